"""Coloured Gaussian noise and the contaminants (junk) that real particle stacks contain."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import fft_module
from ..fourier import centred_ifft, radius_grid


def noise_spectrum(box: int, pixel_size: float, white_fraction: float = 0.4, falloff: float = 12.0) -> np.ndarray:
    """Amplitude filter (N, N/2+1) of ice-and-detector noise: white floor plus a low-frequency hump.

    Power = white_fraction + (1 - white_fraction) * exp(-(k * falloff)^2), k in 1/Å, normalised so
    that filtered unit white noise keeps unit variance.
    """
    k = radius_grid((box, box), np) / (box * pixel_size)
    power = white_fraction + (1.0 - white_fraction) * np.exp(-((k * falloff) ** 2))
    full_mean = (2 * power.sum() - power[:, 0].sum() - power[:, -1].sum()) / (box * box)
    return np.sqrt(power / full_mean).astype(np.float32)


def coloured_noise(n: int, box: int, amp: np.ndarray, rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    """``n`` images of Gaussian noise with standard deviation ``sigma`` and spectrum ``amp``."""
    white = rng.standard_normal((n, box, box)).astype(np.float32)
    ft = fft_module(np).rfft2(white) * amp
    return (fft_module(np).irfft2(ft, s=(box, box)) * sigma).astype(np.float32)


def ice_blobs(n: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """Ice contamination: one or two large, smooth, strong blobs per image (unit peak height)."""
    c = np.arange(box) - box // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    out = np.zeros((n, box, box), np.float32)
    for k in range(2):  # two blob layers, vectorised over images
        cx, cy = rng.uniform(-0.4, 0.4, (2, n, 1, 1)) * box
        s = rng.uniform(0.15, 0.35, (n, 1, 1)) * box
        present = (rng.random((n, 1, 1)) < (1.0 if k == 0 else 0.5))
        out += present * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return out


def carbon_edges(n: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """Carbon-film edges: a soft step across the image along a random line (values 0..1)."""
    c = np.arange(box) - box // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    ang = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    off = rng.uniform(-0.3, 0.3, (n, 1, 1)) * box
    d = xx * np.cos(ang) + yy * np.sin(ang) - off
    return (0.5 * (1 + np.tanh(d / 1.5))).astype(np.float32)


def radial_profile_scale(images: Any, mask: Any) -> float:
    """Mean per-image variance of ``images`` inside ``mask``: the signal power used to set the SNR."""
    m = mask.astype(bool)
    vals = images[:, m]
    return float(np.mean(np.var(vals, axis=1)))


def apply_ctf_real(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Convolve centred real images (B, N, N) with CTFs given as half transforms (B, N, N/2+1)."""
    from ..fourier import centred_fft

    box = images.shape[-1]
    return centred_ifft(centred_fft(images, 2) * ctf, (box, box)).astype(np.float32)
