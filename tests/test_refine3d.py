"""3D auto-refine on simulated CFTR particles: recovered quality against the truth, and --continue."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from autoproc.demo import demo_model_path
from reconstruct.cli import main as reconstruct_main
from reconstruct.files import read_map, read_particles, read_star, write_map
from reconstruct.fourier import lowpass_filter
from reconstruct.fsc import fsc, resolution_at
from reconstruct.geometry import angle_between
from reconstruct.particles import rotations
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles

BOX, PX = 40, 4.0


@pytest.fixture(scope="module")
def cftr_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    vol = atomic_model_map(demo_model_path(), BOX, PX)
    simulate_particles([vol], ParticleSimulation(n_particles=400, box=BOX, pixel_size=PX, snr=3.0, max_offset=5,
                                                 seed=2), root)
    write_map(root / "ref30.mrc", lowpass_filter(vol, PX, 30.0, ndim=3), PX)
    return root, vol


@pytest.mark.slow
def test_refine_from_30A_reference_then_continue(cftr_set, monkeypatch):
    root, truth = cftr_set
    monkeypatch.chdir(root)
    args = ["refine3d", "--i", "Extract/job001/particles.star", "--ref", "ref30.mrc", "--o", "Refine3D/job001",
            "--particle_diameter", "150", "--ini_high", "30"]
    # a run killed (SIGKILL) in the middle of its third iteration, then continued to convergence
    proc = subprocess.Popen([sys.executable, "-m", "reconstruct.cli", *args, "--iter", "15"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done2 = root / "Refine3D/job001/run_it002_optimiser.star"
    t0 = time.monotonic()
    while not done2.exists() and proc.poll() is None and time.monotonic() - t0 < 600:
        time.sleep(0.2)
    time.sleep(1.0)  # into iteration 3
    proc.kill()
    proc.wait()
    assert done2.exists() and not (root / "Refine3D/job001/run_class001.mrc").exists()
    assert reconstruct_main([*args, "--iter", "15", "--continue"]) == 0
    its = sorted(root.glob("Refine3D/job001/run_it*_optimiser.star"))
    assert its[0].name == "run_it001_optimiser.star" and len(its) > 3
    final, px = read_map(root / "Refine3D/job001/run_class001.mrc")
    assert px == pytest.approx(PX)
    curve = fsc(final, truth)
    assert resolution_at(curve, BOX, PX, 0.5).angstrom < 3 * PX, np.round(curve, 2)
    est = read_particles(root / "Refine3D/job001/run_data.star",
                         required=("rlnAngleRot", "rlnRandomSubset", "rlnMaxValueProbDistribution"))
    true = read_particles(root / "truth/particles_true.star")
    err = angle_between(rotations(est), rotations(true))
    assert np.median(err) < 5.0
    shift_err = np.hypot(*(est.data[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
                           - true.data[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()).T)
    assert np.median(shift_err) < 1.5 * PX
    assert set(est.data.rlnRandomSubset) == {1, 2}
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_model.star"):
        assert (root / "Refine3D/job001" / name).exists()


@pytest.mark.slow
@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION 3.1 is not installed")
def test_relion_reads_our_run_data(cftr_set):
    """relion_reconstruct takes our refined poses (run_data.star) and rebuilds the same map."""
    root, truth = cftr_set
    data = root / "Refine3D/job001/run_data.star"
    if not data.exists():
        pytest.skip("needs the refinement of test_refine_from_30A_reference_then_continue")
    res = subprocess.run(["relion_reconstruct", "--i", str(data), "--o", "relion_rec.mrc", "--ctf"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs, _ = read_map(root / "relion_rec.mrc")
    assert resolution_at(fsc(theirs, truth), BOX, PX, 0.5).angstrom < 3.5 * PX


@pytest.mark.slow
def test_c2_symmetry_beats_c1(tmp_path, monkeypatch):
    """A C2 dimer refined with --sym C2 reaches a better resolution than with C1 on the same particles."""
    from reconstruct.symmetry import symmetrise_map
    from tests.helpers import ADK_CLOSED, model_map

    box, px = 40, 3.0
    vol = symmetrise_map(np.roll(model_map(ADK_CLOSED, box, px), 5, axis=2), "C2") * 2  # dimer about z
    simulate_particles([vol], ParticleSimulation(n_particles=200, box=box, pixel_size=px, snr=1.0, max_offset=4,
                                                 seed=3), tmp_path)
    write_map(tmp_path / "ref.mrc", lowpass_filter(vol, px, 30.0, ndim=3), px)
    monkeypatch.chdir(tmp_path)
    gold, vs_truth = {}, {}
    for sym in ("C1", "C2"):
        assert reconstruct_main(["refine3d", "--i", "Extract/job001/particles.star", "--ref", "ref.mrc",
                                 "--o", sym, "--particle_diameter", "110", "--sym", sym, "--ini_high", "30",
                                 "--iter", "15"]) == 0
        model = read_star(tmp_path / sym / "run_model.star")
        gold[sym] = float(model["model_general"]["rlnCurrentResolution"].iloc[0])
        final, _ = read_map(tmp_path / sym / "run_class001.mrc")
        vs_truth[sym] = resolution_at(fsc(final, vol), box, px, 0.5).angstrom
    assert gold["C2"] < gold["C1"] and vs_truth["C2"] <= vs_truth["C1"], (gold, vs_truth)


@pytest.mark.slow
def test_ssri_tune_on_the_refined_particles(cftr_set, capsys):
    """The ordered search runs on a refinement's output and returns options refine3d accepts."""
    root, _ = cftr_set
    data = root / "Refine3D/job001/run_data.star"
    if not data.exists():
        pytest.skip("needs the refinement of test_refine_from_30A_reference_then_continue")
    from reconstruct.cli import build_parser
    from reconstruct.ssri_tune import SEARCH_GRID

    assert reconstruct_main(["ssri-tune", "--i", str(data), "--ref", str(root / "Refine3D/job001/run_class001.mrc"),
                             "--o", str(root / "tune"), "--particle_diameter", "150", "--subset", "200",
                             "--project_dir", str(root)]) == 0
    trials = read_star(root / "tune/ssri_tune.star")["ssri_tune"]
    assert len(trials) == sum(len(v) for v in SEARCH_GRID.values())
    # Each parameter's chosen value is at least as good as every value tried for it at its stage.
    flags = capsys.readouterr().out.split("refine with: ")[1].split()
    a = build_parser().parse_args(["refine3d", "--i", "x", "--ref", "y", "--o", "z", "--particle_diameter", "1",
                                   *flags])
    chosen = {"alpha": a.ssri_alpha, "beta": a.ssri_beta, "gamma": a.ssri_gamma, "epsp": a.ssri_epsp}
    for name, value in chosen.items():
        stage = trials[trials.rlnSsriParameter == name]
        best = stage.rlnResolution.min()
        assert stage[np.isclose(stage.rlnSsriValue, value)].rlnResolution.iloc[0] == pytest.approx(best)
    assert a.ssri and a.ssri_no_search
