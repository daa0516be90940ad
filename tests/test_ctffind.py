"""CTF estimation (reconstruct ctffind) and selection on value (reconstruct select) against simulated truth."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reconstruct import ctffind_job, select_job
from reconstruct.backend import fft_module
from reconstruct.ctf import Optics, ctf_2d
from reconstruct.ctf_fit import CtfSearch, amplitude_spectrum, bin_to_pixel_size, estimate_ctf
from reconstruct.files import read_map, write_map, write_star
from reconstruct.files.star import read_star
from reconstruct.simulate.noise import coloured_noise, noise_spectrum

# (size, pixel, defocus U, V, angle): astigmatism 600-1500 Å, large enough to define the angle
TRUTH = [(640, 1.0, 19500.0, 18000.0, 30.0), (512, 1.5, 9300.0, 8700.0, 125.0), (768, 1.2, 31000.0, 30200.0, 75.0)]


def simulated_micrograph(size: int, px: float, du: float, dv: float, angle: float, snr: float = 0.3,
                         seed: int = 0) -> np.ndarray:
    """Amorphous specimen (white object) through RELION's CTF (B 60 Å^2) plus ice/detector noise."""
    rng = np.random.default_rng(seed)
    obj = rng.standard_normal((size, size)).astype(np.float32)
    ctf = ctf_2d(size, px, du, dv, angle, Optics(), bfactor=60.0)[0]
    fft = fft_module(np)
    signal = fft.irfft2(fft.rfft2(obj) * ctf, s=(size, size))
    signal /= signal.std()
    noise = coloured_noise(1, size, noise_spectrum(size, px), rng, 1.0 / np.sqrt(snr))[0]
    return (100.0 - signal - noise).astype(np.float32)


def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """MotionCorr/job002 with 3 simulated micrographs, one of pure noise and one blank, at 1.2 Å."""
    root = tmp_path_factory.mktemp("ctf")
    names, ps_names = [], []
    mics = [simulated_micrograph(*t, seed=i) for i, t in enumerate(TRUTH)]
    rng = np.random.default_rng(9)
    mics.append((50 + coloured_noise(1, 512, noise_spectrum(512, 1.2), rng)[0]).astype(np.float32))
    mics.append(np.full((512, 512), 7.0, np.float32))
    pixels = [t[1] for t in TRUTH] + [1.2, 1.2]
    for i, (mic, px) in enumerate(zip(mics, pixels)):
        name = f"MotionCorr/job002/Movies/mic_{i + 1:03d}.mrc"
        write_map(root / name, mic, px)
        names.append(name)
        ps = f"MotionCorr/job002/Movies/mic_{i + 1:03d}_PS.mrc"
        ps_names.append(ps)
        if i == 0:  # a RELION-style power spectrum: centred amplitudes, its own pixel size in the header
            img, ps_px = bin_to_pixel_size(mic, px)
            write_map(root / ps, amplitude_spectrum(img, (min(img.shape) // 2) * 2), ps_px)
    # one optics group per pixel size, as motion correction writes them
    groups = {px: g + 1 for g, px in enumerate(dict.fromkeys(pixels))}
    optics = pd.DataFrame([{"rlnOpticsGroupName": f"opticsGroup{g}", "rlnOpticsGroup": g,
                            "rlnMicrographOriginalPixelSize": px, "rlnVoltage": 300.0,
                            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
                            "rlnMicrographPixelSize": px} for px, g in groups.items()])
    mics_df = pd.DataFrame({"rlnCtfPowerSpectrum": ps_names, "rlnMicrographName": names,
                            "rlnOpticsGroup": [groups[p] for p in pixels],
                            "rlnAccumMotionTotal": np.arange(5, dtype=float)})
    write_star(root / "MotionCorr/job002/corrected_micrographs.star", {"optics": optics, "micrographs": mics_df})
    return root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    ctffind_job.register(sub)
    select_job.register(sub)
    return p


@pytest.fixture(scope="module")
def ctf_run(project):
    """The CtfFind job run through its command-line parser (the RELION prep scheme's options)."""
    import os

    old = os.getcwd()
    os.chdir(project)
    try:
        args = _parser().parse_args(["ctffind", "--i", "MotionCorr/job002/corrected_micrographs.star",
                                     "--o", "CtfFind/job003", "--Box", "512", "--ResMin", "30", "--ResMax", "5",
                                     "--dFMin", "5000", "--dFMax", "50000", "--FStep", "500", "--dAst", "100"])
        args.func(args)
    finally:
        os.chdir(old)
    return project / "CtfFind/job003"


def test_defocus_and_angle_against_truth(ctf_run):
    blocks = read_star(ctf_run / "micrographs_ctf.star")
    mics = blocks["micrographs"]
    assert list(mics["rlnMicrographName"][:3]) == [f"MotionCorr/job002/Movies/mic_{i:03d}.mrc" for i in (1, 2, 3)]
    du = mics["rlnDefocusU"].to_numpy()[:3]
    dv = mics["rlnDefocusV"].to_numpy()[:3]
    truth = np.array([t[2:] for t in TRUTH])
    errors = np.abs(np.concatenate([du - truth[:, 0], dv - truth[:, 1]]))
    assert np.median(errors) < 100.0, errors
    assert errors.max() < 250.0, errors
    for ang, t in zip(mics["rlnDefocusAngle"][:3], truth[:, 2]):
        assert angle_error(ang, t) < 5.0, (ang, t)
    assert np.allclose(mics["rlnCtfAstigmatism"], np.abs(mics["rlnDefocusU"] - mics["rlnDefocusV"]))
    assert (mics["rlnCtfMaxResolution"][:3] < 6.0).all()
    assert (mics["rlnCtfFigureOfMerit"][:3] > 0.1).all()


def test_outputs_are_relion_files(ctf_run, project):
    blocks = read_star(ctf_run / "micrographs_ctf.star")
    src = read_star(project / "MotionCorr/job002/corrected_micrographs.star")
    pd.testing.assert_frame_equal(blocks["optics"], src["optics"])
    mics = blocks["micrographs"]
    for label in ("rlnCtfPowerSpectrum", "rlnAccumMotionTotal", *ctffind_job.CTF_LABELS):
        assert label in mics.columns
    assert "rlnPhaseShift" not in mics.columns
    first = mics["rlnCtfImage"].iloc[0]
    assert first == "CtfFind/job003/Movies/mic_001.ctf:mrc"
    image, px = read_map(ctf_run / "Movies/mic_001.ctf")
    assert image.shape == (458, 458) and px == pytest.approx(640 * 1.0 / 458, rel=1e-3)  # binned to ~1.4 Å
    logged = ctffind_job.read_ctffind_log(ctf_run / "Movies/mic_001_ctffind4.log")
    assert logged["defocus_u"] == pytest.approx(mics["rlnDefocusU"].iloc[0], abs=0.01)
    assert (ctf_run / "Movies/mic_001_ctffind4.png").stat().st_size > 10_000


def test_noise_gets_no_fit_and_blank_is_skipped(ctf_run, caplog):
    mics = read_star(ctf_run / "micrographs_ctf.star")["micrographs"]
    assert len(mics) == 4  # the blank micrograph is skipped, not fatal
    noise = mics[mics["rlnMicrographName"].str.endswith("mic_004.mrc")].iloc[0]
    assert noise["rlnCtfMaxResolution"] > 100.0
    assert noise["rlnCtfFigureOfMerit"] < 0.06
    assert not (ctf_run / "Movies/mic_005.ctf").exists()


def test_select_on_max_resolution(ctf_run, project, tmp_path):
    res = select_job.run_select(ctf_run / "micrographs_ctf.star", tmp_path / "Select/job004",
                                "rlnCtfMaxResolution", -9999, 6)
    assert (res.kept, res.total) == (3, 4)
    out = read_star(res.star)
    assert res.star.name == "micrographs.star"
    assert list(out["micrographs"]["rlnMicrographName"]) == [
        f"MotionCorr/job002/Movies/mic_{i:03d}.mrc" for i in (1, 2, 3)]
    pd.testing.assert_frame_equal(out["optics"], read_star(ctf_run / "micrographs_ctf.star")["optics"])
    # ends are included, as RELION's; particles go to particles.star
    parts = pd.DataFrame({"rlnImageName": [f"{i}@p.mrcs" for i in range(1, 6)], "rlnOpticsGroup": 1,
                          "rlnCtfFigureOfMerit": [0.1, 0.2, 0.3, 0.4, 0.5]})
    optics = pd.DataFrame([{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, "rlnVoltage": 300.0,
                            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
                            "rlnImagePixelSize": 1.0, "rlnImageSize": 64, "rlnImageDimensionality": 2}])
    write_star(tmp_path / "p.star", {"optics": optics, "particles": parts})
    args = _parser().parse_args(["select", "--i", str(tmp_path / "p.star"), "--o", str(tmp_path / "Select/job005"),
                                 "--select", "rlnCtfFigureOfMerit", "--minval", "0.2", "--maxval", "0.4"])
    args.func(args)
    kept = read_star(tmp_path / "Select/job005/particles.star")["particles"]
    assert list(kept["rlnCtfFigureOfMerit"]) == pytest.approx([0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="no column rlnNope"):
        select_job.run_select(tmp_path / "p.star", tmp_path / "x", "rlnNope", 0, 1)


def test_given_power_spectrum_and_resume(ctf_run, project, monkeypatch, caplog):
    monkeypatch.chdir(project)
    opts = ctffind_job.CtffindOptions(star=Path("MotionCorr/job002/corrected_micrographs.star"),
                                      out=Path("CtfFind/job003"), use_given_ps=True, only_do_unfinished=True,
                                      plots=False)
    with caplog.at_level(logging.INFO, logger="reconstruct"):
        star = ctffind_job.run_ctffind(opts)
    mics = read_star(star)["micrographs"]
    # mic 1 is fitted from its _PS.mrc (a new stem), the others have no spectrum file and are skipped
    assert mics["rlnCtfImage"].iloc[0] == "CtfFind/job003/Movies/mic_001_PS.ctf:mrc"
    assert abs(mics["rlnDefocusU"].iloc[0] - TRUTH[0][2]) < 150
    assert abs(mics["rlnDefocusV"].iloc[0] - TRUTH[0][3]) < 150
    assert "skipping MotionCorr/job002/Movies/mic_002_PS.mrc" in caplog.text
    # resuming without the power spectra reuses every finished micrograph and redoes nothing
    opts.use_given_ps = False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reconstruct"):
        star = ctffind_job.run_ctffind(opts)
    assert "4 reused" in caplog.text
    assert len(read_star(star)["micrographs"]) == 4


def test_phase_shift_fit():
    truth = (12000.0, 11000.0, 60.0)
    rng = np.random.default_rng(4)
    obj = rng.standard_normal((512, 512)).astype(np.float32)
    fft = fft_module(np)
    ctf = ctf_2d(512, 1.4, *truth, Optics(), phase_shift=90.0, bfactor=60.0)[0]
    mic = fft.irfft2(fft.rfft2(obj) * ctf, s=(512, 512)).astype(np.float32)
    mic += coloured_noise(1, 512, noise_spectrum(512, 1.4), rng, 2.0 * mic.std())[0]
    fit = estimate_ctf(mic, 1.4, Optics(), CtfSearch(fit_phase=True, dfstep=500.0))
    assert abs(fit.defocus_u - truth[0]) < 250 and abs(fit.defocus_v - truth[1]) < 250
    assert angle_error(fit.phase_shift, 90.0) < 15.0
