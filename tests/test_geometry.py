import numpy as np
import pytest

from reconstruct.geometry import angle_between, euler_to_matrix, matrix_to_euler, random_rotations, rotation_2d


def test_matrix_matches_relion_rows():
    rot, tilt, psi = np.deg2rad([20.0, 50.0, -70.0])
    cf, sf, ct, st, cp, sp = np.cos(rot), np.sin(rot), np.cos(tilt), np.sin(tilt), np.cos(psi), np.sin(psi)
    expected = np.array([
        [cp * ct * cf - sp * sf, cp * ct * sf + sp * cf, -cp * st],
        [-sp * ct * cf - cp * sf, -sp * ct * sf + cp * cf, sp * st],
        [st * cf, st * sf, ct],
    ])
    np.testing.assert_allclose(euler_to_matrix(20.0, 50.0, -70.0), expected, atol=1e-12)


def test_matrix_is_rz_ry_rz_product():
    def rz(a):
        a = np.deg2rad(a)
        return np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1]])

    def ry(a):
        a = np.deg2rad(a)
        return np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])

    np.testing.assert_allclose(euler_to_matrix(33, 120, 200), rz(200) @ ry(120) @ rz(33), atol=1e-12)


def test_round_trip_many():
    rng = np.random.default_rng(1)
    mats = random_rotations(2000, rng)
    back = euler_to_matrix(*matrix_to_euler(mats))
    assert np.max(np.abs(back - mats)) < 1e-9
    _, tilt, _ = matrix_to_euler(mats)
    assert tilt.min() >= 0 and tilt.max() <= 180


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_round_trip_poles(tilt):
    m = euler_to_matrix(40.0, tilt, 10.0)
    rot, t, psi = matrix_to_euler(m)
    assert rot == 0.0 and t == tilt
    np.testing.assert_allclose(euler_to_matrix(rot, t, psi), m, atol=1e-12)


def test_random_rotations_uniform():
    rng = np.random.default_rng(2)
    mats = random_rotations(20000, rng)
    # the beam direction (third row) is uniform on the sphere: cos(tilt) uniform in [-1, 1]
    hist, _ = np.histogram(mats[:, 2, 2], bins=10, range=(-1, 1))
    assert hist.min() > 0.9 * hist.mean()
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-9)


def test_angle_between_and_2d():
    a = euler_to_matrix(0, 0, 0)
    b = euler_to_matrix(0, 0, 37.0)
    assert abs(float(angle_between(a, b)) - 37.0) < 1e-9
    np.testing.assert_allclose(rotation_2d(25.0), euler_to_matrix(0, 0, 25.0)[:2, :2], atol=1e-12)
