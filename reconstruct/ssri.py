"""SSRI: the sparseness- and smoothness-regularised maximisation of OPUS-SSRI (Luo et al., PNAS 2021).

Instead of RELION's Wiener-filtered ``D / (W + 1/tau2)``, each half map is the minimiser of

    F(x) = 1/2 <x, A x> - <b, x> + gamma/2 |x - x_prev|^2 + alpha/2 |x|^2
           + alpha sum_j log(eps + |x_j|) + beta sum_p log(eps' + |grad x|_p)

where ``A x = IFFT(W FFT x)`` and ``b = IFFT(D)`` come from the back-projected data (the data term's
minimiser is the unregularised reconstruction D / W), the log-l1 term makes the solvent sparse, the
log-TV term (Nesterov/Huber-smoothed with mu) keeps the map piecewise smooth with edges preserved,
and the proximal term keeps it close to the previous reference.  It is solved by reweighted proximal
gradient steps: a gradient step on the smooth terms, then a soft threshold alpha eta / (eps + |x|).

Here the problem lives on the map's own N^3 grid: the padded accumulators are sampled at the
N-grid's frequencies (each padded-grid point is the kernel-regression estimate there), so every
inner iteration is one N^3 FFT pair; the trilinear kernel's apodisation is undone at the end, as in
RELION.  Parameters are relative, so they carry over between data sets (see :class:`SsriOptions`);
(alpha, beta) are chosen among a few candidates by the prediction error on Fourier voxels held out
from the same half's data, so the two halves stay independent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, fft_module
from .fourier import freq_grid
from .projector import BackProjector, gridding_kernel

log = logging.getLogger("reconstruct")


@dataclass
class SsriOptions:
    """SSRI parameters, relative to the data (defaults from the paper's optimal ranges)."""

    alpha: float = 1.0  # --ssri_alpha: sparseness weight, x eps x the noise RMS of the data gradient
    beta: float = 1.0  # --ssri_beta: smoothness (TV) weight, x eps' x the same noise RMS
    gamma: float = 0.1  # --ssri_gamma: proximal weight, x mean Fourier weight
    eps: float = 1.0  # --ssri_eps: eps of the log-l1 term, x the map's density level (density_level)
    epsp: float = 1.0  # --ssri_epsp: eps' of the log-TV term, x the map's density level
    mu: float = 0.0  # --ssri_mu: Nesterov smoothing of |grad x|, x the density level; 0 = the map's noise level
    iters: int = 100  # --ssri_iters: inner iterations per solve
    lr: float = 1.0  # --ssri_lr: step, x 1/(Lipschitz constant of the smooth terms)
    holdout: float = 0.1  # --ssri_holdout: fraction of Fourier voxels held out to choose (alpha, beta)
    search: bool = True  # try (alpha, beta) x {4, 2, 1, 1/2} and keep the best on held-out data
    fsc_weight: bool = True  # weight each half's SSRI map by the plain halves' FSC before it is a reference


@dataclass
class SsriResult:
    """The regularised map and the parameters that made it (absolute values, for the log)."""

    volume: Any
    alpha: float
    beta: float
    gamma: float
    eps: float
    epsp: float
    mu: float
    step: float
    holdout_error: float


def n_grid_accumulators(data: Any, weight: Any, box: int, padded: int, centre: int) -> tuple[Any, Any]:
    """Sample padded back-projector grids (centred, Friedel-completed) at the N-grid's frequencies.

    ``data``/``weight`` have shape (P+2, P+2, P/2+2) with the origin at (centre, centre, 0); returns
    half transforms (N, N, N/2+1) in FFT order.  Frequency k of the N-grid is padded index k P / N.
    The data are phase-shifted so that their inverse transform is the map centred at N//2 (as maps
    are stored), which lets the solver use plain FFTs on the centred map.
    """
    xp = array_module(data)
    kz, ky, kx = freq_grid((box,) * 3, xp)
    r = padded / box
    iz = (xp.round(kz * r) + centre).astype(xp.int64)
    iy = (xp.round(ky * r) + centre).astype(xp.int64)
    ix = xp.round(kx * r).astype(xp.int64)
    centring = xp.exp((2j * math.pi * (box // 2) / box) * (kz + ky + kx)).astype(xp.complex64)
    return data[iz, iy, ix] * centring, weight[iz, iy, ix]


def tv_gradient(x: Any, epsp: float, mu: float) -> tuple[Any, float]:
    """Gradient and value of sum_p log(eps' + |grad x|_p), |.| smoothed below ``mu``.

    Forward differences d_p,a = x_p - x_(p+e_a) on each axis (none across the last plane);
    d/dx of log(eps' + n) is d_p / (max(n, mu) (n + eps')) -- Huber's smoothing of 1/n -- and each
    difference also enters the gradient at its other end with the opposite sign.
    """
    xp = array_module(x)
    d = []
    n2 = xp.zeros_like(x)
    for a in range(x.ndim):
        da = xp.zeros_like(x)
        lo = [slice(None)] * x.ndim
        hi = [slice(None)] * x.ndim
        lo[a] = slice(0, -1)
        hi[a] = slice(1, None)
        da[tuple(lo)] = x[tuple(lo)] - x[tuple(hi)]
        d.append((da, tuple(lo), tuple(hi)))
        n2 += da * da
    n = xp.sqrt(n2)
    c = 1.0 / (xp.maximum(n, mu) * (n + epsp))
    g = xp.zeros_like(x)
    for da, lo, hi in d:
        cd = c * da
        g += cd
        g[hi] -= cd[lo]
    return g, float(xp.log(epsp + n).sum())


def soft_threshold(z: Any, t: Any) -> Any:
    """sign(z) max(|z| - t, 0): the proximal map of t |z| (elementwise)."""
    xp = array_module(z)
    return xp.sign(z) * xp.maximum(xp.abs(z) - t, 0.0)


class SsriProblem:
    """The SSRI objective for one half map on the N^3 grid, and its proximal-gradient solver."""

    def __init__(self, d_half: Any, w_half: Any, prev: Any, gamma: float, mu: float) -> None:
        xp = array_module(d_half)
        self.xp = xp
        self.fft = fft_module(xp)
        self.shape = prev.shape
        self.w = xp.asarray(w_half, dtype=xp.float32)
        self.b = self.fft.irfftn(d_half, s=self.shape).astype(xp.float32)
        self.prev = xp.asarray(prev, dtype=xp.float32)
        self.gamma, self.mu = gamma, mu

    def smooth_gradient(self, x: Any, alpha: float, beta: float, epsp: float) -> Any:
        """Gradient of the differentiable terms: data + ridge + proximal + TV."""
        xp = self.xp
        ax = self.fft.irfftn((self.w + alpha) * self.fft.rfftn(x), s=self.shape).astype(xp.float32)
        g = ax - self.b + self.gamma * (x - self.prev)
        if beta > 0:
            g += beta * tv_gradient(x, epsp, self.mu)[0]
        return g

    def objective(self, x: Any, alpha: float, beta: float, eps: float, epsp: float) -> float:
        """F(x) (the surrogate the iterations decrease), for tests and diagnostics."""
        xp = self.xp
        ax = self.fft.irfftn((self.w + alpha) * self.fft.rfftn(x), s=self.shape)
        f = 0.5 * float((x * ax).sum()) - float((self.b * x).sum())
        f += 0.5 * self.gamma * float(((x - self.prev) ** 2).sum())
        f += alpha * float(xp.log(eps + xp.abs(x)).sum())
        if beta > 0:
            f += beta * tv_gradient(x, epsp, self.mu)[1]
        return f

    def solve(self, x: Any, alpha: float, beta: float, eps: float, epsp: float, step: float, iters: int) -> Any:
        """``iters`` reweighted proximal-gradient iterations from ``x``."""
        xp = self.xp
        for _ in range(iters):
            t = (step * alpha) / (eps + xp.abs(x))  # reweighted l1 at the current iterate
            x = soft_threshold(x - step * self.smooth_gradient(x, alpha, beta, epsp), t).astype(xp.float32)
        return x


def density_level(volume: Any) -> float:
    """Half the mean magnitude of the strongest 1/32 of the voxels: a density level like a mask
    threshold, stable whether the map is dense (noisy) or sparse (already regularised)."""
    xp = array_module(volume)
    v = xp.abs(volume).ravel()
    k = max(1, v.size // 32)
    return 0.5 * float(xp.partition(v, v.size - k)[v.size - k:].mean())


def _holdout_mask(shape: tuple[int, ...], radius: float, fraction: float, rng: np.random.Generator, xp: Any) -> Any:
    """Random ``fraction`` of the half-transform voxels within ``radius`` (Fourier pixels)."""
    kz, ky, kx = freq_grid(shape, xp)
    inside = (kz * kz + ky * ky + kx * kx) <= radius * radius
    pick = xp.asarray(rng.random(inside.shape) < fraction)
    return inside & pick


def ssri_reconstruct(bp: BackProjector, prev: Any, radius: float, opt: SsriOptions,
                     rng: np.random.Generator) -> SsriResult:
    """One SSRI M-step for one half set (or, in the last iteration, both joined).

    ``bp`` holds the half's back-projected data, ``prev`` its previous (solvent-flattened) reference,
    ``radius`` the current resolution in Fourier pixels (the held-out error is measured within it).
    """
    xp = bp.xp
    box = bp.box
    d, w = n_grid_accumulators(*bp.grids(), box, bp.padded, bp.centre)
    shape = (box,) * 3
    kernel = gridding_kernel(box, bp.padded, 3, xp)
    prev_k = xp.asarray(prev, dtype=xp.float32) * kernel  # the solve is on the kernel-apodised map
    positive = w > 0
    # Sampled voxels; the few with a sliver of weight at the edge of the data would dominate 1/W.
    in_radius = w > 0.01 * float(xp.median(w[positive])) if bool(positive.any()) else positive
    w_mean = float(w[in_radius].mean()) if bool(in_radius.any()) else 1.0
    level = density_level(prev_k)
    if level <= 0:
        level = float(xp.abs(fft_module(xp).irfftn(xp.where(in_radius, d / xp.where(in_radius, w, 1), 0),
                                                    s=shape)).max()) or 1.0
    eps, epsp = opt.eps * level, opt.epsp * level
    # Default smoothing: the noise level of one voxel of the unregularised map (its Fourier
    # coefficients have variance ~1/W), so that gradients within the noise are treated quadratically.
    noise = math.sqrt(float((1.0 / w[in_radius]).mean()) / box**3) if bool(in_radius.any()) else level
    mu = opt.mu * level if opt.mu > 0 else noise
    gamma = opt.gamma * w_mean
    # The data term's gradient at the truth is pure noise with this RMS per voxel (W is the inverse
    # noise variance of each Fourier coefficient): thresholds are set in its units.
    g_noise = math.sqrt(w_mean / box**3)
    alpha0, beta0 = opt.alpha * g_noise * eps, opt.beta * g_noise * epsp
    # 1 / Lipschitz constant of the smooth terms: the largest Fourier weight plus the TV term's
    # curvature bound (12 = largest eigenvalue of the 3D difference Laplacian, weights <= 1/(mu eps')).
    step = opt.lr / (float(w.max()) + alpha0 + gamma + 12 * beta0 / (mu * epsp))
    best = (alpha0, beta0, float("nan"))
    if opt.search and opt.holdout > 0:
        test = _holdout_mask(shape, radius, opt.holdout, rng, xp) & (w > 0)
        train = SsriProblem(xp.where(test, 0, d), xp.where(test, 0, w), prev_k, gamma, mu)
        x = prev_k
        errors = []
        for f in (4.0, 2.0, 1.0, 0.5):  # a path from strong to weak regularisation, warm-started
            x = train.solve(x, alpha0 * f, beta0 * f, eps, epsp, step, max(1, opt.iters // 2))
            pred = fft_module(xp).rfftn(x)
            err = float((xp.abs(w * pred - d) ** 2 / xp.maximum(w, 1e-30))[test].sum() / max(float(w[test].sum()),
                                                                                              1e-30))
            errors.append((err, f))
        err, f = min(errors)
        best = (alpha0 * f, beta0 * f, err)
        log.debug("SSRI held-out errors by (alpha, beta) factor: %s", [(g, round(e, 6)) for e, g in errors])
    alpha, beta = best[0], best[1]
    full = SsriProblem(d, w, prev_k, gamma, mu)
    x = full.solve(prev_k, alpha, beta, eps, epsp, step, opt.iters)
    vol = x / kernel
    return SsriResult(vol, alpha, beta, gamma, eps, epsp, mu, step, best[2])


def describe(res: SsriResult) -> str:
    """The chosen absolute parameters, one line for the log."""
    return (f"alpha {res.alpha:.3g}, beta {res.beta:.3g}, gamma {res.gamma:.3g}, eps {res.eps:.3g}, "
            f"eps' {res.epsp:.3g}, mu {res.mu:.3g}, step {res.step:.3g}, held-out error {res.holdout_error:.4g}")

