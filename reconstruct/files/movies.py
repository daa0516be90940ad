"""Movie frames in, as RELION reads them: MRC/MRCS stacks (modes 0, 1, 2, 6, 12), TIFF stacks and EER.

TIFF movies (one page per frame, any compression ``tifffile`` or Pillow can decode, LZW included) are
flipped along Y on reading, as RELION does whatever the TIFF orientation tag says, so a gain
reference made for RELION matches.  EER movies are rendered in fractions of ``eer_grouping``
internal frames, unflipped (:mod:`.eer`).  Every failure becomes an :class:`InputError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from .eer import DEFAULT_GROUPING, EER_SUFFIX, eer_shape, read_eer
from .errors import InputError
from .mrc import read_mrc_header

TIFF_SUFFIXES = (".tif", ".tiff")
MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".map")


@dataclass(frozen=True)
class MovieHeader:
    """Frame count, frame size and pixel size of a movie, known before its frames are read."""

    n_frames: int
    ny: int
    nx: int
    pixel_size: float  # Å; 0.0 when the file does not say


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix == EER_SUFFIX:
        return "eer"
    if suffix in MRC_SUFFIXES:
        return "mrc"
    raise InputError(path, f"unknown movie format '{suffix}'", "movies must be .mrc, .mrcs, .tif, .tiff or .eer")


def is_eer(path: str | Path) -> bool:
    """Whether ``path`` names an EER movie (by its extension, as RELION decides)."""
    return Path(path).suffix.lower() == EER_SUFFIX


def read_movie_header(path: str | Path, eer_grouping: int = DEFAULT_GROUPING) -> MovieHeader:
    """Shape and pixel size of a movie without reading its frames (validates the file).  An EER
    movie's frames are its fractions of ``eer_grouping`` internal frames."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path; STAR paths are relative to the project directory")
    kind = _kind(path)
    if kind == "mrc":
        h = read_mrc_header(path)
        return MovieHeader(h.shape[0], h.shape[1], h.shape[2], h.pixel_size)
    if kind == "eer":
        n, ny, nx = eer_shape(path, eer_grouping)
        return MovieHeader(n, ny, nx, 0.0)
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = tif.pages
            first = pages[0]
            return MovieHeader(len(pages), int(first.shape[0]), int(first.shape[1]), 0.0)
    except Exception as err:  # tifffile raises TiffFileError, ValueError, struct errors...
        raise InputError(path, f"not a readable TIFF file ({type(err).__name__}: {err})",
                         "the file is damaged or incomplete: re-copy it") from None


def _read_mrc(path: Path, frames: Sequence[int] | None) -> tuple[np.ndarray, float]:
    read_mrc_header(path)  # validation with clear errors (truncated, bad mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
            data = mrc.data
            if data.ndim == 2:
                data = data[None]
            idx = None if frames is None else np.asarray(frames, dtype=int)
            if idx is not None and len(idx) and (np.diff(idx) == 1).all():
                idx = slice(int(idx[0]), int(idx[-1]) + 1)  # a run of frames: converted straight from the map
            sel = np.array(data if idx is None else data[idx], dtype=np.float32)  # a copy: the map closes
            vs = mrc.voxel_size
            px = float(vs.x) if np.isfinite(vs.x) else 0.0
    return sel, px


def _read_tiff_pillow(path: Path, frames: Sequence[int] | None) -> np.ndarray:
    """TIFF pages through Pillow (libtiff), for compressions tifffile cannot decode without imagecodecs."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        pages = [np.asarray(p, dtype=np.float32) for p in ImageSequence.Iterator(im)]
    stack = np.stack(pages)
    return stack if frames is None else stack[np.asarray(frames)]


def _read_tiff(path: Path, frames: Sequence[int] | None) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            n = len(tif.pages)
            key = list(range(n)) if frames is None else [int(f) for f in frames]
            try:
                data = tif.asarray(key=key)
            except (ValueError, KeyError) as err:
                if "imagecodecs" not in str(err):
                    raise
                data = _read_tiff_pillow(path, key)
    except InputError:
        raise
    except Exception as err:
        raise InputError(path, f"cannot decode the TIFF frames ({type(err).__name__}: {err})",
                         "the file is damaged or incomplete: re-copy it") from None
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    return np.ascontiguousarray(data[:, ::-1, :])  # RELION flips TIFF along Y


def read_movie(path: str | Path, frames: Sequence[int] | None = None, eer_grouping: int = DEFAULT_GROUPING
               ) -> tuple[np.ndarray, float]:
    """Frames (0-based indices ``frames``, default all) as float32 [n, y, x] and the pixel size (Å; 0 if
    the file does not say).  Non-finite pixels are kept: motion correction treats them as defects.
    An EER movie's frames are its fractions of ``eer_grouping`` internal frames."""
    path = Path(path)
    head = read_movie_header(path, eer_grouping)
    if frames is not None:
        bad = [f for f in frames if not 0 <= int(f) < head.n_frames]
        if bad:
            raise InputError(path, f"has {head.n_frames} frames; frame(s) {[b + 1 for b in bad]} requested",
                             "the movie is truncated or --last_frame_sum is too large")
    kind = _kind(path)
    if kind == "mrc":
        return _read_mrc(path, frames)
    if kind == "eer":
        return read_eer(path, frames, eer_grouping), head.pixel_size
    return _read_tiff(path, frames), head.pixel_size


def read_gain(path: str | Path) -> np.ndarray:
    """A gain reference (MRC, or TIFF -- Thermo Fisher's ``.gain`` files are TIFF -- flipped along Y as
    RELION reads it) as float32 [y, x]."""
    path = Path(path)
    if path.suffix.lower() == ".gain":
        if not path.exists():
            raise InputError(path, "file not found", "check the path of the gain reference")
        data = _read_tiff(path, [0])
    else:
        data, _ = read_movie(path)
    if data.shape[0] != 1:
        raise InputError(path, f"holds {data.shape[0]} sections; a gain reference is one image",
                         "pass a single 2D gain image")
    return data[0]


def write_tiff_movie(path: str | Path, frames: np.ndarray, compression: str | None = None) -> None:
    """Write frames as a multi-page TIFF the way RELION reads it back (flipped along Y), atomically.

    ``compression`` is a tifffile codec name ('zlib', 'lzw', ...) or None.  LZW needs either the
    ``imagecodecs`` package or Pillow; without imagecodecs Pillow's libtiff writer is used.
    """
    import tifffile

    from .atomic import atomic_path

    data = np.ascontiguousarray(np.asarray(frames)[:, ::-1, :])
    with atomic_path(path) as tmp:
        try:
            tifffile.imwrite(tmp, data, compression=compression, photometric="minisblack")
        except (KeyError, ValueError) as err:
            if compression != "lzw" or "imagecodecs" not in str(err):
                raise
            from PIL import Image

            pages = [Image.fromarray(p) for p in data]
            pages[0].save(tmp, format="TIFF", save_all=True, append_images=pages[1:], compression="tiff_lzw")
