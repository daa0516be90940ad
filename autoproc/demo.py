"""The built-in demo: simulated movies of CFTR (PDB 6MSM, shipped in the package) and its settings.

``autoproc run --demo`` writes the movies into the project, runs the whole chain on them with settings
scaled to a small data set on two CPU cores, and measures the refined map against the truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from reconstruct.simulate import MovieSimulation, atomic_model_map, simulate_movies

from .shipped_schemes import Settings

DEMO_MODEL = "6msm.pdb.gz"
DEMO = MovieSimulation(n_movies=12, size=1024, pixel_size=1.5, n_frames=16, particles_per_movie=70,
                       particle_diameter=130.0, snr=0.12, ice=2.0, float16=True, seed=10288)
TRUTH_BOX = 128  # map box at the movie pixel size: 192 Å, larger than CFTR's ~130 Å


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
    vol = atomic_model_map(demo_model_path(), TRUTH_BOX, cfg.pixel_size)
    simulate_movies([vol], cfg.pixel_size, cfg, out)
    return Path(out) / "movies.star"


def demo_settings(fast: bool = False) -> Settings:
    """The demo's settings: its acquisition, and a run sized for ~300 particles on two cores.

    ``fast`` shrinks the classification and model building further (the test suite's reduced demo).
    """
    st = Settings(movies="Movies/*.mrcs", angpix=DEMO.pixel_size, voltage=DEMO.optics.voltage, cs=DEMO.optics.cs,
                  q0=DEMO.optics.amplitude_contrast, dose_per_frame=DEMO.dose_per_frame, patches=(2, 2),
                  float16=False, particle_diameter=DEMO.particle_diameter, ctf_box=256, class2d_classes=8,
                  class2d_iterations=60, inimodel_classes=1, inimodel_iterations=60, min_particles_3d=100,
                  refine_sampling="7.5 degrees", refine_local_sampling="3.7 degrees", wait_sec=1.0)
    if fast:  # 4 Å pixels (box 48) and shorter runs
        st = replace(st, max_pixel_size=4.1, class2d_classes=6, class2d_iterations=30, inimodel_iterations=30)
    return st


@dataclass
class DemoResult:
    """The refined map against the truth."""

    map: str
    resolution_fsc05: float  # Å, FSC 0.5 with the truth after alignment
    resolution_fsc0143: float
    correlation: float


def compare_with_truth(project: Path, refined_map: Path) -> DemoResult:
    """Align the refined map onto the true map (simulated at the map's grid) and measure their FSC."""
    from reconstruct.align_maps import align_maps
    from reconstruct.files.mrc import read_map
    from reconstruct.fsc import resolution_at

    vol, px = read_map(refined_map)
    truth = atomic_model_map(demo_model_path(), vol.shape[0], px)
    al = align_maps(vol, truth, px, diameter=DEMO.particle_diameter)
    box = vol.shape[0]
    result = DemoResult(str(refined_map.relative_to(project)), resolution_at(al.fsc, box, px, 0.5).angstrom,
                        resolution_at(al.fsc, box, px, 0.143).angstrom, float(al.correlation))
    freq = np.arange(len(al.fsc)) / (box * px)
    (project / "demo_result.json").write_text(json.dumps(
        {**result.__dict__, "fsc": [[float(f), float(c)] for f, c in zip(freq, al.fsc)]}, indent=1))
    return result
