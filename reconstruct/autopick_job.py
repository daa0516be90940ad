"""The AutoPick job with Laplacian-of-Gaussian picking (``reconstruct autopick --LoG``, as ``relion_autopick``).

Reads a RELION micrographs STAR file, picks every micrograph with :mod:`reconstruct.log_picker` and
writes what RELION 4 writes: ``<odir>/<path>_autopick.star`` per micrograph (``<path>`` is the
micrograph's name after its job directory, without extension) and ``<odir>/autopick.star``
(``data_coordinate_files``), plus ``logfile.pdf`` and an overlay PNG of the picks on the low-passed
micrograph for the first micrograph(s).  Unreadable micrographs are skipped, logged and listed in
``skipped_micrographs.txt``; ``--only_do_unfinished`` keeps existing pick files.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import get_xp
from .cli_options import add_gpu_flag
from .files.atomic import atomic_path, atomic_write_text
from .files.errors import InputError
from .files.mrc import read_map
from .files.star import MetadataTable, read_star, read_table, write_star
from .log_picker import LoGParams, LoGPicks, pick_micrograph
from .progress import progress

log = logging.getLogger("reconstruct")
PICK_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit", "rlnAnglePsi")


@dataclass
class AutopickOptions:
    """Options of ``reconstruct autopick`` (RELION's ``relion_autopick`` names)."""

    i: Path  # --i: micrographs STAR file
    odir: Path  # --odir: the job directory, e.g. AutoPick/job005
    LoG_diam_min: float = -1.0  # --LoG_diam_min (Å)
    LoG_diam_max: float = -1.0  # --LoG_diam_max (Å)
    LoG_adjust_threshold: float = 0.0  # --LoG_adjust_threshold (stddevs)
    LoG_upper_threshold: float = 999.0  # --LoG_upper_threshold (stddevs)
    LoG_maxres: float = 20.0  # --LoG_maxres (Å); RELION's job passes it as --lowpass with --shrink 0
    LoG_invert: bool = False  # --LoG_invert: white particles
    LoG_neighbour: float = 100.0  # --LoG_neighbour (percent)
    Log_max_search: float = 5.0  # --Log_max_search
    skip_side: int = 0  # --skip_side (px)
    pickname: str = "autopick"  # --pickname
    only_do_unfinished: bool = False  # --only_do_unfinished
    random_seed: int = 1  # --random_seed (noise padding of non-square micrographs)
    overlays: int = 1  # overlay PNGs for the first this many micrographs picked
    gpu: bool | None = False  # --gpu

    def log_params(self) -> LoGParams:
        """The picker's parameters, validated."""
        p = LoGParams(self.LoG_diam_min, self.LoG_diam_max, self.LoG_adjust_threshold, self.LoG_upper_threshold,
                      self.LoG_maxres, self.LoG_invert, self.LoG_neighbour, self.Log_max_search, 8.0, self.skip_side)
        p.check()
        return p


_JOB_DIR = re.compile(r"job\d+/")


def job_relative_name(name: str) -> str:
    """The part of a file name after its job directory (RELION's ``decomposePipelineFileName``).

    ``MotionCorr/job002/Movies/mic1.mrc`` -> ``Movies/mic1.mrc``; names outside a job directory
    are kept whole.
    """
    m = _JOB_DIR.search(name)
    return name[m.end():] if m else name.lstrip("/")


def output_root(mic_name: str, odir: str | Path) -> str:
    """RELION's output root of a micrograph in a job directory: ``odir/<name after the job dir, no extension>``."""
    rel = job_relative_name(mic_name)
    stem = rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel
    return str(Path(odir) / stem)


def read_micrographs(path: Path) -> MetadataTable:
    """A micrographs STAR file (RELION >= 3.1), with every row's pixel size available."""
    table = read_table(path, "micrographs", required=("rlnMicrographName",))
    if "rlnMicrographPixelSize" not in table.optics.columns and "rlnMicrographPixelSize" not in table.data.columns:
        raise InputError(path, "data_optics has no rlnMicrographPixelSize",
                         "use the output of a motion-correction or CTF job (RELION >= 3.1), which sets it")
    return table


def _read_micrograph(path: Path) -> np.ndarray:
    data, _ = read_map(path)
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise InputError(path, f"holds {data.shape[0]} sections, not one micrograph",
                             "pick motion-corrected micrographs, not movies")
        data = data[0]
    return data


def picks_table(p: LoGPicks) -> pd.DataFrame:
    """RELION 4's LoG coordinate table (class 0 and psi 0 as RELION writes for LoG picks)."""
    n = len(p.x)
    return pd.DataFrame({"rlnCoordinateX": p.x.astype(np.float64), "rlnCoordinateY": p.y.astype(np.float64),
                         "rlnClassNumber": np.zeros(n, dtype=np.int64),
                         "rlnAutopickFigureOfMerit": p.fom.astype(np.float64),
                         "rlnAnglePsi": np.zeros(n, dtype=np.float64)}, columns=list(PICK_COLUMNS))


def plot_picks(p: LoGPicks, pixel_size: float, out: Path, title: str) -> Path:
    """Overlay PNG: the low-passed working micrograph with a circle of the detected diameter at each pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    img = p.work_image
    fig, ax = plt.subplots(figsize=(6.5, 6.5), dpi=110)
    lo, hi = np.percentile(img, [1, 99])
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
    cx = (p.x + p.offset[0]) * p.scale
    cy = (p.y + p.offset[1]) * p.scale
    for x, y, d in zip(cx, cy, p.diameter):
        ax.add_patch(Circle((x, y), 0.5 * d / pixel_size * p.scale, fill=False, lw=1.0, color="tab:green"))
    ax.set_title(f"{title}: {len(p.x)} picks", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _logfile(counts: list[int], foms: list[float], out: Path) -> None:
    """logfile.pdf: picks per micrograph and their mean FOM (RELION's two main plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(6, 6), dpi=100)
    axes[0].plot(np.arange(1, len(counts) + 1), counts, ".-")
    axes[0].set_title("Nr of picked particles for all micrographs", fontsize=9)
    axes[1].plot(np.arange(1, len(foms) + 1), foms, ".-", color="tab:orange")
    axes[1].set_title("Average autopick FOM for all micrographs", fontsize=9)
    axes[1].set_xlabel("micrograph")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)


def run_autopick(opts: AutopickOptions) -> Path:
    """Pick all micrographs of ``opts.i`` into ``opts.odir``; returns the path of ``autopick.star``."""
    params = opts.log_params()
    table = read_micrographs(opts.i)
    xp = get_xp(opts.gpu)
    odir = Path(opts.odir)
    odir.mkdir(parents=True, exist_ok=True)
    names = table.data["rlnMicrographName"].astype(str).tolist()
    pixel = table.column("rlnMicrographPixelSize")
    pick_files = [Path(output_root(n, odir) + f"_{opts.pickname}.star") for n in names]
    todo = [k for k, f in enumerate(pick_files) if not (opts.only_do_unfinished and f.exists())]
    if len(todo) < len(names):
        log.info("%d of %d micrographs already picked: doing the other %d", len(names) - len(todo), len(names),
                 len(todo))
    skipped: list[str] = []
    overlays = 0
    for k in progress(todo, len(todo), "LoG picking", "micrograph"):
        try:
            mic = _read_micrograph(Path(names[k]))
        except InputError as err:
            log.warning("skipping micrograph %s: %s", names[k], err)
            skipped.append(f"{names[k]}\t{err}")
            continue
        try:
            picks = pick_micrograph(xp.asarray(mic), float(pixel[k]), params, seed=opts.random_seed + k)
        except ValueError as err:
            log.warning("skipping micrograph %s: %s", names[k], err)
            skipped.append(f"{names[k]}\t{err}")
            continue
        if len(picks.x) == 0:
            log.info("no particles picked on %s: writing an empty coordinate file", names[k])
        write_star(pick_files[k], {"": picks_table(picks)})
        if overlays < opts.overlays:
            plot_picks(picks, float(pixel[k]), Path(output_root(names[k], odir) + f"_{opts.pickname}.png"),
                       job_relative_name(names[k]))
            overlays += 1
    done = [k for k, f in enumerate(pick_files) if f.exists()]
    coords = pd.DataFrame({"rlnMicrographName": [names[k] for k in done],
                           "rlnMicrographCoordinates": [str(pick_files[k]) for k in done]})
    out = odir / f"{opts.pickname}.star"
    write_star(out, {"coordinate_files": coords})
    counts, foms = _summary(pick_files, done)
    if done:
        _logfile(counts, foms, odir / "logfile.pdf")
    if skipped:
        atomic_write_text(odir / "skipped_micrographs.txt", "\n".join(skipped) + "\n")
        log.warning("skipped %d unreadable micrograph(s), listed in %s: %s", len(skipped),
                    odir / "skipped_micrographs.txt", ", ".join(s.split("\t")[0] for s in skipped))
    log.info("picked %d particles on %d micrographs (%.1f per micrograph); coordinate files listed in %s",
             sum(counts), len(done), sum(counts) / max(len(done), 1), out)
    return out


def _summary(pick_files: list[Path], done: list[int]) -> tuple[list[int], list[float]]:
    counts, foms = [], []
    for k in done:
        df = next(iter(read_star(pick_files[k]).values()))
        counts.append(len(df))
        fom = df["rlnAutopickFigureOfMerit"] if "rlnAutopickFigureOfMerit" in df.columns else pd.Series([], dtype=float)
        foms.append(float(fom.mean()) if len(fom) else 0.0)
    return counts, foms


def _cmd(a: argparse.Namespace) -> None:
    if not a.LoG:
        raise ValueError("only Laplacian-of-Gaussian picking is implemented: add --LoG")
    out = run_autopick(AutopickOptions(
        i=Path(a.i), odir=Path(a.odir), LoG_diam_min=a.LoG_diam_min, LoG_diam_max=a.LoG_diam_max,
        LoG_adjust_threshold=a.LoG_adjust_threshold, LoG_upper_threshold=a.LoG_upper_threshold,
        LoG_maxres=a.LoG_maxres, LoG_invert=a.LoG_invert, LoG_neighbour=a.LoG_neighbour,
        Log_max_search=a.Log_max_search, skip_side=a.skip_side, pickname=a.pickname,
        only_do_unfinished=a.only_do_unfinished, random_seed=a.random_seed, overlays=a.overlays, gpu=a.gpu))
    print(f"coordinate files listed in {out}")


def register(sub: Any) -> None:
    """Add the ``autopick`` subcommand to a ``reconstruct`` sub-parser collection."""
    s = sub.add_parser("autopick", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="Laplacian-of-Gaussian particle picking (like relion_autopick --LoG)",
                       description="Pick particles as blobs of a given diameter range with RELION's "
                                   "Laplacian-of-Gaussian picker; writes RELION 4 AutoPick outputs "
                                   "(<odir>/autopick.star and one _autopick.star per micrograph).")
    s.add_argument("--i", required=True, help="micrographs STAR file (data_optics with rlnMicrographPixelSize)")
    s.add_argument("--odir", required=True, help="output job directory, e.g. AutoPick/job005")
    s.add_argument("--LoG", action="store_true", help="use Laplacian-of-Gaussian picking (the only method here)")
    s.add_argument("--LoG_diam_min", type=float, default=-1.0, help="smallest particle diameter (Å)")
    s.add_argument("--LoG_diam_max", type=float, default=-1.0, help="largest particle diameter (Å)")
    s.add_argument("--LoG_adjust_threshold", type=float, default=0.0,
                   help="picking threshold in standard deviations of the FOM above its mean: higher for fewer "
                        "particles, lower for more")
    s.add_argument("--LoG_upper_threshold", type=float, default=999.0,
                   help="discard picks whose FOM is this many standard deviations above the mean (ice, aggregates)")
    s.add_argument("--LoG_maxres", type=float, default=20.0,
                   help="resolution (Å) the micrographs are low-passed and down-scaled to; <= 0 keeps full size")
    s.add_argument("--LoG_invert", action="store_true", help="particles are white on a dark background")
    s.add_argument("--LoG_neighbour", type=float, default=100.0,
                   help="exclude neighbours within (detected + minimum diameter)/2 times this percentage")
    s.add_argument("--Log_max_search", type=float, default=5.0,
                   help="scan diameters from min/this to max*this to reject too small or large blobs")
    s.add_argument("--skip_side", type=int, default=0,
                   help="extra pixels to keep away from the edges (besides half the minimum diameter)")
    s.add_argument("--pickname", default="autopick", help="root name of the coordinate files")
    s.add_argument("--only_do_unfinished", action="store_true",
                   help="only pick micrographs that have no coordinate file yet")
    s.add_argument("--random_seed", type=int, default=1, help="seed of the noise that pads non-square micrographs")
    s.add_argument("--overlays", type=int, default=1,
                   help="write an overlay PNG of the picks for the first this many micrographs picked")
    add_gpu_flag(s)
    s.set_defaults(func=_cmd)
