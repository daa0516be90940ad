"""Training samples from Class2D jobs laid out as EMPIAR-10812 is: one directory per job.

Each job directory holds the last iteration's ``run_optimiser.star``/``run_model.star``/``run_data.star``
and class stack (``run_classes.mrcs`` or ``run_class.mrcs``), ``job_score.txt`` (the job's quality J) and
``backup_selection.star`` (each class's category, ``rlnSelected``). The same reader serves EMPIAR-10812
and our simulated corpus (:mod:`training.corpus`), whose ``job.json`` adds the protein for splits.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ranker.inputs import job_inputs
from ranker.job import read_class_job
from reconstruct.files import InputError, read_star
from reconstruct.progress import progress

from .targets import BEST, GOOD, target_score

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Per retained class: network inputs, target, and what the metrics need."""

    images: np.ndarray  # (n, 64, 64) float32
    features: np.ndarray  # (n, 24) float32
    targets: np.ndarray  # (n,) float32
    categories: np.ndarray  # (n,) rlnSelected
    sizes: np.ndarray  # (n,) particles per class
    job: np.ndarray  # (n,) job name
    group: np.ndarray  # (n,) protein (or job name when unknown)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, mask: np.ndarray) -> Samples:
        """The samples where ``mask`` is true."""
        return Samples(*(getattr(self, f)[mask] for f in ("images", "features", "targets", "categories", "sizes",
                                                            "job", "group")))

    @property
    def good(self) -> np.ndarray:
        """Truth-good classes: categories 1 (best) and 5 (mostly good)."""
        return np.isin(self.categories, (BEST, GOOD))

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        """Samples of several jobs together."""
        fields = ("images", "features", "targets", "categories", "sizes", "job", "group")
        if not parts:
            return Samples(np.zeros((0, 64, 64), np.float32), np.zeros((0, 24), np.float32),
                           *(np.zeros(0) for _ in fields[2:]))
        return Samples(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def is_job_dir(path: Path) -> bool:
    """Whether ``path`` looks like one job of the layout."""
    return (path / "job_score.txt").exists() and (path / "backup_selection.star").exists()


def job_samples(job_dir: str | Path) -> Samples:
    """Samples of one job: RELION's training targets J x category x relative resolution."""
    job_dir = Path(job_dir)
    try:
        j = float((job_dir / "job_score.txt").read_text().split()[0])
    except (OSError, IndexError, ValueError) as e:
        raise InputError(job_dir / "job_score.txt", f"cannot read the job score ({e})",
                         "its first line must be a number between 0 and 1") from e
    sel = read_star(job_dir / "backup_selection.star")
    table = next(iter(sel.values()))
    if "rlnSelected" not in table.columns:
        raise InputError(job_dir / "backup_selection.star", "has no rlnSelected column")
    job = read_class_job(job_dir, project_dir=job_dir)
    cats = table.rlnSelected.to_numpy(int)
    if len(cats) != job.n_classes:
        raise InputError(job_dir / "backup_selection.star", f"has {len(cats)} rows for {job.n_classes} classes",
                         "it must hold one row per class, in class order")
    inputs = job_inputs(job)
    res = np.array([job.resolution(k) for k in range(job.n_classes)])
    targets = target_score(cats, res, job.class_sizes(), j)[inputs.class_index]
    meta = job_dir / "job.json"
    group = json.loads(meta.read_text()).get("protein", job_dir.name) if meta.exists() else job_dir.name
    n = len(inputs.class_index)
    return Samples(inputs.images, inputs.features, targets, cats[inputs.class_index], inputs.sizes,
                   np.full(n, job_dir.name, dtype=object), np.full(n, group, dtype=object))


def find_jobs(roots: list[str | Path]) -> list[Path]:
    """Job directories under each root (the root itself, or its sub-directories), sorted."""
    jobs: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise InputError(root, "is not a directory", "pass the EMPIAR-10812 or corpus directory")
        jobs += [root] if is_job_dir(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_job_dir(p))
    if not jobs:
        raise InputError(", ".join(map(str, roots)), "holds no job directories (job_score.txt + backup_selection.star)",
                         "see the EMPIAR-10812 layout in the README")
    return jobs


def load_samples(roots: list[str | Path], cache: Path | None = None) -> Samples:
    """All jobs' samples; a job that cannot be read is skipped with a warning (the rest still load).

    With ``cache`` (a directory), each job's samples are kept as ``<job>.npz`` and reused until a file of
    the job changes (new categories rewritten in place, say).
    """
    parts = []
    jobs = find_jobs(roots)
    for job_dir in progress(jobs, len(jobs), desc="reading jobs", unit="job"):
        cached = cache / f"{job_dir.name}.npz" if cache is not None else None
        if cached is not None and cached.exists() and cached.stat().st_mtime >= _newest_change(job_dir):
            with np.load(cached, allow_pickle=False) as z:
                parts.append(Samples(*(z[f] if f not in ("job", "group") else z[f].astype(object)
                                       for f in ("images", "features", "targets", "categories", "sizes", "job",
                                                 "group"))))
            continue
        try:
            s = job_samples(job_dir)
        except (InputError, ValueError, OSError) as e:
            log.warning("skipping job %s: %s", job_dir, e)
            continue
        if cached is not None:
            from reconstruct.files.atomic import atomic_path

            with atomic_path(cached) as tmp, open(tmp, "wb") as f:  # several trainings may share a cache
                np.savez(f, images=s.images, features=s.features, targets=s.targets, categories=s.categories,
                         sizes=s.sizes, job=s.job.astype(str), group=s.group.astype(str))
        parts.append(s)
    return Samples.concat(parts)


def _newest_change(job_dir: Path) -> float:
    """The latest modification time of ``job_dir`` and the files in it."""
    return max([job_dir.stat().st_mtime, *(f.stat().st_mtime for f in job_dir.iterdir() if f.is_file())])


def summary(samples: Samples) -> pd.DataFrame:
    """Classes and jobs per group, with the mean target (for logs and the model card)."""
    df = pd.DataFrame({"group": samples.group, "job": samples.job, "target": samples.targets})
    return df.groupby("group").agg(jobs=("job", "nunique"), classes=("target", "size"), mean_target=("target", "mean"))
