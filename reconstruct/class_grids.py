"""Fourier grids of K references in one array: projection and back-projection with a class index.

Classification needs the slices of K references at many rotations and back-projects into K grids at
once.  Rather than K projector objects, the K padded half transforms (the layout of
:class:`~reconstruct.projector.Projector`: rows centred, one zero margin per axis) are stacked in one
flat array, and a sample of class k simply reads or writes at ``k * cells`` past its index in one
grid, so every class is handled in the same vectorised gather or scatter.  Works for 2D references
(rotated by in-plane angles) and 3D maps alike.
"""

from __future__ import annotations

import math
from typing import Any

from .backend import fft_module
from .projector import (
    _CHUNK_SAMPLES,
    _corner_offsets,
    _corner_weights,
    _gather,
    _interpolation,
    _scatter,
    _slice_coords,
    gridding_kernel,
    padded_size,
)


class ClassGrids:
    """Geometry of K stacked padded half-transform grids of references of box N."""

    def __init__(self, box: int, n_classes: int, ndim: int = 2, padding: float = 2.0, xp: Any = None) -> None:
        import numpy as np

        self.xp = xp or np
        self.box, self.k, self.ndim, self.padding = box, n_classes, ndim, padding
        self.padded = p = padded_size(box, padding)
        self.shape = (p + 2,) * (ndim - 1) + (p // 2 + 2,)
        self.cells = math.prod(self.shape)
        self.centre = p // 2
        self.core = (slice(0, p),) * (ndim - 1) + (slice(0, p // 2 + 1),)
        self.core_shape = (p,) * (ndim - 1) + (p // 2 + 1,)

    # -- between real space and the grids --------------------------------------------------------
    def zeros(self, dtype: Any = None) -> Any:
        """An empty (K, *shape) grid (complex64 unless ``dtype``)."""
        xp = self.xp
        return xp.zeros((self.k, *self.shape), dtype=dtype or xp.complex64)

    def transform(self, refs: Any, gridding_correction: bool) -> Any:
        """The (M, *shape) padded transforms of M references (M, N, ..., N; usually the K classes),
        centred at N//2.

        With ``gridding_correction`` the references are first divided by the interpolation kernel's
        apodisation (what projection needs); without it the grid is the plain transform (what a
        gradient step updates).
        """
        xp = self.xp
        n, p, d = self.box, self.padded, self.ndim
        data = xp.asarray(refs, dtype=xp.float32)
        if gridding_correction:
            data = data / gridding_kernel(n, p, d, xp)
        big = xp.zeros((data.shape[0],) + (p,) * d, dtype=xp.float32)
        lo = p // 2 - n // 2
        big[(slice(None),) + (slice(lo, lo + n),) * d] = data
        ft = fft_module(xp).rfftn(fft_module(xp).ifftshift(big, axes=tuple(range(1, d + 1))),
                                  axes=tuple(range(1, d + 1)))
        ft = fft_module(xp).fftshift(ft, axes=tuple(range(1, d)))
        grid = xp.zeros((data.shape[0], *self.shape), dtype=xp.complex64)
        grid[(slice(None),) + self.core] = ft.astype(xp.complex64)
        return grid

    def images(self, grid: Any) -> Any:
        """References (K, N, ..., N) back from their padded transforms (no gridding correction)."""
        xp = self.xp
        fft = fft_module(xp)
        n, p, d = self.box, self.padded, self.ndim
        ft = fft.ifftshift(grid[(slice(None),) + self.core], axes=tuple(range(1, d)))
        big = fft.fftshift(fft.irfftn(ft, s=(p,) * d, axes=tuple(range(1, d + 1))), axes=tuple(range(1, d + 1)))
        lo = p // 2 - n // 2
        return big[(slice(None),) + (slice(lo, lo + n),) * d].astype(xp.float32)

    def friedel(self, grid: Any, conjugate: bool = True) -> Any:
        """Fold the x = 0 plane onto itself (each sample and its Friedel mate summed): the half
        transform's redundant column made consistent after a scatter."""
        xp = self.xp
        out = grid.copy()
        inner = (slice(None),) + (slice(0, self.padded + 1),) * (self.ndim - 1) + (0,)
        rev = (slice(None),) + (slice(None, None, -1),) * (self.ndim - 1)
        g0 = out[inner]
        mate = g0[rev]
        out[inner] = g0 + (xp.conj(mate) if conjugate else mate)
        return out

    def shell_index(self) -> Any:
        """Shell (of the unpadded box: round(|k| N / P)) of every grid cell; cells past Nyquist get N//2+1."""
        xp = self.xp
        p, d = self.padded, self.ndim
        axes = [xp.arange(s, dtype=xp.float32) for s in self.shape]
        coords = [a - self.centre for a in axes[:-1]] + [axes[-1]]
        r2 = 0
        for i, c in enumerate(coords):
            r2 = r2 + (c * c).reshape((-1,) + (1,) * (d - 1 - i))
        shell = xp.round(xp.sqrt(r2) * (self.box / p)).astype(xp.int64)
        return xp.minimum(shell, self.box // 2 + 1)

    def shift(self, grid: Any, shifts: Any) -> Any:
        """Grids (K, *shape) of the references shifted by ``shifts`` (K, ndim) pixels, (x, y[, z])."""
        xp = self.xp
        p, d = self.padded, self.ndim
        axes = [xp.arange(s, dtype=xp.float32) for s in self.shape]
        coords = [a - self.centre for a in axes[:-1]] + [axes[-1]]  # array axis order (z,) y, x
        shifts = xp.asarray(shifts, dtype=xp.float32).reshape(self.k, d)
        phase = 0
        for i, c in enumerate(coords):
            s = shifts[:, d - 1 - i].reshape((-1,) + (1,) * d)
            phase = phase + s * c.reshape((1,) + (-1,) + (1,) * (d - 1 - i))
        return (grid * xp.exp((-2j * xp.pi / p) * phase)).astype(xp.complex64)

    # -- slices ---------------------------------------------------------------------------------
    def project(self, grid: Any, classes: Any, rotations: Any, size: int) -> Any:
        """Slices (M, size, size/2+1) of class ``classes[m]`` at rotation ``rotations[m]``."""
        xp = self.xp
        flat = grid.reshape(-1)
        classes = xp.asarray(classes, dtype=xp.int64)
        rotations = xp.asarray(rotations, dtype=xp.float32).reshape(-1, self.ndim, self.ndim)
        m = rotations.shape[0]
        out = xp.empty((m, size, size // 2 + 1), dtype=xp.complex64)
        offsets = _corner_offsets(self.shape)
        per = max(1, _CHUNK_SAMPLES // (size * (size // 2 + 1)))
        for s in range(0, m, per):
            q, inside = _slice_coords(size, rotations[s:s + per], self.padded / self.box, size / 2, xp)
            flip, base, frac = _interpolation(q, self.ndim, self.centre, self.shape)
            base = base + (classes[s:s + per] * self.cells).reshape((-1,) + (1,) * (base.ndim - 1))
            acc = _gather(flat, base, offsets, frac)
            out[s:s + per] = xp.where(flip, xp.conj(acc), acc) * inside
        return out

    def insert(self, data: Any, weight: Any, classes: Any, rotations: Any, values: Any, weights: Any) -> None:
        """Scatter slices ``values`` (M, S, S/2+1) and real ``weights`` into class grids in place."""
        xp = self.xp
        size = values.shape[1]
        dflat, wflat = data.reshape(-1), weight.reshape(-1)
        classes = xp.asarray(classes, dtype=xp.int64)
        rotations = xp.asarray(rotations, dtype=xp.float32).reshape(-1, self.ndim, self.ndim)
        m = rotations.shape[0]
        offsets = _corner_offsets(self.shape)
        per = max(1, (_CHUNK_SAMPLES // 4) // (size * (size // 2 + 1)))
        for s in range(0, m, per):
            q, inside = _slice_coords(size, rotations[s:s + per], self.padded / self.box, size / 2, xp)
            flip, base, frac = _interpolation(q, self.ndim, self.centre, self.shape)
            base = (base + (classes[s:s + per] * self.cells).reshape((-1,) + (1,) * (base.ndim - 1))).ravel()
            v = values[s:s + per]
            v = (xp.where(flip, xp.conj(v), v) * inside).astype(xp.complex64).ravel()
            w = (weights[s:s + per] * inside).astype(xp.float32).ravel()
            cw = [c.ravel() for c in _corner_weights(frac)]
            _scatter(xp, dflat, base, offsets, cw, v)
            _scatter(xp, wflat, base, offsets, cw, w)

