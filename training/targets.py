"""Training targets of the class ranker, as EMPIAR-10812's were assigned.

RELION's training script scores a class from three things: the job's quality J (``job_score.txt``), the
class's category (``rlnSelected`` in ``backup_selection.star``: 1 best, then 5, 2, 3/4, and 6/0 useless)
and its resolution relative to the job's best selected class. For simulated jobs the category comes
from the truth (which particles went into the class) instead of a person's judgement.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from reconstruct.geometry import euler_to_matrix

#: rlnSelected categories in RELION's order of preference (EMPIAR-10812's colours).
BEST, GOOD, MIXED, BLURRED, NEIGHBOURS, JUNK = 1, 5, 2, 3, 4, 6
CATEGORY_NAMES = {BEST: "pure good views", GOOD: "mostly good", MIXED: "mixed", BLURRED: "blurred (mixed views)",
                  NEIGHBOURS: "neighbour-contaminated", JUNK: "junk", 0: "none"}
MIN_PARTICLES = 10  # RELION's ranker skips classes with N <= 10


def target_score(category: np.ndarray, resolution: np.ndarray, n_particles: np.ndarray, job_score: float) -> np.ndarray:
    """RELION's training target per class: J x (category base + 0.25 w), w = (d_min/d)^2.

    d_min is the best resolution among category-1 classes with more than 10 particles. Two departures
    from RELION's script, which otherwise gives targets far above 1: a job without a category-1 class
    takes d_min from all its classes of more than 10 particles (RELION: 999 Å), and w is capped at 1.
    """
    c = np.asarray(category, int)
    d = np.asarray(resolution, float)
    big = np.asarray(n_particles) > MIN_PARTICLES
    best = (c == BEST) & big
    pool = d[best] if best.any() else d[big]
    d_min = float(pool.min()) if pool.size else float(d.min(initial=999.0))
    w = np.minimum((d_min / np.maximum(d, 1e-6)) ** 2, 1.0)
    base = np.select([c == BEST, c == GOOD, c == MIXED, (c == BLURRED) | (c == NEIGHBOURS)],
                     [0.75 + 0.25 * w, 0.5 + 0.25 * w, 0.25 + 0.25 * w, 0.25 * w], 0.0)
    return (job_score * base).astype(np.float32)


def view_spread(rot: np.ndarray, tilt: np.ndarray) -> float:
    """Median angle (degrees) between each particle's true viewing direction and their mean direction.

    2D classification does not align mirror views onto each other, so directions are not folded.
    """
    if len(rot) == 0:
        return 0.0
    z = euler_to_matrix(np.asarray(rot, float), np.asarray(tilt, float), np.zeros(len(rot)))[:, 2, :]
    mean = z.mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-6:
        return 180.0
    return float(np.median(np.degrees(np.arccos(np.clip(z @ (mean / norm), -1, 1)))))


MAX_SPREAD = 60.0  # degrees: classes of good particles whose views spread more are blurred averages


def category_of(good: float, neighbour: float, junk: float, spread: float, max_spread: float = MAX_SPREAD) -> int:
    """The category a class earns from its truth make-up (fractions of good, neighbour and junk particles)
    and the median spread of its particles' views."""
    if junk >= 0.5:
        return JUNK
    if neighbour >= 1 / 3:
        return NEIGHBOURS
    if good >= 0.85:
        return BEST if spread <= max_spread else BLURRED
    if good >= 0.7 and spread <= max_spread:
        return GOOD
    return MIXED


def class_categories(classes: np.ndarray, truth: pd.DataFrame, n_classes: int,
                     max_spread: float = MAX_SPREAD) -> pd.DataFrame:
    """Per class (1..K), the truth make-up of its particles and the category it earns.

    ``classes`` holds each particle's rlnClassNumber; ``truth`` is the simulator's particles_truth.csv
    (columns category: good / neighbour / a junk kind, rlnAngleRot, rlnAngleTilt) in the same order.
    A class is junk if half its particles are junk, neighbour-contaminated if a third have a neighbour's
    density at their edge, best if >= 85% are clean good particles from one region of views (median spread
    of their viewing directions at most ``max_spread`` degrees; views of all directions spread ~80-90),
    blurred if they are good but of many views, mostly good at >= 70%, else mixed.
    """
    kind = truth["category"].to_numpy()
    rows = []
    for k in range(1, n_classes + 1):
        sel = np.asarray(classes) == k
        n = int(sel.sum())
        if n == 0:
            rows.append({"class": k, "n": 0, "good": 0.0, "neighbour": 0.0, "junk": 0.0, "spread": 0.0,
                         "category": 0})
            continue
        good = float(np.mean(kind[sel] == "good"))
        nb = float(np.mean(kind[sel] == "neighbour"))
        junk = 1.0 - good - nb
        g = sel & np.isin(kind, ("good", "neighbour"))
        spread = view_spread(truth.rlnAngleRot.to_numpy()[g], truth.rlnAngleTilt.to_numpy()[g])
        cat = category_of(good, nb, junk, spread, max_spread)
        rows.append({"class": k, "n": n, "good": good, "neighbour": nb, "junk": junk, "spread": spread,
                     "category": cat})
    return pd.DataFrame(rows)


def simulated_job_score(snr: float, junk_fraction: float) -> float:
    """J for a simulated job: 1 for clean data at SNR >= 0.3, down to 0.35 x (1 - junk/2) at SNR 0.02.

    EMPIAR-10812's job scores grade the data set's quality; signal-to-noise and contamination are what
    make a simulated data set good or bad.
    """
    t = np.clip(np.log(snr / 0.02) / np.log(0.3 / 0.02), 0.0, 1.0)
    return float((0.35 + 0.65 * t) * (1.0 - 0.5 * junk_fraction))
