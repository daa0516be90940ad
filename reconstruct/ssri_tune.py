"""``reconstruct ssri-tune``: the OPUS-SSRI paper's ordered parameter search, on a refined subset.

The refined poses of a subset of particles are back-projected per half set (weighted by 1/sigma2 as in
the refinement's M-step); then alpha, beta, gamma and eps' are tried in that order, each over a small
grid with the others fixed at the best values so far, and the value giving the best FSC between the two
SSRI half maps is kept.  The result is the table of trials (``ssri_tune.star``) and the refine3d
options to use.  Automatic parameters (``refine3d --ssri``) need none of this; it is for users who
want to check them or squeeze a data set.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import get_xp
from .files.errors import InputError
from .files.mrc import read_map
from .files.stack import ImageSource
from .files.star import read_particles, read_star, write_star
from .fourier import centred_fft, phase_shift_2d
from .fsc import fsc, resolution_at
from .masks import soft_sphere
from .particles import CtfSource, origins_px, rotations
from .progress import progress
from .projector import BackProjector
from .refine3d import image_power_spectrum, inverse_sigma2_full
from .ssri import SsriOptions, ssri_reconstruct

log = logging.getLogger("reconstruct")

# The grids of the ordered search (multiples of the relative parameters; defaults included).
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.25, 0.5, 1.0, 2.0, 4.0),
    "beta": (0.25, 0.5, 1.0, 2.0, 4.0),
    "gamma": (0.05, 0.1, 0.2),
    "epsp": (1 / 3, 0.5, 1.0, 2.0),
}


@dataclass
class SsriTuneOptions:
    """Options of ``reconstruct ssri-tune``."""

    star: Path  # --i: refined particles (run_data.star) with poses and rlnRandomSubset
    ref: Path  # --ref: the map SSRI starts from and stays close to (e.g. run_class001.mrc)
    out: Path  # --o: output directory
    particle_diameter: float  # --particle_diameter (Å): solvent mask of the starting map
    subset: int = 2000  # --subset: particles used (half from each half set)
    model: Path | None = None  # --model: run_model.star with the noise spectrum (default: next to --i)
    ctf: bool = True
    batch: int = 256
    seed: int = 0
    gpu: bool | None = False
    project_dir: Path | None = None


@dataclass
class SsriTuneResult:
    """The best options found and every trial (parameter, value, resolution, mean FSC)."""

    best: SsriOptions
    trials: pd.DataFrame


def _noise_spectrum(opt: SsriTuneOptions, src: ImageSource, rows: np.ndarray, xp: Any) -> np.ndarray:
    model = opt.model or Path(opt.star).with_name(Path(opt.star).name.replace("_data.star", "_model.star"))
    if model.exists() and model != Path(opt.star):
        blocks = read_star(model)
        if "model_optics_group_1" in blocks:
            sigma2 = blocks["model_optics_group_1"]["rlnSigma2Noise"].to_numpy(dtype=float)
            if sigma2.size == src.box // 2 + 1 and np.all(sigma2[1:] > 0):
                log.info("noise spectrum from %s", model)
                return sigma2
    log.info("noise spectrum estimated from the images' power spectra")
    return image_power_spectrum(src, rows, opt.batch, xp)


def ssri_tune(opt: SsriTuneOptions) -> SsriTuneResult:
    """Ordered search alpha -> beta -> gamma -> eps' by the FSC of the SSRI half maps."""
    xp = get_xp(opt.gpu)
    table = read_particles(opt.star)
    if "rlnRandomSubset" not in table.data.columns:
        raise InputError(opt.star, "the particles have no rlnRandomSubset column",
                         "use the run_data.star of a gold-standard refinement (reconstruct refine3d)")
    half = table.data["rlnRandomSubset"].to_numpy(dtype=int)
    rng = np.random.default_rng(opt.seed)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    with ImageSource(table, opt.project_dir) as src:
        box, px = src.box, src.pixel_size
        ref, _ = read_map(opt.ref)
        if ref.shape != (box,) * 3:
            raise InputError(opt.ref, f"map is {ref.shape}, particles are {box} px", "pass the refinement's map")
        picked = [rng.permutation(np.nonzero(half == h)[0])[: opt.subset // 2] for h in (1, 2)]
        sigma2 = _noise_spectrum(opt, src, np.sort(np.concatenate(picked))[:1000], xp)
        inv_s2 = inverse_sigma2_full(sigma2, box, xp)
        mats, shifts = rotations(table), origins_px(table, px)
        ctf = CtfSource(table, box, px) if opt.ctf else None
        bps = []
        for h, rows in enumerate(picked, 1):
            bp = BackProjector(box, xp=xp)
            rows = np.sort(rows)
            for r, imgs in progress(src.batches(opt.batch, rows), -(-rows.size // opt.batch),
                                    f"back-projecting half {h}", "batch"):
                ft = phase_shift_2d(centred_fft(xp.asarray(imgs), 2), xp.asarray(shifts[r]), box)
                c = ctf(r, xp) if ctf is not None else None
                bp.insert(ft, xp.asarray(mats[r]), ctf=c, freq_weight=inv_s2,
                          ctf_premultiplied=bool(ctf and ctf.premultiplied))
            bps.append(bp)
    plain = [bp.reconstruct() for bp in bps]
    base_res = resolution_at(fsc(plain[0], plain[1]), box, px, 0.143).angstrom
    radius = min(box / 2 - 1, box * px / base_res)
    prev = xp.asarray(ref, dtype=xp.float32) * xp.asarray(soft_sphere((box,) * 3, opt.particle_diameter / (2 * px), 5))
    log.info("%d + %d particles; unregularised half maps: FSC 0.143 at %.2f Å", *map(len, picked), base_res)
    best = SsriOptions(search=False)
    rows_out = []
    for name, values in SEARCH_GRID.items():
        scored = []
        for v in values:
            trial = dataclasses.replace(best, **{name: v})
            maps = [ssri_reconstruct(bp, prev, radius, trial).volume for bp in bps]
            curve = fsc(maps[0], maps[1])
            res = resolution_at(curve, box, px, 0.143).angstrom
            band = float(np.mean(curve[1:int(radius) + 1]))
            scored.append((res, -band, v))
            rows_out.append({"rlnSsriParameter": name, "rlnSsriValue": v, "rlnResolution": res, "rlnMeanFsc": band})
            log.info("  %s = %.3g: FSC 0.143 at %.2f Å, mean FSC %.3f", name, v, res, band)
        res, _, v = min(scored)
        best = dataclasses.replace(best, **{name: v})
        log.info("%s: %.3g (%.2f Å)", name, v, res)
    trials = pd.DataFrame(rows_out)
    write_star(out / "ssri_tune.star", {"ssri_tune": trials})
    return SsriTuneResult(best, trials)


def as_flags(o: SsriOptions) -> str:
    """The refine3d options that reproduce ``o``."""
    return (f"--ssri --ssri_alpha {o.alpha:g} --ssri_beta {o.beta:g} --ssri_gamma {o.gamma:g} "
            f"--ssri_eps {o.eps:g} --ssri_epsp {o.epsp:g} --ssri_no_search")
