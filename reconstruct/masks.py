"""Soft masks: spheres (circles) with a raised-cosine edge, and masks from a density threshold.

As RELION's ``--particle_diameter`` solvent mask and ``relion_mask_create`` (binarise at a
threshold, extend by a number of pixels, add a soft cosine edge).
"""

from __future__ import annotations

from typing import Any

from .backend import array_module, ndimage_module


def _centred_radius(shape: tuple[int, ...], xp: Any) -> Any:
    r2 = 0.0
    for i, n in enumerate(shape):
        c = xp.arange(n, dtype=xp.float32) - n // 2
        sh = [1] * len(shape)
        sh[i] = n
        r2 = r2 + c.reshape(sh) ** 2
    return xp.sqrt(r2)


def soft_sphere(shape: tuple[int, ...], radius: float, edge: float = 3.0, xp: Any = None) -> Any:
    """1 inside ``radius`` px of the centre (N//2), 0 beyond radius+edge, raised cosine between."""
    import numpy as np

    xp = xp or np
    r = _centred_radius(shape, xp)
    t = xp.clip((r - radius) / max(edge, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def threshold_mask(volume: Any, threshold: float, extend: float = 3.0, soft_edge: float = 6.0) -> Any:
    """Binarise ``volume`` at ``threshold``, grow it by ``extend`` px and add a ``soft_edge`` px cosine."""
    xp = array_module(volume)
    ndi = ndimage_module(xp)
    inside = volume > threshold
    if not bool(inside.any()):
        raise ValueError(
            f"no voxel is above the mask threshold {threshold:g} (map range "
            f"{float(volume.min()):g} .. {float(volume.max()):g}); choose a lower threshold"
        )
    dist = ndi.distance_transform_edt(~inside)
    t = xp.clip((dist - extend) / max(soft_edge, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def apply_mask(data: Any, mask: Any, background: str = "zero") -> Any:
    """Multiply by ``mask``; with ``background='mean'`` fill outside with the mean under (1 - mask)."""
    xp = array_module(data)
    if background == "zero":
        return data * mask
    ndim = mask.ndim
    axes = tuple(range(-ndim, 0))
    outside = 1.0 - mask
    bg = xp.sum(data * outside, axis=axes, keepdims=True) / max(float(outside.sum()), 1e-6)
    return data * mask + bg * outside
