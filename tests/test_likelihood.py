"""The E-step against brute force, and pose recovery on simulated particles with known truth."""

import numpy as np
import pytest

from reconstruct.ctf import ctf_2d
from reconstruct.fourier import crop_half, phase_shift_2d
from reconstruct.geometry import angle_between, random_rotations
from reconstruct.likelihood import (
    fourier_mask,
    friedel_weights,
    score_poses,
    shell_map,
    shift_cropped,
    significant_posteriors,
)
from reconstruct.projector import Projector
from reconstruct.sampling import angular_step, orientations, translations
from tests.conftest import blob_map


def test_score_equals_brute_force():
    rng = np.random.default_rng(0)
    b, m, s = 3, 4, 16
    x = (rng.normal(size=(b, s, s // 2 + 1)) + 1j * rng.normal(size=(b, s, s // 2 + 1))).astype(np.complex64)
    p = (rng.normal(size=(m, s, s // 2 + 1)) + 1j * rng.normal(size=(m, s, s // 2 + 1))).astype(np.complex64)
    c = rng.uniform(-1, 1, (b, s, s // 2 + 1)).astype(np.float32)
    shifts = np.array([[0.0, 0.0], [1.5, -2.0]])
    inv_s2 = shell_map(rng.uniform(0.5, 2, s // 2 + 1), s, np)
    mask = fourier_mask(s, s / 2, np)
    got = score_poses(x, c, p, shifts, inv_s2, s, mask)
    fw = friedel_weights(s, np)
    ref = np.empty((b, m, 2))
    for i in range(b):
        for j in range(m):
            for k, t in enumerate(shifts):
                xt = phase_shift_2d(x[i:i + 1], t[None], s)[0]
                d = np.abs(xt - c[i] * p[j]) ** 2 * inv_s2 * fw
                ref[i, j, k] = -d[mask].sum() + (np.abs(x[i]) ** 2 * inv_s2 * fw)[mask].sum()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_significant_posteriors():
    logp = np.log(np.array([[[0.5, 0.3], [0.15, 0.05]], [[0.97, 0.01], [0.01, 0.01]]]))
    sig = significant_posteriors(logp, fraction=0.9)
    assert sig.n_significant.tolist() == [3, 1]
    assert np.isclose(sig.weight[sig.image == 0].sum(), 1) and sig.weight[sig.image == 1][0] == 1.0
    assert sig.pmax[1] == pytest.approx(0.97)
    first = (sig.image == 0) & (sig.orient == 0) & (sig.shift == 1)
    assert sig.weight[first][0] == pytest.approx(0.3 / 0.95)


@pytest.mark.slow
def test_pose_recovery_on_simulated_particles():
    """With the true map as reference, the best pose lies within one sampling step of the truth."""
    rng = np.random.default_rng(1)
    box, px, n = 32, 3.0, 48
    vol = blob_map(box, n_atoms=150, spread=0.13, sigma=1.2, seed=2)
    true_r = random_rotations(n, rng)
    true_t = rng.integers(-2, 3, (n, 2)).astype(float)
    du = rng.uniform(10000, 20000, n)
    ctf = ctf_2d(box, px, du, du - 300, rng.uniform(0, 180, n))
    proj = Projector(vol)
    clean = phase_shift_2d(proj.project(true_r), -true_t, box) * ctf
    sig_img = np.fft.irfft2(clean, s=(box, box))
    noise_sd = np.sqrt(sig_img.var() / 0.5)  # SNR 0.5 in real space
    imgs = np.fft.irfft2(clean, s=(box, box)) + rng.normal(0, noise_sd, (n, box, box))
    x = np.fft.rfft2(imgs).astype(np.complex64)
    size = 24  # current image size: Fourier-cropped
    mats, _ = orientations(2)
    ref = proj.project(mats, size=size)
    shifts = translations(2, 1)
    inv_s2 = np.full((size, size // 2 + 1), 1.0 / (noise_sd**2 * box * box), np.float32)
    mask = fourier_mask(size, size / 2, np)
    logl = score_poses(crop_half(x, size), crop_half(ctf, size), ref, shifts, inv_s2, box, mask)
    best = logl.reshape(n, -1).argmax(axis=1)
    m_best, t_best = best // len(shifts), best % len(shifts)
    err = angle_between(mats[m_best], true_r)
    # the best any search on this grid can do: the grid point nearest to the truth
    nearest = np.array([angle_between(mats, r[None]).min() for r in true_r])
    assert np.median(err) < angular_step(2), np.round(err, 1)
    assert np.mean(err < nearest + angular_step(2)) > 0.85, np.round(err - nearest, 1)
    # offsets come out within a pixel (the orientation grid is 15 degrees coarse); a wrong sign would
    # put them 2|t| away
    shift_err = np.abs(shifts[t_best] - true_t).max(axis=1)
    assert np.mean(shift_err <= 1) > 0.85 and np.mean(shift_err == 0) > 0.4
    sig = significant_posteriors(logl)
    assert sig.n_significant.min() >= 1 and np.median(sig.pmax) > 0.05
    # shifting cropped images by full-box offsets equals cropping shifted full images
    full = phase_shift_2d(x[:2], np.array([[2.0, -1.0], [2.0, -1.0]]), box)
    np.testing.assert_allclose(shift_cropped(crop_half(x[:2], size), np.array([[2.0, -1.0]]), box),
                               crop_half(full, size), rtol=1e-4, atol=1e-2)


def test_local_scores_match_global():
    from reconstruct.likelihood import score_local_poses
    from reconstruct.sampling import local_rotations

    rng = np.random.default_rng(3)
    vol = blob_map(24, 60, seed=4)
    proj = Projector(vol)
    base = random_rotations(3, rng)
    delta = local_rotations(5.0, 10.0)
    assert np.allclose(delta[0], np.eye(3)) and len(delta) == 33
    cand = np.einsum("lij,bjk->blik", delta, base)  # (B, L, 3, 3)
    x = proj.project(base) + 0.1 * rng.normal(size=(3, 24, 13))
    c = np.ones((3, 24, 13), np.float32)
    shifts = translations(1, 1)
    inv = np.ones((24, 13), np.float32)
    mask = fourier_mask(24, 12, np)
    local = score_local_poses(x, c, proj.project(cand.reshape(-1, 3, 3)).reshape(3, len(delta), 24, 13),
                              shifts, inv, 24, mask)
    for i in range(3):
        glob = score_poses(x[i:i + 1], c[i:i + 1], proj.project(cand[i]), shifts, inv, 24, mask)
        np.testing.assert_allclose(local[i], glob[0], rtol=1e-4, atol=1e-2)
    assert (local[:, :, 2].argmax(axis=1) == 0).all()  # identity perturbation, zero shift wins


def test_significant_cap():
    logp = np.zeros((2, 10, 3))  # flat posteriors: everything would be significant
    sig = significant_posteriors(logp, fraction=0.999, max_count=5)
    assert sig.n_significant.tolist() == [5, 5]
    np.testing.assert_allclose(sig.weight, 0.2)


def test_capped_significance_matches_a_full_sort():
    """The capped selection (orientations' maxima first, then their offsets) keeps exactly the poses a full
    sort of all B x M x T posteriors keeps, with the same weights, peaks and normalisation."""
    rng = np.random.default_rng(3)
    for b, m, t, scale, cap in [(6, 400, 9, 4.0, 15), (5, 60, 4, 30.0, 12), (4, 3, 5, 2.0, 10), (3, 200, 25, 0.3, 40)]:
        logp = (rng.standard_normal((b, m, t)) * scale).astype(np.float32)
        sig = significant_posteriors(logp, fraction=0.999, max_count=cap)
        flat = logp.reshape(b, -1).astype(np.float64)
        p = np.exp(flat - flat.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        for i in range(b):
            order = np.argsort(-p[i])[:cap]
            keep = np.cumsum(p[i, order]) - p[i, order] < 0.999
            mine = sig.image == i
            assert sorted((sig.orient[mine] * t + sig.shift[mine]).tolist()) == sorted(order[keep].tolist())
            np.testing.assert_allclose(np.sort(sig.weight[mine]), np.sort(p[i, order[keep]] / p[i, order[keep]].sum()),
                                       rtol=1e-4)
        np.testing.assert_allclose(sig.pmax, p.max(axis=1), rtol=1e-4)
        np.testing.assert_allclose(sig.log_max, flat.max(axis=1), rtol=1e-6)
