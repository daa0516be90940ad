import numpy as np
import pytest

from reconstruct.sampling import (
    angular_step,
    asymmetric_unit,
    coarse_image_size,
    healpix_directions,
    orientations,
    psi_angles,
    translations,
)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_healpix_equal_area_and_spacing(order):
    tilt, rot = healpix_directions(order)
    n = 12 * 4**order
    assert tilt.size == n
    t, r = np.deg2rad(tilt), np.deg2rad(rot)
    v = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], 1)
    # equal-area pixels: every octant of the sphere holds 1/8 of them
    octant = (v[:, 0] > 0).astype(int) * 4 + (v[:, 1] > 0) * 2 + (v[:, 2] > 0)
    if order >= 1:
        counts = np.bincount(octant, minlength=8)
        assert counts.min() >= 0.8 * n / 8
    # nearest-neighbour spacing close to RELION's nominal step, and all directions distinct
    cos = np.clip(v @ v.T, -1, 1)
    np.fill_diagonal(cos, -1)
    nn = np.rad2deg(np.arccos(cos.max(axis=1)))
    assert nn.min() > 0.3 * angular_step(order)
    assert np.median(nn) == pytest.approx(angular_step(order), rel=0.35)


def test_psi_steps_like_relion():
    assert psi_angles(2).size == 24  # 15 degrees
    assert psi_angles(3)[1] == pytest.approx(7.5)
    assert psi_angles(0, is_3d=False)[1] == pytest.approx(10.0)


def test_symmetry_reduces_directions():
    tilt, rot = healpix_directions(2)
    for sym, order in [("C2", 2), ("C4", 4), ("D2", 4)]:
        keep = asymmetric_unit(tilt, rot, sym)
        assert keep.sum() == pytest.approx(tilt.size / order, rel=0.2), sym
    assert asymmetric_unit(tilt, rot, "C1").all()


def test_orientations_cover_so3():
    mats, angles = orientations(1)
    assert mats.shape == (48 * 12, 3, 3) and angles.shape == (576, 3)
    # any random rotation is within ~ the sampling step of some grid point
    from reconstruct.geometry import angle_between, random_rotations

    probe = random_rotations(50, np.random.default_rng(0))
    best = np.array([angle_between(mats, p[None]).min() for p in probe])
    assert best.max() < 1.2 * angular_step(1)
    pert, _ = orientations(1, perturb=0.5, rng=np.random.default_rng(1))
    assert angle_between(pert[:1], mats[:1])[0] == pytest.approx(0.5 * angular_step(1), rel=1e-6)


def test_translation_grid():
    t = translations(5, 2)
    assert len(t) == 21 and np.hypot(*t.T).max() <= 5
    assert translations(3, 0).shape == (1, 2)


def test_coarse_image_size_follows_relion() -> None:
    """RELION's first-pass size: 2 ceil(box px / (step/360 pi d / keepsafe)), capped at the current size."""
    # 2D, 12° coarse in-plane step, 160 Å particle at 3 Å/px in a 64 px box: 192 / 11.17 Å -> 2 x 18.
    assert coarse_image_size(12.0, 160.0, 3.0, 64, 64) == 36
    assert coarse_image_size(12.0, 160.0, 3.0, 64, 30) == 30  # never above the current size
    # 3D keep-safe factor 1.2, 7.5° step, 160 Å at 2 Å/px in a 96 px box: 192 / 8.73 Å = 22.0 -> 2 x 23.
    assert coarse_image_size(7.5, 160.0, 2.0, 96, 96, keepsafe=1.2) == 46
    # Finer steps need finer frequencies: the size never shrinks as the step does.
    sizes = [coarse_image_size(s, 200.0, 1.5, 256, 256) for s in (24.0, 12.0, 6.0, 3.0)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] <= 256
