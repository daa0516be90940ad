"""Real-space operations on image batches: in-plane rotation and background normalisation."""

from __future__ import annotations

from typing import Any

from .backend import array_module, ndimage_module


def rotate_images(images: Any, psi: Any, order: int = 1) -> Any:
    """Rotate each image (B, N, N) about its centre N//2 by its own angle ``psi`` (degrees).

    Uses RELION's in-plane convention (the coordinate system rotates by psi, as in
    :func:`reconstruct.geometry.rotation_2d`): the output at x is the input at R(psi)^T x.
    One interpolation call for the whole batch; pixels from outside the box are zero.
    """
    xp = array_module(images)
    ndi = ndimage_module(xp)
    b, n, _ = images.shape
    c = n // 2
    p = xp.deg2rad(xp.asarray(psi, dtype=xp.float32).reshape(-1, 1, 1))
    y, x = xp.meshgrid(xp.arange(n, dtype=xp.float32) - c, xp.arange(n, dtype=xp.float32) - c, indexing="ij")
    cos, sin = xp.cos(p), xp.sin(p)
    # R^T (x, y) with R = [[cos, sin], [-sin, cos]]
    sx = cos * x - sin * y + c
    sy = sin * x + cos * y + c
    sz = xp.broadcast_to(xp.arange(b, dtype=xp.float32).reshape(-1, 1, 1), sx.shape)
    coords = xp.stack([sz, xp.broadcast_to(sy, sx.shape), sx])
    return ndi.map_coordinates(images, coords, order=order, mode="constant", cval=0.0).astype(images.dtype)


def normalise_background(images: Any, radius: float) -> Any:
    """RELION's extraction normalisation: mean 0 and standard deviation 1 outside ``radius`` px."""
    xp = array_module(images)
    n = images.shape[-1]
    c = xp.arange(n, dtype=xp.float32) - n // 2
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > radius * radius
    bg = images[:, outside]
    mu = bg.mean(axis=1)[:, None, None]
    sd = bg.std(axis=1)[:, None, None]
    return ((images - mu) / xp.maximum(sd, 1e-12)).astype(images.dtype)
