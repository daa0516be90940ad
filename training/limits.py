"""What no ranker can beat on a set of labelled jobs, and how visible the categories are.

RELION's targets multiply every class of a job by the job's quality J, so one global score threshold cannot
separate the good classes of a poor data set from the mixed classes of a good one; and a category drawn from
the truth (a class's share of good particles) need not show in its average. These measures bound the metrics
that :func:`training.train.evaluate` reports, so a shortfall can be laid at the labels' or the network's door.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import mean_squared_error, roc_curve


def particle_rates(scores: np.ndarray, good: np.ndarray, sizes: np.ndarray, threshold: float) -> tuple[float, float]:
    """Particle false-positive rate (of particles in not-good classes, the share selected) and
    false-negative rate (of particles in good classes, the share left out) at ``threshold``."""
    sel = scores >= threshold
    bad_total = sizes[~good].sum()
    good_total = sizes[good].sum()
    fpr = float(sizes[sel & ~good].sum() / bad_total) if bad_total > 0 else 0.0
    fnr = float(sizes[~sel & good].sum() / good_total) if good_total > 0 else 0.0
    return fpr, fnr


def calibrate_threshold(scores: np.ndarray, good: np.ndarray, sizes: np.ndarray) -> float:
    """The score threshold minimising the larger of the particle FPR and FNR (ROC weighted by class size)."""
    if good.all() or not good.any():
        return 0.5
    fpr, tpr, thr = roc_curve(good, scores, sample_weight=sizes)
    worst = np.maximum(fpr, 1 - tpr)
    i = int(np.argmin(np.where(np.isfinite(thr), worst, np.inf)))
    return float(thr[i])


def target_ceiling(targets: np.ndarray, good: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    """The particle FPR and FNR of the targets themselves used as scores, at their best single threshold:
    no score that follows the targets does better with one threshold."""
    threshold = calibrate_threshold(targets, good, sizes)
    fpr, fnr = particle_rates(targets, good, sizes, threshold)
    return {"threshold": threshold, "particle_fpr": fpr, "particle_fnr": fnr}


def within_job_auc(values: np.ndarray, categories: np.ndarray, jobs: np.ndarray, positive: tuple[int, ...],
                   negative: tuple[int, ...]) -> float:
    """AUC of telling classes of ``positive`` categories from ``negative`` ones by ``values``, counting only pairs
    of classes of the same job (a job's quality moves all its classes together, so pairs across jobs would measure
    it): the share of such pairs ordered correctly, ties counting half; NaN without any such pair."""
    mask = np.isin(categories, positive + negative) & np.isfinite(values)
    right = pairs = 0.0
    for job in np.unique(jobs[mask]):
        sel = mask & (jobs == job)
        pos = values[sel & np.isin(categories, positive)]
        neg = values[sel & np.isin(categories, negative)]
        if pos.size and neg.size:
            diff = pos[:, None] - neg[None, :]
            right += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return right / pairs if pairs else float("nan")


def merged_floor(targets: np.ndarray, categories: np.ndarray, jobs: np.ndarray,
                 merged: tuple[int, ...]) -> tuple[float, float]:
    """MSE and Spearman of a predictor that knows every target but cannot tell the ``merged`` categories apart
    within a job, so gives each of those classes the mean target of its job's merged classes."""
    inside = np.isin(categories, merged)
    pooled = pd.Series(np.where(inside, targets, np.nan)).groupby(jobs).transform("mean").to_numpy()
    pred = np.where(inside, pooled, targets)
    return float(mean_squared_error(targets, pred)), float(spearmanr(pred, targets).statistic)
