"""Read what the class ranker needs from a 2D classification job (ours, RELION's, or EMPIAR-10812's).

A job is found from its ``*_optimiser.star`` (or a job directory, whose last iteration's optimiser file
is taken), which names the model and data STAR files. Paths in RELION's files are relative to the
project directory; EMPIAR-10812 renamed the files in each job directory (``run_model.star``,
``run_classes.mrcs`` or ``run_class.mrcs``), so each path is also looked for next to the optimiser file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reconstruct.files import InputError, read_particles, read_star
from reconstruct.files.stack import read_named_images
from reconstruct.files.star import MetadataTable

from .features import ClassMetadata

MIN_PARTICLES = 10  # classes with N <= 10 are not scored, as in RELION


@dataclass
class ClassJob:
    """A Class2D job's class averages and the metadata the ranker's features use."""

    optimiser_star: Path
    model_star: Path
    data_star: Path
    images: np.ndarray  # (K, B, B), class k at index k - 1
    classes: pd.DataFrame  # model_classes rows, in class order
    pixel_size: float
    diameter: float  # Å, rlnParticleDiameter
    data: MetadataTable
    ssnr: dict[int, pd.DataFrame]  # model_class_<k> blocks, when written

    @property
    def box(self) -> int:
        """Box size of the class averages (pixels)."""
        return int(self.images.shape[-1])

    @property
    def n_classes(self) -> int:
        """Number of classes in the job."""
        return len(self.classes)

    def class_sizes(self) -> np.ndarray:
        """Particles per class, N = rlnClassDistribution x the number of particles (real-valued, as RELION)."""
        return self.classes.rlnClassDistribution.to_numpy(float) * len(self.data.data)

    def scored(self) -> np.ndarray:
        """Mask of the classes the ranker scores (more than 10 particles)."""
        return self.class_sizes() > MIN_PARTICLES

    def metadata(self, k: int) -> ClassMetadata:
        """Accuracies and resolution of class k (0-based) in Å and degrees, with RELION's fallbacks."""
        row = self.classes.iloc[k]
        n = float(self.class_sizes()[k])
        rot = float(row.get("rlnAccuracyRotations", 999.0))
        if "rlnAccuracyTranslationsAngst" in row:
            trans = float(row["rlnAccuracyTranslationsAngst"])
        else:
            trans = float(row.get("rlnAccuracyTranslations", 999.0)) * self.pixel_size
        if rot > 99 or trans > 99:
            # RELION searches for the expected error here; for tiny classes it uses 5 degrees / 8. The
            # search's caps (30 degrees, 10 px) stand in for it: a class RELION could not assess is poor.
            rot, trans = (5.0, 8.0) if n <= 100 else (min(rot, 30.0), min(trans, 10.0 * self.pixel_size))
        return ClassMetadata(rot, trans, self.resolution(k), n)

    def resolution(self, k: int) -> float:
        """rlnEstimatedResolution if positive, else the SSNR curve's last shell above 1, else Nyquist."""
        row = self.classes.iloc[k]
        d = float(row.get("rlnEstimatedResolution", 0.0))
        if d > 0 and math.isfinite(d):
            return d
        curve = self.ssnr.get(k + 1)
        if curve is not None and {"rlnSsnrMap", "rlnAngstromResolution"} <= set(curve.columns):
            ssnr = curve.rlnSsnrMap.to_numpy(float)
            res = curve.rlnAngstromResolution.to_numpy(float)
            for i in range(1, len(ssnr)):
                if ssnr[i] < 1:
                    return float(res[i - 1])
        return 2 * self.pixel_size


def _candidates(name: str, project_dir: Path, here: Path, fallbacks: tuple[str, ...] = ()) -> list[Path]:
    """Where a path named in a job's files may be: the project, next to the job's file, renamed copies."""
    return [project_dir / name, here / Path(name).name, *(here / f for f in fallbacks)]


def _locate(name: str, project_dir: Path, here: Path, fallbacks: tuple[str, ...] = ()) -> Path | None:
    return next((c for c in _candidates(name, project_dir, here, fallbacks) if c.exists()), None)


def find_optimiser(path: str | Path) -> Path:
    """The optimiser STAR file of a job: the file itself, or the last iteration's in a job directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError(p, "does not exist", "pass a Class2D job directory or its run_itNNN_optimiser.star")
    found = sorted(p.glob("*_optimiser.star"), key=lambda f: [int(t) if t.isdigit() else t
                                                               for t in re.split(r"(\d+)", f.name)])
    if not found:
        raise InputError(p, "has no *_optimiser.star", "is it a finished 2D classification job?")
    return found[-1]


def read_class_job(path: str | Path, project_dir: str | Path | None = None) -> ClassJob:
    """Read a Class2D job's last iteration (or the given optimiser file) for the ranker."""
    opt_path = find_optimiser(path)
    here = opt_path.parent
    project = Path(project_dir) if project_dir is not None else Path.cwd()
    blocks = read_star(opt_path)
    if "optimiser_general" not in blocks:
        raise InputError(opt_path, "has no data_optimiser_general block", "pass a run_itNNN_optimiser.star")
    general = blocks["optimiser_general"].iloc[0]
    if not bool(int(general.get("rlnDoCorrectCtf", 1))):
        raise InputError(opt_path, "the classification was run without CTF correction",
                         "the ranker was trained on CTF-corrected class averages: re-run 2D classification with CTF")
    located = {}
    for label, fallback in (("rlnModelStarFile", "run_model.star"), ("rlnExperimentalDataStarFile", "run_data.star")):
        if label not in general:
            raise InputError(opt_path, f"data_optimiser_general has no {label}")
        found = _locate(str(general[label]), project, here, (fallback,))
        if found is None:
            raise InputError(opt_path, f"{label} {general[label]} not found",
                             "run from the project directory or pass --project_dir")
        located[label] = found
    model_path = located["rlnModelStarFile"]
    model = _read_model(model_path)
    images = read_named_images(model["model_classes"].rlnReferenceImage, model_path,
                               lambda file: _candidates(file, project, here, ("run_classes.mrcs", "run_class.mrcs")))
    diameter = float(general.get("rlnParticleDiameter", -1))
    return class_job_from_files(model_path, located["rlnExperimentalDataStarFile"], images, diameter, opt_path, model)


def _read_model(model_path: Path) -> dict[str, pd.DataFrame]:
    model = read_star(model_path)
    if "model_classes" not in model or "model_general" not in model:
        raise InputError(model_path, "no data_model_classes/data_model_general block: not a classification model")
    for col in ("rlnReferenceImage", "rlnClassDistribution"):
        if col not in model["model_classes"].columns:
            raise InputError(model_path, f"data_model_classes has no {col} column")
    return model


def class_job_from_files(model_path: Path, data_path: Path, images: np.ndarray, diameter: float,
                         optimiser_path: Path | None = None, model: dict[str, pd.DataFrame] | None = None) -> ClassJob:
    """A job from its model and data STAR files and the class images (e.g. uploaded to the HTTP service).

    A non-positive ``diameter`` falls back to 90% of the box, a mask just inside it.
    """
    model = model if model is not None else _read_model(model_path)
    classes = model["model_classes"].reset_index(drop=True)
    mg = model["model_general"].iloc[0]
    if int(mg.get("rlnReferenceDimensionality", 2)) != 2:
        raise InputError(model_path, "is a 3D model", "the ranker scores 2D class averages")
    pixel_size = float(mg.get("rlnPixelSize", 0.0))
    if not pixel_size > 0:
        raise InputError(model_path, "model_general has no positive rlnPixelSize")
    if len(images) != len(classes):
        raise InputError(model_path, f"lists {len(classes)} classes but the stack holds {len(images)} images",
                         "pass the model.star of the same iteration as the class averages")
    if not diameter > 0:
        diameter = 0.9 * images.shape[-1] * pixel_size
    data = read_particles(data_path, required=("rlnClassNumber",))
    numbers = data.data.rlnClassNumber.to_numpy()
    if len(numbers) and (numbers.min() < 1 or numbers.max() > len(classes)):
        raise InputError(data_path, f"rlnClassNumber runs from {numbers.min()} to {numbers.max()} but the job has "
                         f"{len(classes)} classes", "pass the data.star of the same iteration")
    ssnr = {int(m.group(1)): df for name, df in model.items() if (m := re.fullmatch(r"model_class_(\d+)", name))}
    return ClassJob(optimiser_path or model_path, model_path, data_path, np.asarray(images, np.float32), classes,
                    pixel_size, diameter, data, ssnr)
