"""The simulator: deterministic, RELION-readable, with truth that matches what was written."""

import numpy as np
import pandas as pd
import pytest

from reconstruct.files import ImageSource, read_map, read_particles
from reconstruct.files.star import read_table
from reconstruct.fsc import fsc
from reconstruct.projector import Projector
from reconstruct.simulate import (
    MovieSimulation,
    ParticleSimulation,
    morph_maps,
    simulate_movies,
    simulate_particles,
)
from reconstruct.simulate.density import particle_radius
from tests.helpers import ADK_CLOSED, ADK_OPEN, model_map


def test_model_map_is_centred_and_sized():
    vol = model_map(ADK_CLOSED, 48, 2.0)
    assert vol.shape == (48, 48, 48) and vol.min() >= -1e-3
    idx = np.indices(vol.shape).reshape(3, -1)
    com = (idx * vol.ravel()).sum(1) / vol.sum()
    np.testing.assert_allclose(com, 24, atol=0.5)
    # adenylate kinase is ~50 Å across: most density within 30 Å of the centre
    assert 8 < particle_radius(vol) * 2.0 < 32


def test_open_and_closed_states_differ():
    a, b = model_map(ADK_CLOSED, 48, 2.0), model_map(ADK_OPEN, 48, 2.0)
    c = fsc(a, b)
    assert c[1] > 0.9 and c[3:12].max() < 0.6  # same envelope, different conformation


def test_morph_is_a_continuum_between_the_states():
    states = morph_maps(ADK_OPEN, ADK_CLOSED, 5, 48, 2.0)
    open_map = model_map(ADK_OPEN, 48, 2.0)

    def cc(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    # the first state is the open model (the closed one is superposed on it); in between, each state
    # is further from the open state and closer to the closed one than the last
    assert cc(states[0], open_map) > 0.95
    to_open = [cc(s, states[0]) for s in states]
    to_closed = [cc(s, states[-1]) for s in states]
    assert np.all(np.diff(to_open) < 0) and np.all(np.diff(to_closed) > 0), (to_open, to_closed)
    np.testing.assert_allclose([s.sum() for s in states], states[0].sum(), rtol=1e-3)  # same atoms


def test_particles_deterministic_and_truthful(tmp_path, monkeypatch):
    vol = model_map(ADK_CLOSED, 40, 2.0)
    cfg = ParticleSimulation(n_particles=60, box=40, pixel_size=2.0, snr=1e4, junk_fraction=0.3,
                             particles_per_micrograph=25, seed=3)
    t1 = simulate_particles([vol], cfg, tmp_path / "a")
    t2 = simulate_particles([vol], cfg, tmp_path / "b")
    a, _ = read_map(tmp_path / "a/Extract/job001/Micrographs/mic_0001.mrcs")
    b, _ = read_map(tmp_path / "b/Extract/job001/Micrographs/mic_0001.mrcs")
    np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(t1.table, t2.table)
    assert set(t1.table.category) <= {"good", "ice", "carbon", "aggregate", "noise"}
    assert 0.1 < (t1.table.category != "good").mean() < 0.5
    # With nearly no noise a good particle equals the CTF-modulated projection at its true pose.
    monkeypatch.chdir(tmp_path / "a")
    table = read_particles("truth/particles_true.star")
    from reconstruct.ctf import ctf_2d
    from reconstruct.fourier import centred_ifft, phase_shift_2d
    from reconstruct.particles import origins_px, rotations

    good = np.nonzero(t1.table.category.to_numpy() == "good")[0][:5]
    ft = Projector(vol).project(rotations(table)[good])
    ft = phase_shift_2d(ft, -origins_px(table, 2.0)[good], 40)
    d = table.data.iloc[good]
    ft = ft * ctf_2d(40, 2.0, d.rlnDefocusU, d.rlnDefocusV, d.rlnDefocusAngle, bfactor=60.0)
    pred = centred_ifft(ft, (40, 40))
    with ImageSource(table) as src:
        imgs = src.read(good)
    for p, i in zip(pred, imgs):
        assert np.corrcoef(p.ravel(), i.ravel())[0, 1] > 0.99


def test_snr_is_as_requested(tmp_path):
    vol = model_map(ADK_CLOSED, 40, 2.0)
    cfg = ParticleSimulation(n_particles=200, box=40, pixel_size=2.0, snr=0.1, seed=4)
    clean = ParticleSimulation(n_particles=200, box=40, pixel_size=2.0, snr=1e6, seed=4)
    simulate_particles([vol], cfg, tmp_path / "n")
    simulate_particles([vol], clean, tmp_path / "c")
    noisy, _ = read_map(tmp_path / "n/Extract/job001/Micrographs/mic_0001.mrcs")
    sig, _ = read_map(tmp_path / "c/Extract/job001/Micrographs/mic_0001.mrcs")
    # Both are normalised to unit background; rescale the clean images to the noisy ones' signal.
    from reconstruct.masks import soft_sphere

    m = soft_sphere((40, 40), 0.7 * 40 / 2, edge=0) > 0.5
    scale = (noisy * sig).sum() / (sig * sig).sum()
    s = sig * scale
    snr = np.var(s[:, m], axis=1).mean() / np.var((noisy - s)[:, m], axis=1).mean()
    assert snr == pytest.approx(0.1, rel=0.25)


def test_heterogeneous_fractions(tmp_path):
    a, b = model_map(ADK_CLOSED, 40, 2.0), model_map(ADK_OPEN, 40, 2.0)
    t = simulate_particles([a, b], ParticleSimulation(n_particles=400, box=40, pixel_size=2.0,
                                                      fractions=[0.7, 0.3], seed=5), tmp_path)
    frac = (t.table.map_index == 1).mean()
    assert 0.22 < frac < 0.38
    assert len(t.maps) == 2 and (tmp_path / "truth/map_01.mrc").exists()


def test_truth_table_without_images_is_the_simulations(tmp_path):
    """particle_truth_table draws what simulate_particles writes as truth, without making images."""
    from reconstruct.simulate.particles import particle_truth_table

    a, b = model_map(ADK_CLOSED, 32, 3.0), model_map(ADK_OPEN, 32, 3.0)
    cfg = ParticleSimulation(n_particles=230, box=32, pixel_size=3.0, junk_fraction=0.2, neighbour_fraction=0.1,
                             fractions=[0.6, 0.4], particles_per_micrograph=70, seed=8)
    written = simulate_particles([a, b], cfg, tmp_path).table
    drawn = particle_truth_table(cfg, 2)
    assert "rlnCoordinateX" not in drawn.columns  # drawn after the images: not reproduced
    pd.testing.assert_frame_equal(drawn, written[drawn.columns], check_dtype=False)


def test_movies_have_drift_and_particles(tmp_path):
    vol = model_map(ADK_CLOSED, 40, 1.5)
    cfg = MovieSimulation(n_movies=1, size=256, pixel_size=1.5, n_frames=8, particles_per_movie=6,
                          particle_diameter=60.0, snr=50.0, drift_step=1.0, seed=6)
    truth = simulate_movies([vol], 1.5, cfg, tmp_path)
    movies = read_table(tmp_path / "movies.star", "movies", required=("rlnMicrographMovieName",))
    frames, px = read_map(tmp_path / movies.data.rlnMicrographMovieName.iloc[0])
    assert frames.shape == (8, 256, 256) and px == pytest.approx(1.5)
    drift = pd.read_csv(tmp_path / "truth/movie_0001_drift.csv")
    # Frame-to-frame cross-correlation peaks at the true relative shift.
    frames = frames - frames.mean(axis=(1, 2), keepdims=True)
    f0, f7 = np.fft.rfft2(frames[0]), np.fft.rfft2(frames[7])
    cc = np.fft.irfft2(f7 * np.conj(f0), s=(256, 256))
    dy, dx = np.unravel_index(np.argmax(cc), cc.shape)
    dx = dx - 256 if dx > 128 else dx
    dy = dy - 256 if dy > 128 else dy
    true = drift.iloc[7][["shift_x_px", "shift_y_px"]].to_numpy() - drift.iloc[0][["shift_x_px", "shift_y_px"]]
    assert abs(dx - true.iloc[0]) <= 1 and abs(dy - true.iloc[1]) <= 1
    assert len(truth) == 6
    coords = read_table(tmp_path / "truth/coords/movie_0001_autopick.star", "", required=("rlnCoordinateX",))
    assert len(coords) == 6


def test_movies_dose_and_gain(tmp_path):
    vol = model_map(ADK_CLOSED, 40, 1.5)
    cfg = MovieSimulation(n_movies=1, size=128, pixel_size=1.5, n_frames=40, dose_per_frame=2.0,
                          particles_per_movie=3, particle_diameter=60.0, snr=1e6, drift_step=0.0,
                          gain_reference=True, seed=8)
    simulate_movies([vol], 1.5, cfg, tmp_path)
    frames, _ = read_map(tmp_path / "Movies/movie_0001.mrcs")
    gain, _ = read_map(tmp_path / "Movies/gain.mrc")
    dead = pd.read_csv(tmp_path / "truth/dead_pixels.csv")
    assert (frames[:, dead.y, dead.x] == 0).all() and (gain[dead.y, dead.x] == 0).all()
    corrected = frames * gain
    # background counts: dose per frame x pixel area
    assert np.median(corrected) == pytest.approx(2.0 * 1.5 * 1.5, rel=0.05)
    # radiation damage: the last frames carry less high-resolution signal than the first ones
    corrected[:, dead.y, dead.x] = np.median(corrected)  # defect pixels would dominate the spectrum
    sig = corrected - corrected.mean(axis=(1, 2), keepdims=True)
    ps = np.abs(np.fft.rfft2(sig)) ** 2
    k = np.hypot(np.fft.fftfreq(128)[:, None], np.fft.rfftfreq(128)[None]) / 1.5
    band = (k > 1 / 8) & (k < 1 / 5)
    assert ps[-5:, band].sum() < 0.5 * ps[:5, band].sum()
    movies = read_table(tmp_path / "movies.star", "movies")
    assert movies.optics["rlnMicrographGainName"].iloc[0] == "Movies/gain.mrc"
