import numpy as np

from reconstruct.ctf import Optics, ctf_2d, electron_wavelength


def relion_ctf(x, y, du, dv, ang, kv, cs, q0, phase=0.0, bfac=0.0, scale=1.0):
    """RELION's CTF::getCTF written as in ctf.h (K1..K5, -sin(argument))."""
    lam = 12.2643247 / np.sqrt(kv * 1e3 * (1.0 + kv * 1e3 * 0.978466e-6))
    cs_a = cs * 1e7
    k1 = np.pi / 2 * 2 * lam
    k2 = np.pi / 2 * cs_a * lam**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0 * q0))
    k4 = -bfac / 4.0
    k5 = np.deg2rad(phase)
    u2 = x * x + y * y
    avg = -(du + dv) * 0.5
    dev = -(du - dv) * 0.5
    delta = avg + dev * np.cos(2 * (np.arctan2(y, x) - np.deg2rad(ang)))
    arg = k1 * delta * u2 + k2 * u2 * u2 - k5 - k3
    return -np.sin(arg) * np.exp(k4 * u2) * scale


def test_wavelength():
    assert abs(electron_wavelength(300) - 0.019687) < 1e-6
    assert abs(electron_wavelength(200) - 0.025079) < 1e-6


def test_ctf_matches_relion_at_tabulated_points():
    box, px = 128, 1.3
    params = dict(du=21000.0, dv=18500.0, ang=37.0)
    c = ctf_2d(box, px, params["du"], params["dv"], params["ang"], Optics(300, 2.7, 0.07),
               phase_shift=12.0, bfactor=40.0, scale=0.9)[0]
    for iy, ix in [(0, 1), (3, 7), (120, 40), (64, 64), (17, 0), (100, 5)]:
        ky = (iy if iy <= box // 2 else iy - box) / (box * px)  # FFTW rows: i > N/2 negative
        kx = ix / (box * px)
        ref = relion_ctf(kx, ky, 21000.0, 18500.0, 37.0, 300, 2.7, 0.07, phase=12.0, bfac=40.0, scale=0.9)
        assert abs(float(c[iy, ix]) - ref) < 2e-5, (iy, ix)


def test_ctf_origin_and_batch():
    c = ctf_2d(64, 2.0, [10000, 20000, 30000], [10000, 19000, 30000], [0, 10, 20], Optics(200, 2.0, 0.1))
    assert c.shape == (3, 64, 33)
    np.testing.assert_allclose(c[:, 0, 0], 0.1, atol=1e-6)
    full = ctf_2d(64, 2.0, 15000, 14000, 30, half=False)
    assert full.shape == (1, 64, 64)
    # Friedel symmetric
    np.testing.assert_allclose(full[0, 5, 7], full[0, -5, -7], atol=1e-6)
