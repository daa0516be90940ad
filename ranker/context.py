"""Job-context stage: re-scores the network's scores of one job's classes in the light of the whole job.

The network sees one class at a time, but a class's target depends on its job: the job's quality J
scales every class, and a class's resolution counts relative to the job's best. Measured on our
corpus, the network scores the classes of clean jobs too low and those of junk-heavy jobs too high.
This stage takes, per class, the network's score, its features and summaries of the job (the spread of
the job's scores, its class sizes, its mean and best accuracies and resolutions) and returns the final
score from a gradient-boosted tree ensemble fitted on the training jobs (``training.context``).

The ensemble is stored as plain arrays (``.npz``, read with ``allow_pickle=False``), so loading it never
runs code from the file, and it is evaluated here with NumPy: no scikit-learn at scoring time, and no
dependence on scikit-learn's private formats.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from reconstruct.files import InputError
from reconstruct.files.atomic import atomic_path

log = logging.getLogger(__name__)
FORMAT = "autoproc-job-context-1"
#: A job with fewer scored classes than this has too little context: its network scores are used as they are.
MIN_CLASSES = 3
JOB_SUMMARIES = ("score", "size_fraction", "n_classes", "score_mean", "score_max", "score_min", "score_std",
                 "score_median", "score_size_weighted", "score_rank", "score_below_max", "score_q75",
                 "acc_rot_mean", "acc_trans_mean", "weighted_resolution_mean", "relative_resolution_mean",
                 "acc_rot_min", "acc_trans_min", "weighted_resolution_min", "relative_resolution_min")


def context_table(scores: np.ndarray, sizes: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(k, 44) inputs of the stage for the k scored classes of ONE job: :data:`JOB_SUMMARIES` then the
    24 normalised features (as the network got them)."""
    p = np.asarray(scores, np.float64)
    n = np.asarray(sizes, np.float64)
    f = np.asarray(features, np.float64)
    k = p.size
    if f.shape != (k, 24) or n.shape != (k,):
        raise ValueError(f"context needs (k,) scores and sizes and (k, 24) features: got {p.shape}, {n.shape}, "
                         f"{f.shape}")
    ones = np.ones(k)
    weights = n / n.sum() if n.sum() > 0 else ones / max(k, 1)
    summaries = [p, weights, k * ones, p.mean() * ones, p.max() * ones, p.min() * ones,
                 (p.std(ddof=1) if k > 1 else 0.0) * ones, np.median(p) * ones, (weights @ p) * ones,
                 rankdata(p) / k, p - p.max(), np.quantile(p, 0.75) * ones]
    summaries += [f[:, i].mean() * ones for i in range(4)] + [f[:, i].min() * ones for i in range(4)]
    return np.column_stack(summaries + [f])


@dataclass
class JobContext:
    """A fitted stage: regression trees padded to a common node count (T, N) and the network it belongs to."""

    left: np.ndarray  # (T, N) child on x <= threshold; -1 at leaves
    right: np.ndarray  # (T, N)
    feature: np.ndarray  # (T, N) column of :func:`context_table`
    threshold: np.ndarray  # (T, N)
    value: np.ndarray  # (T, N) node values
    init: float  # the ensemble's starting value (mean target)
    learning_rate: float
    network_sha256: str  # the weights whose scores the trees were fitted on
    default_threshold: float | None = None  # selection threshold calibrated on these scores

    def predict(self, table: np.ndarray) -> np.ndarray:
        """Scores (k,) for rows of :func:`context_table`, clipped to [0, 1]."""
        # scikit-learn's trees compare float32 inputs with their float64 thresholds; do the same.
        x = np.asarray(table, np.float32).astype(np.float64)
        t = self.left.shape[0]
        node = np.zeros((t, x.shape[0]), np.int64)
        rows = np.arange(t)[:, None]
        for _ in range(self.left.shape[1]):
            leaf = self.left[rows, node] < 0
            if leaf.all():
                break
            go_left = x[np.arange(x.shape[0])[None, :], self.feature[rows, node]] <= self.threshold[rows, node]
            nxt = np.where(go_left, self.left[rows, node], self.right[rows, node])
            node = np.where(leaf, node, nxt)
        total = self.init + self.learning_rate * self.value[rows, node].sum(axis=0)
        return np.clip(total, 0.0, 1.0).astype(np.float32)

    def rescore(self, scores: np.ndarray, sizes: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Final scores of one job's scored classes; the network's own when the job has under
        :data:`MIN_CLASSES` classes or no class sizes (image-only input)."""
        scores = np.asarray(scores, np.float32)
        if scores.size < MIN_CLASSES or not np.asarray(sizes).sum() > 0:
            return scores
        return self.predict(context_table(scores, sizes, features))

    def save(self, path: Path) -> Path:
        """Write the stage as arrays (atomically)."""
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, format=np.array(FORMAT), left=self.left, right=self.right, feature=self.feature,
                     threshold=self.threshold, value=self.value, init=np.array(self.init),
                     learning_rate=np.array(self.learning_rate), network_sha256=np.array(self.network_sha256),
                     columns=np.array(JOB_SUMMARIES),
                     default_threshold=np.array(np.nan if self.default_threshold is None else self.default_threshold))
        return Path(path)

    @staticmethod
    def load(path: Path) -> JobContext:
        """Read a stage written by :meth:`save`; refuses anything else with a clear message."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise ValueError(f"format {z['format']!s}, expected {FORMAT}")
                stage = JobContext(z["left"].astype(np.int64), z["right"].astype(np.int64),
                                   z["feature"].astype(np.int64), z["threshold"].astype(np.float64),
                                   z["value"].astype(np.float64), float(z["init"]), float(z["learning_rate"]),
                                   str(z["network_sha256"]))
                if "default_threshold" in z and np.isfinite(z["default_threshold"]):
                    stage.default_threshold = float(z["default_threshold"])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(path, f"not a job-context stage ({e})",
                             "delete it to score with the network alone, or re-run `ranker train`") from None
        shapes = {a.shape for a in (stage.left, stage.right, stage.feature, stage.threshold, stage.value)}
        n_cols = len(JOB_SUMMARIES) + 24
        nodes = stage.left.shape[-1] if stage.left.ndim == 2 else 0
        children_ok = all(c.min(initial=-1) >= -1 and c.max(initial=0) < nodes for c in (stage.left, stage.right))
        if len(shapes) != 1 or stage.left.ndim != 2 or not children_ok or stage.feature.min(initial=0) < 0 \
                or stage.feature.max(initial=0) >= n_cols:
            raise InputError(path, "the job-context trees are inconsistent", "re-run `ranker train`")
        return stage


def context_path(weights: Path) -> Path:
    """Where the stage of ``weights`` lives: next to them, ``NAME.context.npz``."""
    return Path(weights).with_suffix(".context.npz")
