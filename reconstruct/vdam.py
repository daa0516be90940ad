"""VDAM: RELION-4.0's variable-metric gradient descent with adaptive moments (and EM as its limit).

The references of K classes live as padded Fourier grids (:class:`~reconstruct.class_grids.ClassGrids`).
After each mini-batch the E-step has back-projected, per half set h (particle index mod 2), the
residuals G_h = sum w c (X - c A) / sigma2 and the weights F_h = sum w c^2 / sigma2.  The update is
the one RELION's code performs (``../shared/specs/vdam.md`` section 2, where it differs from the
paper's equations the code is followed):

    G'_h = G_h / max(floor, F_h)                      rescaled gradient (the paper's eps1 as a floor)
    m_h  = 0.9 m_h + 0.1 G'_h                         first moment per half set (G'_h when m_h = 0)
    u    = 0.999 u + 0.001 |G'_1 - G'_2|^2 / |(G'_1 + G'_2) / 2|^2     shared, relative second moment
    g    = ((m_1 + m_2) / 2) / sqrt(u)
    FSC  = SNR / (1 + SNR),  SNR = 2 T mean|V| / mean|m_1 - m_2|   per shell
    V   <- V + eta_k (FSC g - (1 - FSC) V),  eta_k = eta (1 - exp(-(3K + 10) pi_k))

With every particle in each batch, step 1, no moment averaging (m = G') and u = 1 the same update is
an EM iteration: V <- FSC (V + G') = FSC D/F, the data average shrunk by its own per-shell SNR
(``--algorithm em``).  Schedules of mini-batch size, step size and T are RELION's (section 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, to_numpy

BETA1 = 0.9
BETA2 = 0.999


def _clamp(v: float, lo: int, hi: int) -> int:
    return int(min(max(v, lo), hi))


def auto_subsets(n_particles: int, kind: str = "2d") -> tuple[int, int]:
    """RELION's automatic initial and final mini-batch sizes (truncated to int)."""
    n = n_particles
    if kind == "2d":
        return _clamp(0.005 * n, 200, 10000), _clamp(0.05 * n, 1000, 100000)
    if kind == "initial_model":
        return _clamp(0.005 * n, 200, 5000), _clamp(0.1 * n, 1000, 50000)
    if kind == "3d":
        return _clamp(0.1 * n, 200, 100000), _clamp(0.1 * n, 1000, 100000)
    raise ValueError(f"unknown VDAM kind {kind!r}: 2d, initial_model or 3d")


def _sigmoid(x: float, b: float, a: float) -> float:
    """RELION's logistic switch s(x) = 1 / (10^((x - b - a/2) / (a/4)) + 1): 1 before b, 0 after b + a."""
    a = max(a, 1)
    return 1.0 / (10.0 ** ((x - b - a / 2) / (a / 4)) + 1.0)


@dataclass
class VdamSchedule:
    """Mini-batch sizes, step sizes and regularisation T over ``n_iter`` mini-batches."""

    n_iter: int = 200
    n_particles: int = 0
    ini_frac: float = 0.3
    fin_frac: float = 0.2
    ini_subset: int = -1  # -1: automatic
    fin_subset: int = -1
    stepsize: float = 0.3  # final learning rate (0.3 for 2D, 0.5 for a 3D initial model)
    inflate: float = -1.0  # initial step = stepsize * inflate; -1: 0.9 / stepsize
    tau2_fudge: float = 2.0  # T reached at the end (Class2D job: 2)
    kind: str = "2d"

    def __post_init__(self) -> None:
        if not (0 < self.ini_frac < 1 and 0 < self.fin_frac < 1):
            raise ValueError("the initial and final fractions must lie in (0, 1)")
        total = self.ini_frac + self.fin_frac
        if total > 0.9:
            self.ini_frac, self.fin_frac = self.ini_frac / (total + 0.1), self.fin_frac / (total + 0.1)
        ini, fin = auto_subsets(self.n_particles, self.kind)
        self.ini_subset = ini if self.ini_subset <= 0 else self.ini_subset
        self.fin_subset = fin if self.fin_subset <= 0 else self.fin_subset
        if self.inflate <= 0:
            self.inflate = 0.9 / self.stepsize

    @property
    def phases(self) -> tuple[int, int, int]:
        """Mini-batches in the initial, in-between and final phases (200 -> 60, 100, 40)."""
        n_ini = math.floor(self.n_iter * self.ini_frac)
        n_fin = math.floor(self.n_iter * self.fin_frac)
        return n_ini, self.n_iter - n_ini - n_fin, n_fin

    def subset_size(self, it: int, n_classes: int) -> int:
        """Particles in mini-batch ``it`` (1-based); all of them in the last one when K > 1."""
        n_ini, n_mid, _ = self.phases
        if it < n_ini:
            s = self.ini_subset
        elif it < n_ini + n_mid:
            s = self.ini_subset + round((it - n_ini) / max(n_mid, 1) * (self.fin_subset - self.ini_subset))
        else:
            s = self.fin_subset
        if s >= self.n_particles or (it >= self.n_iter and n_classes > 1):
            return self.n_particles
        return s

    def step(self, it: int) -> float:
        """Learning rate eta(it): from stepsize * inflate down to stepsize around the in-between phase."""
        n_ini, n_mid, _ = self.phases
        s = _sigmoid(it, n_ini, n_mid // 2)
        return self.stepsize * self.inflate * s + self.stepsize * (1 - s)

    def tau2_fudge_at(self, it: int) -> float:
        """T(it): from 1 to ``tau2_fudge`` (the default deflation equals T)."""
        n_ini, n_mid, _ = self.phases
        s = _sigmoid(it, n_ini, n_mid // 4)
        return 1.0 * s + self.tau2_fudge * (1 - s)

    def replacing(self, it: int) -> bool:
        """Whether inactive classes may be replaced in mini-batch ``it`` (strictly inside the in-between phase)."""
        n_ini, n_mid, _ = self.phases
        return n_ini < it < n_ini + n_mid


@dataclass
class Moments:
    """The optimiser's memory per class: first moments per half set and the shared second moment."""

    m: Any  # (2, K, *grid) complex64
    u: Any  # (K, *grid) float32

    @classmethod
    def empty(cls, grids: Any) -> Moments:
        """Zero first moments and unit second moment (the start, and after a reset)."""
        xp = grids.xp
        return cls(xp.zeros((2, grids.k, *grids.shape), dtype=xp.complex64),
                   xp.ones((grids.k, *grids.shape), dtype=xp.float32))


def shell_means(values: Any, shells: Any, n_shells: int, inside: Any) -> Any:
    """Per class, the mean of ``values`` (K, *grid) over each shell (cells ``inside`` only): (K, n_shells)."""
    xp = array_module(values)
    k = values.shape[0]
    idx = shells[inside]
    flat = values.reshape(k, -1)[:, inside.ravel()]
    offset = (xp.arange(k)[:, None] * n_shells + idx[None, :]).ravel()
    total = xp.bincount(offset, weights=flat.ravel(), minlength=k * n_shells).reshape(k, n_shells)
    count = xp.bincount(idx, minlength=n_shells)
    return total / xp.maximum(count, 1)[None, :]


def shell_curve(values: Any, grids: Any, n_shells: int) -> Any:
    """Per class, the mean of ``values`` (K, *grid) over shells 0..n_shells-1: (K, n_shells)."""
    shells = grids.shell_index()
    return shell_means(grids.xp.asarray(values), shells, n_shells + 1, shells <= n_shells)[:, :n_shells]


def update_moments(grids: Any, g_half: Any, f_half: Any, mom: Moments, floor: float, em: bool = False) -> Any:
    """Rescale the half sets' gradients, update the moments in place and return the direction g.

    ``g_half``/``f_half`` (2, K, *grid) are the back-projected residuals and weights of the two half
    sets (Friedel-folded); ``floor`` is the floor on F (RELION's 1 in its normalisation).  With ``em``
    the moments are not averaged (m = G', u = 1), which makes the step an EM update.
    """
    xp = grids.xp
    gh = g_half / xp.maximum(f_half, floor)
    if em:
        mom.m[...] = gh
        mom.u[...] = 1.0
    else:
        fresh = ~xp.any(mom.m.reshape(2, grids.k, -1) != 0, axis=2)  # (2, K): start or reset
        for h in (0, 1):
            upd = BETA1 * mom.m[h] + (1 - BETA1) * gh[h]
            mom.m[h] = xp.where(fresh[h].reshape((-1,) + (1,) * grids.ndim), gh[h], upd)
        rel = xp.abs(gh[0] - gh[1]) ** 2 / (xp.abs(0.5 * (gh[0] + gh[1])) ** 2 + 1e-12)
        mom.u[...] = BETA2 * mom.u + (1 - BETA2) * rel
    return (0.5 * (mom.m[0] + mom.m[1]) / (xp.sqrt(mom.u) + 1e-12)).astype(xp.complex64)


def direction_power(grids: Any, g: Any, radius: float) -> np.ndarray:
    """Mean |g|^2 per class within ``radius``: with the class size, what picks a class to split."""
    xp = grids.xp
    inside = grids.shell_index() <= radius
    return to_numpy((xp.abs(g) ** 2 * inside[None]).reshape(grids.k, -1).sum(axis=1) / max(int(inside.sum()), 1))


def fsc_weights(grids: Any, v: Any, mom: Moments, tau2_fudge: float, radius: float) -> Any:
    """Per class and shell, FSC = SNR / (1 + SNR) with SNR = 2 T mean|V| / mean|m1 - m2| (K, N/2+2).

    The half sets share the references, so this is an estimate from the moments' disagreement, not
    a gold-standard FSC (RELION's Class2D/InitialModel path).
    """
    xp = grids.xp
    n_shells = grids.box // 2 + 2
    shells = grids.shell_index()
    inside = shells <= radius
    noise = shell_means(xp.abs(mom.m[0] - mom.m[1]), shells, n_shells, inside)
    power = shell_means(xp.abs(v), shells, n_shells, inside)
    snr = 2.0 * tau2_fudge * power / xp.maximum(noise, 1e-30)
    fsc = xp.clip(snr / (1 + snr), 0.0, 1.0)
    fsc[:, 0] = 1.0  # the mean (shell 0) follows the data
    return fsc


def half_set_fsc(grids: Any, v: Any, f_half: Any, floor: float, tau2_fudge: float, radius: float,
                 moments: Moments) -> Any:
    """Per class and shell, an FSC weight from the two half sets' first moments (K, N/2+2).

    Each half set's estimate is V + m_h, so the shell correlation of the two measures what the data
    support; the full set's FSC follows as 2 FSC_half / (1 + FSC_half), and T scales its SNR as in
    RELION's regularisation: FSC_T = T SNR / (1 + T SNR).  Unlike :func:`fsc_weights` it falls to zero
    on pure noise whatever T, so the 3D classes are not filled with noise at shells the data do not
    support.  Only cells both halves sampled (F above ``floor``) count.
    """
    xp = grids.xp
    n_shells = grids.box // 2 + 2
    shells = grids.shell_index()
    both = (f_half[0] > floor) & (f_half[1] > floor)
    a1, a2 = xp.where(both, v + moments.m[0], 0), xp.where(both, v + moments.m[1], 0)
    inside = shells <= radius
    cross = shell_means((a1 * xp.conj(a2)).real, shells, n_shells, inside)
    p1 = shell_means(xp.abs(a1) ** 2, shells, n_shells, inside)
    p2 = shell_means(xp.abs(a2) ** 2, shells, n_shells, inside)
    half = xp.clip(cross / xp.sqrt(xp.maximum(p1 * p2, 1e-30)), 0.0, 0.999)
    full = 2 * half / (1 + half)
    snr = tau2_fudge * full / (1 - full)
    fsc = snr / (1 + snr)
    fsc[:, 0] = 1.0
    return fsc


# Noise variance of a back-projected average D / W per cell, in units of 1 / W: trilinear insertion
# spreads each sample over 8 cells with weights summing to 1, so a cell's noise is sum w^2 / (sum w)^2
# of its samples' -- on average (2/3)^3 of 1 / W (measured 0.30 beyond the lowest shells at padding 2).
NOISE_PER_INVERSE_WEIGHT = 0.3


def power_tau2(grids: Any, v: Any, tau2_fudge: float) -> Any:
    """RELION's Class3D prior per class and shell, tau2 = T x the reference's power (K, N/2+2)."""
    xp = grids.xp
    shells = grids.shell_index()
    return tau2_fudge * shell_means(xp.abs(v) ** 2, shells, grids.box // 2 + 2, shells <= grids.box // 2 + 1)


def wiener_weights(grids: Any, tau2: Any, f: Any, radius: float) -> tuple[Any, Any]:
    """Per cell, the Wiener weight SSNR / (1 + SSNR) of the data average, SSNR = tau2 F / noise; and
    per class and shell the FSC equivalent of the shell's mean SSNR (K, N/2+2).

    This is RELION's maximisation without half sets (Class3D): D / (W + 1 / tau2) is the data
    average times that weight.  Its shell SSNR (``data_vs_prior``) crossing 1 is the class's
    resolution; unlike a correlation of half sets aligned to the same reference, it is not inflated
    by the noise that alignment to the reference makes agree.
    """
    xp = grids.xp
    n_shells = grids.box // 2 + 2
    shells = grids.shell_index()
    ssnr = tau2[:, xp.minimum(shells, n_shells - 1)] * f / NOISE_PER_INVERSE_WEIGHT
    ssnr = xp.where((shells <= radius)[None], ssnr, 0).astype(xp.float32)
    shell_ssnr = shell_means(ssnr, shells, n_shells, shells <= radius)
    fsc = shell_ssnr / (1 + shell_ssnr)
    fsc[:, 0] = 1.0
    return ssnr / (1 + ssnr), fsc


def apply_step(grids: Any, v: Any, g: Any, fsc: Any, eta: Any, radius: float, skip: Any = ()) -> Any:
    """V + eta_k (FSC g - (1 - FSC) V) within ``radius`` (zero outside): the new (K, *grid) references.

    ``fsc`` is per class and shell (K, n_shells) or per cell (K, *grid).  Classes in ``skip`` (one
    just replaced) keep their reference.
    """
    xp = grids.xp
    shells = grids.shell_index()
    w = fsc if fsc.ndim == grids.ndim + 1 else fsc[:, xp.minimum(shells, fsc.shape[1] - 1)]  # (K, *grid)
    eta_b = xp.asarray(eta, dtype=xp.float32).reshape((-1,) + (1,) * grids.ndim)
    new = xp.where((shells <= radius)[None], v + eta_b * (w * g - (1 - w) * v), 0)
    for k in skip:
        new[k] = v[k]
    return new.astype(xp.complex64)


def class_steps(eta: float, pi: np.ndarray) -> np.ndarray:
    """Per-class steps eta (1 - exp(-(3K + 10) pi_k)): small classes move less."""
    k = pi.size
    return eta * (1.0 - np.exp(-(3 * k + 10) * pi))
