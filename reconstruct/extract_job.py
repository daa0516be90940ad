"""The Extract job (``reconstruct extract``, as ``relion_preprocess --extract``).

For every micrograph of a micrographs STAR file with a coordinate file listed in ``--coord_list``
(an AutoPick job's ``autopick.star``), cut boxes around the picks, optionally down-scale, normalise and
invert them (:mod:`reconstruct.extraction`, batched) and write what RELION 4 writes:
``<part_dir>/<path>.mrcs`` and ``<path>_extract.star`` per micrograph, ``particles.star``
(optics with rlnImagePixelSize/rlnImageSize/rlnImageDimensionality, particles with the micrograph's
CTF) and ``extractpick.star``.  The particle count in ``particles.star`` always equals the images
in the stacks it names.  Paths are relative to the project directory (the current directory).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .autopick_job import output_root, read_micrographs
from .backend import get_xp, to_numpy
from .cli_options import add_gpu_flag
from .extraction import extract_particles, inside_micrograph, integer_centres
from .files.atomic import atomic_write_text
from .files.errors import InputError
from .files.mrc import StackAppender, read_map, read_mrc_header
from .files.stack import format_image_name
from .files.star import read_star, write_star
from .memory import available_bytes
from .progress import progress

log = logging.getLogger("reconstruct")
# Per-micrograph CTF values copied to each particle, with RELION's defaults when the micrograph lacks them.
CTF_LABELS = {"rlnDefocusU": None, "rlnDefocusV": None, "rlnDefocusAngle": None, "rlnCtfBfactor": 0.0,
              "rlnCtfScalefactor": 1.0, "rlnPhaseShift": 0.0, "rlnCtfMaxResolution": None,
              "rlnCtfFigureOfMerit": None}


@dataclass
class ExtractOptions:
    """Options of ``reconstruct extract`` (RELION's ``relion_preprocess`` names)."""

    i: Path  # --i: micrographs STAR file (with CTF columns, e.g. micrographs_ctf.star)
    coord_list: Path  # --coord_list: STAR file listing coordinate files (autopick.star)
    part_dir: Path  # --part_dir: the job directory, e.g. Extract/job006
    extract_size: int  # --extract_size (px, even)
    scale: int = -1  # --scale: down-scaled box (px); -1 keeps extract_size
    norm: bool = False  # --norm
    bg_radius: int = -1  # --bg_radius (px of the final box); -1: 75% of half the final box
    no_ramp: bool = False  # --no_ramp: subtract the background mean only
    invert_contrast: bool = False  # --invert_contrast
    float16: bool = False  # --float16: write mode 12
    minimum_pick_fom: float = -999.0  # --minimum_pick_fom: keep picks with a larger FOM; -999 is off
    only_do_unfinished: bool = False  # --only_do_unfinished
    part_star: Path | None = None  # --part_star; default <part_dir>/particles.star
    pick_star: Path | None = None  # --pick_star; default <part_dir>/extractpick.star
    gpu: bool | None = False  # --gpu

    def final_box(self) -> int:
        """The box size of the written images."""
        return self.scale if self.scale > 0 else self.extract_size


def _check(opts: ExtractOptions) -> ExtractOptions:
    if opts.extract_size <= 0 or opts.extract_size % 2:
        raise ValueError(f"--extract_size must be a positive even number of pixels (got {opts.extract_size})")
    if opts.scale > 0 and opts.scale % 2:
        log.warning("only even box sizes are allowed: setting --scale to %d", opts.scale + 1)
        opts.scale += 1
    if opts.scale > opts.extract_size:
        raise ValueError(f"--scale {opts.scale} is larger than --extract_size {opts.extract_size}: "
                         "particles can only be down-scaled")
    if opts.norm and opts.bg_radius > 0 and 2 * opts.bg_radius > opts.final_box():
        raise ValueError(f"--bg_radius {opts.bg_radius} px does not fit in the {opts.final_box()}-px box")
    return opts


def _coordinate_files(path: Path) -> dict[str, str]:
    blocks = read_star(path)
    table = blocks.get("coordinate_files", next(iter(blocks.values())))
    for label in ("rlnMicrographName", "rlnMicrographCoordinates"):
        if label not in table.columns:
            raise InputError(path, f"no {label} column in data_coordinate_files",
                             "pass the autopick.star of an AutoPick job (--coord_list)")
    return dict(zip(table["rlnMicrographName"].astype(str), table["rlnMicrographCoordinates"].astype(str)))


def _read_coordinates(path: Path) -> pd.DataFrame:
    df = next(iter(read_star(path).values()))
    for label in ("rlnCoordinateX", "rlnCoordinateY"):
        if len(df) and label not in df.columns:
            raise InputError(path, f"no {label} column", "coordinate files need rlnCoordinateX and rlnCoordinateY")
    return df.reset_index(drop=True)


def _is_done(star: Path, stack: Path) -> bool:
    """A micrograph is done when its _extract.star and stack exist and agree on the particle count."""
    if not (star.exists() and stack.exists()):
        return False
    try:
        n = len(next(iter(read_star(star).values())))
        return read_mrc_header(stack).shape[0] == n
    except InputError:
        return False


def _batch_size(box: int, xp: Any) -> int:
    per = box * box * 48  # cut boxes, transforms and the float64 normalisation temporaries
    return int(np.clip(0.1 * available_bytes(xp) // per, 16, 4096))


def _extract_one(opts: ExtractOptions, name: str, coords: pd.DataFrame, mic_row: pd.Series, star: Path, stack: Path,
                 out_px: float, xp: Any) -> int:
    """Extract one micrograph's particles; returns how many were written (0: nothing written)."""
    mic, header_px = read_map(Path(name))
    star_px = out_px * opts.final_box() / opts.extract_size
    if header_px > 0 and abs(header_px - star_px) > 0.01 * star_px:
        log.warning("%s: the MRC header says %.4f Å/px but the STAR file %.4f Å/px; using the STAR file's",
                    name, header_px, star_px)
    if mic.ndim == 3:
        if mic.shape[0] != 1:
            raise InputError(name, f"holds {mic.shape[0]} sections, not one micrograph",
                             "extract from motion-corrected micrographs")
        mic = mic[0]
    xi, yi = integer_centres(coords["rlnCoordinateX"].to_numpy(float), coords["rlnCoordinateY"].to_numpy(float))
    keep = inside_micrograph(xi, yi, opts.extract_size, mic.shape)
    if not keep.all():
        log.warning("%s: %d pick(s) lie completely outside the micrograph and are left out", name,
                    int((~keep).sum()))
    coords, xi, yi = coords[keep].reset_index(drop=True), xi[keep], yi[keep]
    n = len(coords)
    if n == 0:
        return 0
    box = opts.final_box()
    mic_x = xp.asarray(mic)
    writer = StackAppender(stack, n, box, out_px, float16=opts.float16)
    flat = 0
    try:
        step = _batch_size(opts.extract_size, xp)
        for s in range(0, n, step):
            imgs, ok = extract_particles(mic_x, xp.asarray(xi[s:s + step]), xp.asarray(yi[s:s + step]),
                                         opts.extract_size, opts.scale, opts.norm, opts.bg_radius, not opts.no_ramp,
                                         opts.invert_contrast)
            flat += int((~to_numpy(ok)).sum())
            writer.write(s, to_numpy(imgs))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if flat:
        log.warning("%s: %d particle(s) have a flat background and were not normalised", name, flat)
    rows = coords.copy()
    rows["rlnImageName"] = [format_image_name(k, stack) for k in range(n)]
    rows["rlnMicrographName"] = name
    rows["rlnOpticsGroup"] = int(mic_row.get("rlnOpticsGroup", 1))
    for label, default in CTF_LABELS.items():
        if label in mic_row.index:
            rows[label] = float(mic_row[label])
        elif default is not None and "rlnDefocusU" in mic_row.index:
            rows[label] = default
    write_star(star, {"images": rows})
    return n


def _optics(optics: pd.DataFrame, opts: ExtractOptions) -> pd.DataFrame:
    """Micrograph optics turned into particle optics, as RELION's extraction writes them."""
    out = optics.copy()
    out["rlnImagePixelSize"] = out["rlnMicrographPixelSize"].astype(float) * opts.extract_size / opts.final_box()
    out["rlnImageSize"] = opts.final_box()
    out["rlnImageDimensionality"] = 2
    return out.drop(columns=["rlnMicrographPixelSize"])


def run_extract(opts: ExtractOptions) -> Path:
    """Extract all particles of ``opts.coord_list`` from the micrographs of ``opts.i``; returns particles.star."""
    opts = _check(opts)
    table = read_micrographs(opts.i)
    if "rlnMicrographPixelSize" not in table.optics.columns:
        raise InputError(opts.i, "data_optics has no rlnMicrographPixelSize", "extract from a RELION >= 3.1 STAR file")
    coord_files = _coordinate_files(opts.coord_list)
    xp = get_xp(opts.gpu)
    part_dir = Path(opts.part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    names = table.data["rlnMicrographName"].astype(str).tolist()
    pixel = table.column("rlnMicrographPixelSize")
    roots = [output_root(n, part_dir) for n in names]
    stacks = [Path(r + ".mrcs") for r in roots]
    stars = [Path(r + "_extract.star") for r in roots]
    todo = [k for k in range(len(names)) if not (opts.only_do_unfinished and _is_done(stars[k], stacks[k]))]
    if len(todo) < len(names):
        log.info("%d of %d micrographs already extracted: doing the other %d", len(names) - len(todo), len(names),
                 len(todo))
    skipped: list[str] = []
    for k in progress(todo, len(todo), "extracting", "micrograph"):
        name = names[k]
        coord = coord_files.get(name)
        if coord is None or not Path(coord).exists():
            log.info("no coordinate file for %s: skipped", name)
            continue
        try:
            coords = _read_coordinates(Path(coord))
            if opts.minimum_pick_fom != -999.0 and len(coords):
                if "rlnAutopickFigureOfMerit" not in coords.columns:
                    raise InputError(coord, "no rlnAutopickFigureOfMerit column to apply --minimum_pick_fom to",
                                     "remove --minimum_pick_fom or pick with a method that writes FOMs")
                coords = coords[coords["rlnAutopickFigureOfMerit"] > opts.minimum_pick_fom].reset_index(drop=True)
            if len(coords) == 0:
                log.warning("no particles on micrograph %s", name)
                stars[k].unlink(missing_ok=True)
                continue
            out_px = float(pixel[k]) * opts.extract_size / opts.final_box()
            n = _extract_one(opts, name, coords, table.data.iloc[k], stars[k], stacks[k], out_px, xp)
            if n == 0:
                log.warning("no particles inside micrograph %s", name)
        except InputError as err:
            log.warning("skipping micrograph %s: %s", name, err)
            skipped.append(f"{name}\t{err}")
    out = _join(opts, table, names, stars, stacks)
    if skipped:
        atomic_write_text(part_dir / "skipped_micrographs.txt", "\n".join(skipped) + "\n")
        log.warning("skipped %d micrograph(s), listed in %s: %s", len(skipped), part_dir / "skipped_micrographs.txt",
                    ", ".join(s.split("\t")[0] for s in skipped))
    return out


def _join(opts: ExtractOptions, table: Any, names: list[str], stars: list[Path], stacks: list[Path]) -> Path:
    """particles.star (and extractpick.star) from every micrograph whose stack and STAR agree."""
    parts, picks = [], []
    n_images = 0
    for name, star, stack in zip(names, stars, stacks):
        if not star.exists():
            continue
        df = next(iter(read_star(star).values()))
        n_stack = read_mrc_header(stack).shape[0] if stack.exists() else -1
        if n_stack != len(df):
            log.error("%s lists %d particles but %s holds %d images: left out of particles.star (re-run to redo it)",
                      star, len(df), stack, max(n_stack, 0))
            continue
        parts.append(df)
        picks.append({"rlnMicrographName": name, "rlnMicrographCoordinates": str(star)})
        n_images += n_stack
    data = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["rlnImageName"])
    for col in data.columns:  # RELION fills labels missing from some micrographs with 0 or ""
        if data[col].isna().any():
            data[col] = data[col].fillna("" if data[col].dtype == object else 0)
    if len(data) != n_images:
        raise RuntimeError(f"internal error: {len(data)} particle rows but {n_images} images")
    out = Path(opts.part_star) if opts.part_star else Path(opts.part_dir) / "particles.star"
    write_star(out, {"optics": _optics(table.optics, opts), "particles": data})
    pick_star = Path(opts.pick_star) if opts.pick_star else Path(opts.part_dir) / "extractpick.star"
    write_star(pick_star, {"coordinate_files": pd.DataFrame(picks, columns=["rlnMicrographName",
                                                                            "rlnMicrographCoordinates"])})
    px = table.optics["rlnMicrographPixelSize"].astype(float) * opts.extract_size / opts.final_box()
    log.info("wrote %d particles from %d micrographs to %s (%d px, %s Å/px)", len(data), len(parts), out,
             opts.final_box(), ", ".join(f"{p:.4g}" for p in px))
    return out


def _cmd(a: argparse.Namespace) -> None:
    out = run_extract(ExtractOptions(
        i=Path(a.i), coord_list=Path(a.coord_list), part_dir=Path(a.part_dir), extract_size=a.extract_size,
        scale=a.scale, norm=a.norm, bg_radius=a.bg_radius, no_ramp=a.no_ramp, invert_contrast=a.invert_contrast,
        float16=a.float16, minimum_pick_fom=a.minimum_pick_fom, only_do_unfinished=a.only_do_unfinished,
        part_star=Path(a.part_star) if a.part_star else None, pick_star=Path(a.pick_star) if a.pick_star else None,
        gpu=a.gpu))
    print(f"particles in {out}")


def register(sub: Any) -> None:
    """Add the ``extract`` subcommand to a ``reconstruct`` sub-parser collection."""
    s = sub.add_parser("extract", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="extract particles around picked coordinates (like relion_preprocess --extract)",
                       description="Cut boxes around the picks of an AutoPick job from the micrographs, optionally "
                                   "down-scale, normalise and invert them; writes RELION 4 Extract outputs "
                                   "(<part_dir>/particles.star, one .mrcs and _extract.star per micrograph).")
    s.add_argument("--i", required=True, help="micrographs STAR file with CTF columns (e.g. micrographs_ctf.star)")
    s.add_argument("--coord_list", required=True, help="STAR file listing the coordinate files (autopick.star)")
    s.add_argument("--part_dir", required=True, help="output job directory, e.g. Extract/job006")
    s.add_argument("--extract_size", type=int, required=True, help="box size to extract (px, even)")
    s.add_argument("--scale", type=int, default=-1, help="down-scale the boxes to this size (px); -1: no scaling")
    s.add_argument("--norm", action="store_true",
                   help="normalise the background (outside --bg_radius) to zero mean and unit standard deviation")
    s.add_argument("--bg_radius", type=int, default=-1,
                   help="radius (px, of the final box) of the particle circle; -1: 75%% of half the final box")
    s.add_argument("--no_ramp", action="store_true", help="subtract the background mean instead of a fitted plane")
    s.add_argument("--invert_contrast", action="store_true", help="invert the contrast (make particles white)")
    s.add_argument("--float16", action="store_true", help="write the stacks in half precision (MRC mode 12)")
    s.add_argument("--minimum_pick_fom", type=float, default=-999.0,
                   help="only extract picks with rlnAutopickFigureOfMerit above this; -999 keeps all")
    s.add_argument("--only_do_unfinished", action="store_true",
                   help="only extract micrographs whose particles were not extracted yet")
    s.add_argument("--part_star", default=None, help="output particles STAR file (default <part_dir>/particles.star)")
    s.add_argument("--pick_star", default=None,
                   help="output list of the _extract.star files (default <part_dir>/extractpick.star)")
    add_gpu_flag(s)
    s.set_defaults(func=_cmd)

