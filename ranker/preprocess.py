"""The class ranker's image preprocessing: class averages -> 64x64 network inputs.

As RELION's class ranker: cut a centred square window of side W = ceil(D/p) + 1 (rounded up to
even; zero-padded when W exceeds the box), then resample to 64x64 by Fourier cropping or padding.
No intensity normalisation: the network sees the densities as they are.
"""

from __future__ import annotations

import math

import numpy as np

from reconstruct.fourier import resize_fourier

NET_SIZE = 64


def window_size(diameter: float, pixel_size: float) -> int:
    """W = ceil(D/p) + 1, rounded up to even."""
    w = math.ceil(diameter / pixel_size) + 1
    return w + (w % 2)


def network_images(classes: np.ndarray, diameter: float, pixel_size: float, size: int = NET_SIZE) -> np.ndarray:
    """Class averages (K, B, B) -> (K, size, size) float32 network inputs."""
    classes = np.asarray(classes, dtype=np.float32)
    if classes.ndim == 2:
        classes = classes[None]
    if classes.ndim != 3 or classes.shape[1] != classes.shape[2]:
        raise ValueError(f"class averages must be a stack of square images, got shape {classes.shape}")
    if diameter <= 0 or pixel_size <= 0:
        raise ValueError("the particle diameter and pixel size must be positive")
    box = classes.shape[-1]
    w = window_size(diameter, pixel_size)
    if w > box:
        padded = np.zeros((classes.shape[0], w, w), np.float32)
        lo = w // 2 - box // 2
        padded[:, lo:lo + box, lo:lo + box] = classes
        window = padded
    else:
        lo = box // 2 - w // 2
        window = classes[:, lo:lo + w, lo:lo + w]
    return resize_fourier(window, size, ndim=2).astype(np.float32)
