"""Helpers shared by tests: paths of the shipped test models and small simulated maps."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).parent / "data"
ADK_CLOSED = DATA / "1ake_adk_closed.pdb.gz"
ADK_OPEN = DATA / "4ake_adk_open.pdb.gz"
HIV_PROTEASE = DATA / "1hvr.pdb.gz"


@lru_cache(maxsize=8)
def model_map(path: Path, box: int, pixel_size: float) -> np.ndarray:
    """Simulated map of a test model (cached; treat as read-only)."""
    from reconstruct.simulate import atomic_model_map

    return atomic_model_map(path, box, pixel_size)


def make_class2d_job(root: Path, n_classes: int = 4, box: int = 32, px: float = 4.0, stack_name: str = "run_class.mrcs",
             score: float = 0.9, categories: tuple[int, ...] = (1, 2, 6, 1), seed: int = 0) -> Path:
    """A tiny Class2D job in EMPIAR-10812's layout: a blob per good class, noise for junk."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    c = np.arange(box) - box // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    imgs = []
    for k in range(n_classes):
        if categories[k] in (1, 5):
            imgs.append(np.exp(-r2 / (2 * (3 + k) ** 2)) * 3 + rng.normal(0, 0.05, (box, box)))
        else:
            imgs.append(rng.normal(0, 1, (box, box)))
    from reconstruct.files import write_stack, write_star

    write_stack(root / stack_name, np.array(imgs, np.float32), px)
    dist = np.full(n_classes, 1.0 / n_classes)
    classes = pd.DataFrame({"rlnReferenceImage": [f"{k + 1:06d}@Class2D/job007/run_it025_classes.mrcs"
                                                  for k in range(n_classes)],
                            "rlnClassDistribution": dist, "rlnAccuracyRotations": 3.0 + np.arange(n_classes),
                            "rlnAccuracyTranslationsAngst": 2.0,
                            "rlnEstimatedResolution": 8.0 + 2 * np.arange(n_classes)})
    general = {"rlnReferenceDimensionality": 2, "rlnOriginalImageSize": box, "rlnPixelSize": px,
               "rlnNrClasses": n_classes}
    write_star(root / "run_model.star", {"model_general": general, "model_classes": classes})
    n_parts = 25 * n_classes
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@Extract/job003/p.mrcs" for i in range(n_parts)],
                          "rlnClassNumber": np.repeat(np.arange(1, n_classes + 1), 25), "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [px],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    write_star(root / "run_data.star", {"optics": optics, "particles": parts})
    write_star(root / "run_optimiser.star", {"optimiser_general": {
        "rlnModelStarFile": "Class2D/job007/run_it025_model.star",
        "rlnExperimentalDataStarFile": "Class2D/job007/run_it025_data.star", "rlnParticleDiameter": 100.0,
        "rlnDoCorrectCtf": 1}})
    (root / "job_score.txt").write_text(f"{score}\n")
    write_star(root / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": list(categories)})})
    return root
