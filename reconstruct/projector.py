"""Fourier-space projection and back-projection, as RELION's Projector and BackProjector do it.

A map of box N is gridding-corrected, zero-padded by ``padding`` (default 2) and transformed once; a
projection with rotation A is then the central slice through that transform along the first rows of
A, sampled with trilinear interpolation (bilinear for 2D images, used to rotate 2D references).
Back-projection scatters image transforms (times CTF) and CTF^2 weights into padded data and weight
grids with the same kernel; ``reconstruct`` divides the two and undoes the kernel's apodisation.

Transforms are kept as half transforms (x >= 0), with Friedel's law used for x < 0.  Everything is
vectorised over images (chunked to bound memory) and written against the array module of its inputs.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from .backend import array_module, fft_module
from .fourier import centred_fft, centred_ifft, freq_grid

# Samples processed per chunk; bounds the temporaries of gather/scatter to a few hundred MB.
_CHUNK_SAMPLES = 1 << 21


def padded_size(box: int, padding: float) -> int:
    """RELION's padded box: round(padding * box) made even."""
    p = round(padding * box)
    return p + (p % 2)


def gridding_kernel(box: int, padded: int, ndim: int, xp: Any) -> Any:
    """Real-space apodisation of linear interpolation on the padded grid, centred at box//2.

    The product over axes of sinc^2(x / padded); projection divides the map by it beforehand and
    reconstruction divides the result by it afterwards.
    """
    x = (xp.arange(box, dtype=xp.float64) - box // 2) / padded
    s = xp.sinc(x) ** 2
    k = s
    for _ in range(ndim - 1):
        k = k[..., None] * s
    return k.astype(xp.float32)


def _padded_kernel(padded: int, ndim: int, xp: Any) -> Any:
    """The interpolation kernel's real-space apodisation over the whole padded box, origin at index 0."""
    s = xp.sinc(fft_module(xp).fftfreq(padded).astype(xp.float64)) ** 2  # sinc^2(x / padded)
    k = s
    for _ in range(ndim - 1):
        k = k[..., None] * s
    return k.astype(xp.float32)


def _slice_coords(size: int, rotations: Any, scale: float, r_max: float, xp: Any) -> tuple[Any, Any]:
    """Padded-grid coordinates (B, size, size/2+1, D) of a central slice, and the in-radius mask."""
    ky, kx = freq_grid((size, size), xp)
    ky = ky.astype(xp.float32)
    kx = kx.astype(xp.float32)
    rows = xp.asarray(rotations, dtype=xp.float32)
    # q_j = kx A[0, j] + ky A[1, j]; coordinates in map axis order (x, y[, z]).
    q = kx[None, :, :, None] * rows[:, None, None, 0, :] + ky[None, :, :, None] * rows[:, None, None, 1, :]
    mask = (kx * kx + ky * ky) <= r_max * r_max
    return q * scale, mask


def _interpolation(q: Any, ndim: int, centre: int, shape: tuple[int, ...]) -> tuple[Any, Any, list[Any]]:
    """Friedel flip, flat index of each sample's lowest corner, and fractions in array axis order.

    The 2^ndim corners of a sample sit at fixed offsets (:func:`_corner_offsets`) from its base
    index, so one index array serves every corner.
    """
    xp = array_module(q)
    flip = q[..., 0] < 0
    q = xp.where(flip[..., None], -q, q)
    base = 0
    frac = []
    for axis in range(ndim):  # array axis order: (z, y, x) <- reversed map order
        c = q[..., ndim - 1 - axis]
        if axis < ndim - 1:
            c = c + centre
        f = xp.floor(c)
        i0 = xp.clip(f.astype(xp.int64), 0, shape[axis] - 2)
        base = base + i0 * math.prod(shape[axis + 1:])
        frac.append((c - f).astype(xp.float32))
    return flip, base, frac


def _corner_offsets(shape: tuple[int, ...]) -> list[int]:
    """Flat offsets of the 2^ndim interpolation corners, axis 0 the most significant bit."""
    ndim = len(shape)
    strides = [math.prod(shape[a + 1:]) for a in range(ndim)]
    return [sum(b * st for b, st in zip(bits, strides)) for bits in itertools.product((0, 1), repeat=ndim)]


def _corner_weights(frac: list[Any]) -> list[Any]:
    """Multilinear weights of the corners, in :func:`_corner_offsets` order."""
    weights: list[Any] = [1.0]
    for f in frac:
        weights = [w * g for w in weights for g in (1.0 - f, f)]
    return weights


def _gather(grid: Any, base: Any, offsets: list[int], frac: list[Any]) -> Any:
    """Multilinear interpolation of the flat ``grid`` at samples given by base indices and fractions.

    Corner values are fetched with one gather each (from views of the grid shifted by the corner
    offset) and combined by successive linear interpolation along x, then y, then z.
    """
    xp = array_module(grid)
    vals = [xp.take(grid[off:], base) for off in offsets]
    for f in reversed(frac):  # innermost (x) axis first: corners pair up as (bit 0, bit 1)
        vals = [lo + f * (hi - lo) for lo, hi in zip(vals[0::2], vals[1::2])]
    return vals[0]


def _scatter(xp: Any, target: Any, base: Any, offsets: list[int], weights: list[Any], values: Any) -> None:
    """target[base + offset_c] += weight_c * values over all corners c, repeated indices summed.

    NumPy's ``add.at`` (fast since NumPy 1.25; faster than a dense ``bincount``), CuPy's atomic adds.
    """
    if xp.__name__ == "cupy":
        import cupyx

        if xp.iscomplexobj(target):  # atomic adds on the interleaved real and imaginary parts
            flat = target.view(xp.float32)
            for off, w in zip(offsets, weights):
                v = w * values
                cupyx.scatter_add(flat, 2 * (base + off), v.real.astype(xp.float32))
                cupyx.scatter_add(flat, 2 * (base + off) + 1, v.imag.astype(xp.float32))
            return
        for off, w in zip(offsets, weights):
            cupyx.scatter_add(target, base + off, (w * values).astype(target.dtype))
        return
    for off, w in zip(offsets, weights):
        xp.add.at(target, base + off, (w * values).astype(target.dtype))


class Projector:
    """Projects a 3D map (or rotates a 2D image) through its padded Fourier transform.

    ``data`` is an N^3 map or an N^2 image (real, centred at N//2).  ``project`` returns half
    transforms (B, n, n/2+1) of the projections for rotation matrices (B, 3, 3) (or (B, 2, 2)),
    unnormalised like ``numpy.fft.rfft2`` of the real-space projection; ``n`` defaults to N and a
    smaller ``n`` crops in Fourier space (RELION's current image size).  ``gridding_correction``
    pre-divides the map by the interpolation kernel's apodisation (RELION does; turn it off only to
    compare exact on-grid slices).
    """

    def __init__(self, data: Any, padding: float = 2.0, r_max: float | None = None,
                 gridding_correction: bool = True) -> None:
        xp = array_module(data)
        self.xp = xp
        self.ndim = data.ndim
        self.box = data.shape[-1]
        self.padding = padding
        self.padded = padded_size(self.box, padding)
        self.r_max = self.box / 2 if r_max is None else float(r_max)
        n, p = self.box, self.padded
        corrected = xp.asarray(data, dtype=xp.float32)
        if gridding_correction:
            corrected = corrected / gridding_kernel(n, p, self.ndim, xp)
        big = xp.zeros((p,) * self.ndim, dtype=xp.float32)
        lo = p // 2 - n // 2
        big[(slice(lo, lo + n),) * self.ndim] = corrected
        ft = centred_fft(big, self.ndim).astype(xp.complex64)
        ft = fft_module(xp).fftshift(ft, axes=tuple(range(self.ndim - 1)))
        # One zero margin after every axis keeps the +1 corner of Nyquist samples in bounds.
        self.shape = (p + 2,) * (self.ndim - 1) + (p // 2 + 2,)
        grid = xp.zeros(self.shape, dtype=xp.complex64)
        grid[(slice(0, p),) * (self.ndim - 1) + (slice(0, p // 2 + 1),)] = ft
        self.centre = p // 2
        self.grid = grid.ravel()

    def project(self, rotations: Any, size: int | None = None) -> Any:
        """Fourier slices (B, n, n/2+1) complex64 for a batch of rotation matrices."""
        xp = self.xp
        size = size or self.box
        rotations = xp.asarray(rotations, dtype=xp.float32).reshape(-1, self.ndim, self.ndim)
        b = rotations.shape[0]
        out = xp.empty((b, size, size // 2 + 1), dtype=xp.complex64)
        r_max = min(self.r_max, size / 2)
        per = max(1, _CHUNK_SAMPLES // (size * (size // 2 + 1)))
        offsets = _corner_offsets(self.shape)
        for s in range(0, b, per):
            q, inside = _slice_coords(size, rotations[s:s + per], self.padded / self.box, r_max, xp)
            flip, base, frac = _interpolation(q, self.ndim, self.centre, self.shape)
            acc = _gather(self.grid, base, offsets, frac)
            acc = xp.where(flip, xp.conj(acc), acc)
            out[s:s + per] = acc * inside
        return out

    def project_images(self, rotations: Any) -> Any:
        """Real-space projections (B, N, N) centred at N//2 (or rotated 2D images)."""
        return centred_ifft(self.project(rotations), (self.box, self.box)).astype(self.xp.float32)


class BackProjector:
    """Accumulates CTF-weighted Fourier slices into padded data and weight grids.

    ``insert`` adds w * CTF * X to the data and w * CTF^2 to the weights at the slice positions of
    each image; ``reconstruct`` returns the N^3 map (or N^2 image) D / (W + 1/tau2), with Friedel
    symmetry on the x = 0 plane and the gridding correction applied.
    """

    def __init__(self, box: int, ndim: int = 3, padding: float = 2.0, xp: Any = None,
                 r_max: float | None = None, symmetry: str = "C1") -> None:
        import numpy as np

        from .symmetry import symmetry_operators

        self.xp = xp or np
        self.sym_ops = symmetry_operators(symmetry, self.xp).astype(self.xp.float32) if ndim == 3 else None
        self.box, self.ndim, self.padding = box, ndim, padding
        self.padded = padded_size(box, padding)
        self.r_max = box / 2 if r_max is None else float(r_max)
        p = self.padded
        self.shape = (p + 2,) * (ndim - 1) + (p // 2 + 2,)
        self.centre = p // 2
        size = math.prod(self.shape)
        self.data = self.xp.zeros(size, dtype=self.xp.complex64)
        self.weight = self.xp.zeros(size, dtype=self.xp.float32)

    def insert(self, images_ft: Any, rotations: Any, ctf: Any = None, weights: Any = None,
               freq_weight: Any = None, ctf_premultiplied: bool = False) -> None:
        """Back-project half transforms (B, n, n/2+1) with rotations (B, D, D).

        ``ctf`` (B, n, n/2+1) multiplies the data once and the weights twice (only the weights when
        the images are already CTF-premultiplied); ``weights`` (B,) are per-image factors (posterior
        probabilities); ``freq_weight`` (n, n/2+1) multiplies data and weights alike (1/sigma2 of the
        noise, as RELION's M-step).  With symmetry every image is inserted once per operator.
        """
        xp = self.xp
        b, size = images_ft.shape[0], images_ft.shape[1]
        rotations = xp.asarray(rotations, dtype=xp.float32).reshape(b, self.ndim, self.ndim)
        ops = self.sym_ops if self.sym_ops is not None else xp.eye(self.ndim, dtype=xp.float32)[None]
        ops_t = xp.swapaxes(ops, 1, 2)
        g = ops.shape[0]
        fw = None if freq_weight is None else xp.asarray(freq_weight, dtype=xp.float32)
        r_max = min(self.r_max, size / 2)
        per = max(1, (_CHUNK_SAMPLES // 4) // (size * (size // 2 + 1) * g))  # x8 corners in the scatter
        offsets = _corner_offsets(self.shape)
        for s in range(0, b, per):
            sl = slice(s, s + per)
            x = images_ft[sl]
            wgt = xp.ones(x.shape, dtype=xp.float32)
            if ctf is not None:
                c = xp.asarray(ctf[sl], dtype=xp.float32)
                if not ctf_premultiplied:
                    x = x * c
                wgt = wgt * c * c
            if weights is not None:
                w_img = xp.asarray(weights[sl], dtype=xp.float32)[:, None, None]
                x = x * w_img
                wgt = wgt * w_img
            if fw is not None:
                x = x * fw
                wgt = wgt * fw
            # Symmetry: an image with pose A of a symmetric map is also one with pose A R_g^T.
            rot = (rotations[sl][:, None] @ ops_t[None]).reshape(-1, self.ndim, self.ndim)
            if g > 1:
                x = xp.repeat(x, g, axis=0)
                wgt = xp.repeat(wgt, g, axis=0)
            q, inside = _slice_coords(size, rot, self.padded / self.box, r_max, xp)
            flip, base, frac = _interpolation(q, self.ndim, self.centre, self.shape)
            x = (xp.where(flip, xp.conj(x), x) * inside).astype(xp.complex64)
            wgt = (wgt * inside).astype(xp.float32)
            base = base.ravel()
            cw = [w.ravel() for w in _corner_weights(frac)]
            _scatter(xp, self.data, base, offsets, cw, x.ravel())
            _scatter(xp, self.weight, base, offsets, cw, wgt.ravel())

    def add(self, other: BackProjector) -> None:
        """Accumulate another back-projector of the same geometry (e.g. join the two half sets)."""
        self.data += other.data
        self.weight += other.weight

    def mean_weight_per_shell(self) -> Any:
        """Average weight W over each Fourier shell of the unpadded box (shells 0..N/2).

        RELION's regularisation scales tau2 by this to compare the prior with the data's weight.
        """
        xp = self.xp
        _, w = self.grids()
        p = self.padded
        grids = freq_grid((p,) * self.ndim, xp)
        r = xp.sqrt(sum(g * g for g in grids)) * (self.box / p)
        shell = xp.round(r).astype(xp.int64)
        shell = fft_module(xp).fftshift(shell, axes=tuple(range(self.ndim - 1)))
        core = (slice(0, p),) * (self.ndim - 1) + (slice(0, p // 2 + 1),)
        wc = w[core].ravel()
        sc = shell.ravel()
        n = self.box // 2 + 1
        inside = sc < n
        total = xp.bincount(sc[inside], weights=wc[inside], minlength=n)
        count = xp.bincount(sc[inside], minlength=n)
        return total / xp.maximum(count, 1)

    def grids(self) -> tuple[Any, Any]:
        """Data and weight grids with Friedel symmetry imposed on the x = 0 plane."""
        xp = self.xp
        d = self.data.reshape(self.shape).copy()
        w = self.weight.reshape(self.shape).copy()
        p = self.padded
        inner = (slice(0, p + 1),) * (self.ndim - 1) + (0,)
        rev = (slice(None, None, -1),) * (self.ndim - 1)
        d0, w0 = d[inner], w[inner]
        d[inner] = d0 + xp.conj(d0[rev])
        w[inner] = w0 + w0[rev]
        return d, w

    def reconstruct(self, tau2: Any = None, min_weight: float = 1e-6, gridding_iterations: int = 10) -> Any:
        """The map (N^3, or N^2) from the accumulated slices.

        With ``gridding_iterations`` > 0 (RELION's default, 10) the data are weighted by Pipe-Menon
        density-compensation weights w, iterated until (W w) convolved with the interpolation kernel
        is 1 wherever there are data; this keeps amplitudes right where the slices sample the grid
        unevenly (low frequencies).  With 0 the data are simply divided by the weights.  A ``tau2``
        array (per Fourier shell of the unpadded box) adds RELION's regularisation 1/tau2 to W.
        Voxels whose weight is below ``min_weight`` times the largest are zero.
        """
        xp = self.xp
        fft = fft_module(xp)
        d, w = self.grids()
        p, n = self.padded, self.box
        core = (slice(0, p),) * (self.ndim - 1) + (slice(0, p // 2 + 1),)
        axes = tuple(range(self.ndim - 1))
        d = fft.ifftshift(d[core], axes=axes)
        w = fft.ifftshift(w[core], axes=axes)
        valid = w > min_weight * float(w.max() if w.size else 0.0)  # judged on the data's weights alone
        if tau2 is not None:
            w = w + 1.0 / xp.maximum(fft.ifftshift(self._tau2_grid(tau2)[core], axes=axes), 1e-30)
        if gridding_iterations > 0:
            shape = (p,) * self.ndim
            kernel = _padded_kernel(p, self.ndim, xp)
            wt = valid.astype(xp.float32)
            for _ in range(gridding_iterations):  # a fixed handful of whole-grid FFT pairs
                conv = fft.rfftn(fft.irfftn(w * wt, s=shape) * kernel)
                wt = xp.where(valid, wt / xp.maximum(xp.abs(conv), 1e-12), 0.0).astype(xp.float32)
            f = d * wt
        else:
            f = xp.where(valid, d / xp.where(valid, w, 1.0), 0.0)
        big = fft.fftshift(fft.irfftn(f, s=(p,) * self.ndim))
        lo = p // 2 - n // 2
        vol = big[(slice(lo, lo + n),) * self.ndim]
        return (vol / gridding_kernel(n, p, self.ndim, xp)).astype(xp.float32)

    def _tau2_grid(self, tau2: Any) -> Any:
        xp = self.xp
        tau2 = xp.asarray(tau2, dtype=xp.float32)
        if tau2.ndim == self.ndim:
            return tau2
        p = self.padded
        grids = freq_grid((p,) * self.ndim, xp)
        r2 = sum(g * g for g in grids)
        r = xp.sqrt(r2) * (self.box / p)
        shell = xp.clip(xp.round(r).astype(xp.int64), 0, tau2.size - 1)
        t = tau2[shell]
        t = fft_module(xp).fftshift(t, axes=tuple(range(self.ndim - 1)))
        full = xp.zeros(self.shape, dtype=xp.float32)
        full[(slice(0, p),) * (self.ndim - 1) + (slice(0, p // 2 + 1),)] = t
        return full
