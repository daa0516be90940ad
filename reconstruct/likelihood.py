"""The E-step: Gaussian log-likelihoods of particle images over poses, and their significant posteriors.

For image X_b (half transform), CTF C_b, reference projection P_m and candidate origin offset t,
the log-likelihood is -sum_k |X_b,t(k) - C_b(k) P_m(k)|^2 / sigma2(k) over the independent Fourier
coefficients -- each Friedel pair once, so the kx = 0 and Nyquist columns of the half transform, which
hold both members of their pairs, count half -- where X_b,t is the image shifted by +t (which centres a
particle whose origin offset is t) and sigma2(k) = E|noise(k)|^2 per complex coefficient, one value
per Fourier shell.  This is RELION's diff2 (half-plane sum over 2 sigma2_RELION, whose sigma2 is the
variance of the real and imaginary parts).  Dropping the per-image constant sum |X|^2/sigma2,

    log L(b, m, t) = 2 Re sum_k conj(X_b,t) C_b P_m / sigma2 - sum_k C_b^2 |P_m|^2 / sigma2,

which for a batch is two matrix products: (B T x 2K) @ (2K x M) and (B x K) @ (K x M).  Nothing loops
over particles, orientations or translations in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import array_module
from .fourier import freq_grid, phase_shift_2d


def fourier_mask(size: int, r_max: float, xp: Any) -> Any:
    """Boolean (size, size/2+1) mask of frequencies with radius <= ``r_max`` (Fourier pixels)."""
    ky, kx = freq_grid((size, size), xp)
    return (kx * kx + ky * ky) <= r_max * r_max


def friedel_weights(size: int, xp: Any) -> Any:
    """Weight of each half-transform coefficient when every Friedel pair counts once: 1, but 1/2 in
    the kx = 0 (and even-size Nyquist) column, which holds both members of its pairs."""
    w = xp.ones((size, size // 2 + 1), dtype=xp.float32)
    w[:, 0] = 0.5
    if size % 2 == 0:
        w[:, -1] = 0.5
    return w


def shell_map(values: Any, size: int, xp: Any) -> Any:
    """Spread a per-shell curve (shells of the full box) onto a (size, size/2+1) half grid."""
    ky, kx = freq_grid((size, size), xp)
    shell = xp.round(xp.sqrt(kx * kx + ky * ky)).astype(xp.int64)
    values = xp.asarray(values, dtype=xp.float32)
    # A window of the box's transform keeps its frequency indices, so shells are shared.
    return values[xp.clip(shell, 0, values.size - 1)]


def inverse_sigma2_curve(sigma2: Any, size: int) -> Any:
    """1/sigma2 on the (size, size/2+1) half grid (NumPy) from a per-shell noise curve."""
    import numpy as np

    from .backend import to_numpy

    return 1.0 / np.maximum(to_numpy(shell_map(sigma2, size, np)), 1e-30)


def score_poses(images: Any, ctf: Any, projections: Any, shifts: Any, inv_sigma2: Any, box: int,
                mask: Any, terms: bool = False) -> Any:
    """Log-likelihoods (B, M, T) up to a per-image constant.

    With ``terms=True`` returns the two terms separately: the cross term 2 Re sum conj(X) C P / sigma2
    (B, M, T) and the power term sum C^2 |P|^2 / sigma2 (B, M), e.g. for scale-free scores.

    ``images`` (B, S, S/2+1) are image transforms Fourier-cropped to the current size S, ``ctf`` the
    matching CTFs, ``projections`` (M, S, S/2+1) the reference slices, ``shifts`` (T, 2) candidate
    origin offsets in pixels of the full box ``box``, ``inv_sigma2`` (S, S/2+1) 1/sigma2 (zero where
    unused) and ``mask`` the frequencies to include.
    """
    xp = array_module(images)
    b, s = images.shape[0], images.shape[1]
    t = shifts.shape[0]
    w = (friedel_weights(s, xp) * inv_sigma2)[mask]  # (K,)
    # X shifted by +t for every candidate offset (offsets in pixels of the full box).
    x = shift_cropped(images, shifts, box)[:, mask].reshape(b, t, -1)  # (B, T, K)
    a = xp.conj(x) * (ctf[:, mask] * (2.0 * w))[:, None, :]
    p = projections[:, mask]  # (M, K)
    # Re(sum conj(X) C P w) as one real product of contiguous (B T, 2K) and (2K, M) operands.
    a_ri = xp.concatenate([a.real, a.imag], axis=2).reshape(b * t, -1)
    p_ri = xp.concatenate([p.real, -p.imag], axis=1).astype(a_ri.dtype, copy=False)
    cross = a_ri @ p_ri.T  # (B T, M)
    c2 = ctf[:, mask] ** 2 * w  # (B, K)
    power = c2 @ (p.real**2 + p.imag**2).T  # (B, M)
    out = xp.empty((b, p.shape[0], t), dtype=xp.float32)  # (B, M, T): one pass transposes and subtracts
    if terms:
        out[...] = cross.reshape(b, t, -1).transpose(0, 2, 1)
        return out, power
    xp.subtract(cross.reshape(b, t, -1).transpose(0, 2, 1), power[:, :, None], out=out)
    return out


def shift_cropped(images: Any, shifts: Any, box: int) -> Any:
    """Every image shifted by every offset: (B T, S, S/2+1), offsets (T, 2) in pixels of the full box.

    The images are transforms Fourier-cropped from ``box`` to S; a shift of d full-box pixels is a
    shift of d S / box cropped pixels.
    """
    xp = array_module(images)
    b, size = images.shape[0], images.shape[1]
    t = shifts.shape[0]
    scaled = xp.asarray(shifts, dtype=xp.float32) * (size / box)
    return phase_shift_2d(xp.repeat(images, t, axis=0), xp.tile(scaled, (b, 1)), size)


@dataclass
class Significant:
    """Sparse posterior: the poses that together hold ``fraction`` of each image's probability."""

    image: Any  # (S,) index into the batch
    orient: Any  # (S,) orientation index
    shift: Any  # (S,) translation index
    weight: Any  # (S,) posterior probability (sums to ~1 per image over its entries)
    log_max: Any  # (B,) largest log posterior per image (the log-likelihood contribution)
    pmax: Any  # (B,) largest posterior probability (RELION's rlnMaxValueProbDistribution)
    n_significant: Any  # (B,) entries kept per image (rlnNrOfSignificantSamples)


def significant_posteriors(log_post: Any, fraction: float = 0.999, max_count: int = 0,
                           floor: float = 1e-12) -> Significant:
    """Normalise log posteriors (B, M, T) and keep, per image, the smallest set of poses whose
    probabilities sum to at least ``fraction`` (RELION's adaptive significance), at most
    ``max_count`` of them when that is > 0 (RELION's ``--maxsig``)."""
    xp = array_module(log_post)
    b, _, t = log_post.shape
    flat = log_post.reshape(b, -1)
    n = flat.shape[1]
    best = log_post.max(axis=2)  # (B, M): each orientation's best offset
    top = best.max(axis=1, keepdims=True)
    k = n if max_count <= 0 else min(max_count, n)
    if k < n:
        total = _sum_exp(flat, top)  # (B, 1): sum of exp(log_post - top), the normaliser
        cand = _top_candidates(log_post, best, k)
        vals = xp.exp(xp.take_along_axis(flat, cand, axis=1) - top) / total
    else:  # every pose is a candidate: the probabilities are needed anyway
        vals = xp.exp(flat - top)
        total = vals.sum(axis=1, keepdims=True)
        vals /= total
        cand = xp.broadcast_to(xp.arange(n), (b, n))
    order = xp.argsort(-vals, axis=1)
    cand = xp.take_along_axis(cand, order, axis=1)
    vals = xp.take_along_axis(vals, order, axis=1)
    prev = xp.cumsum(vals, axis=1) - vals
    keep = (prev < fraction) & (vals > floor)  # until the running sum first reaches the fraction
    keep[:, 0] = True
    img, j = xp.nonzero(keep)
    pose, w = cand[img, j], vals[img, j]
    w = w / (vals * keep).sum(axis=1)[img]
    return Significant(img, pose // t, pose % t, w, top[:, 0], 1.0 / total[:, 0], keep.sum(axis=1))


def _sum_exp(flat: Any, top: Any, chunk: int = 1 << 24) -> Any:
    """Row sums of exp(flat - top) (B, 1), over row blocks so the temporary stays small."""
    xp = array_module(flat)
    rows = max(1, chunk // max(flat.shape[1], 1))
    return xp.concatenate([xp.exp(flat[s:s + rows] - top[s:s + rows]).sum(axis=1, keepdims=True)
                           for s in range(0, flat.shape[0], rows)])


def _top_candidates(log_post: Any, best: Any, k: int) -> Any:
    """Flat indices (B, k) of each image's k largest entries of (B, M, T), in no particular order;
    ``best`` (B, M) is each orientation's maximum over T.

    The k best (orientation, offset) pairs lie in the k orientations whose best offset is best (a pair
    at least the k-th value makes its orientation's maximum at least that), so the selection runs over
    B x M maxima and then B x k x T entries instead of all B x M x T.
    """
    xp = array_module(log_post)
    b, m, t = log_post.shape
    ko = min(k, m)
    orient = xp.argpartition(-best, ko - 1, axis=1)[:, :ko] if ko < m else xp.broadcast_to(xp.arange(m), (b, m))
    sub = xp.take_along_axis(log_post, orient[:, :, None], axis=1).reshape(b, -1)  # (B, ko T)
    pick = xp.argpartition(-sub, k - 1, axis=1)[:, :k] if k < sub.shape[1] else xp.broadcast_to(
        xp.arange(sub.shape[1]), (b, sub.shape[1]))
    return xp.take_along_axis(orient, pick // t, axis=1) * t + pick % t


def score_local_poses(images: Any, ctf: Any, projections: Any, shifts: Any, inv_sigma2: Any, box: int,
                      mask: Any) -> Any:
    """As :func:`score_poses`, with each image's own candidate projections (B, L, S, S/2+1): (B, L, T).

    Local searches give every particle different orientations; the products become batched ones.
    """
    xp = array_module(images)
    b = images.shape[0]
    t = shifts.shape[0]
    w = (friedel_weights(images.shape[1], xp) * inv_sigma2)[mask]
    x = shift_cropped(images, shifts, box)[:, mask].reshape(b, t, -1)  # (B, T, K)
    c = ctf[:, mask]  # (B, K)
    a = xp.conj(x) * (c * (2.0 * w))[:, None, :]
    p = projections[:, :, mask]  # (B, L, K)
    pt_r = xp.swapaxes(p.real, 1, 2)
    pt_i = xp.swapaxes(p.imag, 1, 2)
    cross = xp.matmul(a.real, pt_r) - xp.matmul(a.imag, pt_i)  # (B, T, L)
    power = xp.einsum("bk,blk->bl", c * c * w, p.real**2 + p.imag**2)
    return (xp.swapaxes(cross, 1, 2) - power[:, :, None]).astype(xp.float32)
