"""Image-batch operations, and CPU/GPU agreement of the core (GPU part runs only where one is lent)."""

import numpy as np
import pytest

from reconstruct.backend import array_module, get_xp, gpu_available, to_numpy
from reconstruct.fourier import lowpass_filter, shift_images
from reconstruct.geometry import random_rotations, rotation_2d
from reconstruct.images import normalise_background, rotate_images
from reconstruct.projector import Projector


def _blob_image(n=32):
    img = np.zeros((n, n), np.float32)
    img[8:14, 18:26] = 1.0
    return lowpass_filter(img, 1.0, 4.0, ndim=2)


def test_rotate_images_matches_fourier_rotation():
    img = _blob_image()
    angles = np.array([0.0, 30.0, 90.0, 211.0])
    real = rotate_images(np.repeat(img[None], 4, 0), angles)
    fourier = Projector(img).project_images(rotation_2d(angles))
    for a, b in zip(real, fourier):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_rotate_then_back_is_identity():
    img = _blob_image()
    out = rotate_images(rotate_images(img[None], [40.0]), [-40.0])
    assert np.corrcoef(out[0].ravel(), img.ravel())[0, 1] > 0.99


def test_shift_images_subpixel_round_trip():
    img = _blob_image()[None]
    moved = shift_images(img, np.array([[2.5, -1.25]]))
    back = shift_images(moved, np.array([[-2.5, 1.25]]))
    np.testing.assert_allclose(back, img, atol=1e-4)
    whole = shift_images(img, np.array([[3.0, 0.0]]))
    np.testing.assert_allclose(whole[0], np.roll(img[0], 3, axis=1), atol=1e-4)


def test_normalise_background():
    rng = np.random.default_rng(0)
    imgs = rng.normal(5.0, 3.0, (4, 32, 32)).astype(np.float32)
    out = normalise_background(imgs, 10)
    c = np.arange(32) - 16
    outside = (c[:, None] ** 2 + c[None] ** 2) > 100
    np.testing.assert_allclose(out[:, outside].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, outside].std(1), 1, atol=1e-5)


def test_backend_selection_without_gpu():
    assert get_xp(False) is np
    assert array_module(np.zeros(2)) is np
    if not gpu_available():
        assert get_xp(None) is np
        from reconstruct.backend import GPUUnavailableError

        with pytest.raises(GPUUnavailableError, match="no CUDA device"):
            get_xp(True)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device (none here)")
def test_cpu_and_gpu_agree():
    cp = get_xp(True)
    from reconstruct.ctf import ctf_2d
    from reconstruct.fsc import fsc
    from reconstruct.projector import BackProjector
    from tests.conftest import blob_map

    vol = blob_map(32, 100)
    mats = random_rotations(300, np.random.default_rng(1))
    ctf_np = ctf_2d(32, 2.0, np.full(300, 15000.0), np.full(300, 14000.0), np.full(300, 20.0))
    ctf_cp = ctf_2d(32, 2.0, cp.full(300, 15000.0), cp.full(300, 14000.0), cp.full(300, 20.0), xp=cp)
    np.testing.assert_allclose(to_numpy(ctf_cp), ctf_np, atol=1e-5)
    p_np = Projector(vol).project(mats)
    p_cp = Projector(cp.asarray(vol)).project(cp.asarray(mats))
    np.testing.assert_allclose(to_numpy(p_cp), p_np, rtol=1e-3, atol=1e-3 * np.abs(p_np).max())
    b_np = BackProjector(32)
    b_np.insert(p_np * ctf_np, mats, ctf=ctf_np)
    b_cp = BackProjector(32, xp=cp)
    b_cp.insert(p_cp * ctf_cp, cp.asarray(mats), ctf=ctf_cp)
    r_np, r_cp = b_np.reconstruct(), to_numpy(b_cp.reconstruct())
    assert fsc(r_np, r_cp)[1:].min() > 0.999
    np.testing.assert_allclose(fsc(cp.asarray(vol), cp.asarray(r_np)), fsc(vol, r_np), atol=1e-4)
    img = np.repeat(_blob_image()[None], 3, 0)
    np.testing.assert_allclose(to_numpy(rotate_images(cp.asarray(img), cp.asarray([0.0, 33.0, 90.0]))),
                               rotate_images(img, np.array([0.0, 33.0, 90.0])), atol=1e-4)
