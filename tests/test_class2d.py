"""2D classification: the VDAM engine's rules, the class grids, and classification of a simulated mixture
(CFTR, adenylate kinase and junk) measured against the truth; RELION interop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from autoproc.demo import demo_model_path
from reconstruct.class2d import Class2DOptions, class2d, read_class_averages
from reconstruct.class_grids import ClassGrids
from reconstruct.cli import main as reconstruct_main
from reconstruct.files import read_map, read_particles, read_star
from reconstruct.geometry import rotation_2d
from reconstruct.projector import BackProjector, Projector
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles
from reconstruct.simulate.scoring import classification_quality, truth_labels
from reconstruct.vdam import Moments, VdamSchedule, apply_step, auto_subsets, fsc_weights, update_moments
from tests.helpers import ADK_CLOSED

BOX, PX = 40, 4.0


# -- the engine ------------------------------------------------------------------------------------
def test_schedule_is_relions():
    sch = VdamSchedule(n_iter=200, n_particles=10_000)
    assert sch.phases == (60, 100, 40)
    assert (sch.ini_subset, sch.fin_subset) == (200, 1000)
    assert auto_subsets(100_000) == (500, 5000) and auto_subsets(10_000, "initial_model") == (200, 1000)
    assert sch.subset_size(1, 50) == 200 and sch.subset_size(110, 50) == 600 and sch.subset_size(180, 50) == 1000
    assert sch.subset_size(200, 50) == 10_000  # the last mini-batch is a full pass when K > 1
    assert sch.step(1) == pytest.approx(0.9, abs=1e-3) and sch.step(200) == pytest.approx(0.3, abs=1e-3)
    assert np.all(np.diff([sch.step(i) for i in range(1, 201)]) <= 1e-12)
    assert sch.tau2_fudge_at(1) == pytest.approx(1.0, abs=1e-3) and sch.tau2_fudge_at(200) == pytest.approx(2.0)
    assert not sch.replacing(60) and sch.replacing(61) and sch.replacing(159) and not sch.replacing(160)


def test_class_grids_agree_with_the_projectors():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(3, 32, 32)).astype(np.float32)
    grids = ClassGrids(32, 3)
    rots = rotation_2d(np.array([0.0, 17.0, 200.0]))
    cls = np.array([0, 2, 1])
    ours = grids.project(grids.transform(refs, True), cls, rots, 24)
    theirs = np.stack([Projector(refs[k]).project(rots[i:i + 1], size=24)[0] for i, k in enumerate(cls)])
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    np.testing.assert_allclose(grids.images(grids.transform(refs, False)), refs, atol=1e-5)
    vals = (rng.normal(size=(3, 24, 13)) + 1j * rng.normal(size=(3, 24, 13))).astype(np.complex64)
    w = rng.random((3, 24, 13)).astype(np.float32)
    d, wt = grids.zeros(), grids.zeros(np.float32)
    grids.insert(d, wt, cls, rots, vals, w)
    d, wt = grids.friedel(d), grids.friedel(wt, conjugate=False)
    for i, k in enumerate(cls):
        bp = BackProjector(32, ndim=2)
        bp.insert(vals[i:i + 1], rots[i:i + 1], ctf=np.sqrt(w[i:i + 1]), ctf_premultiplied=True)
        dd, ww = bp.grids()
        np.testing.assert_allclose(d[k], dd, atol=1e-5)
        np.testing.assert_allclose(wt[k], ww, atol=1e-5)


def test_em_step_is_the_data_average_shrunk_by_its_snr():
    """With m = G/F, u = 1 and step 1: V <- FSC (D1/F1 + D2/F2) / 2, as the module says."""
    rng = np.random.default_rng(1)
    grids = ClassGrids(16, 2)
    shape = (2, 2, *grids.shape)
    v = (rng.normal(size=shape[1:]) + 1j * rng.normal(size=shape[1:])).astype(np.complex64)
    f = rng.uniform(2, 5, size=shape).astype(np.float32)
    data = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64) * f
    g = data - f * v[None]  # back-projected residuals X - cA
    mom = Moments.empty(grids)
    direction = update_moments(grids, g, f, mom, floor=1e-8, em=True)
    fsc = fsc_weights(grids, v, mom, 1.0, 8)
    new = apply_step(grids, v, direction, fsc, np.ones(2), 8)
    shells = grids.shell_index()
    expect = fsc[:, np.minimum(shells, fsc.shape[1] - 1)] * 0.5 * (data[0] / f[0] + data[1] / f[1])
    inside = shells <= 8
    np.testing.assert_allclose(new[:, inside], expect[:, inside], rtol=1e-4, atol=1e-4)
    assert np.all(new[:, ~inside] == 0)


def test_vdam_moments_start_from_the_gradient_then_average():
    rng = np.random.default_rng(2)
    grids = ClassGrids(16, 1)
    shape = (2, 1, *grids.shape)
    f = np.full(shape, 2.0, np.float32)
    g1 = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    g2 = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    mom = Moments.empty(grids)
    update_moments(grids, g1, f, mom, floor=1.0)
    np.testing.assert_allclose(mom.m, g1 / 2, rtol=1e-6)  # a fresh moment is the rescaled gradient
    u1 = mom.u.copy()
    update_moments(grids, g2, f, mom, floor=1.0)
    np.testing.assert_allclose(mom.m, 0.9 * g1 / 2 + 0.1 * g2 / 2, rtol=1e-5, atol=1e-6)
    rel = np.abs(g2[0] / 2 - g2[1] / 2) ** 2 / (np.abs((g2[0] + g2[1]) / 4) ** 2 + 1e-12)
    np.testing.assert_allclose(mom.u, 0.999 * u1 + 0.001 * rel, rtol=1e-4)


# -- classification of a simulated mixture --------------------------------------------------------
@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """400 particles: CFTR and adenylate kinase in all views (40% each) and 20% junk, box 40 at 4 Å."""
    root = tmp_path_factory.mktemp("class2d")
    maps = [atomic_model_map(demo_model_path(), BOX, PX), atomic_model_map(ADK_CLOSED, BOX, PX)]
    simulate_particles(maps, ParticleSimulation(n_particles=400, box=BOX, pixel_size=PX, snr=0.1, junk_fraction=0.2,
                                                max_offset=2 * PX, seed=3), root)
    return root


def _quality(data_star: Path, labels: np.ndarray) -> tuple[float, float]:
    q = classification_quality(read_particles(data_star).data.rlnClassNumber.to_numpy(), labels)
    return q["purity"], q["junk_separation"]


def _run(root: Path, out: str, **kw) -> object:
    opt = Class2DOptions(star=root / "Extract/job001/particles.star", out=root / out, particle_diameter=150,
                         project_dir=root, **kw)
    return class2d(opt)


@pytest.mark.slow
def test_vdam_separates_particles_and_junk_and_replaces_empty_classes(mixture):
    """VDAM with 16 classes for 3 kinds of particle: pure classes, junk in junk classes, and class
    replacement leaves fewer inactive classes than the same run without it."""
    labels = truth_labels(mixture)
    k = 16
    kw = {"n_classes": k, "algorithm": "vdam", "n_iter": 60, "ini_subset": 100, "fin_subset": 200}
    res = _run(mixture, "VDAM", **kw)
    purity, junk = _quality(res.data_star, labels)
    # chance purity is ~0.4 (the largest kind), a single kind per class is 1
    assert purity > 0.8 and junk > 0.45, (purity, junk)
    no_repl = _run(mixture, "VDAM_norepl", class_inactivity_threshold=0.0, **kw)
    inactive = int((res.class_distribution < 0.1 / k).sum())  # RELION's replacement criterion
    inactive_without = int((no_repl.class_distribution < 0.1 / k).sum())
    assert inactive < inactive_without, (res.class_distribution, no_repl.class_distribution)
    # RELION's outputs are there, and the gallery
    out = mixture / "VDAM"
    for name in ("run_it060_classes.mrcs", "run_it060_model.star", "run_it060_data.star", "run_it060_optimiser.star",
                 "run_it060_1moment.mrcs", "run_it060_2moment.mrcs", "run_it050_model.star", "run_classes.png"):
        assert (out / name).exists(), name
    avg = read_class_averages(out / "run_it060_model.star", project_dir=mixture)
    assert avg.images.shape == (k, BOX, BOX) and avg.pixel_size == pytest.approx(PX)
    assert avg.classes.rlnClassDistribution.sum() == pytest.approx(1.0, abs=1e-3)
    data = read_particles(out / "run_it060_data.star").data
    for label in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnMaxValueProbDistribution",
                  "rlnNrOfSignificantSamples", "rlnLogLikeliContribution"):
        assert label in data.columns
    assert len(data) == 400 and data.rlnClassNumber.between(1, k).all()


@pytest.mark.slow
def test_em_mode_and_continue_from_the_command_line(mixture):
    """EM through the CLI, stopped after 4 iterations and continued to 8: classes as pure as VDAM's."""
    args = ["class2d", "--i", str(mixture / "Extract/job001/particles.star"), "--o", str(mixture / "EM"), "--K", "5",
            "--particle_diameter", "150", "--algorithm", "em", "--project_dir", str(mixture)]
    assert reconstruct_main([*args, "--iter", "4"]) == 0
    assert not (mixture / "EM/run_it005_optimiser.star").exists()
    assert reconstruct_main([*args, "--iter", "8", "--continue"]) == 0
    general = read_star(mixture / "EM/run_it008_optimiser.star")["optimiser_general"].iloc[0]
    assert int(general.rlnCurrentIteration) == 8 and int(general.rlnDoGradientRefine) == 0
    purity, _ = _quality(mixture / "EM/run_it008_data.star", truth_labels(mixture))
    assert purity > 0.75, purity
    # A different algorithm cannot continue this run.
    assert reconstruct_main([*args[:-2], "--algorithm", "vdam", "--project_dir", str(mixture), "--continue"]) == 2


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_refine") is None,
                    reason="RELION 3.1 is not installed (apt-get install relion); interop tests need it")
def test_relion_interop(mixture, tmp_path):
    """relion_star_handler reads our data.star; we read relion_refine's Class2D outputs."""
    _run(mixture, "Small", n_classes=3, algorithm="em", n_iter=1)
    ours = mixture / "Small/run_it001_data.star"
    res = subprocess.run(["relion_star_handler", "--i", str(ours), "--o", str(tmp_path / "sel.star"), "--select",
                          "rlnClassNumber", "--minval", "1", "--maxval", "1"], capture_output=True, text=True,
                         cwd=mixture, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    expect = int((read_particles(ours).data.rlnClassNumber == 1).sum())
    assert len(read_particles(tmp_path / "sel.star").data) == expect
    res = subprocess.run(["relion_refine", "--i", "Extract/job001/particles.star", "--o", str(tmp_path / "run"),
                          "--K", "3", "--iter", "1", "--ctf", "--tau2_fudge", "2", "--particle_diameter", "150",
                          "--zero_mask", "--flatten_solvent", "--psi_step", "12", "--offset_range", "5",
                          "--offset_step", "2", "--j", "1", "--dont_combine_weights_via_disc", "--pool", "10"],
                         capture_output=True, text=True, cwd=mixture, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:]
    theirs = read_class_averages(tmp_path / "run_it001_model.star", project_dir=mixture)
    assert theirs.images.shape == (3, BOX, BOX) and theirs.classes.rlnClassDistribution.sum() == pytest.approx(1, 1e-3)
    labels = set(read_star(tmp_path / "run_it001_model.star")["model_classes"].columns)
    ours_labels = set(read_star(mixture / "Small/run_it001_model.star")["model_classes"].columns)
    assert labels <= ours_labels, labels - ours_labels
    assert read_particles(tmp_path / "run_it001_data.star").data.rlnClassNumber.between(1, 3).all()
    assert read_map(tmp_path / "run_it001_classes.mrcs")[0].shape == (3, BOX, BOX)
    # the class ranker scores RELION's job and selects from it
    from ranker.cli import main as ranker_main

    sel = tmp_path / "Select"
    assert ranker_main(["score", str(tmp_path / "run_it001_optimiser.star"), "--o", str(sel), "--project_dir",
                        str(mixture), "--min_score", "-100"]) == 0
    ranked = read_star(sel / "rank_model.star")["model_classes"]
    assert len(ranked) == 3 and np.isfinite(ranked.rlnClassScore).all()
    # every scored class is selected; a class is scored when N = rlnClassDistribution x particles > 10 (RELION's
    # real-valued N, which after one soft EM iteration can differ from the class's hard-assigned count)
    n_sel = len(read_particles(sel / "particles.star").data)
    data = read_particles(tmp_path / "run_it001_data.star").data
    model = read_star(tmp_path / "run_it001_model.star")["model_classes"]
    soft_n = model.rlnClassDistribution.to_numpy(float) * len(data)
    scored = {k + 1 for k in range(3) if soft_n[k] > 10}
    assert {k + 1 for k in range(3) if ranked.rlnClassScore.iloc[k] > -999} == scored
    assert n_sel == int(data.rlnClassNumber.isin(scored).sum())


@pytest.mark.parametrize("diameter", [0.0, -150.0])
def test_a_particle_diameter_that_is_not_positive_is_refused(tmp_path, diameter):
    with pytest.raises(ValueError, match="--particle_diameter must be positive"):
        class2d(Class2DOptions(star=tmp_path / "particles.star", out=tmp_path / "Class2D", particle_diameter=diameter))
