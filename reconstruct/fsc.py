"""Fourier shell correlation between maps (or images) and the resolution where it crosses a threshold.

Shells are rings of width one Fourier pixel (radius rounded to the nearest integer) over the half
transform, as RELION's ``getFSC``; shell i has resolution N * pixel / i Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, fft_module, to_numpy
from .fourier import radius_grid


def shell_index(shape: tuple[int, ...], xp: Any) -> Any:
    """Integer shell (rounded Fourier radius) of each element of the half transform of ``shape``."""
    return xp.round(radius_grid(shape, xp)).astype(xp.int64)


def fsc(map1: Any, map2: Any, ndim: int | None = None) -> np.ndarray:
    """FSC per shell (0..N/2) between two real maps or images of one shape.

    ``ndim`` (default: all axes) says how many trailing axes form a map; leading axes are a batch and
    give one curve each, shape (B, N/2+1).
    """
    xp = array_module(map1, map2)
    if map1.shape != map2.shape:
        raise ValueError(f"FSC needs maps of one shape, got {map1.shape} and {map2.shape}")
    ndim = ndim or map1.ndim
    shape = map1.shape[-ndim:]
    axes = tuple(range(-ndim, 0))
    fa = fft_module(xp).rfftn(xp.asarray(map1, dtype=xp.float32), axes=axes)
    fb = fft_module(xp).rfftn(xp.asarray(map2, dtype=xp.float32), axes=axes)
    lead = map1.shape[:-ndim]
    n_batch = int(np.prod(lead)) if lead else 1
    n_shells = shape[-1] // 2 + 1
    shells = xp.minimum(shell_index(shape, xp).ravel(), n_shells)  # corners -> overflow bin
    idx = (shells[None, :] + (n_shells + 1) * xp.arange(n_batch)[:, None]).ravel()
    size = n_batch * (n_shells + 1)
    fa, fb = fa.reshape(-1), fb.reshape(-1)
    num = xp.bincount(idx, weights=(fa * xp.conj(fb)).real, minlength=size)
    da = xp.bincount(idx, weights=xp.abs(fa) ** 2, minlength=size)
    db = xp.bincount(idx, weights=xp.abs(fb) ** 2, minlength=size)
    curve = num / xp.sqrt(xp.maximum(da * db, 1e-30))
    curve = to_numpy(curve).reshape(n_batch, n_shells + 1)[:, :n_shells]
    return curve.reshape(lead + (n_shells,)) if lead else curve[0]


def fsc_weighted(volume: Any, curve: np.ndarray) -> Any:
    """``volume`` filtered per shell by sqrt(2 FSC / (1 + FSC)) (zero where FSC <= 0).

    The weight (Rosenthal and Henderson's C_ref) keeps in a reference only what the two independent
    half sets support, so that nothing beyond their gold-standard resolution can steer the alignment.
    """
    xp = array_module(volume)
    shape = volume.shape
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 1.0)
    w = np.sqrt(2 * c / (1 + c))
    w = xp.asarray(np.append(w, 0.0), dtype=xp.float32)  # corners past Nyquist: zero
    shells = xp.minimum(shell_index(shape, xp), w.size - 1)
    fft = fft_module(xp)
    return fft.irfftn(fft.rfftn(xp.asarray(volume, dtype=xp.float32)) * w[shells], s=shape).astype(xp.float32)


@dataclass(frozen=True)
class Resolution:
    """Where an FSC curve crosses a threshold."""

    shell: int  # last shell at or above the threshold before the first crossing
    angstrom: float  # its resolution in Å (inf when even shell 1 is below)


def resolution_at(curve: np.ndarray, box: int, pixel_size: float, threshold: float = 0.143) -> Resolution:
    """Resolution of the last shell before the FSC first drops below ``threshold`` (RELION's rule)."""
    curve = np.asarray(curve)
    below = np.nonzero(curve[1:] < threshold)[0]
    last = int(below[0]) if below.size else len(curve) - 1
    if last < 1:
        return Resolution(0, float("inf"))
    return Resolution(last, box * pixel_size / last)


def shell_resolutions(box: int, pixel_size: float) -> np.ndarray:
    """Spatial frequency (1/Å) of shells 0..N/2: RELION's ``rlnResolution`` column."""
    return np.arange(box // 2 + 1) / (box * pixel_size)
