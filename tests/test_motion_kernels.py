"""Kernels of motion correction (reconstruct.motion): tiled sums, binned patch alignment, defects, FFT sizes."""

import numpy as np
import pytest

from reconstruct.fourier import fft_friendly_even
from reconstruct.motion import (
    DoseWeights,
    align_stack,
    binned_aligned_frames,
    binned_patch_grid,
    defect_mask,
    dose_weights,
    fix_defects,
    patch_binning,
    patch_grid,
    sum_global,
    sum_tiles,
    tile_layout,
)


def _texture(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n copies of one smooth random texture (float32), the frames of a motionless movie."""
    rng = np.random.default_rng(seed)
    ft = np.fft.rfft2(rng.normal(size=(size, size)))
    k2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None] ** 2
    img = np.fft.irfft2(ft * np.exp(-k2 * 300), s=(size, size))
    return np.repeat((img / img.std()).astype(np.float32)[None], n, axis=0)


@pytest.mark.parametrize(("n", "want"), [(1, 2), (15, 16), (409, 420), (818, 840), (1016, 1024), (4096, 4096)])
def test_fft_friendly_even_sizes(n, want):
    got = fft_friendly_even(n)
    assert got == want
    rest = got
    for p in (2, 3, 5, 7):
        while rest % p == 0:
            rest //= p
    assert rest == 1 and got % 2 == 0


def test_tiles_with_a_uniform_shift_equal_the_exactly_shifted_sum():
    """Tiles shifted by the same sub-pixel amount (as a phase ramp each) sum to what shifting whole
    frames in Fourier space gives, away from the frame edges (edge padding there, wrap-around in the
    full-frame shift); the rest is the faint ringing of non-periodic tiles, hidden by the blend."""
    n, size = 6, 256
    frames = _texture(n, size)
    rng = np.random.default_rng(1)
    shifts = rng.uniform(-0.5, 0.5, (n, 2)).astype(np.float32)
    layout = tile_layout(size, size, 0.5, target=64)
    tshift = np.broadcast_to(shifts[:, None, None, :], (n, layout.ty, layout.tx, 2))
    weights = DoseWeights(np.arange(1, n + 1) * 2.0, 1.0, np)
    tiled = sum_tiles(frames, tshift, layout, weights, chunk=4)
    exact = sum_global(np.fft.rfft2(frames), shifts, size, size, weights)
    for a, b in zip(tiled, exact):
        inner_a, inner_b = a[8:-8, 8:-8], b[8:-8, 8:-8]
        assert np.abs(inner_a - inner_b).max() < 0.01 * np.abs(inner_b).max()
        assert np.sqrt(((inner_a - inner_b) ** 2).mean()) < 0.005 * inner_b.std()


def test_dose_weights_in_slices_equal_all_at_once():
    doses = np.arange(1, 11) * 1.5
    whole = dose_weights(doses, 64, 64, 1.2, np)
    parts = DoseWeights(doses, 1.2, np)
    got = np.concatenate([parts(slice(s, s + 4), 64, 64) for s in range(0, 10, 4)])
    np.testing.assert_allclose(got, whole, rtol=1e-5)
    np.testing.assert_allclose((whole ** 2).sum(0), 1.0, rtol=1e-4)


def test_patch_alignment_on_binned_frames_finds_patch_shifts():
    """A field that moves one half of the frame against the other: patches cut from the binned,
    globally aligned frames measure it in full-size pixels."""
    n, size, bfac = 8, 512, 150.0
    base = _texture(1, size)[0]
    ft0 = np.fft.rfft2(base)
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None]
    rate = np.array([0.6, -0.4])  # px per frame (x, y), right half only
    frames = []
    for f in range(n):
        moved = np.fft.irfft2(ft0 * np.exp(-2j * np.pi * (kx * rate[0] * f + ky * rate[1] * f)), s=(size, size))
        frame = base.copy()
        frame[:, size // 2:] = moved[:, size // 2:]
        frames.append(frame)
    ft = np.fft.rfft2(np.asarray(frames, dtype=np.float32))
    zero = np.zeros((n, 2), dtype=np.float32)
    my, mx = patch_binning(size, size, bfac, 4, 4)
    assert my < size and mx < size
    ry, rx = my / size, mx / size
    grid = binned_patch_grid(patch_grid(size, size, 4, 4), ry, rx, my, mx)
    assert (grid.x0 + grid.width <= mx).all() and grid.width % 2 == 0
    small = binned_aligned_frames(ft, zero, size, size, my, mx)
    patches = np.stack([small[:, y:y + grid.height, x:x + grid.width] for x, y in zip(grid.x0, grid.y0)])
    res = align_stack(np.fft.rfft2(patches), grid.height, grid.width, bfac * ry * rx, 5)
    shifts = res.shifts / np.array([rx, ry])  # full-size px
    centres = grid.centres / np.array([rx, ry])
    right = centres[:, 0] > size / 2 + grid.width / rx / 2
    left = centres[:, 0] + grid.width / rx / 2 < size / 2
    expected = -rate[None, :] * np.arange(n)[:, None]  # the correction undoes the motion
    # windowed patches see a little less than the true motion (static borders): within 10 %
    np.testing.assert_allclose(shifts[right], np.broadcast_to(expected, shifts[right].shape), rtol=0.1, atol=0.1)
    np.testing.assert_allclose(shifts[left], 0.0, atol=0.2)


def test_defects_non_finite_and_hot_pixels_are_repaired_in_place():
    rng = np.random.default_rng(3)
    frames = rng.poisson(2.0, (5, 64, 64)).astype(np.float32)
    frames[1, 10, 12] = np.nan
    frames[3, 40, 41] = np.inf
    frames[:, 20, 30] = 500.0  # a hot pixel
    keep = frames.copy()
    bad, hot = defect_mask(frames, None, None)
    assert bad[10, 12] and bad[40, 41] and bad[20, 30] and hot[20, 30] and not hot[10, 12]
    assert int(bad.sum()) == 3
    out = fix_defects(frames, bad, np.random.default_rng(0))
    assert out is frames and np.isfinite(out).all()
    good = ~bad
    np.testing.assert_array_equal(out[:, good], keep[:, good])
    assert out[:, 20, 30].max() < 30  # replaced by neighbouring counts, not the hot value
