"""The class ranker's 24 per-class features, computed as RELION's ``relion_class_ranker`` does.

From the class average resampled to ~4 Å/px: moments in a ring at the mask edge, in a protein mask
(flood-filled from the centre of a 25 Å low-passed image) and in the solvent around it, the low-passed
image's statistics, scattered and edge signal, and granulometry (sums of grey openings with discs of
radius 1..6); from the job's metadata: rotational and translational accuracy, resolution weighted by the
class size and relative to the box. Slots 0-20 are normalised with RELION's fixed constants, slots
21-23 within the job. See ``../shared/specs/class_ranker.md`` section 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from reconstruct.fourier import resize_fourier

N_FEATURES = 24
FEATURE_NAMES = (
    "acc_rot", "acc_trans", "weighted_resolution", "relative_resolution", "ring_mean", "ring_std",
    "protein_std", "solvent_mean", "solvent_std", "scattered_signal", "edge_signal", "lowpass_mean",
    "lowpass_std", "lowpass_min", "lowpass_max", "granulo_1", "granulo_2", "granulo_3", "granulo_4",
    "granulo_5", "granulo_6", "protein_sum", "solvent_sum", "relative_signal_intensity",
)
GRANULO = slice(15, 21)
JOB_LOCAL = slice(21, 24)
FEATURE_MEAN = np.array([4.352, 3.871, 0.001, 0.061, -0.199, 0.424, 0.744, -0.380, 0.292, 0.024, 0.047,
                         0.116, 0.638, -1.112, 2.990, 837.576, 726.097, 602.175, 483.469, 328.014, 196.059],
                        np.float64)
FEATURE_STD = np.array([4.759, 3.019, 0.002, 0.088, 0.283, 0.629, 0.585, 0.378, 0.485, 0.075, 0.075,
                        0.182, 0.429, 1.087, 1.758, 1958.823, 2845.330, 3605.858, 4001.972, 4399.578, 4709.751],
                       np.float64)
FEATURE_PIXEL = 4.0  # Å, the pixel size of the feature image
LOWPASS = 25.0  # Å
RING_RATIO = 0.95


@dataclass(frozen=True)
class ClassMetadata:
    """What the job's metadata says about one class (Å and degrees)."""

    accuracy_rotation: float
    accuracy_translation: float
    resolution: float
    n_particles: float


def feature_image(image: np.ndarray, pixel_size: float) -> tuple[np.ndarray, float]:
    """Class averages (..., B, B) Fourier-resampled to ~4 Å/px (an even box), and the exact pixel size."""
    box = image.shape[-1]
    n = round(box * pixel_size / FEATURE_PIXEL)
    n -= n % 2
    n = max(n, 2)
    return resize_fourier(np.asarray(image, np.float64), n, ndim=2), box * pixel_size / n


def radius_grid(n: int) -> np.ndarray:
    """Distance of each pixel from the centre pixel (n/2, n/2)."""
    c = np.arange(n) - n // 2
    return np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)


def lowpass(image: np.ndarray, pixel_size: float, resolution: float = LOWPASS, edge: float = 2.0) -> np.ndarray:
    """Low-pass filter at ``resolution`` Å with a raised-cosine edge ``edge`` Fourier shells wide."""
    n = image.shape[-1]
    f = np.fft.fftfreq(n) * n
    shell = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    cut = n * pixel_size / resolution
    lo, hi = cut - edge / 2, cut + edge / 2
    w = np.where(shell <= lo, 1.0, np.where(shell >= hi, 0.0, 0.5 + 0.5 * np.cos(np.pi * (shell - lo) / edge)))
    return np.fft.ifft2(np.fft.fft2(image, axes=(-2, -1)) * w, axes=(-2, -1)).real


def protein_mask(filtered: np.ndarray, radius: float) -> tuple[np.ndarray, int]:
    """Protein islands grown from the central disc of the low-passed image, and the scattered pixel count.

    Pixels above 5% of the image's standard deviation within ``radius`` form 4-connected islands; an
    island seeded in the central disc (radius 0.6 R) is protein when more than 10% of that disc is in it,
    otherwise its size counts as scattered signal. Islands that never reach the disc are ignored.
    """
    r = radius_grid(filtered.shape[-1])
    above = (filtered > 0.05 * filtered.std()) & (r <= radius)
    labels, n = ndimage.label(above, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    central = r ** 2 <= 0.36 * radius ** 2
    in_disc = np.bincount(labels[central].ravel(), minlength=n + 1)
    size = np.bincount(labels.ravel(), minlength=n + 1)
    seeded = np.arange(n + 1)[1:][in_disc[1:] > 0]
    protein_ids = seeded[in_disc[seeded] > 0.1 * 3.14 * 0.36 * radius ** 2]
    scattered = int(size[np.setdiff1d(seeded, protein_ids)].sum())
    return np.isin(labels, protein_ids) & (labels > 0), scattered


def moments(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, population standard deviation, skewness and kurtosis as RELION computes them (0 if empty)."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    mu = x.mean()
    d = x - mu
    m2 = float((d ** 2).sum())
    std = math.sqrt(m2 / x.size)
    if m2 <= 0:
        return float(mu), std, 0.0, 0.0
    skew = math.sqrt(x.size) * float((d ** 3).sum()) / m2 ** 1.5
    return float(mu), std, skew, x.size * float((d ** 4).sum()) / m2 ** 2


def granulometry(images: np.ndarray, radii: range = range(1, 7)) -> np.ndarray:
    """Sums of grey openings (erosion then dilation) with discs of each radius; off-image pixels ignored.

    ``images`` (..., n, n) -> (..., len(radii)); a stack is opened image by image in one call per radius.
    """
    images = np.asarray(images, np.float64)
    lead = images.shape[:-2]
    stack = images.reshape(-1, *images.shape[-2:])
    big = float(np.abs(stack).max()) * 10 + 1.0
    out = []
    for k in radii:
        c = np.arange(-k, k + 1)
        disc = (c[:, None] ** 2 + c[None, :] ** 2 <= k * k)[None]
        eroded = ndimage.grey_erosion(stack, footprint=disc, mode="constant", cval=big)
        out.append(ndimage.grey_dilation(eroded, footprint=disc, mode="constant", cval=-big).sum(axis=(-2, -1)))
    return np.stack(out, -1).reshape(*lead, len(radii))


def image_features(image: np.ndarray, pixel_size: float, diameter: float) -> np.ndarray:
    """Slots 4-23 (raw) from one class average at ``pixel_size`` with mask ``diameter`` (Å)."""
    return image_features_batch(np.asarray(image)[None], pixel_size, diameter)[0]


def image_features_batch(images: np.ndarray, pixel_size: float, diameter: float) -> np.ndarray:
    """Slots 4-23 (raw) of class averages (K, B, B): resampling, filtering and openings batched."""
    imgs, _ = feature_image(images, pixel_size)
    n = imgs.shape[-1]
    radius = min(diameter / (2 * FEATURE_PIXEL), n / 2)
    filtered = lowpass(imgs, FEATURE_PIXEL)
    granulo = granulometry(imgs) if n >= 15 else np.zeros((len(imgs), 6))
    return np.stack([_one_image(img, f, g, radius) for img, f, g in zip(imgs, filtered, granulo)]) \
        if len(imgs) else np.zeros((0, N_FEATURES - 4))


def _one_image(img: np.ndarray, filtered: np.ndarray, granulo: np.ndarray, radius: float) -> np.ndarray:
    n = img.shape[-1]
    protein, scattered = protein_mask(filtered, radius)
    r = radius_grid(n)
    solvent = (r <= radius) & ~protein
    ring = (r >= RING_RATIO * radius) & (r <= radius)
    edge = np.round(r) == round(radius)
    ring_mean, ring_std, _, _ = moments(img[ring])
    _, protein_std, _, _ = moments(img[protein])
    solvent_mean, solvent_std, _, _ = moments(img[solvent])
    area_p = int(protein.sum())
    protein_sum = float(img[protein].sum())
    solvent_sum = float(img[solvent].sum())
    v = np.zeros(N_FEATURES - 4)
    v[:7] = [ring_mean, ring_std, protein_std, solvent_mean, solvent_std, scattered / (scattered + area_p + 1),
             float(protein[edge].mean()) if edge.any() else 0.0]
    v[7:11] = [filtered.mean(), filtered.std(), filtered.min(), filtered.max()]
    v[11:17] = granulo
    v[17:] = [protein_sum, solvent_sum, protein_sum - solvent_mean * area_p]
    return v


def metadata_features(meta: ClassMetadata, box: int, pixel_size: float) -> np.ndarray:
    """Slots 0-3 (raw): accuracies, resolution weighted by log class size, resolution relative to the box."""
    log_n = math.log(meta.n_particles) if meta.n_particles > 1 else 1e-6
    return np.array([meta.accuracy_rotation, meta.accuracy_translation, 1.0 / (meta.resolution ** 2 * log_n),
                     meta.resolution / (box * pixel_size)])


def raw_features(images: np.ndarray, metadata: list[ClassMetadata], pixel_size: float, diameter: float) -> np.ndarray:
    """(K, 24) raw features of a job's retained classes."""
    box = images.shape[-1]
    if not len(images):
        return np.zeros((0, N_FEATURES))
    meta = np.stack([metadata_features(m, box, pixel_size) for m in metadata])
    return np.concatenate([meta, image_features_batch(images, pixel_size, diameter)], axis=1)


def normalise_features(raw: np.ndarray) -> np.ndarray:
    """RELION's normalisation: fixed constants for slots 0-20, z-scores within the job for 21-23."""
    raw = np.asarray(raw, np.float64)
    out = np.empty_like(raw)
    out[:, :21] = (raw[:, :21] - FEATURE_MEAN) / FEATURE_STD
    local = raw[:, JOB_LOCAL]
    std = local.std(axis=0)
    out[:, JOB_LOCAL] = np.where(std < 1e-10, 0.0, (local - local.mean(axis=0)) / np.where(std < 1e-10, 1.0, std))
    return out.astype(np.float32)
