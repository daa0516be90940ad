"""Simulated micrograph movies: particles at known coordinates, drift, dose, CTF and noise.

Writes an Import-style project: ``Movies/*.mrcs`` (frames as an MRC stack, or TIFF on request),
``movies.star`` with the optics group, and ``truth/`` with per-micrograph coordinates (RELION
``*_autopick.star`` layout), per-frame drift (pixels) and defoci.  Optionally a smooth local
(beam-induced) deformation on top of the drift, with each particle's true per-frame motion in
``truth/<stem>_particle_motion.csv``, and movies cut short as a failed transfer leaves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..backend import fft_module
from ..ctf import Optics, ctf_2d
from ..files.mrc import write_map, write_stack
from ..files.star import write_star
from ..fourier import centred_fft, centred_ifft, phase_shift_2d, radius_grid
from ..geometry import matrix_to_euler, random_rotations
from ..projector import Projector
from .noise import coloured_noise, noise_spectrum


@dataclass
class MovieSimulation:
    """Parameters of simulated movies (defaults: small and fast)."""

    n_movies: int = 2
    size: int = 512  # micrograph edge in pixels
    pixel_size: float = 1.5  # Å
    n_frames: int = 16
    dose_per_frame: float = 1.5  # e/Å^2
    particles_per_movie: int = 20
    particle_diameter: float = 120.0  # Å, minimum distance between particle centres
    snr: float = 0.05  # per-particle signal variance / noise variance of the summed micrograph
    defocus_range: tuple[float, float] = (10000.0, 25000.0)
    max_astigmatism: float = 600.0
    drift_step: float = 0.6  # px per frame, standard deviation of the random walk's steps
    bfactor: float = 40.0
    optics: Optics = field(default_factory=Optics)
    gain_reference: bool = False  # record frames divided by a per-pixel gain (with a few dead pixels)
    float16: bool = False  # write frames as mode 12
    seed: int = 0
    local_motion: float = 0.0  # px: largest local (non-uniform) displacement at the first/last frame
    movie_format: str = "mrcs"  # "mrcs", "tiff" (zlib) or "tiff-lzw"
    truncate_movies: tuple[int, ...] = ()  # 1-based movie numbers written cut short (a damaged file)
    ice: float = 0.0  # variance of a CTF-modulated amorphous layer (ice, carbon) relative to the noise's


def critical_exposure(k: np.ndarray) -> np.ndarray:
    """Grant & Grigorieff (2015) critical exposure (e/Å^2) at spatial frequency k (1/Å)."""
    return 0.245 * np.maximum(k, 1e-6) ** -1.665 + 2.81


def local_field(xy: np.ndarray, size: int, coeffs: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Local displacement (px) of points ``xy`` (k, 2) at frame times ``tau`` (n,): (n, k, 2).

    A quadratic deformation of the normalised position u = x/size - 0.5, v = y/size - 0.5 with
    ``coeffs`` (2, 5) over (u, v, u^2, uv, v^2), scaled in time by ``tau`` (zero at the reference frame).
    """
    u, v = xy[:, 0] / size - 0.5, xy[:, 1] / size - 0.5
    basis = np.stack([u, v, u * u, u * v, v * v], axis=1)  # (k, 5)
    return tau[:, None, None] * (basis @ coeffs.T)[None]


def _local_coeffs(size: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Random quadratic-deformation coefficients scaled so the largest displacement is ``amplitude``."""
    c = rng.normal(0, 1, (2, 5))
    g = np.stack(np.meshgrid(np.linspace(0, size, 17), np.linspace(0, size, 17)), -1).reshape(-1, 2)
    peak = np.abs(local_field(g, size, c, np.ones(1))).max()
    return c * amplitude / max(peak, 1e-12)


def _write_movie(path: Path, frames: np.ndarray, px: float, cfg: MovieSimulation) -> None:
    """Frames as an MRC stack or a (compressed) TIFF, as ``cfg.movie_format`` says."""
    if cfg.movie_format == "mrcs":
        write_stack(path, frames, px, float16=cfg.float16)
    elif cfg.movie_format in ("tiff", "tiff-lzw"):
        from ..files.movies import write_tiff_movie

        write_tiff_movie(path, frames, compression="lzw" if cfg.movie_format == "tiff-lzw" else "zlib")
    else:
        raise ValueError(f"movie_format must be mrcs, tiff or tiff-lzw, not {cfg.movie_format!r}")


def _place(size: int, n: int, min_dist: float, margin: float, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` coordinates at least ``min_dist`` apart (dart throwing, batched proposals)."""
    pts = np.empty((0, 2))
    for _ in range(50):
        cand = rng.uniform(margin, size - margin, (4 * n, 2))
        for c in cand:  # acceptance is sequential by nature; n is small (tens per micrograph)
            if len(pts) >= n:
                return pts
            if len(pts) == 0 or np.min(np.hypot(*(pts - c).T)) >= min_dist:
                pts = np.vstack([pts, c])
    return pts


def simulate_movies(maps: Sequence[np.ndarray], map_pixel_size: float, cfg: MovieSimulation,
                    out_dir: str | Path) -> pd.DataFrame:
    """Write ``cfg.n_movies`` movies and their truth; returns the per-particle truth table."""
    out = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    size, px = cfg.size, cfg.pixel_size
    box = maps[0].shape[0]
    if abs(map_pixel_size - px) > 1e-3:
        raise ValueError("maps must be sampled at the movie pixel size (simulate the map at that pixel size)")
    projectors = [Projector(np.asarray(m, np.float32)) for m in maps]
    amp = noise_spectrum(size, px)
    damage_ne = critical_exposure(radius_grid((size, size), np) / (size * px))
    background = cfg.dose_per_frame * px * px  # mean electrons per pixel per frame
    contrast = 0.1 * background  # particle signal amplitude relative to the background counts
    gain = None
    if cfg.gain_reference:
        gain = rng.uniform(0.9, 1.1, (size, size)).astype(np.float32)
        dead = rng.integers(0, size, (max(1, size // 64), 2))
        gain[dead[:, 1], dead[:, 0]] = 0.0
        write_map(out / "Movies" / "gain.mrc", gain, px)
        (out / "truth").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"x": dead[:, 0], "y": dead[:, 1]}).to_csv(out / "truth" / "dead_pixels.csv", index=False)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rows = []
    movie_rows = []
    for mv in range(cfg.n_movies):  # movies are independent files; each is vectorised inside
        coords = _place(size, cfg.particles_per_movie, cfg.particle_diameter / px, box / 2 + 1, rng)
        k = len(coords)
        mats = random_rotations(k, rng)
        which = rng.integers(0, len(maps), k)
        proj = np.zeros((k, box, box), np.float32)
        for i, pr in enumerate(projectors):
            sel = np.nonzero(which == i)[0]
            if sel.size:
                proj[sel] = pr.project_images(mats[sel])
        # Sum the patches into the micrograph with one scatter-add.
        ij = np.rint(coords).astype(int)
        frac = coords - ij
        proj_ft = centred_fft(proj, 2)
        proj = centred_ifft(phase_shift_2d(proj_ft, frac, box), (box, box))
        oy, ox = np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij")
        yy = (ij[:, 1, None, None] + oy[None]).ravel()
        xx = (ij[:, 0, None, None] + ox[None]).ravel()
        mic = np.bincount(yy * size + xx, weights=proj.ravel(), minlength=size * size).reshape(size, size)
        mean_def = rng.uniform(*cfg.defocus_range)
        astig = rng.uniform(0, cfg.max_astigmatism)
        ang = rng.uniform(0, 180)
        du, dv = mean_def + astig / 2, mean_def - astig / 2
        ctf = ctf_2d(size, px, du, dv, ang, cfg.optics, bfactor=cfg.bfactor)[0]
        patch_var = float(np.var(proj)) if k else 1.0
        sigma_total = np.sqrt(patch_var / cfg.snr)
        # Amorphous specimen (ice, carbon): white, seen through the same CTF, so the micrograph's power
        # spectrum shows Thon rings everywhere, as real ones do, not only under the sparse particles.
        ice = rng.standard_normal((size, size)) * (sigma_total * np.sqrt(cfg.ice)) if cfg.ice > 0 else 0.0
        mic = mic + ice
        signal_ft = fft_module(np).rfft2(mic) * ctf
        # Drift: a random walk, frame 0 at the origin; each frame carries 1/n of the signal.
        steps = rng.normal(0, cfg.drift_step, (cfg.n_frames, 2))
        steps[0] = 0
        drift = np.cumsum(steps, axis=0)
        drift -= drift[cfg.n_frames // 2]
        # Radiation damage: frame f keeps exp(-N_f / (2 Ne(k))) of the signal, N_f its mid-frame exposure.
        exposure = (np.arange(cfg.n_frames) + 0.5) * cfg.dose_per_frame
        damage = np.exp(-exposure[:, None, None] / (2 * damage_ne))
        stem = Path(f"movie_{mv + 1:04d}").stem
        if cfg.local_motion > 0:
            # Each particle moves by the drift plus a smooth local field: render every frame from its
            # own particle positions (one scatter-add over frames x particles).
            tau = (np.arange(cfg.n_frames) - cfg.n_frames // 2) / max(cfg.n_frames // 2, 1)
            motion = drift[:, None, :] + local_field(coords, size, _local_coeffs(size, cfg.local_motion, rng), tau)
            pos = coords[None] + motion  # (n, k, 2)
            pij = np.rint(pos).astype(int)
            shifted = centred_ifft(phase_shift_2d(np.broadcast_to(proj_ft[None], (cfg.n_frames,) + proj_ft.shape)
                                                  .reshape((-1,) + proj_ft.shape[1:]), (pos - pij).reshape(-1, 2),
                                                  box), (box, box))
            fy = np.clip(pij[..., 1, None, None] + oy, 0, size - 1)
            fx = np.clip(pij[..., 0, None, None] + ox, 0, size - 1)
            fidx = (np.arange(cfg.n_frames)[:, None, None, None] * size + fy) * size + fx
            per_frame = np.bincount(fidx.ravel(), weights=shifted.ravel(),
                                    minlength=cfg.n_frames * size * size).reshape(cfg.n_frames, size, size)
            per_frame += ice
            frames_ft = fft_module(np).rfft2(per_frame) * ctf / cfg.n_frames * damage
            frames = fft_module(np).irfft2(frames_ft, s=(size, size))
            pd.DataFrame({"particle": np.tile(np.arange(len(coords)) + 1, cfg.n_frames),
                          "frame": np.repeat(np.arange(cfg.n_frames) + 1, len(coords)),
                          "x": np.tile(coords[:, 0], cfg.n_frames), "y": np.tile(coords[:, 1], cfg.n_frames),
                          "motion_x_px": motion[..., 0].ravel(), "motion_y_px": motion[..., 1].ravel()}
                         ).to_csv(out / "truth" / f"{stem}_particle_motion.csv", index=False)
        else:
            frames_ft = signal_ft[None] / cfg.n_frames * damage
            frames = fft_module(np).irfft2(phase_shift_2d(frames_ft, drift, size), s=(size, size))
        frames += coloured_noise(cfg.n_frames, size, amp, rng, sigma_total / np.sqrt(cfg.n_frames))
        # As recorded: protein dark on a background of the mean counts per pixel and frame.
        frames = background - frames / max(float(np.sqrt(patch_var)), 1e-12) * contrast
        if gain is not None:
            frames = frames / np.where(gain > 0, gain, 1.0)
            frames[:, gain == 0] = 0.0
        name = f"Movies/movie_{mv + 1:04d}." + ("mrcs" if cfg.movie_format == "mrcs" else "tif")
        _write_movie(out / name, frames.astype(np.float32), px, cfg)
        if mv + 1 in cfg.truncate_movies:  # a damaged transfer: the last frame is half missing
            data = (out / name).read_bytes()
            (out / name).write_bytes(data[: len(data) - size * size * 2])
        movie_rows.append({"rlnMicrographMovieName": name, "rlnOpticsGroup": 1})
        rot, tilt, psi = matrix_to_euler(mats)
        rows.append(pd.DataFrame({"movie": name, "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1],
                                  "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
                                  "map_index": which, "rlnDefocusU": du, "rlnDefocusV": dv,
                                  "rlnDefocusAngle": ang}))
        write_star(out / "truth" / "coords" / f"{stem}_autopick.star", {
            "": pd.DataFrame({"rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1],
                              "rlnClassNumber": 0, "rlnAutopickFigureOfMerit": 1.0, "rlnAnglePsi": -999.0})})
        pd.DataFrame({"frame": np.arange(cfg.n_frames) + 1, "shift_x_px": drift[:, 0],
                      "shift_y_px": drift[:, 1]}).to_csv(out / "truth" / f"{stem}_drift.csv", index=False)
    optics = pd.DataFrame([{
        "rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, "rlnMicrographOriginalPixelSize": px,
        "rlnVoltage": cfg.optics.voltage, "rlnSphericalAberration": cfg.optics.cs,
        "rlnAmplitudeContrast": cfg.optics.amplitude_contrast,
    }])
    if gain is not None:
        optics["rlnMicrographGainName"] = "Movies/gain.mrc"
    write_star(out / "movies.star", {"optics": optics, "movies": pd.DataFrame(movie_rows)})
    truth = pd.concat(rows, ignore_index=True)
    truth.to_csv(out / "truth" / "particles_truth.csv", index=False)
    for i, m in enumerate(maps):
        write_map(out / "truth" / f"map_{i:02d}.mrc", m, px)
    return truth
