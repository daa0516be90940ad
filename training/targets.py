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
CATEGORY_NAMES = {BEST: "pure good views", GOOD: "mostly good", MIXED: "mixed", BLURRED: "blurred",
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


#: A class of good particles is blurred when the resolution to which it is one view (:func:`blur_resolution`)
#: is this many times coarser than that of the job's typical class of good particles (their median):
#: people divide a job's classes by comparing them side by side, and every 2D class averages a range of
#: neighbouring views, so blur is judged against the job's other classes, not against a single view.
#: At 1.4 the classes called blurred looked like their job's others and a network trained on those labels
#: scored them above the pure ones (held-out AUC 0.36); 2.0 keeps the label for blur that shows.
BLUR_FACTOR = 2.0
PURE_GOOD = 0.85  # the fraction of clean good particles that makes a class pure


def blurred_classes(blur: np.ndarray, good: np.ndarray, n: np.ndarray, factor: float = BLUR_FACTOR) -> np.ndarray:
    """Which classes are blurred: :func:`blur_resolution` (Å, NaN for none) more than ``factor`` times the
    median of the job's classes that are >= 85% good particles and hold more than 10 particles. A job
    without such classes has none blurred."""
    blur = np.asarray(blur, float)
    pure = (np.asarray(good) >= PURE_GOOD) & (np.asarray(n) > MIN_PARTICLES) & np.isfinite(blur)
    if not pure.any():
        return np.zeros(blur.shape, bool)
    typical = float(np.median(blur[pure]))
    return np.nan_to_num(blur, nan=0.0) > factor * typical


def category_of(good: float, neighbour: float, junk: float, blurred: bool = False) -> int:
    """The category a class earns from its truth make-up (fractions of good, neighbour and junk particles)
    and whether its noise-free average is blurred (:func:`blurred_classes`)."""
    if junk >= 0.5:
        return JUNK
    if neighbour >= 1 / 3:
        return NEIGHBOURS
    if good >= PURE_GOOD:
        return BLURRED if blurred else BEST
    if good >= 0.7 and not blurred:
        return GOOD
    return MIXED


def class_categories(classes: np.ndarray, truth: pd.DataFrame, n_classes: int,
                     blur: np.ndarray | None = None) -> pd.DataFrame:
    """Per class (1..K), the truth make-up of its particles and the category it earns.

    ``classes`` holds each particle's rlnClassNumber; ``truth`` is the simulator's particles_truth.csv
    (columns category: good / neighbour / a junk kind, rlnAngleRot, rlnAngleTilt) in the same order;
    ``blur`` is each noise-free class average's :func:`blur_resolution` (default: none blurred). A class
    is junk if half its particles are junk, neighbour-contaminated if a third have a neighbour's density
    at their edge, best if >= 85% are clean good particles and it is not blurred (:func:`blurred_classes`),
    blurred if they are good but it is, mostly good at >= 70% (and not blurred), else mixed. The median
    spread of the particles' viewing directions is recorded too.
    """
    blur = np.full(n_classes, np.nan) if blur is None else np.asarray(blur, float)
    kind = truth["category"].to_numpy()
    rows = []
    for k in range(1, n_classes + 1):
        sel = np.asarray(classes) == k
        n = int(sel.sum())
        good = float(np.mean(kind[sel] == "good")) if n else 0.0
        nb = float(np.mean(kind[sel] == "neighbour")) if n else 0.0
        g = sel & np.isin(kind, ("good", "neighbour"))
        spread = view_spread(truth.rlnAngleRot.to_numpy()[g], truth.rlnAngleTilt.to_numpy()[g])
        rows.append({"class": k, "n": n, "good": good, "neighbour": nb, "junk": 1.0 - good - nb if n else 0.0,
                     "spread": spread, "blur_resolution": float(blur[k - 1])})
    cats = pd.DataFrame(rows)
    cats["category"] = categories(cats)
    return cats


def categories(cats: pd.DataFrame) -> np.ndarray:
    """The category of each class of a job from its table (n, good, neighbour, junk, blur_resolution)."""
    blurred = blurred_classes(cats.blur_resolution.to_numpy(), cats.good.to_numpy(), cats.n.to_numpy())
    return np.array([0 if r.n == 0 else category_of(r.good, r.neighbour, r.junk, bool(b))
                     for r, b in zip(cats.itertuples(), blurred, strict=True)], int)


def simulated_job_score(snr: float, junk_fraction: float) -> float:
    """J for a simulated job: 1 for clean data at SNR >= 0.3, down to 0.35 x (1 - junk/2) at SNR 0.02.

    EMPIAR-10812's job scores grade the data set's quality; signal-to-noise and contamination are what
    make a simulated data set good or bad.
    """
    t = np.clip(np.log(snr / 0.02) / np.log(0.3 / 0.02), 0.0, 1.0)
    return float((0.35 + 0.65 * t) * (1.0 - 0.5 * junk_fraction))


class _ViewMatcher:
    """Finds the noise-free projection of a map that an image matches best: over a ~15° grid of all
    rotations (HEALPix order 2 x in-plane) and every shift up to ``max_shift`` px, by the normalised
    correlation of both, low-passed to ``resolution`` Å, masked to ``diameter`` and zero-mean."""

    def __init__(self, truth_map: np.ndarray, pixel_size: float, diameter: float, resolution: float = 15.0,
                 max_shift: int = 3) -> None:
        from reconstruct.masks import soft_sphere
        from reconstruct.projector import Projector
        from reconstruct.sampling import orientations

        self.box = truth_map.shape[0]
        self.pixel_size, self.resolution = pixel_size, resolution
        self.projector = Projector(np.asarray(truth_map, np.float32))
        self.mask = soft_sphere((self.box, self.box), diameter / (2 * pixel_size), edge=3)
        self.window = np.r_[0:max_shift + 1, self.box - max_shift:self.box]
        self.grid, _ = orientations(2)
        self.grid_ft = self._transforms(self.grid)

    def prepare(self, images: np.ndarray, lowpass: bool = True) -> np.ndarray:
        """Images low-passed (optionally), masked and zero-mean inside the mask."""
        from reconstruct.fourier import lowpass_filter

        x = np.asarray(images, np.float32)
        if lowpass:
            x = lowpass_filter(x, self.pixel_size, self.resolution, ndim=2)
        x = x * self.mask
        x = x - x.sum(axis=(1, 2), keepdims=True) / self.mask.sum()
        return x * self.mask

    def projections(self, rotations: np.ndarray, lowpass: bool = True) -> np.ndarray:
        """The map's projections at ``rotations``, prepared as :meth:`prepare` does."""
        from reconstruct.fourier import centred_ifft

        return self.prepare(centred_ifft(self.projector.project(rotations), (self.box, self.box)), lowpass)

    def _transforms(self, rotations: np.ndarray) -> np.ndarray:
        return np.fft.rfft2(_unit(self.projections(rotations)))

    def _best(self, candidates_ft: np.ndarray, image_ft: np.ndarray) -> tuple[int, tuple[int, int], float]:
        b = self.box
        cc = np.fft.irfft2(candidates_ft * np.conj(image_ft), s=(b, b))[:, self.window][:, :, self.window]
        i, dy, dx = np.unravel_index(int(np.argmax(cc)), cc.shape)
        return int(i), (int(self.window[dy]), int(self.window[dx])), float(cc[i, dy, dx])

    def grid_match(self, image: np.ndarray) -> float:
        """The best correlation of ``image`` with any grid projection."""
        return self._best(self.grid_ft, np.fft.rfft2(_unit(self.prepare(image[None]))[0]))[2]

    def best_view(self, image: np.ndarray, steps: tuple[float, ...] = (6.0, 3.0, 1.5, 0.75)
                  ) -> tuple[np.ndarray, tuple[int, int], float]:
        """The rotation, shift and correlation of the projection ``image`` matches best (the projection
        rolled by minus the shift, in px, lies on the image): the grid's best, refined by local searches
        over rotations about each axis of +-``step`` degrees, step by step."""
        from reconstruct.sampling import local_rotations

        image_ft = np.fft.rfft2(_unit(self.prepare(image[None]))[0])
        i, shift, corr = self._best(self.grid_ft, image_ft)
        rot = self.grid[i]
        for step in steps:
            candidates = local_rotations(step, step * np.sqrt(3)) @ rot  # the 3 x 3 x 3 cube around rot
            i, shift, corr = self._best(self._transforms(candidates), image_ft)
            rot = candidates[i]
        return rot, shift, corr


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x.reshape(len(x), -1), axis=1), 1e-12)[:, None, None]


def class_views(ideal: np.ndarray, averages: np.ndarray, truth_map: np.ndarray, pixel_size: float,
                diameter: float) -> pd.DataFrame:
    """Per class, how its averages compare with single views of the truth: ``blur_resolution`` of the
    noise-free average (:func:`blur_resolution`, what decides blurred), and the 15 Å :func:`view_match`
    of the noise-free and of the job's own average (``view_match``, ``average_match``, for the record).
    The truth's projections are made once for all three."""
    matcher = _ViewMatcher(truth_map, pixel_size, diameter)
    return pd.DataFrame({"blur_resolution": blur_resolution(ideal, truth_map, pixel_size, diameter, matcher),
                         "view_match": view_match(ideal, truth_map, pixel_size, diameter, matcher=matcher),
                         "average_match": view_match(averages, truth_map, pixel_size, diameter, matcher=matcher)})


def view_match(classes: np.ndarray, truth_map: np.ndarray, pixel_size: float, diameter: float,
               resolution: float = 15.0, max_shift: int = 3, matcher: _ViewMatcher | None = None) -> np.ndarray:
    """Per class average, its best normalised correlation with any noise-free projection of the truth
    on a ~15° grid of all rotations, both low-passed to ``resolution`` Å and masked to ``diameter``,
    at every shift up to ``max_shift`` px (kept in the corpus's records; :func:`blur_resolution` is
    what decides blurred)."""
    matcher = matcher or _ViewMatcher(truth_map, pixel_size, diameter, resolution, max_shift)
    return np.array([matcher.grid_match(c) for c in np.asarray(classes, np.float32)])


def blur_resolution(ideal: np.ndarray, truth_map: np.ndarray, pixel_size: float, diameter: float,
                    matcher: _ViewMatcher | None = None) -> np.ndarray:
    """Per noise-free class average (:func:`ideal_class_averages`), the resolution (Å) to which it is
    one view of the particle: where its Fourier ring correlation with the best-matching projection of
    the truth (found on a 15° grid, refined to 0.75°) falls below 0.5. A class of particles from one view,
    aligned right, is that view to the end of the data's resolution; averaging neighbouring views or
    misaligning in-plane blurs it from some resolution on. NaN for a class without protein particles.
    """
    from reconstruct.fsc import fsc, resolution_at

    matcher = matcher or _ViewMatcher(truth_map, pixel_size, diameter)
    out = np.full(len(ideal), np.nan)
    full = matcher.prepare(ideal, lowpass=False)
    for k, image in enumerate(np.asarray(ideal, np.float32)):
        if not np.any(image):
            continue
        rot, shift, _ = matcher.best_view(image)
        view = np.roll(matcher.projections(rot[None], lowpass=False)[0], (-shift[0], -shift[1]), axis=(0, 1))
        out[k] = resolution_at(fsc(full[k], view), matcher.box, pixel_size, threshold=0.5).angstrom
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
