"""Lazy, batched reading of the images a STAR table names as ``N@stack.mrcs``.

Only headers are read up front (to validate sizes, pixel sizes and indices); image data are read
from memory-mapped files one batch at a time, so stacks far larger than RAM can be processed.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from .errors import InputError
from .mrc import read_mrc_header
from .star import MetadataTable


def parse_image_name(name: str) -> tuple[int, str]:
    """``'000012@Extract/job004/a.mrcs'`` -> (11, path): 0-based section and file; no ``@`` -> (0, name)."""
    if "@" in name:
        idx, path = name.split("@", 1)
        try:
            n = int(idx)
        except ValueError:
            raise InputError(None, f"bad image name {name!r}: the part before @ must be a number") from None
        if n < 1:
            raise InputError(None, f"bad image name {name!r}: image numbers start at 1")
        return n - 1, path
    return 0, name


def format_image_name(index0: int, path: str | Path) -> str:
    """RELION's ``NNNNNN@path`` for a 0-based section index."""
    return f"{index0 + 1:06d}@{path}"


class ImageSource:
    """Reads particle images of a table in batches, validating every file once.

    Paths are resolved against ``project_dir`` (RELION's convention: the directory the job runs
    in; default the current directory) and, failing that, against the STAR file's directory.
    """

    def __init__(self, table: MetadataTable, project_dir: str | Path | None = None,
                 label: str = "rlnImageName", check_pixel_size: bool = True, max_open: int = 32) -> None:
        if label not in table.data.columns:
            raise InputError(table.path, f"no {label} column in data_{table.block}")
        self.table = table
        self.max_open = max_open
        names = table.data[label].astype(str)
        parts = names.str.split("@", n=1, expand=True)
        if parts.shape[1] == 1:
            idx = np.zeros(len(names), dtype=np.int64)
            files = parts[0]
        else:
            has_at = parts[1].notna()
            idx_text = parts[0].where(has_at, "1")
            try:
                idx = idx_text.astype(np.int64).to_numpy() - 1
            except ValueError:
                bad = names[~idx_text.str.fullmatch(r"\s*\d+\s*")].iloc[0]
                raise InputError(table.path, f"bad image name {bad!r}: expected NNNNNN@stack.mrcs") from None
            files = parts[1].where(has_at, parts[0])
        self.index = idx
        uniq, inverse = np.unique(files.to_numpy(dtype=str), return_inverse=True)
        self.file_of_row = inverse
        base_dirs = [Path(project_dir) if project_dir else Path.cwd()]
        if table.path is not None:
            base_dirs.append(Path(table.path).parent)
        self.files = [self._resolve(f, base_dirs) for f in uniq]
        self._open: OrderedDict[int, Any] = OrderedDict()
        self.box = 0
        star_px = None
        if check_pixel_size and "rlnImagePixelSize" in table.optics.columns:
            star_px = table.image_pixel_size()
        self.pixel_size = star_px or 0.0
        for k, path in enumerate(self.files):
            self._validate(k, path, star_px)
        if self.pixel_size <= 0:
            raise InputError(table.path, "the pixel size is unknown: neither rlnImagePixelSize in data_optics "
                             "nor the MRC headers give it", "add rlnImagePixelSize to the optics table")
        if "rlnImageSize" in table.optics.columns:
            sizes = {int(v) for v in table.optics["rlnImageSize"]}
            if sizes != {self.box}:
                raise InputError(table.path, f"rlnImageSize {sorted(sizes)} disagrees with the {self.box}-px "
                                 "images in the stacks", "fix the optics table or re-extract")

    @staticmethod
    def _resolve(name: str, bases: list[Path]) -> Path:
        p = Path(name)
        if p.is_absolute():
            return p
        for b in bases:
            if (b / p).exists():
                return b / p
        return bases[0] / p

    def _validate(self, k: int, path: Path, star_px: float | None) -> None:
        h = read_mrc_header(path)
        n, ny, nx = h.shape
        if nx != ny:
            raise InputError(path, f"images are {nx}x{ny}; particles must be square")
        if self.box and nx != self.box:
            raise InputError(path, f"images are {nx} px but other stacks are {self.box} px",
                             "all particles of one job must have one box size: re-extract")
        self.box = nx
        rows = self.index[self.file_of_row == k]
        if rows.size and (rows.max() >= n or rows.min() < 0):
            raise InputError(path, f"image number {int(rows.max()) + 1} is out of range: the stack holds {n}",
                             "the STAR file does not match this stack")
        if star_px and h.pixel_size > 0 and abs(h.pixel_size - star_px) > 0.01 * star_px:
            raise InputError(path, f"pixel size {h.pixel_size:.4f} Å in the MRC header disagrees with "
                             f"rlnImagePixelSize {star_px:.4f} Å in {self.table.path}",
                             "find out which is right and fix the other")
        if not self.pixel_size and h.pixel_size > 0:
            self.pixel_size = h.pixel_size

    def __len__(self) -> int:
        return len(self.index)

    def _data(self, k: int) -> Any:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k].data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(self.files[k], mode="r", permissive=False)
        self._open[k] = mrc
        if len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return mrc.data

    def read(self, rows: Any) -> np.ndarray:
        """Images (B, N, N) float32 for table rows ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.box, self.box), dtype=np.float32)
        files = self.file_of_row[rows]
        for k in np.unique(files):  # one read per stack file, not per particle
            sel = np.nonzero(files == k)[0]
            data = self._data(int(k))
            sections = self.index[rows[sel]]
            block = data[sections] if data.ndim == 3 else data[None]
            out[sel] = block
        if not np.isfinite(out).all():
            bad = rows[~np.isfinite(out).all(axis=(1, 2))]
            names = self.table.data["rlnImageName"].iloc[bad[:3]].tolist()
            raise InputError(self.table.path, f"{bad.size} particle image(s) contain NaN or infinite "
                             f"pixels, e.g. {', '.join(names)}", "remove those particles or re-extract them")
        return out

    def batches(self, batch_size: int, rows: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, images) in batches of at most ``batch_size``."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        for s in range(0, rows.size, batch_size):
            r = rows[s:s + batch_size]
            yield r, self.read(r)

    def close(self) -> None:
        """Release the memory maps."""
        for mrc in self._open.values():
            mrc.close()
        self._open.clear()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_named_images(names: Any, owner: Path, candidates: Any) -> np.ndarray:
    """The images (K, N, N) float32 that ``N@stack`` names point to, each stack read once.

    ``candidates(file)`` lists the paths to try for a named stack, in order (project directory,
    next to ``owner``, renamed copies...); ``owner`` is the STAR file named in errors.
    """
    from .mrc import read_map

    stacks: dict[Path, np.ndarray] = {}
    out = []
    for name in map(str, names):
        k, file = parse_image_name(name)
        tried = list(candidates(file))
        where = next((c for c in tried if c.exists()), None)
        if where is None:
            raise InputError(owner, f"class average stack {file} not found (looked in {', '.join(map(str, tried))})",
                             "run from the project directory or pass the project directory")
        if where not in stacks:
            data = read_map(where)[0]
            stacks[where] = data.reshape(-1, *data.shape[-2:])
        if not 0 <= k < len(stacks[where]):
            raise InputError(owner, f"{name} points past the {len(stacks[where])} images in {where}")
        out.append(stacks[where][k])
    return np.stack(out).astype(np.float32)
