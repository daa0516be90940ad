"""STAR metadata tables as RELION >= 3.1 writes them: an optics block plus a data block.

Reading and writing go through ``starfile``; this module adds RELION's semantics (optics groups,
legacy pre-3.1 files, required columns) and turns every problem into one :class:`InputError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from .atomic import atomic_path
from .errors import InputError

OPTICS_REQUIRED = ("rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# Per-particle columns that a pre-3.1 file carries and RELION 3.1 moves into the optics table.
_LEGACY_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


def read_star(path: str | Path) -> dict[str, pd.DataFrame]:
    """All blocks of a STAR file keyed by name (without ``data_``), each a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises a variety of parser errors
        raise InputError(path, f"not a readable STAR file ({type(err).__name__}: {err})") from None
    out: dict[str, pd.DataFrame] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            out[name] = block
        else:  # a list block: label -> value
            out[name] = pd.DataFrame([block])
    if not out:
        raise InputError(path, "the file contains no data blocks")
    return out


def write_star(path: str | Path, blocks: Mapping[str, pd.DataFrame | dict]) -> None:
    """Write blocks (DataFrames, or dicts for list blocks) to ``path`` atomically, in order."""
    data: dict[str, Any] = {}
    for name, block in blocks.items():
        data[name] = block
    with atomic_path(path) as tmp:
        starfile.write(data, tmp)


@dataclass
class MetadataTable:
    """One RELION data block (movies, micrographs or particles) with its optics groups."""

    data: pd.DataFrame
    optics: pd.DataFrame
    block: str = "particles"
    path: Path | None = None
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.data)

    def optics_value(self, label: str) -> np.ndarray:
        """The optics-table ``label`` for each row, looked up through ``rlnOpticsGroup``."""
        if label not in self.optics.columns:
            raise InputError(self.path, f"the optics table has no {label} column",
                             "add it to data_optics (every optics group needs a value)")
        lookup = dict(zip(self.optics["rlnOpticsGroup"].astype(int), self.optics[label]))
        return np.asarray([lookup[g] for g in self.data["rlnOpticsGroup"].astype(int)])

    def column(self, label: str, default: float | None = None) -> np.ndarray:
        """A numeric per-row column, from the data block or else from the optics table."""
        if label in self.data.columns:
            return self.data[label].to_numpy(dtype=np.float64)
        if label in self.optics.columns:
            return self.optics_value(label).astype(np.float64)
        if default is not None:
            return np.full(len(self.data), float(default))
        raise InputError(self.path, f"no {label} column in data_{self.block} or data_optics")

    def image_pixel_size(self) -> float:
        """The particles' pixel size (Å); all optics groups must agree for one reconstruction."""
        label = "rlnImagePixelSize" if self.block == "particles" else "rlnMicrographPixelSize"
        sizes = np.unique(np.round(self.column(label), 5))
        if sizes.size != 1:
            raise InputError(self.path, f"optics groups have different {label}: {sizes.tolist()}",
                             "rescale the particles to one pixel size (re-extract) before combining")
        return float(sizes[0])

    def subset(self, mask: np.ndarray) -> MetadataTable:
        """A table with the rows where ``mask`` is true (same optics)."""
        return MetadataTable(self.data[np.asarray(mask)].reset_index(drop=True), self.optics,
                             self.block, self.path, self.extra)

    def to_blocks(self) -> dict[str, pd.DataFrame]:
        """Blocks in RELION's order: optics first, then the data block, then anything else."""
        blocks = {"optics": self.optics, self.block: self.data}
        blocks.update(self.extra)
        return blocks


ParticleTable = MetadataTable


def _legacy_to_optics(df: pd.DataFrame, block: str, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Convert a pre-3.1 table (per-row optics, pixel offsets) to the 3.1 layout.

    Rows with the same voltage, Cs, amplitude contrast and pixel size form one optics group, as
    RELION's own conversion does.
    """
    df = df.copy()
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        df["_pixel"] = df["rlnDetectorPixelSize"].astype(float) * 1e4 / df["rlnMagnification"].astype(float)
        df = df.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
        for axis in ("X", "Y"):
            old = f"rlnOrigin{axis}"
            if old in df.columns:
                df[f"rlnOrigin{axis}Angst"] = df[old].astype(float) * df["_pixel"]
                df = df.drop(columns=old)
    keys = [c for c in (*_LEGACY_OPTICS, "_pixel") if c in df.columns]
    group = df.groupby(keys, sort=False).ngroup().to_numpy() + 1 if keys else np.ones(len(df), int)
    first = df.groupby(group, sort=True).head(1) if keys else df.head(1)
    optics = pd.DataFrame({"rlnOpticsGroup": np.arange(1, len(first) + 1),
                           "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(first) + 1)]})
    for label in keys:
        target = label if label != "_pixel" else (
            "rlnImagePixelSize" if block == "particles" else "rlnMicrographPixelSize")
        optics[target] = first[label].astype(float).to_numpy()
    df = df.drop(columns=keys)
    df["rlnOpticsGroup"] = group
    return df, optics


# Labels whose values are text; every other rln label RELION defines here is numeric.
_TEXT_LABELS = ("Name", "FileName", "Image", "Micrograph", "Movie", "Coordinates", "GroupName", "Metadata",
               "PowerSpectrum", "Symmetry", "Label")


def _check_numeric(df: pd.DataFrame, block: str, path: Path) -> pd.DataFrame:
    """Numeric columns must parse as numbers and be finite; report the first bad cell."""
    for name in df.columns:
        col = df[name]
        if any(t in name for t in _TEXT_LABELS) or not name.startswith("rln"):
            continue
        if not pd.api.types.is_numeric_dtype(col):
            num = pd.to_numeric(col, errors="coerce")
            bad = num.isna() & col.notna()
            if bad.any():
                row = int(np.nonzero(bad.to_numpy())[0][0])
                raise InputError(path, f"data_{block} column {name} row {row + 1} holds {col.iloc[row]!r}, "
                                 "not a number", "fix that value")
            df = df.assign(**{name: num})
            col = df[name]
        vals = col.to_numpy(dtype=float)
        if not np.isfinite(vals).all():
            n_bad = int(np.count_nonzero(~np.isfinite(vals)))
            raise InputError(path, f"data_{block} column {name} has {n_bad} NaN or infinite value(s)",
                             "fix or remove those rows")
    return df


def read_table(path: str | Path, block: str = "particles", required: Iterable[str] = (),
               optics_required: Iterable[str] = ("rlnOpticsGroup",)) -> MetadataTable:
    """Read and validate one RELION data block with its optics groups.

    ``required`` columns must be in the data block, ``optics_required`` in the optics table; every
    row's optics group must exist; numeric columns must be finite.  Pre-3.1 files (no optics block)
    are converted to the 3.1 layout.
    """
    path = Path(path)
    blocks = read_star(path)
    if block not in blocks:
        if len(blocks) == 1 and "" in blocks:
            blocks = {block: blocks[""]}
        else:
            raise InputError(path, f"no data_{block} block (found: {', '.join('data_' + b for b in blocks)})",
                             f"pass a STAR file of {block}")
    df = blocks[block]
    if "optics" in blocks:
        optics = blocks["optics"]
    else:
        df, optics = _legacy_to_optics(df, block, path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"data_{block} is missing column(s) {', '.join(missing)}",
                         "the file must come from a job that writes them (see RELION's conventions)")
    missing = [c for c in optics_required if c not in optics.columns]
    if missing:
        raise InputError(path, f"data_optics is missing column(s) {', '.join(missing)}",
                         "add them for every optics group")
    if "rlnOpticsGroup" not in df.columns:
        if len(optics) != 1:
            raise InputError(path, f"data_{block} has no rlnOpticsGroup column but there are "
                             f"{len(optics)} optics groups", "add rlnOpticsGroup to each row")
        df = df.assign(rlnOpticsGroup=int(optics["rlnOpticsGroup"].iloc[0]))
    known = {int(g) for g in optics["rlnOpticsGroup"]}
    used = {int(g) for g in pd.unique(df["rlnOpticsGroup"])}
    unknown = sorted(used - known)
    if unknown:
        raise InputError(path, f"rows refer to optics group(s) {unknown} that data_optics does not define",
                         f"defined groups are {sorted(known)}")
    df = _check_numeric(df, block, path)
    optics = _check_numeric(optics, "optics", path)
    extra = {k: v for k, v in blocks.items() if k not in (block, "optics")}
    return MetadataTable(df.reset_index(drop=True), optics.reset_index(drop=True), block, path, extra)


def read_particles(path: str | Path, required: Iterable[str] = ("rlnImageName",),
                   optics_required: Iterable[str] = ("rlnOpticsGroup",)) -> MetadataTable:
    """Read a particles STAR file (``data_optics`` + ``data_particles``), validated."""
    return read_table(path, "particles", required, optics_required)


def write_particles(path: str | Path, table: MetadataTable) -> None:
    """Write a table (optics first) atomically."""
    write_star(path, table.to_blocks())


def make_optics(pixel_size: float, box: int | None = None, voltage: float = 300.0, cs: float = 2.7,
                amplitude_contrast: float = 0.1, group: int = 1, original_pixel_size: float | None = None,
                ctf_premultiplied: bool = False) -> pd.DataFrame:
    """A one-row optics table as RELION's extraction writes it."""
    row: dict[str, Any] = {
        "rlnOpticsGroupName": f"opticsGroup{group}",
        "rlnOpticsGroup": group,
        "rlnMicrographOriginalPixelSize": original_pixel_size or pixel_size,
        "rlnVoltage": voltage,
        "rlnSphericalAberration": cs,
        "rlnAmplitudeContrast": amplitude_contrast,
    }
    if box is not None:
        row.update({"rlnImagePixelSize": pixel_size, "rlnImageSize": box, "rlnImageDimensionality": 2,
                    "rlnCtfDataAreCtfPremultiplied": int(ctf_premultiplied)})
    else:
        row["rlnMicrographPixelSize"] = pixel_size
    return pd.DataFrame([row])
