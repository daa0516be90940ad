"""Motion correction (reconstruct motioncorr): accuracy against simulated truth and RELION's files."""

import argparse
import logging
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from reconstruct.backend import gpu_available
from reconstruct.files.eer import check_grouping, eer_gain, read_eer, write_eer
from reconstruct.files.errors import InputError
from reconstruct.files.movies import read_movie, read_movie_header
from reconstruct.files.mrc import write_map
from reconstruct.motion import poly_terms
from reconstruct.motioncorr_job import MotionCorrOptions, _transform_gain, output_stem, register, run_motioncorr
from reconstruct.simulate import MovieSimulation, simulate_movies
from tests.helpers import ADK_CLOSED, model_map

BASE = MovieSimulation(n_movies=1, size=384, pixel_size=1.5, n_frames=16, particles_per_movie=50,
                       particle_diameter=50.0, snr=20.0, drift_step=1.0, seed=5)


def _sim(root: Path, cfg: MovieSimulation) -> Path:
    simulate_movies([model_map(ADK_CLOSED, 40, 1.5)], 1.5, cfg, root)
    return root


def _run(root: Path, **kw) -> Path:
    opts = MotionCorrOptions(Path("movies.star"), Path("MotionCorr/job002"), project_dir=root, **kw)
    cwd = os.getcwd()
    os.chdir(root)  # outputs are relative to the project directory, as RELION's
    try:
        return run_motioncorr(replace(opts, project_dir=None))
    finally:
        os.chdir(cwd)


def _motion(root: Path, stem: str = "movie_0001") -> dict:
    return starfile.read(root / f"MotionCorr/job002/Movies/{stem}.star", always_dict=True)


def test_global_drift_matches_truth_with_relion_sign(tmp_path):
    root = _sim(tmp_path, BASE)
    star = _run(root, patch_x=1, patch_y=1, dose_per_frame=1.5)
    b = _motion(root)
    est = b["global_shift"][["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    drift = pd.read_csv(root / "truth/movie_0001_drift.csv")[["shift_x_px", "shift_y_px"]].to_numpy()
    truth = -(drift - drift[0])  # RELION stores the correction, zero at the first frame
    rms = np.sqrt(((est - truth) ** 2).sum(1).mean())
    assert rms < 0.5, rms
    assert np.abs(truth).max() > 3  # the drift was worth correcting
    mics = starfile.read(root / star, always_dict=True)
    assert {"rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"} <= set(mics["optics"].columns)
    row = mics["micrographs"].iloc[0]
    assert row.rlnMicrographName == "MotionCorr/job002/Movies/movie_0001.mrc"
    assert row.rlnMicrographMetadata == "MotionCorr/job002/Movies/movie_0001.star"
    steps = np.hypot(*np.diff(est, axis=0).T)
    assert row.rlnAccumMotionTotal == pytest.approx(steps.sum(), rel=1e-4)
    assert row.rlnAccumMotionEarly == pytest.approx(steps[:1].sum(), rel=1e-4)  # 4 e/Å² at 1.5 e/Å²/frame
    assert b["general"]["rlnMotionModelVersion"] == 0 and b["general"]["rlnImageSizeZ"] == 16
    assert (root / "MotionCorr/job002/Movies/movie_0001_shifts.png").exists()
    assert (root / "MotionCorr/job002/Movies/movie_0001.log").read_text().count("Iteration") >= 2


def test_patch_model_recovers_local_motion_better_than_global(tmp_path):
    cfg = replace(BASE, size=512, particles_per_movie=80, snr=200.0, local_motion=3.0, seed=3)
    root = _sim(tmp_path, cfg)
    _run(root, patch_x=5, patch_y=5)
    b = _motion(root)
    g = b["global_shift"][["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    t = pd.read_csv(root / "truth/movie_0001_particle_motion.csv")
    n, k = len(g), int(t.particle.max())
    m = t[["motion_x_px", "motion_y_px"]].to_numpy().reshape(n, k, 2)
    xy = t[["x", "y"]].to_numpy()[:k]
    truth = -(m - m[:1])
    glob = np.repeat(g[:, None], k, 1)
    c = b["local_motion_model"]["rlnMotionModelCoeff"].to_numpy()
    assert len(c) == 36 and b["general"]["rlnMotionModelVersion"] == 1
    terms = poly_terms(xy[None, :, 0] / 512 - 0.5, xy[None, :, 1] / 512 - 0.5, np.arange(n, dtype=float)[:, None])
    local = glob + np.stack([terms @ c[:18], terms @ c[18:]], -1)
    err_global = np.sqrt(((glob - truth) ** 2).sum(-1).mean())
    err_local = np.sqrt(((local - truth) ** 2).sum(-1).mean())
    assert err_local < 0.5 < err_global and err_local < 0.4 * err_global, (err_local, err_global)
    assert {"rlnMicrographFrameNumber", "rlnCoordinateX", "rlnMicrographShiftX"} <= set(b["local_shift"].columns)


def _band_cc(a: np.ndarray, b: np.ndarray, px: float, lo: float = 8.0, hi: float = 4.0) -> float:
    fa, fb = np.fft.rfft2(a - a.mean()), np.fft.rfft2(b - b.mean())
    n = a.shape[0]
    k = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None]) / px
    band = (k > 1 / lo) & (k < 1 / hi)
    return float(np.real(fa[band] * np.conj(fb[band])).sum()
                 / np.sqrt((np.abs(fa[band]) ** 2).sum() * (np.abs(fb[band]) ** 2).sum()))


def test_dose_weighting_keeps_more_signal_at_high_resolution(tmp_path):
    # Same particles, drift and damage twice: nearly noise-free (the reference) and noisy.
    cfg = replace(BASE, n_frames=24, dose_per_frame=2.0, snr=3.0)
    clean = _sim(tmp_path / "clean", replace(cfg, snr=1e6))
    noisy = _sim(tmp_path / "noisy", cfg)
    drift = pd.read_csv(clean / "truth/movie_0001_drift.csv")[["shift_x_px", "shift_y_px"]].to_numpy()
    frames, _ = read_movie(clean / "Movies/movie_0001.mrcs")
    ft = np.fft.rfft2(frames)
    from reconstruct.motion import phase_ramp

    ref = np.fft.irfft2((ft * phase_ramp(-(drift - drift[0]), 384, 384, np)).sum(0), s=(384, 384))
    ref = ref - frames.sum(0).mean()
    _run(noisy, patch_x=1, patch_y=1, dose_weighting=True, dose_per_frame=2.0, save_noDW=True)
    dw, _ = read_movie(noisy / "MotionCorr/job002/Movies/movie_0001.mrc")
    plain, _ = read_movie(noisy / "MotionCorr/job002/Movies/movie_0001_noDW.mrc")
    cc_dw, cc_plain = _band_cc(dw[0], ref, 1.5), _band_cc(plain[0], ref, 1.5)
    assert cc_plain > 0.02 and cc_dw > 1.05 * cc_plain, (cc_dw, cc_plain)
    # RELION's normalisation: the DC of the weighted sum is the plain sum's / sqrt(frames)
    assert dw.mean() == pytest.approx(plain.mean() / np.sqrt(24), rel=1e-3)


def test_gain_rotation_flip_and_size_check(tmp_path):
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(_transform_gain(g, 1, 0), np.rot90(g, -1))  # clockwise with y down
    assert np.array_equal(_transform_gain(g, 0, 1), g[::-1]) and np.array_equal(_transform_gain(g, 0, 2), g[:, ::-1])
    root = _sim(tmp_path, replace(BASE, gain_reference=True, drift_step=0.3))
    gain, _ = read_movie(root / "Movies/gain.mrc")
    import reconstruct.files.mrc as mrc

    mrc.write_map(root / "gain_rot.mrc", np.rot90(gain[0], 1), 1.5)  # stored a quarter turn anticlockwise
    _run(root, patch_x=1, patch_y=1, gainref=Path("gain_rot.mrc"), gain_rot=1)
    good, _ = read_movie(root / "MotionCorr/job002/Movies/movie_0001.mrc")
    _run(root, patch_x=1, patch_y=1, gainref=Path("gain_rot.mrc"), gain_rot=3)
    wrong, _ = read_movie(root / "MotionCorr/job002/Movies/movie_0001.mrc")
    dead = pd.read_csv(root / "truth/dead_pixels.csv")
    assert np.isfinite(good).all() and abs(good[0, dead.y, dead.x].mean() / good.mean() - 1) < 0.2
    assert good.std() < 0.5 * wrong.std()  # the gain pattern is gone only with the right rotation
    mrc.write_map(root / "gain_small.mrc", gain[0, :, :200], 1.5)
    with pytest.raises(InputError, match="gain reference"):
        _run(root, gainref=Path("gain_small.mrc"))


def test_corrupt_movie_is_skipped_and_listed(tmp_path, caplog):
    root = _sim(tmp_path, replace(BASE, n_movies=2, size=256, truncate_movies=(2,)))
    with caplog.at_level(logging.WARNING, logger="reconstruct"):
        star = _run(root, patch_x=1, patch_y=1)
    assert any("skipping Movies/movie_0002.mrcs" in r.getMessage() for r in caplog.records)
    mics = starfile.read(root / star, always_dict=True)["micrographs"]
    assert list(mics.rlnMicrographName) == ["MotionCorr/job002/Movies/movie_0001.mrc"]
    assert "movie_0002" in (root / "MotionCorr/job002/skipped_movies.txt").read_text()


def test_movie_too_large_for_memory_is_skipped_with_advice(tmp_path, monkeypatch, caplog):
    root = _sim(tmp_path, replace(BASE, size=256))
    monkeypatch.setattr("reconstruct.memory.available_bytes", lambda xp=None: 1_000_000)
    with caplog.at_level(logging.WARNING, logger="reconstruct"):
        _run(root, patch_x=1, patch_y=1)
    text = (root / "MotionCorr/job002/skipped_movies.txt").read_text()
    assert "movie_0001" in text and "GiB" in text and "--last_frame_sum" in text
    assert not (root / "MotionCorr/job002/Movies/movie_0001.mrc").exists()


def test_outputs_float16_ps_binning_tiff_and_only_unfinished(tmp_path):
    root = _sim(tmp_path, replace(BASE, n_movies=2, size=256, movie_format="tiff-lzw"))
    frames, _ = read_movie(root / "Movies/movie_0001.tif")
    assert frames.shape == (16, 256, 256)
    kw = dict(patch_x=1, patch_y=1, dose_weighting=True, save_noDW=True, grouping_for_ps=4, ps_size=128,
              float16=True, bin_factor=2.0, dose_per_frame=1.5)
    star = _run(root, do_at_most=1, **kw)
    mics = starfile.read(root / star, always_dict=True)
    assert len(mics["micrographs"]) == 1
    assert list(mics["micrographs"].columns[:3]) == ["rlnMicrographNameNoDW", "rlnCtfPowerSpectrum",
                                                      "rlnMicrographName"]
    assert mics["optics"].rlnMicrographPixelSize.iloc[0] == pytest.approx(3.0)
    out = root / "MotionCorr/job002/Movies"
    with mrcfile.open(out / "movie_0001.mrc") as m:
        assert m.header.mode == 12 and m.data.shape == (128, 128) and m.voxel_size.x == pytest.approx(3.0)
    with mrcfile.open(out / "movie_0001_PS.mrc") as m:
        assert m.header.mode == 2 and m.data.shape == (128, 128)
        ps = m.data.astype(float)
        assert ps[64, 64] == ps.max()  # centred spectrum
    shifts = _motion(root)["global_shift"]
    assert shifts.rlnMicrographShiftX.abs().max() > 1  # shifts in unbinned pixels
    stamp = (out / "movie_0001.mrc").stat().st_mtime_ns
    star = _run(root, only_do_unfinished=True, **kw)
    assert (out / "movie_0001.mrc").stat().st_mtime_ns == stamp  # done movies are not redone
    assert len(starfile.read(root / star, always_dict=True)["micrographs"]) == 2


def test_stem_rule_and_cli_registration(tmp_path):
    assert output_stem("Movies/CB1__00006_Feb18_23.39.55.tif") == "Movies/CB1__00006_Feb18_23_39_55"
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub)
    a = p.parse_args(["motioncorr", "--i", "movies.star", "--o", "MotionCorr/job002", "--dose_weighting",
                      "--gain_rot", "1", "--float16", "--grouping_for_ps", "4"])
    assert a.func.__module__ == "reconstruct.motioncorr_job" and a.gain_rot == 1 and a.patch_x == 5
    with pytest.raises(InputError, match="grouping_for_ps"):
        run_motioncorr(MotionCorrOptions(tmp_path / "none.star", tmp_path / "out", float16=True))


def _eer_movie(root: Path, n: int, group: int, size: int, rng: np.random.Generator, mean: float = 0.5) -> np.ndarray:
    """An EER movie of a drifting high-contrast texture: each internal frame draws one electron per
    pixel with probability mean (1 +- 0.9) from the texture shifted by that fraction's drift.  Returns
    the true correction (n, 2) in RELION's convention (zero at the first frame)."""
    from reconstruct.motion import phase_ramp

    ft = np.fft.rfft2(rng.normal(size=(size, size)))
    ft *= np.exp(-(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None] ** 2) * 400)
    drift = np.cumsum(rng.normal(0, 1.0, (n, 2)), axis=0)
    drift -= drift[0]
    tex = np.fft.irfft2(ft[None] * phase_ramp(drift, size, size, np), s=(size, size))
    p = mean * (1 + 0.9 * np.tanh(tex / tex.std()))
    events = rng.random((n, group, size, size)) < p[:, None]
    (root / "Movies").mkdir(parents=True)
    write_eer(root / "Movies/m.eer", events.reshape(-1, size, size).astype(np.uint8))
    starfile.write({"optics": pd.DataFrame([{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
                                             "rlnMicrographOriginalPixelSize": 1.0, "rlnVoltage": 300.0,
                                             "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}]),
                    "movies": pd.DataFrame([{"rlnMicrographMovieName": "Movies/m.eer", "rlnOpticsGroup": 1}])},
                   root / "movies.star")
    return -drift


def test_eer_movies_rendered_in_fractions_align_and_take_relions_gain_rule(tmp_path):
    truth = _eer_movie(tmp_path, 10, 6, 256, np.random.default_rng(4))  # 60 internal frames
    movie = tmp_path / "Movies/m.eer"
    assert read_movie_header(movie, 6).n_frames == 10
    assert read_movie_header(movie, 8).n_frames == 7  # 4 internal frames left over are not used
    with pytest.raises(InputError, match="eer_upsampling"):
        check_grouping(6, 2)
    gain = np.full((256, 256), 4.0, dtype=np.float32)
    gain[10, 20] = 0.0  # a dead pixel
    write_map(tmp_path / "gain_counts.mrc", gain, 1.0)
    star = _run(tmp_path, patch_x=1, patch_y=1, eer_grouping=6, gainref=Path("gain_counts.mrc"))
    b = starfile.read(tmp_path / "MotionCorr/job002/Movies/m.star", always_dict=True)
    assert int(b["general"]["rlnEERGrouping"]) == 6 and int(b["general"]["rlnImageSizeZ"]) == 10
    est = b["global_shift"][["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    assert np.abs(truth).max() > 2 and np.sqrt(((est - truth) ** 2).sum(1).mean()) < 0.3
    assert starfile.read(tmp_path / star, always_dict=True)["micrographs"].shape[0] == 1
    # RELION's EER gain rule: a counts gain is inverted (mean / gain), zeros stay defects; a
    # Thermo Fisher .gain is multiplicative already; an 8K gain is summed to the 4K grid.
    g = eer_gain(gain, multiplicative=False)
    assert g[10, 20] == 0 and g[0, 0] == pytest.approx(gain.mean() / 4.0)
    np.testing.assert_array_equal(eer_gain(gain, multiplicative=True), gain)
    assert eer_gain(np.ones((8, 8)), True, (4, 4)).tolist() == np.full((4, 4), 4.0).tolist()


def test_eer_code_round_trips_through_tifffile(tmp_path):
    rng = np.random.default_rng(2)
    events = (rng.random((6, 50, 300)) < 0.05).astype(np.uint8)
    events[0] = 0  # an empty internal frame
    events[1, -1, -1] = 1  # an electron on the last pixel
    events[2, :, :200] = 0  # a run longer than 127 pixels
    write_eer(tmp_path / "m.eer", events)
    np.testing.assert_array_equal(read_eer(tmp_path / "m.eer", None, 1), events.astype(np.float32))
    np.testing.assert_array_equal(read_eer(tmp_path / "m.eer", [1], 3)[0], events[3:].sum(0))
    with pytest.raises(InputError, match="fraction"):
        read_eer(tmp_path / "m.eer", [2], 3)
    (tmp_path / "bad.eer").write_bytes((tmp_path / "m.eer").read_bytes()[:400])
    with pytest.raises(InputError):
        read_eer(tmp_path / "bad.eer", None, 1)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_run_motioncorr") is None,
                    reason="RELION 3.1 is not installed (apt-get install relion); interop tests need it")
def test_relion_reads_our_eer_and_agrees_with_our_rendering(tmp_path):
    """relion_run_motioncorr --use_own on an EER movie we wrote (RELION renders 4K EER only): its
    fractions of --eer_grouping internal frames are ours (same shifts, same orientation, same sum)."""
    truth = _eer_movie(tmp_path, 4, 3, 4096, np.random.default_rng(4), mean=0.1)
    common = ["--eer_grouping", "3", "--patch_x", "1", "--patch_y", "1", "--bfactor", "150", "--dose_per_frame", "1"]
    res = subprocess.run(["relion_run_motioncorr", "--i", "movies.star", "--o", "MotionCorr/relion/", "--use_own",
                          "--j", "2", *common], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    _run(tmp_path, eer_grouping=3, patch_x=1, patch_y=1, dose_per_frame=1.0)

    def shifts(job: str) -> np.ndarray:
        b = starfile.read(tmp_path / f"MotionCorr/{job}/Movies/m.star", always_dict=True)
        return b["global_shift"][["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()

    ours, theirs = shifts("job002"), shifts("relion")
    assert np.sqrt(((ours - truth) ** 2).sum(1).mean()) < 0.1
    assert np.sqrt(((ours - theirs) ** 2).sum(1).mean()) < 0.2
    a = mrcfile.read(tmp_path / "MotionCorr/job002/Movies/m.mrc")[32:-32, 32:-32]
    b = mrcfile.read(tmp_path / "MotionCorr/relion/Movies/m.mrc")[32:-32, 32:-32]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99 and a.mean() == pytest.approx(b.mean(), rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device (none here)")
def test_cpu_and_gpu_motion_correction_and_picking_agree(tmp_path):
    """The same job on NumPy and on CuPy: the same shifts, local model and sums; the same picks."""
    root = _sim(tmp_path, replace(BASE, size=512, local_motion=3.0, seed=3))
    _run(root, patch_x=5, patch_y=5, dose_weighting=True, dose_per_frame=1.5, gpu=False)
    os.rename(root / "MotionCorr/job002", root / "MotionCorr/cpu")
    _run(root, patch_x=5, patch_y=5, dose_weighting=True, dose_per_frame=1.5, gpu=True)
    cpu = starfile.read(root / "MotionCorr/cpu/Movies/movie_0001.star", always_dict=True)
    gpu = starfile.read(root / "MotionCorr/job002/Movies/movie_0001.star", always_dict=True)
    cols = ["rlnMicrographShiftX", "rlnMicrographShiftY"]
    np.testing.assert_allclose(gpu["global_shift"][cols].to_numpy(), cpu["global_shift"][cols].to_numpy(), atol=0.02)
    np.testing.assert_allclose(gpu["local_motion_model"]["rlnMotionModelCoeff"].to_numpy(),
                               cpu["local_motion_model"]["rlnMotionModelCoeff"].to_numpy(), atol=0.05)
    a = mrcfile.read(root / "MotionCorr/cpu/Movies/movie_0001.mrc")
    b = mrcfile.read(root / "MotionCorr/job002/Movies/movie_0001.mrc")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999
    from reconstruct.backend import get_xp
    from reconstruct.log_picker import LoGParams, pick_micrograph

    params = LoGParams(60.0, 80.0, 0.0)
    p_cpu = pick_micrograph(a, 1.5, params)
    p_gpu = pick_micrograph(get_xp(True).asarray(a), 1.5, params)
    np.testing.assert_allclose(np.sort(p_gpu.x), np.sort(p_cpu.x), atol=1e-3)
