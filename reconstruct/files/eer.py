"""EER movies (Thermo Fisher's Electron Event Representation), read as RELION reads them.

An EER file is a TIFF whose pages are the detector's internal frames, each a run-length code of the
electron events (compression 65000/65001/65002; ``tifffile`` decodes them with ``imagecodecs``).
RELION renders ``--eer_grouping`` consecutive internal frames into one movie frame (a fraction) and
drops the internal frames left over after the last whole fraction; frames are not flipped (unlike
TIFF movies), and a gain reference is used as RELION uses it (:func:`eer_gain`).
``--dose_per_frame`` is then the dose of one fraction.
Only the detector's own 4K grid is rendered (RELION's ``--eer_upsampling 1``, its default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

EER_SUFFIX = ".eer"
EER_CODES = (65000, 65001, 65002)  # TIFF compression codes of EER frames
DEFAULT_GROUPING = 32  # the EER fractionation RELION proposes by default


def _damaged(path: Path, err: Exception) -> InputError:
    return InputError(path, f"not a readable EER file ({type(err).__name__}: {err})",
                      "the file is damaged or incomplete: re-copy it")


def _open(path: Path) -> Any:
    """The file as a ``tifffile.TiffFile``; a damaged file is an InputError."""
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as err:  # tifffile raises many types for damaged files
        raise _damaged(path, err) from None


def _layout(path: Path, tif: Any, grouping: int) -> tuple[list[int], int, int, int]:
    """The EER-coded pages (some files start with an uncompressed integrated image), the number of
    whole fractions of ``grouping`` of them, and the frame size."""
    try:
        pages = [i for i, p in enumerate(tif.pages) if p.compression in EER_CODES]
    except Exception as err:  # the page directories are read lazily: a cut file fails here
        raise _damaged(path, err) from None
    if not pages:
        raise InputError(path, "has no EER-compressed frames", "is this really an EER movie?")
    n = len(pages) // grouping
    if n < 1:
        raise InputError(path, f"has {len(pages)} internal frames, fewer than one fraction of {grouping}",
                         "lower --eer_grouping")
    ny, nx = tif.pages[pages[0]].shape[:2]
    return pages, n, int(ny), int(nx)


def check_grouping(grouping: int, upsampling: int = 1) -> None:
    """Refuse EER options this reader does not support, before any file is opened."""
    if grouping < 1:
        raise InputError(None, f"--eer_grouping must be at least 1, not {grouping}")
    if upsampling != 1:
        raise InputError(None, f"--eer_upsampling {upsampling} is not supported",
                         "use 1 (the detector's 4K grid, RELION's default)")


def eer_shape(path: str | Path, grouping: int = DEFAULT_GROUPING) -> tuple[int, int, int]:
    """(fractions, ny, nx) of an EER movie rendered with ``grouping`` internal frames per fraction."""
    path = Path(path)
    check_grouping(grouping)
    with _open(path) as tif:
        return _layout(path, tif, grouping)[1:]


def read_eer(path: str | Path, fractions: Sequence[int] | None = None, grouping: int = DEFAULT_GROUPING
             ) -> np.ndarray:
    """Fractions (0-based indices, default all) of an EER movie as float32 (n, ny, nx) electron counts:
    each the sum of ``grouping`` consecutive internal frames, decoded one page at a time."""
    path = Path(path)
    check_grouping(grouping)
    with _open(path) as tif:
        pages, n_all, ny, nx = _layout(path, tif, grouping)
        want = list(range(n_all)) if fractions is None else [int(f) for f in fractions]
        bad = [f + 1 for f in want if not 0 <= f < n_all]
        if bad:
            raise InputError(path, f"has {n_all} fractions of {grouping} internal frames; fraction(s) {bad} "
                             "requested", "the movie is truncated, or --last_frame_sum / --eer_grouping is too large")
        out = np.zeros((len(want), ny, nx), dtype=np.float32)
        try:
            for i, f in enumerate(want):  # internal frames one by one: a fraction of 4K pages is 0.5 GB at once
                acc = np.zeros((ny, nx), dtype=np.uint16)
                for k in pages[f * grouping:(f + 1) * grouping]:
                    acc += tif.pages[k].asarray()
                out[i] = acc
        except Exception as err:  # imagecodecs/tifffile errors on a damaged code stream
            raise InputError(path, f"cannot decode the EER frames ({type(err).__name__}: {err})",
                             "the file is damaged or incomplete, or the imagecodecs package is missing "
                             "(pip install imagecodecs)") from None
    return out


def eer_gain(gain: np.ndarray, multiplicative: bool, frame_shape: tuple[int, int] | None = None) -> np.ndarray:
    """An EER gain reference made multiplicative for frames of ``frame_shape``, by RELION's rule.

    Thermo Fisher's ``.gain`` files are multiplicative already; any other EER gain holds relative
    counts, so it becomes mean / gain (zeros stay zero: defects).  A gain of twice the frames' size
    (8K for a 4K rendering) is summed over 2 x 2 blocks first.
    """
    g = np.asarray(gain, dtype=np.float64)
    if frame_shape is not None and g.shape == (2 * frame_shape[0], 2 * frame_shape[1]):
        g = g.reshape(frame_shape[0], 2, frame_shape[1], 2).sum(axis=(1, 3))
    if not multiplicative:
        ok = g != 0
        g = np.where(ok, g.mean() / np.where(ok, g, 1.0), 0.0)
    return g.astype(np.float32)


def encode_eer_frame(events: np.ndarray) -> bytes:
    """Thermo Fisher's EER v1 code (compression 65001) of one internal frame of 0/1 events.

    The stream is read least-significant bit first: a 7-bit skip count n; n = 127 skips 127 pixels
    and carries no electron, otherwise n pixels are skipped and an electron sits on the next one,
    followed by 4 sub-pixel bits (written as zero).  The code ends with an "electron" on the pixel
    just past the frame, which ends decoding.  Used by the simulator and the tests: detectors write
    these files, RELION and we only read them.
    """
    flat = np.asarray(events).ravel()
    if flat.size and flat.max() > 1:
        raise ValueError("an EER frame holds at most one electron per pixel")
    pos = np.concatenate([np.flatnonzero(flat), [flat.size]])
    gaps = np.diff(np.concatenate([[-1], pos])) - 1  # pixels skipped before each electron
    full = gaps // 127  # 127-pixel skips before each electron's own code
    ends = np.cumsum(full + 1) - 1  # where each electron's code falls in the stream of codes
    codes = np.full(int(full.sum()) + len(gaps), 127, dtype=np.int64)
    electron = np.zeros(len(codes), dtype=bool)
    codes[ends] = gaps % 127
    electron[ends] = True
    nbits = np.where(electron, 11, 7)
    bits = (codes[:, None] >> np.arange(11)[None, :]) & 1  # sub-pixel bits (7..10) are zero
    stream = bits[np.arange(11)[None, :] < nbits[:, None]].astype(np.uint8)
    stream = np.concatenate([stream, np.zeros((-len(stream)) % 64, dtype=np.uint8)])  # whole 64-bit words
    return np.packbits(stream, bitorder="little").tobytes()


def write_eer(path: str | Path, events: np.ndarray) -> None:
    """Write internal frames of 0/1 events (n, ny, nx) as an EER file, atomically: a little-endian
    BigTIFF with one EER-v1 strip per page and the acquisition-metadata tag (65001) on the first page,
    the layout detectors write.  For simulated data and tests."""
    import struct

    from .atomic import atomic_path

    events = np.asarray(events)
    n, ny, nx = events.shape
    strips = [encode_eer_frame(f) for f in events]
    meta = (f'<metadata><item name="numberOfFrames">{n}</item><item name="sensorImageWidth">{nx}</item>'
            f'<item name="sensorImageHeight">{ny}</item></metadata>').encode()

    def entry(tag: int, typ: int, count: int, value: int) -> bytes:
        fmt = {3: "<HHQH6x", 4: "<HHQI4x", 16: "<HHQQ"}[typ]
        return struct.pack(fmt, tag, typ, count, value)

    ifd_size = [8 + 20 * (10 if i == 0 else 9) + 8 for i in range(n)]
    ifd_at = np.cumsum([16] + ifd_size[:-1]).tolist()
    meta_at = 16 + sum(ifd_size)
    strip_at = np.cumsum([meta_at + len(meta)] + [len(x) for x in strips[:-1]]).tolist()
    out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, 16))
    for i in range(n):  # one directory per internal frame (a few words each)
        tags = [entry(256, 4, 1, nx), entry(257, 4, 1, ny), entry(258, 3, 1, 8), entry(259, 3, 1, 65001),
                entry(262, 3, 1, 1), entry(273, 16, 1, int(strip_at[i])), entry(277, 3, 1, 1),
                entry(278, 4, 1, ny), entry(279, 16, 1, len(strips[i]))]
        if i == 0:
            tags.append(struct.pack("<HHQQ", 65001, 7, len(meta), meta_at))
        out += struct.pack("<Q", len(tags)) + b"".join(tags)
        out += struct.pack("<Q", int(ifd_at[i + 1]) if i < n - 1 else 0)
    out += meta
    for x in strips:
        out += x
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(bytes(out))
