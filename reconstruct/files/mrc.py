"""MRC maps and image stacks in and out, as RELION reads and writes them (via ``mrcfile``).

Reads modes 0, 1, 2, 6 and 12 (float16); writes mode 2 (float32) or, on request, mode 12.  Every
failure to read becomes an :class:`InputError` naming the file; writes are atomic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from .atomic import atomic_path
from .errors import InputError

READABLE_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


@dataclass(frozen=True)
class MrcHeader:
    """The facts about an MRC file that callers need before reading its data."""

    shape: tuple[int, int, int]  # (sections, ny, nx)
    mode: int
    pixel_size: float  # Å; 0.0 when the header does not say
    is_volume: bool


def _open(path: str | Path, mmap: bool) -> Any:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path; STAR paths are relative to the project directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RELION writes nversion 0, which mrcfile warns about
            if mmap:
                return mrcfile.mmap(path, mode="r", permissive=False)
            return mrcfile.open(path, mode="r", permissive=False)
    except ValueError as err:
        text = str(err)
        if "mode" in text.lower():
            raise InputError(path, f"unsupported MRC data mode ({text})",
                             "supported modes are 0, 1, 2, 6 and 12 (float16)") from None
        if "bytes" in text.lower() or "size" in text.lower():
            raise InputError(path, f"truncated or corrupt MRC file ({text})",
                             "the file is shorter than its header says: re-copy or regenerate it") from None
        raise InputError(path, f"not a valid MRC file ({text})", "") from None
    except OSError as err:
        raise InputError(path, f"cannot read the file ({err.strerror or err})", "") from None


def _pixel_size(mrc: Any) -> float:
    vs = mrc.voxel_size
    return float(vs.x) if np.isfinite(vs.x) else 0.0


def read_mrc_header(path: str | Path) -> MrcHeader:
    """Shape, mode, pixel size and kind of an MRC file, validating it without reading the data."""
    with _open(path, mmap=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        return MrcHeader(shape, int(h.mode), _pixel_size(mrc), bool(mrc.is_volume()))


def read_map(path: str | Path, check_finite: bool = True) -> tuple[np.ndarray, float]:
    """A map, image or whole stack as float32 [z|n, y, x] (or [y, x]) and its pixel size in Å."""
    with _open(path, mmap=False) as mrc:
        data = np.array(mrc.data, dtype=np.float32)
        px = _pixel_size(mrc)
    if check_finite and not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(path, f"{bad} voxel(s) are NaN or infinite",
                         "the file is damaged or was written by a failed job: regenerate it")
    return data, px


def _write(path: str | Path, data: np.ndarray, pixel_size: float, float16: bool, stack: bool) -> None:
    dtype = np.float16 if float16 else np.float32
    arr = np.ascontiguousarray(np.asarray(data), dtype=dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"refusing to write {path}: the data contain NaN or infinite values")
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.new(tmp, overwrite=True) as mrc:
                mrc.set_data(arr)
                if stack and arr.ndim == 3:
                    mrc.set_image_stack()
                elif arr.ndim == 3:
                    mrc.set_volume()
                mrc.voxel_size = float(pixel_size)
                mrc.update_header_stats()
                mrc.header.label[0] = b"cryoem-autoproc (RELION-compatible)"
                mrc.header.nlabl = 1


def write_map(path: str | Path, data: Any, pixel_size: float, float16: bool = False) -> None:
    """Write a 2D image or 3D volume (mode 2, or 12 with ``float16``) atomically."""
    _write(path, data, pixel_size, float16, stack=False)


def write_stack(path: str | Path, images: Any, pixel_size: float, float16: bool = False) -> None:
    """Write an image stack (.mrcs; section n holds STAR image n+1) atomically."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    _write(path, images, pixel_size, float16, stack=True)


class StackAppender:
    """Writes a large stack in batches without holding it in memory, then renames it into place.

    The header is written first for the final size; batches are copied into the memory-mapped data.
    """

    def __init__(self, path: str | Path, n: int, box: int, pixel_size: float, float16: bool = False):
        self.path = Path(path)
        self.n, self.box = n, box
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        dtype = np.float16 if float16 else np.float32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._mrc = mrcfile.new_mmap(self._tmp, shape=(n, box, box), mrc_mode=12 if float16 else 2,
                                         overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = float(pixel_size)
        self._dtype = dtype
        self._done = 0

    def write(self, start: int, images: np.ndarray) -> None:
        """Put ``images`` (B, box, box) at sections start..start+B-1."""
        self._mrc.data[start:start + len(images)] = np.asarray(images, dtype=self._dtype)
        self._done += len(images)

    def close(self) -> None:
        """Finish the header and move the file into place."""
        self._mrc.update_header_stats()
        self._mrc.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Discard the partial file."""
        self._mrc.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def interleave_complex(z: np.ndarray) -> np.ndarray:
    """Complex (..., W) as float32 (..., 2W), real and imaginary parts interleaved along x: RELION's
    layout of complex arrays (VDAM moments) in MRC files."""
    return np.ascontiguousarray(z.astype(np.complex64)).view(np.float32)


def deinterleave_complex(a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`interleave_complex`."""
    return np.ascontiguousarray(a.astype(np.float32)).view(np.complex64)
