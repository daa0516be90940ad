import numpy as np
import pytest

from reconstruct.fourier import bfactor_filter, lowpass_filter, resize_fourier
from reconstruct.fsc import fsc, fsc_weighted, resolution_at, shell_index
from reconstruct.masks import apply_mask, soft_sphere, threshold_mask
from reconstruct.symmetry import group_order, is_proper, symmetrise_map, symmetry_operators


def test_fsc_self_is_one_and_noise_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32, 32))
    assert np.allclose(fsc(a, a), 1.0)
    b = rng.normal(size=(32, 32, 32))
    c = fsc(a, b)
    # independent noise: |FSC| ~ 1/sqrt(voxels per shell)
    assert np.abs(c[3:]).max() < 0.15 and abs(c[3:].mean()) < 0.02


def test_fsc_batched_images():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 16, 16))
    out = fsc(a, a, ndim=2)
    assert out.shape == (4, 9) and np.allclose(out, 1)


def test_resolution_at_threshold():
    curve = np.array([1, 0.99, 0.9, 0.6, 0.3, 0.1, 0.2, 0.05])
    r = resolution_at(curve, box=14, pixel_size=2.0, threshold=0.143)
    assert r.shell == 4 and r.angstrom == pytest.approx(7.0)
    assert resolution_at(curve, 14, 2.0, 0.5).shell == 3


def test_lowpass_sets_fsc_resolution():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(48, 48, 48)).astype(np.float32)
    lp = lowpass_filter(a, 2.0, 8.0, ndim=3)
    # frequencies beyond 1/8 Å^-1 (shell 12 at 96 Å box) are removed
    power = np.abs(np.fft.rfftn(lp)) ** 2
    from reconstruct.fsc import shell_index

    shells = shell_index(lp.shape, np)
    assert power[shells >= 14].max() < 1e-6 * power.max()
    assert fsc(lp, a)[10] > 0.95


def test_bfactor_filter_is_gaussian():
    img = np.zeros((32, 32), np.float32)
    img[16, 16] = 1.0
    out = bfactor_filter(img, 1.0, 100.0, ndim=2)
    ft = np.abs(np.fft.rfft2(np.fft.ifftshift(out)))
    k = 5 / 32
    assert ft[0, 5] == pytest.approx(np.exp(-100 * k * k / 4), rel=1e-4)


def test_resize_fourier_keeps_scale():
    rng = np.random.default_rng(3)
    img = lowpass_filter(rng.normal(size=(64, 64)).astype(np.float32), 1.0, 8.0, ndim=2)
    small = resize_fourier(img, 32, ndim=2)
    back = resize_fourier(small, 64, ndim=2)
    assert np.corrcoef(back.ravel(), img.ravel())[0, 1] > 0.999
    assert small.mean() == pytest.approx(img.mean(), abs=1e-5)


def test_soft_sphere_and_threshold_mask():
    m = soft_sphere((32, 32, 32), 8.0, edge=4.0)
    assert m[16, 16, 16] == 1.0 and m[16, 16, 16 + 8] == 1.0 and m[16, 16, 16 + 12] == 0.0
    assert 0 < m[16, 16, 16 + 10] < 1
    vol = np.zeros((32, 32, 32), np.float32)
    vol[12:20, 12:20, 12:20] = 1.0
    tm = threshold_mask(vol, 0.5, extend=2, soft_edge=3)
    assert tm[16, 16, 16] == 1.0 and tm[16, 16, 21] == 1.0 and tm[16, 16, 26] == 0.0
    assert 0 < tm[16, 16, 23] < 1
    with pytest.raises(ValueError, match="no voxel is above"):
        threshold_mask(vol, 5.0)
    bg = apply_mask(vol + 3.0, m, background="mean")
    assert bg[0, 0, 0] == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("name,order", [("C1", 1), ("C6", 6), ("D4", 8), ("T", 12), ("O", 24), ("I", 60),
                                        ("I3", 60), ("D2h", 8), ("Oh", 48)])
def test_group_orders_and_closure(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3) and group_order(name) == order
    np.testing.assert_allclose(ops[0], np.eye(3))
    np.testing.assert_allclose(ops @ np.swapaxes(ops, 1, 2), np.broadcast_to(np.eye(3), ops.shape), atol=1e-9)
    prods = (ops[:, None] @ ops[None]).reshape(-1, 9)
    for p in prods[:: max(1, len(prods) // 200)]:
        assert np.abs(ops.reshape(-1, 9) - p).max(axis=1).min() < 1e-4
    assert is_proper(name) == (name[-1] not in "hH")


def test_symmetrised_map_is_invariant():
    from tests.conftest import blob_map

    vol = symmetrise_map(blob_map(32, 60, seed=9), "C4")
    rot = np.rot90(vol, k=1, axes=(1, 2))  # 90 degrees about z, exact on the grid
    rot = np.roll(rot, 1, axis=1)  # keep the centre at index N//2 for even N
    assert np.corrcoef(rot.ravel(), vol.ravel())[0, 1] > 0.99


def test_unknown_group():
    with pytest.raises(ValueError, match="unknown symmetry group"):
        symmetry_operators("Q7")


def test_fsc_weighting_keeps_what_the_halves_support(atoms32):
    n = atoms32.shape[0]
    ones = np.ones(n // 2 + 1)
    inside = shell_index(atoms32.shape, np) <= n // 2  # the curve says nothing past Nyquist: zeroed
    ft, ft_w = np.fft.rfftn(atoms32), np.fft.rfftn(fsc_weighted(atoms32, ones))
    np.testing.assert_allclose(ft_w[inside], ft[inside], atol=1e-4 * np.abs(ft).max())
    assert np.abs(ft_w[~inside]).max() < 1e-4 * np.abs(ft).max()
    assert np.abs(fsc_weighted(atoms32, 0 * ones)).max() == 0
    curve = np.where(np.arange(n // 2 + 1) <= 6, 0.9, -0.1)  # supported to shell 6 only
    out = fsc_weighted(atoms32, curve)
    spectrum = fsc(out, atoms32)
    assert np.all(spectrum[1:7] > 0.99)
    power = np.abs(np.fft.rfftn(out))[shell_index(out.shape, np) > 7]
    assert power.max() < 1e-3 * np.abs(np.fft.rfftn(atoms32)).max()
