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


MIN_VIEW_MATCH = 0.955  # a noise-free class average this close to one view (at 15 Å) is sharp


def category_of(good: float, neighbour: float, junk: float, match: float, min_match: float = MIN_VIEW_MATCH) -> int:
    """The category a class earns from its truth make-up (fractions of good, neighbour and junk particles)
    and how well its noise-free average (:func:`ideal_class_averages`) matches a single view of the truth
    (:func:`view_match`)."""
    if junk >= 0.5:
        return JUNK
    if neighbour >= 1 / 3:
        return NEIGHBOURS
    if good >= 0.85:
        return BEST if match >= min_match else BLURRED
    if good >= 0.7 and match >= min_match:
        return GOOD
    return MIXED


def class_categories(classes: np.ndarray, truth: pd.DataFrame, n_classes: int,
                     match: np.ndarray | None = None) -> pd.DataFrame:
    """Per class (1..K), the truth make-up of its particles and the category it earns.

    ``classes`` holds each particle's rlnClassNumber; ``truth`` is the simulator's particles_truth.csv
    (columns category: good / neighbour / a junk kind, rlnAngleRot, rlnAngleTilt) in the same order;
    ``match`` is each noise-free class average's :func:`view_match` (default: all sharp). A class is junk if half
    its particles are junk, neighbour-contaminated if a third have a neighbour's density at their edge,
    best if >= 85% are clean good particles and its average looks like one view of the particle,
    blurred if they are good but the average matches no single view, mostly good at >= 70% (and sharp),
    else mixed. The median spread of the particles' viewing directions is recorded too.
    """
    match = np.ones(n_classes) if match is None else np.asarray(match, float)
    kind = truth["category"].to_numpy()
    rows = []
    for k in range(1, n_classes + 1):
        sel = np.asarray(classes) == k
        n = int(sel.sum())
        if n == 0:
            rows.append({"class": k, "n": 0, "good": 0.0, "neighbour": 0.0, "junk": 0.0, "spread": 0.0,
                         "view_match": float(match[k - 1]), "category": 0})
            continue
        good = float(np.mean(kind[sel] == "good"))
        nb = float(np.mean(kind[sel] == "neighbour"))
        junk = 1.0 - good - nb
        g = sel & np.isin(kind, ("good", "neighbour"))
        spread = view_spread(truth.rlnAngleRot.to_numpy()[g], truth.rlnAngleTilt.to_numpy()[g])
        cat = category_of(good, nb, junk, float(match[k - 1]))
        rows.append({"class": k, "n": n, "good": good, "neighbour": nb, "junk": junk, "spread": spread,
                     "view_match": float(match[k - 1]), "category": cat})
    return pd.DataFrame(rows)


def simulated_job_score(snr: float, junk_fraction: float) -> float:
    """J for a simulated job: 1 for clean data at SNR >= 0.3, down to 0.35 x (1 - junk/2) at SNR 0.02.

    EMPIAR-10812's job scores grade the data set's quality; signal-to-noise and contamination are what
    make a simulated data set good or bad.
    """
    t = np.clip(np.log(snr / 0.02) / np.log(0.3 / 0.02), 0.0, 1.0)
    return float((0.35 + 0.65 * t) * (1.0 - 0.5 * junk_fraction))


def view_match(classes: np.ndarray, truth_map: np.ndarray, pixel_size: float, diameter: float,
               resolution: float = 15.0, max_shift: int = 3) -> np.ndarray:
    """Per class average, its best normalised correlation with any noise-free projection of the truth.

    Projections on a ~15° grid of all rotations (HEALPix order 2 x in-plane) and the class averages are
    low-passed to ``resolution`` Å, masked to ``diameter`` and normalised; each pair is compared at
    every shift up to ``max_shift`` px. A class of good particles that matches no single view well is
    an average of many views: blurred, as a person would see it.
    """
    from reconstruct.fourier import centred_ifft, lowpass_filter
    from reconstruct.masks import soft_sphere
    from reconstruct.projector import Projector
    from reconstruct.sampling import orientations

    box = truth_map.shape[0]
    rots, _ = orientations(2)
    proj = centred_ifft(Projector(np.asarray(truth_map, np.float32)).project(rots), (box, box))
    mask = soft_sphere((box, box), diameter / (2 * pixel_size), edge=3)

    def prepare(images: np.ndarray) -> np.ndarray:
        x = lowpass_filter(np.asarray(images, np.float32), pixel_size, resolution, ndim=2) * mask
        x = x - x.sum(axis=(1, 2), keepdims=True) / mask.sum()
        x = x * mask
        return x / np.maximum(np.linalg.norm(x.reshape(len(x), -1), axis=1), 1e-12)[:, None, None]

    fp = np.fft.rfft2(prepare(proj))
    fc = np.fft.rfft2(prepare(classes))
    win = np.r_[0:max_shift + 1, box - max_shift:box]
    out = np.empty(len(classes))
    for k in range(len(classes)):
        cc = np.fft.irfft2(fp * np.conj(fc[k]), s=(box, box))[:, win][:, :, win]
        out[k] = float(cc.max())
    return out


def ideal_class_averages(truth: pd.DataFrame, data: pd.DataFrame, truth_map: np.ndarray, pixel_size: float,
                         n_classes: int, batch: int = 512) -> np.ndarray:
    """Per class (1..K), the noise-free, CTF-free average of its protein particles as 2D classification
    aligned them: what the class average would be with infinitely many particles.

    ``truth`` is the simulator's table (true poses and offsets, ``map_index`` -1 for junk); ``data`` is the
    classification's particle table (rlnClassNumber, rlnAnglePsi, rlnOriginX/YAngst), matched by
    rlnImageName. A particle's clean image is the projection at its true pose, shifted by its true
    offset; the classification's in-plane rotation and offset bring it into the class's frame. Unlike the
    class average itself, this is free of noise, so a class of well-aligned particles from a noisy data set
    is not mistaken for a blurred one. Junk particles are left out (the junk fraction speaks for them);
    a class without protein particles is all zeros.
    """
    from reconstruct.fourier import centred_ifft, phase_shift_2d
    from reconstruct.projector import Projector

    cols = ["rlnImageName", "rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    missing = [c for c in cols if c not in data.columns]
    if missing:
        raise ValueError(f"the classification's particle table lacks {missing}")
    both = truth.merge(data[cols], on="rlnImageName", how="inner", suffixes=("_true", ""))
    if len(both) != len(truth):
        raise ValueError(f"{len(truth) - len(both)} of {len(truth)} true particles are not in the classification's "
                         "table: the truth and the job do not belong together")
    both = both[both.map_index.to_numpy() >= 0]
    box = truth_map.shape[0]
    projector = Projector(np.asarray(truth_map, np.float32))
    sums = np.zeros((n_classes, box * box), np.float64)
    counts = np.zeros(n_classes)
    for s in range(0, len(both), batch):
        part = both.iloc[s:s + batch]
        true_rot = euler_to_matrix(part.rlnAngleRot.to_numpy(), part.rlnAngleTilt.to_numpy(),
                                   part.rlnAnglePsi_true.to_numpy())
        undo = euler_to_matrix(np.zeros(len(part)), np.zeros(len(part)), -part.rlnAnglePsi.to_numpy())
        offset = (part[["rlnOriginXAngst_true", "rlnOriginYAngst_true"]].to_numpy()
                  - part[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
        shift = np.einsum("nij,nj->ni", undo[:, :2, :2], offset) / pixel_size
        images = centred_ifft(phase_shift_2d(projector.project(undo @ true_rot), -shift, box), (box, box))
        onehot = part.rlnClassNumber.to_numpy()[None, :] == np.arange(1, n_classes + 1)[:, None]
        sums += onehot.astype(np.float64) @ images.reshape(len(part), -1)
        counts += onehot.sum(axis=1)
    return (sums / np.maximum(counts, 1)[:, None]).reshape(n_classes, box, box).astype(np.float32)
