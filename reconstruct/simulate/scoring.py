"""Scores of a classification against the simulator's truth: purity, junk separation, class use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def truth_labels(project_dir: str | Path) -> np.ndarray:
    """Per particle, the index of the map it was drawn from (as text), or "junk"."""
    truth = pd.read_csv(Path(project_dir) / "truth/particles_truth.csv")
    return np.where(truth.map_index.to_numpy() >= 0, truth.map_index.astype(str), "junk")


def classification_quality(classes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Purity (particles in their class's majority label), junk separation (junk particles in
    junk-led classes) and the number of classes holding any particle."""
    classes = np.asarray(classes)
    majority = junk_kept = 0
    for k in np.unique(classes):
        vals, counts = np.unique(labels[classes == k], return_counts=True)
        majority += counts.max()
        if vals[counts.argmax()] == "junk":
            junk_kept += counts[vals == "junk"][0]
    return {"purity": majority / classes.size,
            "junk_separation": junk_kept / max(int((labels == "junk").sum()), 1),
            "non_empty": int(np.unique(classes).size)}
