"""RELION's Select job "on value" (``relion_star_handler --select``): keep the rows of a micrographs or
particles STAR file whose numeric label lies in [minval, maxval], both ends included, and write
``micrographs.star`` or ``particles.star`` in the job directory with the optics table unchanged."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .files.errors import InputError
from .files.star import MetadataTable, read_star, write_star

log = logging.getLogger("reconstruct")
_BLOCKS = ("particles", "micrographs", "movies")


@dataclass
class SelectResult:
    """Where the selection went and how many rows it kept."""

    star: Path
    kept: int
    total: int


def read_relion_table(path: str | Path, block: str, required: tuple[str, ...] = (),
                      optics_required: tuple[str, ...] = ("rlnOpticsGroup",)) -> MetadataTable:
    """One RELION data block with its optics table, checked: required columns present, every row's
    optics group defined, numeric columns finite.  Text columns stay text whatever their label
    (``files.star.read_table`` takes rlnCtfPowerSpectrum for a number and refuses RELION 4's
    motion-corrected micrograph files)."""
    path = Path(path)
    blocks = read_star(path)
    if block not in blocks:
        raise InputError(path, f"no data_{block} block (found: {', '.join('data_' + b for b in blocks)})",
                         f"pass a STAR file of {block}")
    df = blocks[block].reset_index(drop=True)
    if "optics" not in blocks:
        raise InputError(path, "no data_optics block", "RELION >= 3.1 files have one; re-run the job that made it")
    optics = blocks["optics"].reset_index(drop=True)
    for where, frame, labels in (("data_" + block, df, required), ("data_optics", optics, optics_required)):
        missing = [c for c in labels if c not in frame.columns]
        if missing:
            raise InputError(path, f"{where} is missing column(s) {', '.join(missing)}",
                             "the file must come from a job that writes them")
    if "rlnOpticsGroup" not in df.columns:
        if len(optics) != 1:
            raise InputError(path, f"data_{block} has no rlnOpticsGroup column but there are {len(optics)} "
                             "optics groups", "add rlnOpticsGroup to each row")
        df["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    unknown = sorted({int(g) for g in df["rlnOpticsGroup"]} - {int(g) for g in optics["rlnOpticsGroup"]})
    if unknown:
        raise InputError(path, f"rows refer to optics group(s) {unknown} that data_optics does not define")
    for name, frame in ((block, df), ("optics", optics)):
        for col in frame.columns:
            if pd.api.types.is_numeric_dtype(frame[col]) and not np.isfinite(frame[col].to_numpy(float)).all():
                raise InputError(path, f"data_{name} column {col} has NaN or infinite values",
                                 "fix or remove those rows")
    return MetadataTable(df, optics, block, path, {k: v for k, v in blocks.items() if k not in (block, "optics")})


def _data_block(path: Path) -> str:
    blocks = read_star(path)
    for name in _BLOCKS:
        if name in blocks:
            return name
    others = [b for b in blocks if b != "optics"]
    if len(others) == 1:
        return others[0] or "particles"
    raise InputError(path, f"cannot tell which block to select from ({', '.join('data_' + b for b in blocks)})",
                     "pass a RELION particles, micrographs or movies STAR file")


def run_select(star: str | Path, out_dir: str | Path, label: str, minval: float = -9999.0,
               maxval: float = 9999.0) -> SelectResult:
    """Write ``out_dir/<block>.star`` with the rows whose ``label`` is within [minval, maxval]."""
    star, out_dir = Path(star), Path(out_dir)
    if minval > maxval:
        raise ValueError(f"--minval ({minval}) is larger than --maxval ({maxval})")
    block = _data_block(star)
    table = read_relion_table(star, block)
    if label not in table.data.columns:
        numeric = [c for c in table.data.columns if pd.api.types.is_numeric_dtype(table.data[c])]
        raise InputError(star, f"data_{block} has no column {label}",
                         f"choose one of its numeric labels: {', '.join(numeric) or 'none'}")
    values = table.data[label]
    if not pd.api.types.is_numeric_dtype(values):
        raise InputError(star, f"{label} is not numeric", "selection on value needs a numeric label")
    vals = values.to_numpy(dtype=np.float64)
    keep = (vals >= minval) & (vals <= maxval)
    chosen = table.subset(keep)
    out = out_dir / f"{block}.star"
    write_star(out, chosen.to_blocks())
    log.info("select: kept %d of %d %s with %g <= %s <= %g in %s", int(keep.sum()), len(vals), block,
             minval, label, maxval, out)
    return SelectResult(out, int(keep.sum()), len(vals))


def _cmd(a: argparse.Namespace) -> None:
    res = run_select(a.i, a.o, a.select, a.minval, a.maxval)
    print(f"kept {res.kept} of {res.total} rows ({a.minval:g} <= {a.select} <= {a.maxval:g}) in {res.star}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``select`` subcommand to a ``reconstruct`` subparser set."""
    s = sub.add_parser(
        "select", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="keep the rows of a STAR file whose value lies in a range (RELION's Select job on value)",
        description="Keep the micrographs or particles whose numeric label lies in [minval, maxval] (both "
                    "included) and write micrographs.star or particles.star in the output job directory, "
                    "with the optics table unchanged, as RELION's Select job does.")
    s.add_argument("--i", required=True, help="input STAR file (micrographs or particles)")
    s.add_argument("--o", required=True, help="output job directory, e.g. Select/job004")
    s.add_argument("--select", required=True, help="numeric label to select on, e.g. rlnCtfMaxResolution")
    s.add_argument("--minval", type=float, default=-9999.0, help="lowest value kept")
    s.add_argument("--maxval", type=float, default=9999.0, help="highest value kept")
    s.set_defaults(func=_cmd)
