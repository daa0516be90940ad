"""Post-processing: masked FSC with phase-randomisation correction, Guinier B-factor, RELION agreement."""

import shutil
import subprocess

import numpy as np
import pytest

from reconstruct.files import read_map, read_star, write_map
from reconstruct.fourier import bfactor_filter
from reconstruct.fsc import fsc, resolution_at
from reconstruct.postprocess import PostprocessOptions, guinier_bfactor, postprocess
from tests.helpers import ADK_CLOSED, model_map

BOX, PX = 48, 2.0


def _halves(tmp_path, noise=0.02, seed=0):
    truth = model_map(ADK_CLOSED, BOX, PX)
    rng = np.random.default_rng(seed)
    from reconstruct.fourier import lowpass_filter

    def noisy():  # noise that grows with frequency, as in real half maps
        n = rng.normal(0, noise, truth.shape).astype(np.float32)
        return truth + n - 0.5 * lowpass_filter(n, PX, 12.0, ndim=3)

    write_map(tmp_path / "run_half1_class001_unfil.mrc", noisy(), PX)
    write_map(tmp_path / "run_half2_class001_unfil.mrc", noisy(), PX)
    return truth


def test_postprocess_resolution_and_outputs(tmp_path):
    truth = _halves(tmp_path)
    res = postprocess(PostprocessOptions(tmp_path / "run_half1_class001_unfil.mrc",
                                         tmp_path / "run_half2_class001_unfil.mrc", tmp_path / "pp" / "postprocess",
                                         autob_lowres=20.0))
    h1, _ = read_map(tmp_path / "run_half1_class001_unfil.mrc")
    h2, _ = read_map(tmp_path / "run_half2_class001_unfil.mrc")
    # masking removes solvent noise: the corrected masked FSC is at least as good as the unmasked one,
    # and the resolution is where the halves' agreement says
    assert res.resolution <= resolution_at(fsc(h1, h2), BOX, PX, 0.143).angstrom + 1e-6
    # the corrected FSC of the halves predicts each half's FSC against the truth: sqrt(2 FSC / (1 + FSC))
    full = fsc((h1 + h2) / 2, truth)
    c = np.clip(res.fsc_corrected, 0, 1)
    predicted = np.sqrt(2 * c / (1 + c))
    assert np.abs(full[2:15] - predicted[2:15]).max() < 0.15
    star = read_star(res.star)
    assert star["general"]["rlnFinalResolution"].iloc[0] == pytest.approx(res.resolution)
    assert {"rlnFourierShellCorrelationCorrected",
            "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"} <= set(star["fsc"].columns)
    for p in (res.map, res.masked_map, res.mask, tmp_path / "pp" / "postprocess_fsc.png"):
        assert p.exists()
    mask, _ = read_map(res.mask)
    assert 0 <= mask.min() and mask.max() <= 1 and (mask > 0.5).sum() > 100


def test_guinier_bfactor_recovers_blur():
    vol = model_map(ADK_CLOSED, BOX, PX)
    b0, _, _ = guinier_bfactor(vol, PX, 10.0, 4.5)
    b1, _, corr = guinier_bfactor(bfactor_filter(vol, PX, 150.0, ndim=3), PX, 10.0, 4.5)
    assert b1 - b0 == pytest.approx(150.0, abs=5.0) and corr < -0.5


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_postprocess") is None, reason="RELION 3.1 is not installed")
def test_relion_postprocess_agrees_within_one_shell(tmp_path):
    _halves(tmp_path, noise=0.03, seed=1)
    ours = postprocess(PostprocessOptions(tmp_path / "run_half1_class001_unfil.mrc",
                                          tmp_path / "run_half2_class001_unfil.mrc", tmp_path / "postprocess"))
    (tmp_path / "rel").mkdir()
    subprocess.run(["relion_postprocess", "--mask", str(ours.mask), "--i", "run_half1_class001_unfil.mrc",
                    "--o", "rel/postprocess", "--angpix", str(PX), "--auto_bfac", "--autob_lowres", "10"],
                   cwd=tmp_path, capture_output=True, text=True, timeout=300)
    theirs = float(read_star(tmp_path / "rel/postprocess.star")["general"]["rlnFinalResolution"].iloc[0])
    shell = lambda a: BOX * PX / a  # noqa: E731
    assert abs(shell(ours.resolution) - shell(theirs)) <= 1.0, (ours.resolution, theirs)
