"""Interop with RELION 3.1 (Debian's ``relion``): it reads what we write, we read what it writes,
and our maths agrees with its own (symmetry, projection, reconstruction)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from reconstruct.files import ImageSource, read_map, read_particles, read_star
from reconstruct.fsc import fsc
from reconstruct.project_job import ProjectOptions, project_particles
from reconstruct.reconstruct_job import ReconstructOptions, reconstruct_particles
from reconstruct.simulate import ParticleSimulation, simulate_particles
from reconstruct.symmetry import symmetry_operators
from tests.helpers import ADK_CLOSED, model_map

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(shutil.which("relion_project") is None,
                       reason="RELION 3.1 is not installed (apt-get install relion); interop tests need it"),
]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """1200 high-SNR particles of adenylate kinase with offsets and astigmatism, box 40 at 2 Å."""
    root = tmp_path_factory.mktemp("relion_interop")
    vol = model_map(ADK_CLOSED, 40, 2.0)
    simulate_particles([vol], ParticleSimulation(n_particles=1200, box=40, pixel_size=2.0, snr=20.0,
                                                 max_astigmatism=3000, max_offset=8.0, seed=11), root)
    return root


@pytest.mark.parametrize("group", ["C1", "C7", "D3", "T", "O", "I", "I1", "I3", "I4", "D2h", "Th", "Oh"])
def test_symmetry_operators_match_relion(group, tmp_path):
    out = run(["relion_refine", "--sym", group, "--print_symmetry_ops", "--o", str(tmp_path / "s")], tmp_path).stdout
    lines = out.splitlines()
    theirs = np.array([[list(map(float, lines[i + k].split())) for k in (1, 2, 3)]
                       for i, line in enumerate(lines) if line.strip().startswith("R(")])
    ours = symmetry_operators(group)
    assert len(theirs) == len(ours)
    for m in theirs:
        assert np.abs(ours - m).max(axis=(1, 2)).min() < 2e-3


def test_relion_reconstructs_our_particles(project):
    """relion_reconstruct reads our files and conventions: FSC >= 0.9 to the truth to 2/3 Nyquist."""
    run(["relion_reconstruct", "--i", "truth/particles_true.star", "--o", "relion_rec.mrc", "--ctf"], project)
    rec, px = read_map(project / "relion_rec.mrc")
    truth, _ = read_map(project / "truth/map_00.mrc")
    assert px == pytest.approx(2.0)
    curve = fsc(rec, truth)
    assert curve[1: int(2 / 3 * 20) + 1].min() >= 0.9, np.round(curve, 3)


def test_our_projection_matches_relion_project(project, monkeypatch):
    monkeypatch.chdir(project)
    run(["relion_project", "--i", "truth/map_00.mrc", "--o", "relion_proj", "--ang", "truth/particles_true.star",
         "--ctf"], project)
    project_particles(ProjectOptions(Path("truth/map_00.mrc"), Path("truth/particles_true.star"),
                                     Path("our_proj"), ctf=True))
    # our reader reads what relion_project wrote (STAR + stack)
    theirs_table = read_particles("relion_proj.star")
    with ImageSource(theirs_table) as src:
        theirs = src.read(np.arange(200))
    ours, _ = read_map("our_proj.mrcs")
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours[:200], theirs)]
    assert min(cc) >= 0.99, min(cc)
    assert np.std(ours[:200]) == pytest.approx(np.std(theirs), rel=0.02)


def test_our_reconstruction_matches_relion(project):
    """Both programs reconstruct the same particles to maps that agree (FSC >= 0.9 to 2/3 Nyquist)."""
    run(["relion_reconstruct", "--i", "truth/particles_true.star", "--o", "relion_rec2.mrc", "--ctf"], project)
    ours = reconstruct_particles(ReconstructOptions(project / "truth/particles_true.star", project / "ours.mrc",
                                                    project_dir=project))
    theirs, _ = read_map(project / "relion_rec2.mrc")
    truth, _ = read_map(project / "truth/map_00.mrc")
    assert fsc(ours, theirs)[1:14].min() >= 0.9
    assert fsc(ours, truth)[1:14].min() >= 0.9


def test_we_read_relion_refine_outputs(project):
    """A one-iteration RELION 2D classification of our particles: we read its data/model/classes."""
    (project / "Class2D").mkdir(exist_ok=True)
    run(["relion_refine", "--i", "Extract/job001/particles.star", "--o", "Class2D/run", "--K", "2", "--iter", "1",
         "--tau2_fudge", "2", "--particle_diameter", "60", "--ctf", "--psi_step", "30", "--offset_range", "2",
         "--offset_step", "2", "--j", "2", "--pool", "10", "--flatten_solvent", "--zero_mask"], project)
    data = read_particles(project / "Class2D/run_it001_data.star",
                          required=("rlnClassNumber", "rlnAnglePsi", "rlnMaxValueProbDistribution"))
    assert len(data) == 1200 and set(data.data.rlnClassNumber) <= {1, 2}
    model = read_star(project / "Class2D/run_it001_model.star")
    assert {"model_general", "model_classes", "model_class_1"} <= set(model)
    assert len(model["model_classes"]) == 2
    classes, px = read_map(project / "Class2D/run_it001_classes.mrcs")
    assert classes.shape == (2, 40, 40) and px == pytest.approx(2.0)
    opt = read_star(project / "Class2D/run_it001_optimiser.star")
    assert "optimiser_general" in opt
