"""Oversampled poses of significant coarse samples, and per-image reductions over sparse sample lists.

RELION's adaptive oversampling scores every significant coarse pose again at J finer orientations x 4
finer offsets.  :class:`FineSamples` holds one batch's images on the frequencies in use and scores,
records and accumulates those fine samples with batched matrix products; the functions below reduce
over each image's entries (max, argmax, normalisation) and add rows of values by index -- the
scatter that the M-step needs on CPU and GPU alike.  Shared by 2D and 3D classification.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .likelihood import friedel_weights


class FineSamples:
    """One batch's images on the masked frequencies of the current size, for the oversampled poses.

    Entries are significant coarse poses (image, class and orientation, coarse offset); each has J
    finer orientations (rows of ``fine``, picked per entry by ``fine_idx`` (E, J)) x 4 finer offsets.
    Shifts are phase factors of the few distinct offsets, gathered per entry.
    """

    def __init__(self, box: int, size: int, mask: Any, x: Any, c: Any, inv_s2: Any, fine: Any,
                 coarse_shifts: np.ndarray, children: np.ndarray, xp: Any, score_inv_s2: Any = None) -> None:
        self.xp = xp
        self.xm, self.cm = x[:, mask], c[:, mask]  # (B, F)
        # Scores may use fewer frequencies than the M-step (RELION's --strict_highres_exp).
        score_w = inv_s2 if score_inv_s2 is None else score_inv_s2
        self.wm = (friedel_weights(size, xp) * score_w)[mask]  # each Friedel pair once
        self.inv = inv_s2[mask]
        self.pm = fine[:, mask]  # (K kf, F)
        ky, kx = (a.astype(xp.float32) for a in freq_vectors(size, mask, xp))
        self.ky, self.kx, self.box = ky, kx, box
        self.shells = xp.round(xp.sqrt(kx * kx + ky * ky)).astype(xp.int64)
        # Offsets are in pixels of the full box; the cropped transform keeps the box's frequency indices.
        rel = xp.asarray(coarse_shifts[:, None, :] + children[None], dtype=xp.float32)
        self.table = self._phase(rel).astype(xp.complex64)  # (Tc, 4, F)
        self.chunk = max(1, (1 << 22) // max(int(self.xm.shape[1]) * 8, 1))

    def _phase(self, shifts: Any) -> Any:
        return self.xp.exp((-2j * self.xp.pi / self.box) * (shifts[..., 0, None] * self.kx
                                                              + shifts[..., 1, None] * self.ky))

    def scores(self, img: Any, shift: Any, fine_idx: Any) -> Any:
        """Log-likelihoods (E, J, 4) of the fine samples, up to a per-image constant."""
        xp = self.xp
        e = int(img.shape[0])
        out = xp.empty((e, fine_idx.shape[1], 4), xp.float32)
        for s in range(0, e, self.chunk):
            sl = slice(s, s + self.chunk)
            ie = img[sl]
            p = self.pm[fine_idx[sl]]  # (e, J, F)
            # Re sum conj(X shifted) C P 2w = Re sum (conj(X) C 2w P) conj(phase): batched real matmuls.
            y = (xp.conj(self.xm[ie]) * (self.cm[ie] * (2 * self.wm)))[:, None, :] * p
            ph = self.table[shift[sl]]  # (e, 4, F)
            cross = xp.matmul(y.real, xp.swapaxes(ph.real, 1, 2)) + xp.matmul(y.imag, xp.swapaxes(ph.imag, 1, 2))
            power = xp.einsum("ef,ejf->ej", self.cm[ie] ** 2 * self.wm, p.real**2 + p.imag**2)
            out[sl] = (cross - power[:, :, None]).astype(xp.float32)
        return out

    def best_residual_power(self, moved: Any, best_slice: Any) -> Any:
        """|X shifted by ``moved`` - C P|^2 (B, F) at each image's best pose."""
        return self.xp.abs(self.xm * self._phase(moved) - self.cm * self.pm[best_slice]) ** 2

    def accumulate(self, img: Any, shift: Any, group: Any, weights: Any, data: Any, weight: Any) -> None:
        """data[group] += w c X / sigma2 and weight[group] += w c^2 / sigma2 over samples with weight.

        The prediction's part of the residual, sum w c^2 A / sigma2, is the group's slice times its
        weight sum and is subtracted once per pass by the caller.
        """
        xp = self.xp
        wt_all = weights * (weights > 1e-6)
        live = xp.nonzero(wt_all.reshape(wt_all.shape[0], -1).sum(axis=1) > 0)[0]
        cw = self.cm * self.inv[None]  # c / sigma2
        u, c2w = cw * self.xm, self.cm * cw
        for s in range(0, int(live.shape[0]), self.chunk):
            ent = live[s:s + self.chunk]
            ie = img[ent]
            wt = wt_all[ent]  # (e, J, 4)
            # sum_s w_js X shifted by s = X * (sum_s w_js phase_s): one small matmul
            wph = xp.matmul(wt.astype(xp.complex64), self.table[shift[ent]])  # (e, J, F)
            n_f = wph.shape[-1]
            gidx = group[ent].ravel()
            add_rows(xp, data, gidx, (u[ie][:, None, :] * wph).reshape(-1, n_f))
            add_rows(xp, weight, gidx, (wt.sum(axis=2)[:, :, None] * c2w[ie][:, None, :]).reshape(-1, n_f))


def freq_vectors(size: int, mask: Any, xp: Any) -> tuple[Any, Any]:
    from .fourier import freq_grid

    ky, kx = freq_grid((size, size), xp)
    ky = xp.broadcast_to(ky, mask.shape)
    kx = xp.broadcast_to(kx, mask.shape)
    return ky[mask], kx[mask]


def normalise_per_image(xp: Any, img: Any, logp: Any, b: int) -> tuple[Any, Any, Any]:
    """Posteriors of samples (E, S) normalised over each image's samples; the per-image max and sum."""
    top = xp.full(b, -xp.inf, dtype=xp.float32)
    maximum_at(xp, top, img, logp.max(axis=1))
    p = xp.exp(logp - top[img][:, None])
    norm = xp.bincount(img, weights=p.sum(axis=1), minlength=b)
    return p / norm[img][:, None], top, norm


def maximum_at(xp: Any, target: Any, idx: Any, values: Any) -> None:
    if xp.__name__ == "cupy":
        import cupyx

        cupyx.scatter_max(target, idx, values)
    else:
        np.maximum.at(target, idx, values)


def max_per_image(xp: Any, img: Any, pw: Any, b: int) -> Any:
    out = xp.zeros(b, dtype=xp.float32)
    maximum_at(xp, out, img, pw.max(axis=1).astype(xp.float32))
    return out


def argmax_per_image(xp: Any, img: Any, pw: Any, b: int) -> tuple[Any, Any]:
    """Per image, the entry and the sample (column of ``pw``) of its largest fine posterior."""
    best = max_per_image(xp, img, pw, b)
    vals = pw.max(axis=1)
    e = img.shape[0]
    is_best = vals >= best[img] * (1 - 1e-6)
    cand = xp.where(is_best, xp.arange(e), e)
    first = xp.full(b, e, dtype=xp.int64)
    if xp.__name__ == "cupy":
        import cupyx

        cupyx.scatter_min(first, img, cand)
    else:
        np.minimum.at(first, img, cand)
    return first, pw[first].argmax(axis=1)


def add_rows(xp: Any, target: Any, idx: Any, values: Any) -> None:
    """target[idx[i]] += values[i] (rows of a 2D array), repeated indices summed.

    On the CPU a sparse (rows x values) selection matrix product (several times faster than
    ``add.at``); on the GPU atomic adds.
    """
    if xp.__name__ == "cupy":
        import cupyx

        width = target.shape[1]
        pos = (idx[:, None] * width + xp.arange(width)[None, :]).ravel()
        flat = target.reshape(-1)
        v = values.reshape(-1).astype(target.dtype)
        if xp.iscomplexobj(flat):  # atomic adds on the interleaved real and imaginary parts
            view = flat.view(xp.float32)
            cupyx.scatter_add(view, 2 * pos, v.real.astype(xp.float32))
            cupyx.scatter_add(view, 2 * pos + 1, v.imag.astype(xp.float32))
        else:
            cupyx.scatter_add(flat, pos, v)
        return
    import scipy.sparse

    n = values.shape[0]
    rows, inverse = np.unique(idx, return_inverse=True)
    select = scipy.sparse.csr_matrix((np.ones(n, np.float32), (inverse, np.arange(n))), shape=(rows.size, n))
    target[rows] += np.asarray(select @ values.astype(target.dtype))
