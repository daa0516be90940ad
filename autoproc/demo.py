"""The built-in demo data set: simulated movies of CFTR (PDB 6MSM, shipped in the package)."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

from reconstruct.simulate import MovieSimulation, atomic_model_map, simulate_movies

DEMO_MODEL = "6msm.pdb.gz"
DEMO = MovieSimulation(n_movies=8, size=768, pixel_size=1.5, n_frames=16, particles_per_movie=40,
                       particle_diameter=130.0, snr=0.08, seed=10288)


def demo_model_path() -> Path:
    """Path of the shipped CFTR model."""
    return Path(str(resources.files("autoproc") / "data" / DEMO_MODEL))


def write_demo_data(out: str | Path, n_movies: int | None = None, seed: int | None = None) -> Path:
    """Write the demo movies (Import-ready ``movies.star``) and their truth into ``out``."""
    cfg = DEMO
    if n_movies is not None:
        cfg = replace(cfg, n_movies=n_movies)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    box = 128  # map box at the movie pixel size: 192 Å, larger than CFTR's ~130 Å
    vol = atomic_model_map(demo_model_path(), box, cfg.pixel_size)
    simulate_movies([vol], cfg.pixel_size, cfg, out)
    return Path(out) / "movies.star"
