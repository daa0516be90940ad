"""Movie frames in, as RELION reads them: MRC/MRCS stacks (modes 0, 1, 2, 6, 12) and TIFF stacks.

TIFF movies (one page per frame, any compression ``tifffile`` or Pillow can decode, LZW included) are
flipped along Y on reading, as RELION does whatever the TIFF orientation tag says, so a gain
reference made for RELION matches.  EER is not supported: convert EER movies to TIFF first
(``relion_convert_to_tiff``).  Every failure becomes an :class:`InputError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

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
    if suffix == ".eer":
        raise InputError(path, "EER movies are not supported",
                         "convert them to TIFF first (e.g. relion_convert_to_tiff) and import those")
    if suffix in MRC_SUFFIXES:
        return "mrc"
    raise InputError(path, f"unknown movie format '{suffix}'", "movies must be .mrc, .mrcs, .tif or .tiff")


def read_movie_header(path: str | Path) -> MovieHeader:
    """Shape and pixel size of a movie without reading its frames (validates the file)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path; STAR paths are relative to the project directory")
    if _kind(path) == "mrc":
        h = read_mrc_header(path)
        return MovieHeader(h.shape[0], h.shape[1], h.shape[2], h.pixel_size)
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


def read_movie(path: str | Path, frames: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Frames (0-based indices ``frames``, default all) as float32 [n, y, x] and the pixel size (Å; 0 if
    the file does not say).  Non-finite pixels are kept: motion correction treats them as defects."""
    path = Path(path)
    head = read_movie_header(path)
    if frames is not None:
        bad = [f for f in frames if not 0 <= int(f) < head.n_frames]
        if bad:
            raise InputError(path, f"has {head.n_frames} frames; frame(s) {[b + 1 for b in bad]} requested",
                             "the movie is truncated or --last_frame_sum is too large")
    if _kind(path) == "mrc":
        return _read_mrc(path, frames)
    return _read_tiff(path, frames), head.pixel_size


def read_gain(path: str | Path) -> np.ndarray:
    """A gain reference (MRC, or TIFF flipped along Y as RELION reads it) as float32 [y, x]."""
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
