"""The console scripts as a user runs them: help texts, a small end-to-end session, clear errors."""

import subprocess
import sys

import numpy as np
import pytest

from autoproc.cli import main as autoproc_main
from ranker.cli import main as ranker_main
from ranker.preprocess import network_images, window_size
from reconstruct.cli import build_parser
from reconstruct.cli import main as reconstruct_main
from reconstruct.files import read_map, write_stack
from tests.helpers import ADK_CLOSED


@pytest.mark.parametrize("module", ["reconstruct.cli", "ranker.cli", "autoproc.cli"])
def test_help_runs(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "usage:" in res.stdout


def test_every_option_has_help_with_default():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest in ("help",):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
        assert "(default:" in sub.format_help(), name


def test_simulate_backproject_fsc_session(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reconstruct_main(["simulate", "particles", "--model", str(ADK_CLOSED), "--o", ".", "--n", "600",
                             "--box", "32", "--angpix", "2.5", "--snr", "5", "--seed", "1"]) == 0
    assert reconstruct_main(["backproject", "--i", "truth/particles_true.star", "--o", "rec.mrc"]) == 0
    assert reconstruct_main(["fsc", "rec.mrc", "truth/map_00.mrc", "--o", "fsc.star", "--plot", "fsc.png"]) == 0
    out = capsys.readouterr().out
    res_05 = float(out.split("FSC = 0.5")[1].split("at")[1].split("Å")[0])
    assert res_05 < 3 * 2.5 * 1.2  # a reconstruction from known poses is near Nyquist
    assert (tmp_path / "fsc.png").stat().st_size > 1000
    assert reconstruct_main(["mask", "--i", "truth/map_00.mrc", "--o", "mask.mrc", "--ini_threshold", "0.01"]) == 0
    m, _ = read_map("mask.mrc")
    assert m.max() == pytest.approx(1.0) and m.min() == pytest.approx(0.0)


def test_clear_error_for_bad_input(tmp_path, capsys):
    (tmp_path / "bad.star").write_text("data_particles\nloop_\n_rlnImageName #1\n1@x.mrcs\n")
    code = reconstruct_main(["backproject", "--i", str(tmp_path / "bad.star"), "--o", str(tmp_path / "o.mrc")])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "x.mrcs: file not found" in err
    assert not (tmp_path / "o.mrc").exists()


def test_gpu_flag_without_gpu_gives_advice(tmp_path, capsys):
    from reconstruct.backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    code = reconstruct_main(["project", "--i", "x.mrc", "--ang", "x.star", "--gpu"])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


def test_ranker_prepare_images(tmp_path):
    assert window_size(150.0, 3.0) == 52
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(3, 80, 80)).astype(np.float32)
    write_stack(tmp_path / "c.mrcs", cls, 3.0)
    assert ranker_main(["prepare-images", "--i", str(tmp_path / "c.mrcs"), "--o", str(tmp_path / "n.mrcs"),
                        "--particle_diameter", "150"]) == 0
    out, _ = read_map(tmp_path / "n.mrcs")
    assert out.shape == (3, 64, 64)
    np.testing.assert_allclose(out, network_images(cls, 150, 3.0))
    # a larger diameter than the box zero-pads: the border is (near) zero
    padded = network_images(np.ones((1, 40, 40), np.float32), 200.0, 3.0)
    assert abs(padded[0, 0, 0]) < 0.1 and padded[0, 32, 32] == pytest.approx(1.0, abs=0.1)


def test_autoproc_demo_data(tmp_path):
    assert autoproc_main(["demo-data", "--o", str(tmp_path), "--movies", "1"]) == 0
    frames, px = read_map(tmp_path / "Movies/movie_0001.mrcs")
    assert frames.shape[0] == 16 and px == pytest.approx(1.5)
    assert (tmp_path / "truth/particles_truth.csv").exists()


def test_project_checks_pixel_size_and_premultiplied_reconstruction(tmp_path, monkeypatch):
    """project refuses a map/STAR pixel-size mismatch; backproject honours CTF-premultiplied data."""
    from reconstruct.files import read_particles, write_star
    from reconstruct.fsc import fsc

    monkeypatch.chdir(tmp_path)
    assert reconstruct_main(["simulate", "particles", "--model", str(ADK_CLOSED), "--o", ".", "--n", "800",
                             "--box", "32", "--angpix", "2.5", "--snr", "1000", "--seed", "2"]) == 0
    t = read_particles("truth/particles_true.star")
    t.optics.loc[0, "rlnImagePixelSize"] = 2.0
    write_star("wrong_px.star", t.to_blocks())
    assert reconstruct_main(["project", "--i", "truth/map_00.mrc", "--ang", "wrong_px.star", "--o", "p"]) == 2
    assert not (tmp_path / "p.mrcs").exists()
    # CTF-premultiplied copies of the particles: project with --ctf twice is CTF^2-weighted data
    assert reconstruct_main(["project", "--i", "truth/map_00.mrc", "--ang", "truth/particles_true.star",
                             "--o", "once", "--ctf"]) == 0
    once = read_particles("once.star")
    from reconstruct.files import read_map as rm

    imgs, _ = rm("once.mrcs")
    from reconstruct.ctf import ctf_2d
    from reconstruct.fourier import centred_fft, centred_ifft

    d = once.data
    c = ctf_2d(32, 2.5, d.rlnDefocusU, d.rlnDefocusV, d.rlnDefocusAngle)
    twice = centred_ifft(centred_fft(imgs, 2) * c, (32, 32))
    write_stack(tmp_path / "twice.mrcs", twice, 2.5)
    once.data["rlnImageName"] = [f"{i + 1:06d}@twice.mrcs" for i in range(len(d))]
    once.optics["rlnCtfDataAreCtfPremultiplied"] = 1
    write_star("premult.star", once.to_blocks())
    assert reconstruct_main(["backproject", "--i", "premult.star", "--o", "premult.mrc"]) == 0
    rec, _ = rm("premult.mrc")
    truth, _ = rm("truth/map_00.mrc")
    assert fsc(rec, truth)[1:11].min() > 0.9
