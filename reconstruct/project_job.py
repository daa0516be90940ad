"""Projections of a map for the poses and CTFs in a particle STAR file (as ``relion_project``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import get_xp, to_numpy
from .files.errors import InputError
from .files.mrc import StackAppender, read_map
from .files.stack import format_image_name
from .files.star import read_particles, write_star
from .fourier import centred_ifft, phase_shift_2d
from .particles import CtfSource, origins_px, rotations
from .progress import progress
from .projector import Projector

log = logging.getLogger("reconstruct")


@dataclass
class ProjectOptions:
    """Options of ``reconstruct project`` (RELION names in brackets)."""

    map: Path  # --i
    star: Path  # --ang
    out: Path  # --o, root name: writes ROOT.mrcs and ROOT.star
    ctf: bool = False  # --ctf
    padding: float = 2.0  # --pad
    white_noise: float = 0.0  # --white_noise: std of added Gaussian noise
    batch: int = 256
    seed: int = 0
    gpu: bool | None = False


def project_particles(opt: ProjectOptions) -> Path:
    """Write ROOT.mrcs with one projection per particle row and ROOT.star pointing at it."""
    xp = get_xp(opt.gpu)
    vol, map_px = read_map(opt.map)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"{opt.map}: expected a cubic 3D map, got shape {vol.shape}")
    table = read_particles(opt.star, required=())
    box = vol.shape[-1]
    px = map_px
    if "rlnImagePixelSize" in table.optics.columns:
        star_px = table.image_pixel_size()
        if px > 0 and abs(star_px - px) > 0.01 * px:
            raise InputError(opt.star, f"rlnImagePixelSize {star_px:.4f} Å differs from the map's {px:.4f} Å",
                             "rescale the map to the particles' pixel size, or fix the STAR file")
        px = px or star_px
    if px <= 0:
        raise InputError(opt.map, "the map header has no pixel size and the STAR file gives none",
                         "set the map's voxel size or add rlnImagePixelSize to data_optics")
    mats = rotations(table)
    shifts = origins_px(table, px)
    ctf = CtfSource(table, box, px) if opt.ctf else None
    proj = Projector(xp.asarray(vol), padding=opt.padding)
    rng = np.random.default_rng(opt.seed)
    stack = Path(f"{opt.out}.mrcs")
    n = len(table)
    writer = StackAppender(stack, n, box, px)
    try:
        starts = range(0, n, opt.batch)
        for s in progress(starts, len(starts), "projecting", "batch"):
            rows = np.arange(s, min(n, s + opt.batch))
            ft = proj.project(xp.asarray(mats[rows]))
            ft = phase_shift_2d(ft, xp.asarray(-shifts[rows]), box)
            if ctf is not None:
                ft = ft * ctf(rows, xp)
            img = to_numpy(centred_ifft(ft, (box, box)))
            if opt.white_noise > 0:
                img = img + rng.normal(0, opt.white_noise, img.shape)
            writer.write(s, img.astype(np.float32))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    data = table.data.copy()
    data["rlnImageName"] = [format_image_name(i, stack) for i in range(n)]
    optics = table.optics.copy()
    optics["rlnImageSize"] = box
    optics["rlnImagePixelSize"] = px
    optics["rlnImageDimensionality"] = 2
    star = Path(f"{opt.out}.star")
    write_star(star, {"optics": optics, "particles": data})
    log.info("wrote %d projections to %s and %s", n, stack, star)
    return star
