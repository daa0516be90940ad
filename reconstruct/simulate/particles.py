"""Simulated extracted particles with known poses, offsets, CTFs, classes and junk.

The output looks like a RELION Extract job (per-micrograph ``.mrcs`` stacks and ``particles.star``
without poses, contrast inverted so protein is white, background normalised to unit variance) and
``truth/`` holds the maps, the true poses (``particles_true.star``, readable by RELION) and a CSV
with every particle's category.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..ctf import Optics, ctf_2d
from ..files.mrc import write_map, write_stack
from ..files.stack import format_image_name
from ..files.star import make_optics, write_star
from ..fourier import centred_ifft, phase_shift_2d
from ..geometry import matrix_to_euler, random_rotations
from ..masks import soft_sphere
from ..projector import Projector
from .noise import apply_ctf_real, carbon_edges, coloured_noise, ice_blobs, noise_spectrum

JUNK_KINDS = ("ice", "carbon", "aggregate", "noise")


@dataclass
class ParticleSimulation:
    """Parameters of a simulated particle data set (defaults: a small, realistic test set)."""

    n_particles: int = 500
    box: int = 64
    pixel_size: float = 3.0
    snr: float = 0.05  # variance of the CTF-modulated signal inside the particle / noise variance
    particle_diameter: float | None = None  # Å; default 0.7 * box * pixel_size
    fractions: Sequence[float] | None = None  # per map; default equal
    junk_fraction: float = 0.0
    junk_kinds: Sequence[str] = JUNK_KINDS
    neighbour_fraction: float = 0.0  # good particles with a neighbour's density at the edge
    defocus_range: tuple[float, float] = (8000.0, 25000.0)  # Å
    max_astigmatism: float = 800.0  # Å
    max_offset: float = 6.0  # Å, radius of the uniform disc of true offsets
    bfactor: float = 60.0  # Å^2 envelope on the signal
    optics: Optics = field(default_factory=Optics)
    particles_per_micrograph: int = 100
    seed: int = 0
    batch: int = 256


@dataclass
class ParticleTruth:
    """What the simulator knows: per-particle truth and the output paths."""

    table: pd.DataFrame  # category, map index, angles, offsets, defocus, image name
    particles_star: Path
    true_star: Path
    maps: list[Path]


def _defoci(n_mics: int, cfg: ParticleSimulation, rng: np.random.Generator) -> np.ndarray:
    mean = rng.uniform(*cfg.defocus_range, n_mics)
    astig = rng.uniform(0, cfg.max_astigmatism, n_mics)
    ang = rng.uniform(0, 180, n_mics)
    return np.stack([mean + astig / 2, mean - astig / 2, ang], 1)


def _draw(cfg: ParticleSimulation, n_maps: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The per-particle truth drawn before any image is made: category, map index, neighbour flag,
    rotation, offset (Å), micrograph and defocus. Both :func:`simulate_particles` and
    :func:`particle_truth_table` draw it, so the two agree for the same parameters."""
    n = cfg.n_particles
    fractions = np.asarray(cfg.fractions if cfg.fractions is not None else [1.0] * n_maps, float)
    fractions = fractions / fractions.sum()
    is_junk = rng.random(n) < cfg.junk_fraction
    kinds = np.asarray(list(cfg.junk_kinds))
    category = np.where(is_junk, kinds[rng.integers(0, len(kinds), n)], "good").astype(object)
    map_index = np.where(is_junk, -1, rng.choice(n_maps, n, p=fractions))
    neighbour = (~is_junk) & (rng.random(n) < cfg.neighbour_fraction)
    category[neighbour] = "neighbour"
    rots = random_rotations(n, rng)
    r = cfg.max_offset * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    origin = np.stack([r * np.cos(phi), r * np.sin(phi)], 1)  # Å
    n_mics = max(1, int(np.ceil(n / cfg.particles_per_micrograph)))
    mic = np.minimum(np.arange(n) // cfg.particles_per_micrograph, n_mics - 1)
    defo = _defoci(n_mics, cfg, rng)[mic]
    return category, map_index, neighbour, rots, origin, mic, defo


def _image_names(mic: np.ndarray, job: str) -> np.ndarray:
    names = np.empty(mic.size, dtype=object)
    for m_id in np.unique(mic):
        rows = np.nonzero(mic == m_id)[0]
        rel = Path(job) / "Micrographs" / f"mic_{m_id + 1:04d}.mrcs"
        names[rows] = [format_image_name(i, rel) for i in range(rows.size)]
    return names


def particle_truth_table(cfg: ParticleSimulation, n_maps: int, job: str = "Extract/job001") -> pd.DataFrame:
    """The truth of a simulation without making its images: what :func:`simulate_particles` writes to
    ``particles_truth.csv`` for the same parameters (image names, micrographs, defoci, true poses and
    offsets, category, map index), except the picking coordinates, which are drawn after the images.

    For re-deriving truth-based labels of a data set made earlier, at a fraction of the cost of simulating
    it again."""
    category, map_index, _, rots, origin, mic, defo = _draw(cfg, n_maps, np.random.default_rng(cfg.seed))
    rot, tilt, psi = matrix_to_euler(rots)
    return pd.DataFrame({
        "rlnImageName": _image_names(mic, job),
        "rlnMicrographName": [f"MotionCorr/job001/Micrographs/mic_{m + 1:04d}.mrc" for m in mic],
        "rlnDefocusU": defo[:, 0], "rlnDefocusV": defo[:, 1], "rlnDefocusAngle": defo[:, 2],
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": origin[:, 0], "rlnOriginYAngst": origin[:, 1], "rlnClassNumber": map_index + 1,
        "category": category, "map_index": map_index, "micrograph": mic,
    })


def simulate_particles(maps: Sequence[np.ndarray], cfg: ParticleSimulation, out_dir: str | Path,
                       job: str = "Extract/job001") -> ParticleTruth:
    """Write a simulated particle data set under ``out_dir`` (a RELION project directory)."""
    out = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    n, box, px = cfg.n_particles, cfg.box, cfg.pixel_size
    for m in maps:
        if m.shape != (box, box, box):
            raise ValueError(f"maps must be {box}^3 to match the box, got {m.shape}")
    category, map_index, neighbour, rots, origin, mic, defo = _draw(cfg, len(maps), rng)
    n_mics = int(mic.max()) + 1

    diameter = cfg.particle_diameter or 0.7 * box * px
    mask = soft_sphere((box, box), diameter / (2 * px), edge=0)
    projectors = [Projector(np.asarray(m, np.float32)) for m in maps]
    amp = noise_spectrum(box, px)

    # Noise level from the average signal power of good particles (a trial batch with the same stats).
    images = np.zeros((n, box, box), np.float32)
    for s in range(0, n, cfg.batch):
        sl = slice(s, min(n, s + cfg.batch))
        b = sl.stop - sl.start
        ctf = ctf_2d(box, px, defo[sl, 0], defo[sl, 1], defo[sl, 2], cfg.optics, bfactor=cfg.bfactor)
        ft = np.zeros((b, box, box // 2 + 1), np.complex64)
        for k, pr in enumerate(projectors):  # a few maps, each projected for its particles at once
            sel = np.nonzero(map_index[sl] == k)[0]
            if sel.size:
                ft[sel] = pr.project(rots[sl][sel])
        agg = np.nonzero(category[sl] == "aggregate")[0]
        if agg.size:  # clumps: 3 to 5 copies at random poses around the centre
            for _ in range(4):
                shift = rng.normal(0, 0.25 * diameter / px, (agg.size, 2))
                extra = projectors[rng.integers(len(projectors))].project(random_rotations(agg.size, rng))
                ft[agg] += phase_shift_2d(extra, shift, box)
        nb = np.nonzero(neighbour[sl])[0]
        if nb.size:
            ang = rng.uniform(0, 2 * np.pi, nb.size)
            dist = rng.uniform(0.75, 0.95, nb.size) * diameter / px
            shift = np.stack([dist * np.cos(ang), dist * np.sin(ang)], 1)
            extra = projectors[rng.integers(len(projectors))].project(random_rotations(nb.size, rng))
            ft[nb] += phase_shift_2d(extra, shift, box)
        ft = phase_shift_2d(ft, -origin[sl] / px, box) * ctf
        images[sl] = centred_ifft(ft, (box, box))
    good = category == "good"
    ref = images[good] if good.any() else images
    signal_var = float(np.mean(np.var(ref[:, mask > 0.5], axis=1)))
    if signal_var <= 0:
        signal_var = 1.0
    sigma = np.sqrt(signal_var / cfg.snr)
    # Contaminants: strong, CTF-modulated features scaled relative to the particle signal.
    sd = np.sqrt(signal_var)
    for kind, make, scale in (("ice", ice_blobs, 25.0), ("carbon", carbon_edges, 15.0)):
        sel = np.nonzero(category == kind)[0]
        if sel.size:
            ctf = ctf_2d(box, px, defo[sel, 0], defo[sel, 1], defo[sel, 2], cfg.optics, bfactor=cfg.bfactor)
            images[sel] += scale * sd * apply_ctf_real(make(sel.size, box, rng), ctf)
    for s in range(0, n, cfg.batch):
        sl = slice(s, min(n, s + cfg.batch))
        images[sl] += coloured_noise(sl.stop - sl.start, box, amp, rng, sigma)
    # Extraction-style normalisation: background (outside the particle) to mean 0, std 1.
    bg = mask < 0.5
    mu = images[:, bg].mean(axis=1)[:, None, None]
    sdv = images[:, bg].std(axis=1)[:, None, None]
    images = (images - mu) / np.maximum(sdv, 1e-6)

    # Files: one stack per micrograph, as Extract writes them.
    stack_dir = out / job / "Micrographs"
    for m_id in range(n_mics):
        write_stack(stack_dir / f"mic_{m_id + 1:04d}.mrcs", images[mic == m_id], px)
    names = _image_names(mic, job)
    rot, tilt, psi = matrix_to_euler(rots)
    coords = rng.uniform(box, 4096 - box, (n, 2))
    optics = make_optics(px, box, cfg.optics.voltage, cfg.optics.cs, cfg.optics.amplitude_contrast)
    parts = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"MotionCorr/job001/Micrographs/mic_{m + 1:04d}.mrc" for m in mic],
        "rlnCoordinateX": coords[:, 0].round(1),
        "rlnCoordinateY": coords[:, 1].round(1),
        "rlnDefocusU": defo[:, 0], "rlnDefocusV": defo[:, 1], "rlnDefocusAngle": defo[:, 2],
        "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0, "rlnPhaseShift": 0.0,
        "rlnOpticsGroup": 1,
    })
    particles_star = out / job / "particles.star"
    write_star(particles_star, {"optics": optics, "particles": parts})
    truth_dir = out / "truth"
    posed = parts.assign(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi,
                         rlnOriginXAngst=origin[:, 0], rlnOriginYAngst=origin[:, 1],
                         rlnClassNumber=map_index + 1)
    true_star = truth_dir / "particles_true.star"
    write_star(true_star, {"optics": optics, "particles": posed})
    table = posed.assign(category=category, map_index=map_index, micrograph=mic)
    table.to_csv(truth_dir / "particles_truth.csv", index=False)
    map_paths = []
    for k, m in enumerate(maps):
        p = truth_dir / f"map_{k:02d}.mrc"
        write_map(p, m, px)
        map_paths.append(p)
    return ParticleTruth(table, particles_star, true_star, map_paths)
