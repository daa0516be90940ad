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
RELION.  Parameters are relative, so they carry over between data sets (see :class:`SsriOptions`).

(alpha, beta) are chosen among a few multiples of their automatic values by cross-validation on
particles held out from the same half set, so the two halves stay independent: each candidate is
solved on the other particles of the half, and scored by its correlation, shell by shell, with the
held-out particles' back-projected data (the data are the truth plus independent noise, so this
correlation follows the candidate's FSC against the truth).  The same scores guard each shell: where
the plain Wiener-filtered map of the remaining particles agrees better with the held-out particles
than the chosen SSRI map does, the final map keeps the Wiener map's shell.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, fft_module, to_numpy
from .fourier import freq_grid
from .fsc import shell_index
from .projector import BackProjector, gridding_kernel

log = logging.getLogger("reconstruct")

# Multiples of the automatic (alpha, beta) tried on held-out particles, strong to weak.
SEARCH_FACTORS = (4.0, 2.0, 1.0, 0.5)


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
    holdout: float = 0.1  # --ssri_holdout: fraction of each half's particles held out to choose (alpha, beta)
    search: bool = True  # try (alpha, beta) x SEARCH_FACTORS, keep the best on held-out particles
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
    holdout_score: float  # mean held-out shell correlation of the chosen candidate (nan without a search)
    wiener_shells: int = 0  # shells where the plain Wiener map agreed better with the held-out particles


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


def heldout_shell_scores(pred: Any, d_test: Any, w_test: Any, shells: Any, n_shells: int) -> np.ndarray:
    """Per-shell correlation of a candidate with held-out particles' back-projected data.

    ``pred`` is the candidate's half transform (on the apodised N-grid), ``d_test``/``w_test`` the
    held-out accumulators there.  Per shell, Re<pred, D> / sqrt(<W |pred|^2> <|D|^2 / W>): as D = W x
    truth + noise of variance W, its expectation is the W-weighted correlation of the candidate with
    the truth times a factor that depends on the held-out data only, so candidates rank as their FSC
    against the truth would.  Shells without held-out weight score 0.
    """
    xp = array_module(pred)
    seen = w_test > 0
    idx = xp.where(seen, shells, n_shells).ravel()
    num = xp.bincount(idx, weights=xp.real(xp.conj(pred) * d_test).ravel(), minlength=n_shells + 1)
    p2 = xp.bincount(idx, weights=(w_test * xp.abs(pred) ** 2).ravel(), minlength=n_shells + 1)
    d2 = xp.bincount(idx, weights=(xp.abs(d_test) ** 2 / xp.where(seen, w_test, 1.0)).ravel(),
                     minlength=n_shells + 1)
    num, den = (np.asarray(to_numpy(a[:n_shells]), dtype=np.float64) for a in (num, xp.sqrt(p2 * d2)))
    return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)


def _wiener(d: Any, w: Any, tau2: Any, shells: Any) -> Any:
    """The Wiener-filtered apodised map D / (W + 1/tau2) on the N-grid (half transform)."""
    xp = array_module(d)
    t = xp.asarray(np.maximum(tau2, 1e-30), dtype=xp.float32)[xp.minimum(shells, len(tau2) - 1)]
    return xp.where(w > 0, d / (w + 1.0 / t), 0).astype(xp.complex64)


def ssri_reconstruct(bp: BackProjector, prev: Any, radius: float, opt: SsriOptions,
                     held_out: BackProjector | None = None, tau2: np.ndarray | None = None) -> SsriResult:
    """One SSRI M-step for one half set (or, in the last iteration, both joined).

    ``bp`` holds all the half's back-projected data, ``prev`` its previous (solvent-flattened)
    reference, ``radius`` the current resolution in Fourier pixels (candidates are scored within
    it).  ``held_out`` holds a subset of the same particles back-projected again: with it (and
    ``opt.search``) (alpha, beta) are cross-validated on those particles, and with ``tau2`` (per
    shell, RELION's Wiener prior) each shell of the result falls back to the Wiener map where that
    agrees better with them.  Without it the automatic (alpha, beta) are used as they are.
    """
    xp = bp.xp
    fft = fft_module(xp)
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
        level = float(xp.abs(fft.irfftn(xp.where(in_radius, d / xp.where(in_radius, w, 1), 0), s=shape)).max()) or 1.0
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
    factor, score, keep_wiener = 1.0, float("nan"), None
    if held_out is not None and opt.search:
        d_test, w_test = n_grid_accumulators(*held_out.grids(), box, held_out.padded, held_out.centre)
        d_train, w_train = d - d_test, xp.maximum(w - w_test, 0)
        shells = shell_index(shape, xp)
        n_shells = box // 2 + 1
        band = slice(1, max(2, min(int(radius), n_shells - 1) + 1))
        train = SsriProblem(d_train, w_train, prev_k, gamma, mu)
        x = prev_k
        scored = []
        for f in SEARCH_FACTORS:  # a path from strong to weak regularisation, warm-started
            x = train.solve(x, alpha0 * f, beta0 * f, eps, epsp, step, max(1, opt.iters // 2))
            curve = heldout_shell_scores(fft.rfftn(x), d_test, w_test, shells, n_shells)
            scored.append((float(curve[band].mean()), f, curve))
        score, factor, curve = max(scored, key=lambda t: t[0])
        log.debug("SSRI held-out scores by (alpha, beta) factor: %s", [(f, round(c, 4)) for c, f, _ in scored])
        if tau2 is not None:
            plain = heldout_shell_scores(_wiener(d_train, w_train, tau2, shells), d_test, w_test, shells, n_shells)
            keep_wiener = plain > curve
            keep_wiener[0] = False
    full = SsriProblem(d, w, prev_k, gamma, mu)
    x = full.solve(prev_k, alpha0 * factor, beta0 * factor, eps, epsp, step, opt.iters)
    n_wiener = 0
    if keep_wiener is not None and keep_wiener.any():
        n_wiener = int(keep_wiener.sum())
        use = xp.asarray(keep_wiener)[xp.minimum(shells, n_shells - 1)]
        x = fft.irfftn(xp.where(use, _wiener(d, w, tau2, shells), fft.rfftn(x)), s=shape).astype(xp.float32)
    vol = x / kernel
    return SsriResult(vol, alpha0 * factor, beta0 * factor, gamma, eps, epsp, mu, step, score, n_wiener)


def describe(res: SsriResult) -> str:
    """The chosen absolute parameters, one line for the log."""
    return (f"alpha {res.alpha:.3g}, beta {res.beta:.3g}, gamma {res.gamma:.3g}, eps {res.eps:.3g}, "
            f"eps' {res.epsp:.3g}, mu {res.mu:.3g}, step {res.step:.3g}, held-out correlation "
            f"{res.holdout_score:.4f}, Wiener kept in {res.wiener_shells} shells")

