"""Particle extraction maths, as RELION's ``relion_preprocess --extract``, batched over particles.

- :func:`cut_boxes`: boxes around picked coordinates.  RELION truncates coordinates to integers
  (``(long int)x``) and puts the particle at pixel N/2 of the box; pixels beyond the micrograph edge
  take the value of the nearest edge pixel (RELION fills the box with the micrograph mean and then
  copies the edge rows and columns outwards, which is the same).
- :func:`downsample`: Fourier cropping to a smaller box (RELION's ``rescale``/``resizeMap``), values
  keeping their real-space scale.
- :func:`normalise_background`: RELION's ``normalise`` with ``do_ramp``: a least-squares plane fitted
  to the pixels outside the background circle is subtracted, then the same pixels are brought to
  zero mean and unit standard deviation.
- :func:`extraction_box_sizes`: relion_it.py's choice of the box and down-scaled box from the
  particle diameter.

All functions take and return arrays of one module (NumPy or CuPy) with particles on the first axis.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backend import array_module, fft_module
from .fourier import crop_half

# relion_it.py's down-scaled box sizes (FFT-friendly), in the order they are tried.
RELION_IT_SMALL_BOXES = (48, 64, 96, 128, 160, 192, 256, 288, 300, 320, 360, 384, 400, 420, 450, 480, 512, 640,
                         768, 896, 1024)


def extraction_box_sizes(diameter: float, pixel_size: float, max_pixel_size: float = 3.75) -> tuple[int, int]:
    """relion_it.py's extraction box and down-scaled box for a particle of ``diameter`` Å.

    box = ceil(1.5 D / angpix) rounded up to even; the down-scaled box is the first of
    :data:`RELION_IT_SMALL_BOXES` whose pixel size angpix * box / small is below ``max_pixel_size``
    (3.75 Å/px: Nyquist better than 7.5 Å), or the box itself when that candidate is not smaller.
    """
    if diameter <= 0 or pixel_size <= 0:
        raise ValueError("the particle diameter and pixel size must be positive")
    box = math.ceil(1.5 * diameter / pixel_size)
    box += box % 2
    small = next((s for s in RELION_IT_SMALL_BOXES if pixel_size * box / s < max_pixel_size), box)
    return box, min(small, box)


def default_bg_radius(box: int) -> int:
    """RELION's background radius when none is given: 75% of half the (final) box, rounded."""
    return math.floor(0.375 * box + 0.5)


def integer_centres(x: Any, y: Any) -> tuple[Any, Any]:
    """Integer particle centres as RELION takes them: the coordinates truncated towards zero."""
    xp = array_module(x)
    return xp.trunc(xp.asarray(x)).astype(xp.int64), xp.trunc(xp.asarray(y)).astype(xp.int64)


def inside_micrograph(xi: Any, yi: Any, box: int, shape: tuple[int, int]) -> Any:
    """Boxes that overlap the micrograph at all (RELION refuses boxes lying completely outside)."""
    h, w = shape
    x0, y0 = xi - box // 2, yi - box // 2
    x1, y1 = x0 + box - 1, y0 + box - 1
    return (x1 >= 0) & (x0 < w) & (y1 >= 0) & (y0 < h)


def cut_boxes(mic: Any, xi: Any, yi: Any, box: int) -> Any:
    """Boxes (B, box, box) with particle centre (xi, yi) (integers) at pixel box//2, edges replicated."""
    xp = array_module(mic)
    h, w = mic.shape
    off = xp.arange(box) - box // 2
    rows = xp.clip(xp.asarray(yi)[:, None] + off[None, :], 0, h - 1)
    cols = xp.clip(xp.asarray(xi)[:, None] + off[None, :], 0, w - 1)
    return mic[rows[:, :, None], cols[:, None, :]].astype(xp.float32)


def downsample(images: Any, new_box: int) -> Any:
    """Fourier-crop square images (B, N, N) to (B, new_box, new_box), keeping real-space values."""
    xp = array_module(images)
    n = images.shape[-1]
    if new_box == n:
        return images
    if new_box > n:
        raise ValueError(f"cannot down-scale {n}-px boxes to {new_box} px: --scale must not exceed --extract_size")
    fft = fft_module(xp)
    ft = crop_half(fft.rfft2(images, axes=(-2, -1)), new_box)
    out = fft.irfft2(ft, s=(new_box, new_box), axes=(-2, -1))
    return (out * np.float32((new_box / n) ** 2)).astype(xp.float32)


def background_mask(box: int, radius: float, xp: Any) -> Any:
    """Pixels with i^2 + j^2 > radius^2 around the centre box//2: RELION's background."""
    c = xp.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) > radius * radius


def normalise_background(images: Any, radius: float, ramp: bool = True) -> tuple[Any, Any]:
    """RELION's ``normalise``: subtract the background plane (``ramp``), then zero mean and unit std outside ``radius``.

    Returns the images and a boolean per image that is False where the background was flat (std
    below 1e-10) and the image was left as it was, as RELION does with a warning.
    """
    xp = array_module(images)
    b, n, _ = images.shape
    if 2 * radius > n:
        raise ValueError(f"the background radius {radius:g} px is larger than half the {n}-px box")
    mask = background_mask(n, radius, xp)
    flat = images.reshape(b, n * n).astype(xp.float64)
    m = mask.ravel()
    bg = flat[:, m]
    if ramp:
        c = (xp.arange(n) - n // 2).astype(xp.float64)
        yy, xx = xp.meshgrid(c, c, indexing="ij")
        design = xp.stack([xx.ravel(), yy.ravel(), xp.ones(n * n)], axis=1)  # plane a x + b y + c
        coef = bg @ xp.linalg.pinv(design[m]).T  # (B, 3) least squares for all images at once
        flat = flat - coef @ design.T
        bg = flat[:, m]
    avg = bg.mean(axis=1)
    std = xp.sqrt(xp.maximum((bg * bg).mean(axis=1) - avg * avg, 0.0))
    ok = std >= 1e-10
    out = xp.where(ok[:, None], (flat - avg[:, None]) / xp.where(ok, std, 1.0)[:, None], images.reshape(b, n * n))
    return out.reshape(b, n, n).astype(xp.float32), ok


def extract_particles(mic: Any, xi: Any, yi: Any, box: int, scale: int = -1, norm: bool = False,
                      bg_radius: float = -1, ramp: bool = True, invert: bool = False) -> tuple[Any, Any]:
    """RELION's per-particle chain on a batch: cut, down-scale to ``scale``, normalise, invert contrast.

    ``bg_radius`` < 0 uses :func:`default_bg_radius` of the final box.  Returns (images, normalised
    flags).
    """
    xp = array_module(mic)
    imgs = cut_boxes(mic, xi, yi, box)
    if scale > 0:
        imgs = downsample(imgs, scale)
    ok = xp.ones(imgs.shape[0], dtype=bool)
    if norm:
        radius = bg_radius if bg_radius > 0 else default_bg_radius(imgs.shape[-1])
        imgs, ok = normalise_background(imgs, radius, ramp)
    if invert:
        imgs = -imgs
    return imgs, ok
