"""3D initial model (VDAM from blobs) and 3D classification: measured against simulated truth."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ADK_CLOSED, HIV_PROTEASE
from scipy.spatial.transform import Rotation

from autoproc.demo import demo_model_path
from reconstruct.align_maps import align_maps
from reconstruct.class3d import child_rotations
from reconstruct.class_grids import ClassGrids
from reconstruct.cli import main as reconstruct_main
from reconstruct.files import read_particles, read_star
from reconstruct.files.mrc import read_map, write_map
from reconstruct.fourier import lowpass_filter
from reconstruct.fsc import resolution_at
from reconstruct.geometry import angle_between
from reconstruct.likelihood import fourier_mask, score_poses
from reconstruct.oversampling import FineSamples
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles
from reconstruct.simulate.scoring import classification_quality, truth_labels
from reconstruct.vdam import NOISE_PER_INVERSE_WEIGHT, shell_means, wiener_weights

BOX, PX = 32, 6.0


def test_child_rotations_split_the_cell_evenly():
    kids = child_rotations(30.0)
    assert kids.shape == (8, 3, 3)
    ang = angle_between(np.eye(3)[None], kids)
    # centres of the 2x2x2 sub-cells of a 30-degree cell: 30 * sqrt(3) / 4 from the centre
    assert np.allclose(ang, 30 * np.sqrt(3) / 4, atol=1e-6)
    assert np.allclose(kids @ np.swapaxes(kids, 1, 2), np.eye(3), atol=1e-6)


def test_em_regularisation_measures_back_projected_noise_as_noise():
    """Class3D's EM Wiener filter needs the noise of a back-projected average D / W per cell: pure
    noise inserted at random orientations has |D / W|^2 W = the noise constant (trilinear insertion),
    so a prior of that power gives an SSNR of T per cell, and the shell's FSC-equivalent follows."""
    n, rng = 32, np.random.default_rng(3)
    g = ClassGrids(n, 1, 3, 2.0, np)
    d, w = g.zeros(), g.zeros(np.float32)
    rots = Rotation.random(1500, random_state=4).as_matrix()
    for s in range(0, 1500, 300):
        x = np.fft.fftshift(np.fft.rfft2(np.fft.ifftshift(rng.normal(size=(300, n, n)), axes=(1, 2))), axes=1)
        g.insert(d, w, np.zeros(300, int), rots[s:s + 300], x / n**2, np.full(x.shape, 1.0 / n**2, np.float32))
    d, w = g.friedel(d), g.friedel(w, conjugate=False)
    shells = g.shell_index()
    seen = w > 1e-3 * w.max()
    a = np.where(seen, d / np.maximum(w, 1e-30), 0)
    power_w = shell_means(np.abs(a) ** 2 * w, shells, n // 2 + 2, shells <= n // 2)[0]
    coverage = shell_means(seen.astype(float), shells, n // 2 + 2, shells <= n // 2)[0]
    measured = (power_w / np.maximum(coverage, 1e-9))[5:n // 2]  # the lowest shells: too few cells, samples overlap
    assert np.allclose(measured, NOISE_PER_INVERSE_WEIGHT, rtol=0.15), measured
    # a prior of T x the noise per cell (T = 2), data of the same weight F everywhere: SSNR 2 per cell
    f0 = float(w[seen].mean())
    tau2 = np.full((1, n // 2 + 2), 2.0 * NOISE_PER_INVERSE_WEIGHT / f0)
    weight, fsc = wiener_weights(g, tau2, np.full(w.shape, f0, np.float32), radius=10)
    assert np.allclose(weight[(shells <= 10)[None]], 2 / 3, atol=1e-5) and np.all(weight[(shells > 10)[None]] == 0)
    assert np.allclose(fsc[0, 1:11], 2 / 3, atol=1e-5) and np.all(fsc[0, 11:] == 0)


def test_strict_highres_exp_scores_ignore_the_frequencies_beyond_it():
    """RELION's --strict_highres_exp: poses are scored on the low frequencies only, so references that
    differ only beyond the limit score the same; the M-step still gets every frequency."""
    rng = np.random.default_rng(3)
    box = size = 16
    mask = fourier_mask(size, size / 2 - 1, np)
    shape = (size, size // 2 + 1)

    def cplx(*lead):
        return (rng.normal(size=(*lead, *shape)) + 1j * rng.normal(size=(*lead, *shape))).astype(np.complex64)

    x, c = cplx(3), rng.uniform(0.2, 1.0, size=(3, *shape)).astype(np.float32)
    inv = mask.astype(np.float32)
    low = inv * fourier_mask(size, 4.0, np)
    p1 = cplx(2)
    p2 = p1.copy()
    p2[:, ~fourier_mask(size, 4.0, np)] += cplx(2)[:, ~fourier_mask(size, 4.0, np)]
    shifts = np.array([[0.0, 0.0], [1.0, -1.0]])
    assert np.allclose(score_poses(x, c, p1, shifts, low, box, mask), score_poses(x, c, p2, shifts, low, box, mask),
                       rtol=1e-4, atol=1e-3)
    assert not np.allclose(score_poses(x, c, p1, shifts, inv, box, mask),
                           score_poses(x, c, p2, shifts, inv, box, mask), rtol=1e-4, atol=1e-3)
    img, sh, idx = np.arange(3), np.zeros(3, int), np.tile(np.arange(2), (3, 1))
    children = np.zeros((4, 2))

    def fine(p, score_w):
        return FineSamples(box, size, mask, x, c, inv, p, shifts, children, np, score_inv_s2=score_w)

    assert np.allclose(fine(p1, low).scores(img, sh, idx), fine(p2, low).scores(img, sh, idx), rtol=1e-4, atol=1e-3)
    assert not np.allclose(fine(p1, None).scores(img, sh, idx), fine(p2, None).scores(img, sh, idx),
                           rtol=1e-4, atol=1e-3)
    # The M-step sums use all frequencies whatever the scoring limit.
    groups = np.zeros((3, 2), int)
    w = np.full((3, 2, 4), 0.125, np.float32)
    data, weight = np.zeros((1, int(mask.sum())), np.complex64), np.zeros((1, int(mask.sum())), np.float32)
    fine(p1, low).accumulate(img, sh, groups, w, data, weight)
    assert (weight[0][~fourier_mask(size, 4.0, np)[mask]] > 0).all()


@pytest.fixture(scope="module")
def cftr_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("inimodel")
    vol = atomic_model_map(demo_model_path(), BOX, PX)
    simulate_particles([vol], ParticleSimulation(n_particles=600, box=BOX, pixel_size=PX, snr=0.3, max_offset=6,
                                                 seed=4), root)
    return root, vol


@pytest.mark.slow
def test_initial_model_from_blobs_finds_the_shape_and_resumes(cftr_small, monkeypatch, capsys):
    root, truth = cftr_small
    monkeypatch.chdir(root)
    args = ["initialmodel", "--i", "Extract/job001/particles.star", "--o", "InitialModel/job002",
            "--particle_diameter", "170", "--iter", "40", "--grad_ini_subset", "200", "--grad_fin_subset", "600",
            "--random_seed", "1", "--max_healpix_order", "1"]
    assert reconstruct_main(args) == 0
    out = root / "InitialModel/job002"
    model, px = read_map(out / "initial_model.mrc")
    assert px == pytest.approx(PX)
    al = align_maps(model, truth, PX)
    res = resolution_at(al.fsc, BOX, PX, 0.5).angstrom
    print(f"initial model vs truth after alignment: FSC 0.5 at {res:.1f} Å, CC {al.correlation:.3f}")
    assert res < 30.0  # a blob would stay near the 64 Å of shell 3
    assert al.correlation > 0.8
    # RELION's outputs, and poses that agree with the truth up to the map's frame
    for name in ("run_it040_class001.mrc", "run_it040_model.star", "run_it040_data.star", "run_it040_sampling.star",
                 "run_it040_1moment006.mrc", "run_it040_2moment003.mrc", "run_it040_slices.png"):
        assert (out / name).is_file(), name
    data = read_particles(out / "run_it040_data.star").data
    assert len(data) == 600 and set(data["rlnClassNumber"]) <= {1, 2, 3}
    # --continue after losing the last iteration reproduces it
    for f in out.glob("run_it040_*"):
        f.unlink()
    assert reconstruct_main(args + ["--continue"]) == 0
    again, _ = read_map(out / "initial_model.mrc")
    assert float(np.corrcoef(again.ravel(), model.ravel())[0, 1]) > 0.95


@pytest.mark.slow
def test_class3d_separates_two_different_particles(tmp_path, monkeypatch):
    box, px = 32, 3.0
    maps = [atomic_model_map(ADK_CLOSED, box, px), atomic_model_map(HIV_PROTEASE, box, px)]
    simulate_particles(maps, ParticleSimulation(n_particles=400, box=box, pixel_size=px, snr=0.5, max_offset=3,
                                                seed=5), tmp_path)
    write_map(tmp_path / "ref.mrc", lowpass_filter((maps[0] + maps[1]) / 2, px, 30.0, ndim=3), px)
    monkeypatch.chdir(tmp_path)
    assert reconstruct_main(["class3d", "--i", "Extract/job001/particles.star", "--ref", "ref.mrc", "--o",
                             "Class3D/job003", "--K", "2", "--particle_diameter", "80", "--iter", "10",
                             "--strict_highres_exp", "10"]) == 0
    data = read_particles(tmp_path / "Class3D/job003/run_it010_data.star").data
    general = read_star(tmp_path / "Class3D/job003/run_it010_optimiser.star")["optimiser_general"].iloc[0]
    assert float(general["rlnHighresLimitExpectation"]) == 10.0
    q = classification_quality(data["rlnClassNumber"].to_numpy(), truth_labels(tmp_path))
    print("class3d purity", q)
    assert q["purity"] >= 0.9 and q["non_empty"] == 2
    # each class looks more like the particle most of its members came from than like the other
    labels = truth_labels(tmp_path)
    for k in (1, 2):
        vol, _ = read_map(tmp_path / f"Class3D/job003/run_it010_class{k:03d}.mrc")
        members = labels[data["rlnClassNumber"].to_numpy() == k]
        src = int(np.bincount(members.astype(int)).argmax())
        # a class of a particle unlike the reference may settle in another frame: compare after alignment
        own, cross = (align_maps(vol, maps[j], px).correlation for j in (src, 1 - src))
        print(f"class {k}: CC with its particle {own:.3f}, with the other {cross:.3f}")
        assert own > cross
