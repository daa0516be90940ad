"""The network's inputs for one job: 64x64 images and normalised features of the classes it scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .features import FEATURE_MEAN, image_features_batch, normalise_features, raw_features
from .job import ClassJob
from .preprocess import network_images


@dataclass
class JobInputs:
    """Inputs of the retained classes (more than 10 particles), in class order."""

    class_index: np.ndarray  # 0-based class numbers of the retained classes
    images: np.ndarray  # (k, 64, 64) float32
    features: np.ndarray  # (k, 24) float32, normalised
    raw: np.ndarray  # (k, 24) float64, before normalisation
    sizes: np.ndarray  # (k,) particles per class


def job_inputs(job: ClassJob) -> JobInputs:
    """Images and features of the classes RELION's ranker would score in ``job``."""
    keep = np.nonzero(job.scored())[0]
    meta = [job.metadata(int(k)) for k in keep]
    raw = raw_features(job.images[keep], meta, job.pixel_size, job.diameter)
    images = network_images(job.images[keep], job.diameter, job.pixel_size) if keep.size else \
        np.zeros((0, 64, 64), np.float32)
    return JobInputs(keep, images, normalise_features(raw) if keep.size else np.zeros((0, 24), np.float32), raw,
                     job.class_sizes()[keep])


def image_only_inputs(images: np.ndarray, pixel_size: float, diameter: float) -> JobInputs:
    """Inputs from class images alone (no job metadata): every class is scored, and the four metadata
    features (accuracies, resolutions) are set to their normalised mean, 0, so they favour no class."""
    k = len(images)
    raw = np.zeros((k, 24))
    raw[:, :4] = FEATURE_MEAN[:4]
    raw[:, 4:] = image_features_batch(images, pixel_size, diameter)
    return JobInputs(np.arange(k), network_images(images, diameter, pixel_size), normalise_features(raw), raw,
                     np.zeros(k))
