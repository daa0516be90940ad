"""Direct Fourier reconstruction of a map from posed particles (as ``relion_reconstruct``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import get_xp, to_numpy
from .files.errors import InputError
from .files.mrc import write_map
from .files.stack import ImageSource
from .files.star import read_particles
from .fourier import centred_fft, phase_shift_2d
from .memory import backprojector_bytes, check_fits
from .particles import CtfSource, origins_px, rotations
from .progress import progress
from .projector import BackProjector

log = logging.getLogger("reconstruct")


@dataclass
class ReconstructOptions:
    """Options of ``reconstruct backproject`` (RELION names in brackets)."""

    star: Path  # --i
    out: Path  # --o
    ctf: bool = True  # --ctf
    symmetry: str = "C1"  # --sym
    padding: float = 2.0  # --pad
    maxres: float = -1.0  # --maxres (Å); -1 for Nyquist
    subset: int = 0  # --subset: 1 or 2 uses only that rlnRandomSubset half, 0 all
    class_number: int = -1  # --class: only particles of this rlnClassNumber
    batch: int = 256
    project_dir: Path | None = None
    gpu: bool | None = False


def reconstruct_particles(opt: ReconstructOptions) -> np.ndarray:
    """Back-project the selected particles and write the map; returns it as a NumPy array."""
    xp = get_xp(opt.gpu)
    table = read_particles(opt.star)
    keep = np.ones(len(table), bool)
    if opt.subset:
        if "rlnRandomSubset" not in table.data.columns:
            raise InputError(opt.star, "--subset needs an rlnRandomSubset column")
        keep &= table.data["rlnRandomSubset"].to_numpy() == opt.subset
    if opt.class_number > 0:
        if "rlnClassNumber" not in table.data.columns:
            raise InputError(opt.star, "--class needs an rlnClassNumber column")
        keep &= table.data["rlnClassNumber"].to_numpy() == opt.class_number
    if not keep.any():
        raise InputError(opt.star, "no particle is selected (check --subset / --class)")
    table = table.subset(keep)
    with ImageSource(table, opt.project_dir) as images:
        box, px = images.box, images.pixel_size
        check_fits(backprojector_bytes(box, opt.padding), xp, f"back-projection at box {box}, --pad {opt.padding:g}",
                   "use --pad 1, or downsample the particles (re-extract with a smaller box)")
        r_max = box / 2 if opt.maxres <= 0 else min(box / 2, box * px / opt.maxres)
        mats = rotations(table)
        shifts = origins_px(table, px)
        ctf = CtfSource(table, box, px) if opt.ctf else None
        bp = BackProjector(box, padding=opt.padding, xp=xp, r_max=r_max, symmetry=opt.symmetry)
        batches = images.batches(opt.batch)
        for rows, imgs in progress(batches, -(-len(table) // opt.batch), "back-projecting", "batch"):
            ft = centred_fft(xp.asarray(imgs), 2)
            ft = phase_shift_2d(ft, xp.asarray(shifts[rows]), box)  # +origin centres the particle
            c = ctf(rows, xp) if ctf is not None else None
            bp.insert(ft, xp.asarray(mats[rows]), ctf=c, ctf_premultiplied=bool(ctf and ctf.premultiplied))
    vol = to_numpy(bp.reconstruct())
    write_map(opt.out, vol, px)
    log.info("reconstructed %d particles (box %d, %.3f Å/px) into %s", len(table), box, px, opt.out)
    return vol
