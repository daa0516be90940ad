"""Fit the job-context stage (:mod:`ranker.context`) on the network's scores of the training jobs.

scikit-learn's ``GradientBoostingRegressor`` fits the trees; they are then exported as plain arrays. Its
settings were chosen by cross-validation grouped by protein on the training proteins' jobs (never on the
test protein): depth-4 trees, 300 of them, learning rate 0.05, at least 40 classes per leaf, 80% subsampling.
Scores for threshold calibration come from fitting on some jobs and predicting others (``GroupKFold`` by
job), so the threshold is not chosen on scores of classes the trees have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.model_selection import GroupKFold

from ranker.context import JOB_SUMMARIES, MIN_CLASSES, JobContext, context_table


class TooFewJobs(ValueError):
    """The fitting data has too few jobs (with enough classes) for the stage."""


TREES = {"n_estimators": 300, "learning_rate": 0.05, "max_depth": 4, "min_samples_leaf": 40, "subsample": 0.8}


def job_tables(scores: np.ndarray, sizes: np.ndarray, features: np.ndarray, job: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Context rows of every class (:func:`ranker.context.context_table`, job by job) and which rows
    belong to jobs with enough classes for the stage to apply."""
    table = np.zeros((len(scores), len(JOB_SUMMARIES) + 24))
    usable = np.zeros(len(scores), bool)
    for name in np.unique(job):
        rows = np.nonzero(job == name)[0]
        table[rows] = context_table(scores[rows], sizes[rows], features[rows])
        usable[rows] = rows.size >= MIN_CLASSES and sizes[rows].sum() > 0
    return table, usable


def _fit_trees(table: np.ndarray, targets: np.ndarray, seed: int) -> GradientBoostingRegressor:
    return GradientBoostingRegressor(**TREES, random_state=seed).fit(table, targets)


def export(model: GradientBoostingRegressor, network_sha256: str) -> JobContext:
    """The fitted ensemble as padded arrays (squared-error loss: its start value is a constant)."""
    trees = [est.tree_ for est in model.estimators_[:, 0]]
    n = max(t.node_count for t in trees)

    def pad(attr: str, fill: float, dtype: type) -> np.ndarray:
        out = np.full((len(trees), n), fill, dtype)
        for i, t in enumerate(trees):
            v = getattr(t, attr)
            out[i, : t.node_count] = v.reshape(t.node_count)
        return out

    init = float(np.ravel(model.init_.constant_)[0])
    return JobContext(pad("children_left", -1, np.int64), pad("children_right", -1, np.int64),
                      np.maximum(pad("feature", 0, np.int64), 0), pad("threshold", 0.0, np.float64),
                      pad("value", 0.0, np.float64), init, float(model.learning_rate), network_sha256)


@dataclass
class FittedContext:
    """The stage and its out-of-fold scores of the jobs it was fitted on (for the threshold)."""

    stage: JobContext
    out_of_fold: np.ndarray  # final scores of the fitting classes, each from trees that did not see its job


def fit_context(scores: np.ndarray, sizes: np.ndarray, features: np.ndarray, job: np.ndarray, targets: np.ndarray,
                network_sha256: str, seed: int = 12, folds: int = 5) -> FittedContext:
    """Fit the stage on the network's ``scores`` of the classes of some jobs (train + validation)."""
    table, usable = job_tables(scores, sizes, features, job)
    if usable.sum() < 50 or np.unique(job[usable]).size < folds:
        raise TooFewJobs(f"too few jobs for the job-context stage: {np.unique(job[usable]).size} jobs with "
                         f"{MIN_CLASSES}+ classes (needs {folds})")
    oof = np.asarray(scores, np.float32).copy()
    rows = np.nonzero(usable)[0]
    for fit_idx, pred_idx in GroupKFold(n_splits=folds).split(rows, groups=job[rows]):
        trees = _fit_trees(table[rows[fit_idx]], targets[rows[fit_idx]], seed)
        oof[rows[pred_idx]] = np.clip(trees.predict(table[rows[pred_idx]]), 0, 1)
    stage = export(_fit_trees(table[rows], targets[rows], seed), network_sha256)
    return FittedContext(stage, oof)


def rescore_samples(stage: JobContext | None, scores: np.ndarray, sizes: np.ndarray, features: np.ndarray,
                    job: np.ndarray) -> np.ndarray:
    """Final scores of classes of many jobs: the stage applied job by job (network scores without one)."""
    if stage is None:
        return np.asarray(scores, np.float32)
    out = np.asarray(scores, np.float32).copy()
    for name in np.unique(job):
        rows = np.nonzero(job == name)[0]
        out[rows] = stage.rescore(scores[rows], sizes[rows], features[rows])
    return out
