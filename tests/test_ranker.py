"""The class ranker: features against hand-computed values, the job reader (ours and EMPIAR-10812's
layout), training targets, the network's RELION-5 layout and safe loading, training, scoring and the
selection outputs, and the shipped model on a held-out simulated job."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ADK_CLOSED, ADK_OPEN, DATA, make_class2d_job, model_map
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import nn

from ranker.cli import main as ranker_main
from ranker.features import (
    FEATURE_MEAN,
    FEATURE_STD,
    ClassMetadata,
    granulometry,
    image_features,
    metadata_features,
    moments,
    normalise_features,
    protein_mask,
)
from ranker.job import read_class_job
from ranker.model_store import load_model, model_card
from ranker.network import ClassRankerNet, load_network, save_checkpoint
from ranker.score import select_classes
from reconstruct.files import InputError, read_star, write_star
from reconstruct.geometry import euler_to_matrix
from training.data import job_samples, load_samples
from training.targets import class_categories, target_score

FIXTURE_JOB = DATA / "ranker_job_tcr"  # a simulated Class2D job of the held-out protein (see tests/data/README.md)


# -- features ---------------------------------------------------------------------------------------
def test_moments_match_population_definitions():
    x = np.random.default_rng(0).gamma(2.0, size=500)
    mean, std, skew, kurt = moments(x)
    assert mean == pytest.approx(x.mean()) and std == pytest.approx(x.std())
    assert skew == pytest.approx(stats.skew(x, bias=True))
    assert kurt == pytest.approx(stats.kurtosis(x, fisher=False, bias=True))
    assert moments(np.array([])) == (0.0, 0.0, 0.0, 0.0)
    assert moments(np.ones(5))[2:] == (0.0, 0.0)


def test_granulometry_of_a_square_by_hand():
    """Opening a 9x9 square with the radius-1 disc (a cross) loses its 4 corners; radius 5 removes it."""
    img = np.zeros((20, 20))
    img[5:14, 5:14] = 1.0
    g = granulometry(img)
    assert g[0] == pytest.approx(77.0)
    assert g[4] == pytest.approx(0.0) and g[5] == pytest.approx(0.0)
    assert np.all(np.diff(g) <= 0)


def test_protein_mask_islands_by_hand():
    """R = 15 px: a 10x10 centre block is protein, a 3x3 island in the central disc is scattered signal,
    an island outside the central disc is ignored."""
    f = np.zeros((40, 40))
    f[15:25, 15:25] = 1.0  # centre (20, 20)
    f[27:30, 20:23] = 1.0  # in the central disc (r <= 9), separate from the block
    f[20:23, 32:35] = 1.0  # r ~ 12-14: inside R, never reaches the central disc
    mask, scattered = protein_mask(f, 15.0)
    assert mask.sum() == 100 and mask[15:25, 15:25].all()
    assert scattered == 9


def test_image_features_on_a_synthetic_class():
    """A bright disc at exactly 4 Å/px (no resampling): solvent is zero, the protein std and the sums are
    those of the disc, and the ring (at the mask edge, where the image is 0.5) has mean 0.5 and std 0."""
    n, px, diameter = 40, 4.0, 120.0  # R = 15 px
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    img = np.where(r <= 6, 2.0, 0.0)
    img[(r >= 0.95 * 15) & (r <= 15)] = 0.5
    v = image_features(img, px, diameter)
    ring_mean, ring_std, protein_std, _, solvent_std = v[:5]
    assert ring_mean == pytest.approx(0.5) and ring_std == pytest.approx(0.0, abs=1e-9)
    disc = r <= 6
    # the low-passed disc spreads a little beyond r = 6: the protein mask holds the disc and some zeros
    protein_sum, solvent_sum, _ = v[17:]
    assert protein_sum == pytest.approx(2.0 * disc.sum())
    assert protein_std > 0 and solvent_std >= 0
    assert solvent_sum == pytest.approx(0.5 * ((r >= 0.95 * 15) & (r <= 15)).sum())
    lowpass_max = v[10]
    assert 0 < lowpass_max < 2.5


def test_metadata_features_and_normalisation():
    m = ClassMetadata(accuracy_rotation=3.0, accuracy_translation=2.0, resolution=10.0, n_particles=np.e ** 2)
    v = metadata_features(m, box=64, pixel_size=2.0)
    np.testing.assert_allclose(v, [3.0, 2.0, 1 / (100 * 2), 10 / 128])
    raw = np.zeros((3, 24))
    raw[:, :21] = FEATURE_MEAN + FEATURE_STD  # every fixed slot normalises to 1
    raw[:, 21] = [1.0, 2.0, 3.0]
    raw[:, 22] = 5.0  # constant within the job -> 0
    out = normalise_features(raw)
    np.testing.assert_allclose(out[:, :21], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[:, 21], (raw[:, 21] - 2) / np.std(raw[:, 21]), rtol=1e-5)
    np.testing.assert_allclose(out[:, 22], 0.0)


# -- targets --------------------------------------------------------------------------------------
def test_target_scores_follow_relions_formula():
    cats = np.array([1, 1, 5, 2, 3, 6, 0])
    res = np.array([8.0, 10.0, 10.0, 16.0, 8.0, 20.0, 30.0])
    n = np.full(7, 100)
    t = target_score(cats, res, n, job_score=0.8)
    w = np.minimum((8.0 / res) ** 2, 1.0)
    np.testing.assert_allclose(t, 0.8 * np.array([0.75 + 0.25 * w[0], 0.75 + 0.25 * w[1], 0.5 + 0.25 * w[2],
                                                   0.25 + 0.25 * w[3], 0.25 * w[4], 0, 0]), rtol=1e-6)


def test_class_categories_from_truth():
    """Categories from the truth make-up, blurred judged against the job's typical pure class."""
    m = 12
    truth = pd.DataFrame({"category": ["good"] * 4 * m + ["ice"] * m + ["neighbour"] * m,
                          "rlnAngleRot": np.r_[np.full(3 * m, 10.0), np.linspace(-180, 180, m), np.zeros(2 * m)],
                          "rlnAngleTilt": np.r_[np.full(3 * m, 90.0), np.linspace(0, 180, m), np.zeros(2 * m)]})
    classes = np.repeat([1, 2, 3, 4, 5, 6], m)
    # blur resolutions (Å): three pure classes near 10 Å, one 2.5 times as coarse, the rest without protein
    blur = np.array([10.0, 11.0, 9.0, 25.0, np.nan, 10.0, np.nan])
    cats = class_categories(classes, truth, 7, blur=blur)
    # pure and sharp x3, good but blurred, junk, neighbours, empty
    assert list(cats.category) == [1, 1, 1, 3, 6, 4, 0]
    assert cats.spread[0] < 1 < 30 < cats.spread[3]  # one view vs many
    assert cats.n.sum() == 6 * m
    assert (class_categories(classes, truth, 7).category != 3).all()  # no blur measured: none blurred


def test_blurred_is_relative_to_the_jobs_pure_classes():
    from training.targets import BLUR_FACTOR, blurred_classes

    good, n = np.array([1.0, 1.0, 0.9, 0.95, 0.5]), np.array([50, 50, 50, 8, 50])
    blur = np.array([10.0, 12.0, 14.0, 100.0, 10.0 * BLUR_FACTOR * 1.1])
    # median of the pure classes with > 10 particles: 12 Å; the small class does not count towards it
    assert list(blurred_classes(blur, good, n)) == [False, False, False, True, False]
    assert list(blurred_classes(blur * 2, good, n)) == [False, False, False, True, False]  # scale-free
    assert not blurred_classes(blur, np.full(5, 0.5), n).any()  # no pure class: nothing to judge against


def _one_view_truth(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Truth of ``n`` protein particles in one view (rot 30, tilt 70) at random in-plane angles and offsets."""
    return pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)], "map_index": 0,
                         "category": "good", "rlnAngleRot": 30.0, "rlnAngleTilt": 70.0,
                         "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.uniform(-6, 6, n),
                         "rlnOriginYAngst": rng.uniform(-6, 6, n), "rlnClassNumber": 1})


def test_ideal_class_averages_bring_particles_into_the_class_frame():
    """The noise-free class average: particles of one view whose in-plane angle and offset the classification
    found exactly average to that view's projection (rotated by what the classification left over); the
    same particles at wrong angles blur, which the view match sees; junk contributes nothing."""
    from reconstruct.projector import Projector
    from training.targets import blur_resolution, ideal_class_averages, view_match

    box, px, n = 32, 4.0, 40
    vol = model_map(ADK_OPEN, box, px)  # elongated: its in-plane average looks like no single view
    rng = np.random.default_rng(5)
    truth = _one_view_truth(3 * n, rng)
    truth.loc[2 * n:, ["map_index", "category"]] = [-1, "ice"]
    data = truth[["rlnImageName", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]].copy()
    data["rlnClassNumber"] = np.repeat([1, 2, 3], n)
    data.loc[:n - 1, "rlnAnglePsi"] -= 30.0  # class 1: aligned, 30 degrees of in-plane rotation left over
    data.loc[n:2 * n - 1, "rlnAnglePsi"] = rng.uniform(-180, 180, n)  # class 2: in-plane angles wrong
    ideal = ideal_class_averages(truth, data, vol, px, 4)
    view = Projector(vol).project_images(euler_to_matrix(np.array([30.0]), np.array([70.0]), np.array([30.0])))[0]
    corr = np.corrcoef(ideal[0].ravel(), view.ravel())[0, 1]
    assert corr > 0.999
    match = view_match(ideal, vol, px, 100.0)
    assert match[0] > 0.99 and match[1] < 0.95
    blur = blur_resolution(ideal, vol, px, 100.0)
    assert blur[0] < 3 * px < 6 * px < blur[1], blur  # one view to near Nyquist; the smeared one is not
    assert np.isnan(blur[2:]).all()  # no protein particles
    assert not ideal[2].any() and not ideal[3].any()  # junk only; empty
    with pytest.raises(ValueError, match="not in the classification"):
        ideal_class_averages(truth, data.iloc[1:], vol, px, 4)


@pytest.mark.slow
def test_ideal_class_averages_agree_with_a_real_classification(tmp_path):
    """On a clean simulated set, our 2D classification's own class averages look like the noise-free
    ones computed from the truth and its alignments (the conventions of angles and offsets agree)."""
    from reconstruct.class2d import Class2DOptions, class2d
    from reconstruct.files import read_map, read_particles
    from reconstruct.fourier import lowpass_filter
    from reconstruct.simulate import ParticleSimulation, simulate_particles
    from training.targets import ideal_class_averages

    box, px = 32, 4.0
    vol = model_map(ADK_CLOSED, box, px)
    truth = simulate_particles([vol], ParticleSimulation(n_particles=300, box=box, pixel_size=px, snr=2.0,
                                                         max_offset=2 * px, seed=4), tmp_path).table
    res = class2d(Class2DOptions(star=tmp_path / "Extract/job001/particles.star", out=tmp_path / "Class2D",
                                 particle_diameter=100, n_classes=3, algorithm="em", n_iter=8, seed=1,
                                 project_dir=tmp_path))
    data = read_particles(res.data_star).data
    ideal = lowpass_filter(ideal_class_averages(truth, data, vol, px, 3), px, 15.0, ndim=2)
    avg = lowpass_filter(read_map(res.classes)[0], px, 15.0, ndim=2)
    used = np.bincount(data.rlnClassNumber, minlength=4)[1:] > 10
    corr = [np.corrcoef(ideal[k].ravel(), avg[k].ravel())[0, 1] for k in np.nonzero(used)[0]]
    assert used.sum() >= 2 and min(corr) > 0.9, corr


@pytest.mark.slow
def test_corpus_job_is_recategorised_from_its_truth_drawn_again(tmp_path, monkeypatch):
    """A corpus job made, then its blur measurements lost (as in a corpus made before them): recategorise
    draws the truth again without images and gets the same measurements and categories; a job whose
    simulation no longer matches what it classified is refused, not relabelled."""
    from training import corpus

    monkeypatch.setattr(corpus, "protein_map", lambda name, box, px: model_map(ADK_CLOSED, box, px))
    job = corpus.CorpusJob(name="adk_closed_0000", protein="adk_closed", n_particles=240, box=32, pixel_size=3.0,
                           diameter=75.0, snr=0.5, junk_fraction=0.2, neighbour_fraction=0.1, defocus_min=8000.0,
                           defocus_max=20000.0, n_classes=4, n_iter=6, seed=3, job_score=0.9)
    job_dir = corpus.make_job(job, tmp_path / "corpus", tmp_path / "work")
    made = pd.read_csv(job_dir / "class_truth.csv")
    assert {"blur_resolution", "view_match", "average_match", "category"} <= set(made.columns)
    assert made.n.sum() == 240 and (made.category > 0).any()
    made.drop(columns=["blur_resolution"]).to_csv(job_dir / "class_truth.csv", index=False)
    again = corpus.recategorise(job_dir)
    np.testing.assert_allclose(again.blur_resolution, made.blur_resolution, rtol=1e-6)
    assert list(again.category) == list(made.category)
    assert list(read_star(job_dir / "backup_selection.star")[""].rlnSelected) == list(made.category)
    made.drop(columns=["blur_resolution"]).to_csv(job_dir / "class_truth.csv", index=False)
    spec = json.loads((job_dir / "job.json").read_text())
    (job_dir / "job.json").write_text(json.dumps(spec | {"seed": 4}))
    with pytest.raises(RuntimeError, match="make the job again"):
        corpus.recategorise(job_dir)


# -- jobs on disk: EMPIAR-10812's layout -----------------------------------------------------------
def test_empiar_10812_layout_is_read_with_relions_targets(tmp_path):
    job_dir = make_class2d_job(tmp_path / "a1b2c3d4e5f6")
    job = read_class_job(job_dir, project_dir=job_dir)
    assert job.n_classes == 4 and job.box == 32 and job.pixel_size == 4.0 and job.diameter == 100.0
    s = job_samples(job_dir)
    assert s.images.shape == (4, 64, 64) and s.features.shape == (4, 24)
    res = 8.0 + 2 * np.arange(4)
    np.testing.assert_allclose(s.targets, target_score(np.array([1, 2, 6, 1]), res, np.full(4, 25), 0.9))
    assert s.targets[0] == pytest.approx(0.9)  # the best class of a job with J = 0.9
    both = load_samples([tmp_path])
    assert len(both) == 4 and set(both.job) == {"a1b2c3d4e5f6"}


def test_validation_split_by_job_or_by_protein():
    """Whole jobs go to validation; with val_by="protein", whole proteins; the held-out protein is the test set."""
    from training.data import Samples
    from training.train import split_by_job

    groups = np.repeat(["a", "b", "c", "d", "e", "held"], 12)
    jobs = np.array([f"{g}_{i // 3}" for i, g in enumerate(groups)], dtype=object)
    n = len(jobs)
    s = Samples(np.zeros((n, 64, 64), np.float32), np.zeros((n, 24), np.float32), np.zeros(n, np.float32),
                np.ones(n), np.ones(n), jobs, groups.astype(object))
    for val_by in ("job", "protein"):
        tr, va, te = split_by_job(s, 0.4, 0, "held", val_by)
        assert set(te.group) == {"held"} and len(tr) + len(va) + len(te) == n
        assert not set(tr.job) & set(va.job)
        assert not (set(tr.group) & set(va.group)) if val_by == "protein" else len(va) > 0
    with pytest.raises(ValueError, match="val_by"):
        split_by_job(s, 0.4, 0, "held", "class")


def test_sample_cache_follows_changed_categories(tmp_path):
    """Cached samples are reused, but not after a job's categories are rewritten (as the corpus does when
    its category rule changes)."""
    job_dir = make_class2d_job(tmp_path / "jobs" / "a1b2c3d4e5f6")
    first = load_samples([tmp_path / "jobs"], cache=tmp_path / "cache")
    cached = tmp_path / "cache" / "a1b2c3d4e5f6.npz"
    assert cached.exists()
    np.testing.assert_array_equal(load_samples([tmp_path / "jobs"], cache=tmp_path / "cache").targets, first.targets)
    sel = job_dir / "backup_selection.star"
    write_star(sel, {"": pd.DataFrame({"rlnSelected": [6, 6, 6, 1]})})
    later = cached.stat().st_mtime + 5
    os.utime(sel, (later, later))
    again = load_samples([tmp_path / "jobs"], cache=tmp_path / "cache")
    assert list(again.categories) == [6, 6, 6, 1] and again.targets[0] == 0 and first.targets[0] > 0


def test_bad_jobs_give_clear_errors(tmp_path):
    job_dir = make_class2d_job(tmp_path / "job")
    (job_dir / "run_class.mrcs").unlink()
    with pytest.raises(InputError, match="class average stack"):
        read_class_job(job_dir, project_dir=job_dir)
    job_dir = make_class2d_job(tmp_path / "job2", categories=(1, 2, 6, 1))
    write_star(job_dir / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": [1, 2]})})
    with pytest.raises(InputError, match="2 rows for 4 classes"):
        job_samples(job_dir)
    # a broken job is skipped with a warning while the others load
    make_class2d_job(tmp_path / "job3")
    assert len(load_samples([tmp_path])) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no job directories"):
        load_samples([tmp_path / "empty"])


# -- the network: RELION-5's layout, safe loading ---------------------------------------------------
class Relion5Model(nn.Module):
    """RELION-5's v1.0 model as its training script defines it (written out independently here)."""

    def __init__(self) -> None:
        super().__init__()
        p = 0.3
        layers: list[nn.Module] = []
        for c_in, c in ((1, 16), (32, 32), (64, 64)):
            layers += [nn.Conv2d(c_in, c, 3, 1, 1), nn.ReLU(), nn.Dropout(p), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
                       nn.Conv2d(c, 2 * c, 3, 2, 1), nn.Dropout(p)]
        self.cnn_layers = nn.Sequential(*layers)
        self.feature_extractor = nn.Sequential(nn.Linear(8192, 48))
        self.classifier_images_and_features = nn.Sequential(nn.Dropout(p), nn.Linear(72, 48), nn.ReLU(),
                                                            nn.Dropout(p), nn.Linear(48, 1))
        self.classifier_images = nn.Sequential(nn.Dropout(p), nn.Linear(48, 1))
        self.classifier_features = nn.Sequential(nn.Linear(24, 12), nn.ReLU(), nn.Dropout(p), nn.Linear(12, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.feature_extractor(self.cnn_layers(x).reshape(x.shape[0], -1))
        return self.classifier_images_and_features(torch.cat([z, y], 1))


def test_network_matches_relion5_layout_and_loads_its_checkpoint(tmp_path):
    net = ClassRankerNet()
    assert sum(p.numel() for p in net.parameters()) == 589_003
    torch.manual_seed(1)
    ref = Relion5Model().eval()
    ckpt = {"model_state_dict": ref.state_dict(), "model_definition": "import os\nos.system('echo pwned')\n",
            "P_DROPOUT": 0.3, "LEARNING_RATE": 5e-5, "BATCH_SIZE": 32, "USE_IMAGES": True, "USE_FEATURES": True,
            "N_EPOCHS": 200, "CNN_W": 16, "FEAT_EXT_W": 48, "FEAT_EXT_W2": 48, "train_losses": [0.1, 0.05],
            "valid_losses": [0.2, 0.1]}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path = tmp_path / "v1.0.ckpt.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    model = load_model(path)
    assert model.version == "relion-v1.0" and not model.zero_granulometry
    x, y = torch.randn(5, 1, 64, 64), torch.randn(5, 24)
    with torch.no_grad():
        np.testing.assert_allclose(model.net(x, y).numpy(), ref(x, y).numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoints_with_code_or_wrong_layout_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": {}, "payload": Evil()}, bad)
    with pytest.raises(InputError, match="weights-only"):
        load_network(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model_state_dict": nn.Linear(3, 1).state_dict()}, wrong)
    with pytest.raises(InputError, match=r"not a class ranker v1\.0 network"):
        load_network(wrong)
    ok = tmp_path / "ok.pt"
    save_checkpoint(ClassRankerNet(), ok, version="x")
    with pytest.raises(InputError, match="checksum"):
        load_model(ok, expected_sha256="0" * 64)


# -- selection ---------------------------------------------------------------------------------------
def test_selection_threshold_and_minimums():
    scores = np.array([0.9, 0.2, 0.6, -999.0, 0.4])
    sizes = np.array([100, 50, 30, 5, 80])
    assert list(select_classes(scores, sizes, 0.5).selected) == [True, False, True, False, False]
    s = select_classes(scores, sizes, 0.5, min_particles=200)
    assert list(s.selected) == [True, False, True, False, True] and s.added_for_minimum == 1
    s = select_classes(scores, sizes, 0.95, min_classes=4)  # the unscored class is never added
    assert list(s.selected) == [True, True, True, False, True]


# -- training ----------------------------------------------------------------------------------------
def test_one_epoch_of_training_lowers_the_loss(tmp_path):
    import lightning as L

    from training.module import RankerData, RankerModule

    for i in range(3):
        make_class2d_job(tmp_path / f"job{i}", categories=(1, 6, 1, 6), seed=i)
    s = load_samples([tmp_path])
    L.seed_everything(0)
    module = RankerModule(lr=1e-4, weight_decay=0.0, dropout=0.0)

    def loss() -> float:
        module.eval()
        with torch.no_grad():
            pred = module(torch.as_tensor(s.images), torch.as_tensor(s.features))
        return float(((pred - torch.as_tensor(s.targets)) ** 2).mean())

    before = loss()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    module.train()
    trainer.fit(module, RankerData(s, s, batch_size=4))
    assert loss() < before


@pytest.mark.slow
def test_train_and_score_from_the_command_line(tmp_path):
    """`ranker train` on a tiny corpus (2 epochs, then resumed to 3), then `ranker score` with its weights:
    RELION's outputs, and the selected particle count equals the selected classes' sizes."""
    for i, cats in enumerate(((1, 2, 6, 1), (1, 6, 6, 5), (2, 1, 1, 6))):
        make_class2d_job(tmp_path / "corpus" / f"job{i}", categories=cats, seed=i)
    out = tmp_path / "train"
    base = ["train", "--data", str(tmp_path / "corpus"), "--o", str(out), "--val_fraction", "0.3", "--lr", "1e-3"]
    assert ranker_main([*base, "--epochs", "2"]) == 0
    assert ranker_main([*base, "--epochs", "3", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] >= 2 and metrics["validation"]["classes"] == 4
    split = metrics["jobs"]  # split by job: each job in exactly one part
    assert sorted(split["train"] + split["validation"] + split["test"]) == ["job0", "job1", "job2"]
    assert len(split["validation"]) == 1 and split["test"] == []
    job = tmp_path / "Class2D" / "job007"
    make_class2d_job(job, categories=(1, 2, 6, 1))
    sel = tmp_path / "Select" / "job008"
    assert ranker_main(["score", str(job), "--o", str(sel), "--model", str(out / "class_ranker.pt"),
                        "--project_dir", str(tmp_path), "--min_score", "-10"]) == 0
    ranked = read_star(sel / "rank_model.star")["model_classes"]
    assert len(ranked) == 4 and "rlnClassScore" in ranked.columns
    backup = next(iter(read_star(sel / "backup_selection.star").values()))
    assert list(backup.rlnSelected) == [1, 1, 1, 1]
    parts = read_star(sel / "particles.star")
    assert len(parts["particles"]) == 100 and "optics" in parts
    assert len(next(iter(read_star(sel / "class_averages.star").values()))) == 4
    assert (sel / "rank_gallery.png").stat().st_size > 1000
    assert np.load(sel / "features.npy").shape == (4, 24)


# -- the shipped model ---------------------------------------------------------------------------------
def test_shipped_model_matches_its_card_and_separates_good_from_junk(tmp_path):
    """On a simulated job of a protein the model never saw, classes of good particles (sharp or blurred)
    outscore junk classes."""
    card = model_card()
    model = load_model()
    assert model.sha256 == card["sha256"] and model.zero_granulometry
    s = job_samples(FIXTURE_JOB)
    from ranker.score import predict, zero_granulometry

    pred = predict(model.net, s.images, zero_granulometry(s.features))
    good, junk = np.isin(s.categories, (1, 5, 3)), s.categories == 6
    assert good.any() and junk.any()
    keep = good | junk
    assert roc_auc_score(good[keep], pred[keep]) > 0.8
    damaged = tmp_path / "damaged.pt"
    shutil.copy(model.path, damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-100] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum"):
        load_model(damaged, expected_sha256=card["sha256"])


def test_chimeras_are_new_reproducible_shapes_of_training_domains() -> None:
    """A chimera is built the same way every time from its number; its pieces come only from training
    models (never the held-out TCR-HLA), are globular domains of 60-250 residues, touch one another and
    do not clash; two numbers give different shapes; the corpus accepts chimera names only as chimera_<N>."""
    from scipy.spatial import cKDTree

    from training.chimeras import SOURCES, chimera_map, chimera_radius, chimera_structure
    from training.corpus import HELD_OUT, PROTEINS, build_corpus, with_chimeras

    assert PROTEINS[HELD_OUT].model not in SOURCES
    small = ("4ake_adk_open.pdb", "1ake_adk_closed.pdb", "1hvr.pdb")  # gzipped in tests/data
    a, b = chimera_structure(3, DATA, small), chimera_structure(3, DATA, small)
    xyz = [np.array([[at.pos.x, at.pos.y, at.pos.z] for res in ch for at in res]) for ch in a[0]]
    assert 2 <= len(xyz) <= 4
    assert all(60 <= len(ch) <= 250 for ch in a[0])
    assert np.allclose(np.vstack(xyz), [[at.pos.x, at.pos.y, at.pos.z] for ch in b[0] for res in ch for at in res])
    for i in range(1, len(xyz)):
        earlier = cKDTree(np.vstack(xyz[:i]))
        d, _ = earlier.query(xyz[i])
        assert d.min() >= 3.0 - 1e-6  # no clash
        assert d.min() < 4.5  # in contact (slid on in 1 Å steps until clear)
    r = chimera_radius(3, DATA, small)
    assert 25 < r < 120
    px = 2.3 * r / 45
    m3, m4 = chimera_map(3, 64, px, DATA, small), chimera_map(4, 64, px, DATA, small)
    assert m3.shape == (64, 64, 64) and m3.max() > 0
    assert np.corrcoef(m3.ravel(), m4.ravel())[0, 1] < 0.9
    assert with_chimeras(["cftr"], 2) == ("cftr", "chimera_0", "chimera_1")
    with pytest.raises(ValueError, match="chimera_<N>"):
        build_corpus(Path("unused"), 1, 0, proteins=("chimera_x",))


def test_model_card_names_chimeras_as_make_corpus_takes_them() -> None:
    """chimera_0 ... chimera_<N-1> become ``--chimeras N`` (and one line in the card), other sets stay listed."""
    from training.chimeras import split_chimeras

    assert split_chimeras(["cftr", "chimera_1", "chimera_0"]) == (["cftr"], 2)
    assert split_chimeras(["cftr", "chimera_2"]) == (["cftr", "chimera_2"], 0)
    assert split_chimeras(["chimera_0"]) == (["chimera_0"], 0)
    assert split_chimeras(["cftr", "adk_open"]) == (["cftr", "adk_open"], 0)


def _failing_job(job, out: Path, work: Path) -> Path:
    """Stand-in for make_job that is interrupted after the first job."""
    if any(out.glob("*/job.json")):
        raise KeyboardInterrupt
    return _fake_job(job, out, work)


def test_interrupted_corpus_has_its_index_and_its_card_says_so(tmp_path, monkeypatch) -> None:
    """corpus.csv/corpus.json describe the whole plan before any job is made, so a corpus stopped part way
    still has them, and the model card counts the jobs the model used (those made, or those its run lists)."""
    import training.corpus as corpus
    from training.card import publish

    monkeypatch.setattr(corpus, "make_job", _failing_job)
    out = tmp_path / "corpus"
    with pytest.raises(KeyboardInterrupt):
        corpus.build_corpus(out, 3, 1, seed=3, proteins=("adk_open",))
    index = pd.read_csv(out / "corpus.csv")
    assert len(index) == 4 and index.held_out.sum() == 1
    assert json.loads((out / "corpus.json").read_text())["n_jobs"] == 3
    assert len(list(out.glob("*/job.json"))) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "class_ranker.pt").write_bytes(b"weights")
    split = {"classes": 10, "jobs": 1, "mse": 0.02, "spearman": 0.8, "auc_good": 0.8, "particle_fpr": 0.2,
             "particle_fnr": 0.2, "threshold": 0.3}
    (run / "metrics.json").write_text(json.dumps({
        "validation": split, "test": split, "default_threshold": 0.3, "epochs": 1, "train_classes": 10,
        "train_seconds": 1.0, "options": {"epochs": 1, "lr": 0.001, "weight_decay": 0.0, "batch_size": 32,
                                          "seed": 1, "held_out": "tcr_hla", "val_fraction": 0.2, "patience": 5,
                                          "data": [str(out)]}}))
    card = publish(run, tmp_path / "models", corpus=[out])
    text = (tmp_path / "models" / "class_ranker_v1.md").read_text()
    assert not index.held_out[index.name == next(out.glob("*/job.json")).parent.name].iloc[0]  # a training job
    assert card["data"]["jobs"] == 1 and card["data"]["jobs_used"] == 1 and card["data"]["jobs_planned"] == 4
    assert "--n_jobs 3 --n_held_out 1 --seed 3 --proteins adk_open   # made so far: 1 of its 4 jobs" in text
    metrics = json.loads((run / "metrics.json").read_text())
    made_name = next(out.glob("*/job.json")).parent.name
    for used, expected in (([], None), ([made_name], 1)):  # the jobs the run says it trained on, made or not
        metrics["jobs"] = {"train": used + ["never_made"], "validation": [], "test": []}
        (run / "metrics.json").write_text(json.dumps(metrics))
        assert publish(run, tmp_path / "models", corpus=[out]).get("data", {}).get("jobs") == expected
        card_text = (tmp_path / "models" / "class_ranker_v1.md").read_text()
        assert f"# this model used {expected or 0} of its 4 jobs" in card_text


def _fake_job(job, out: Path, work: Path) -> Path:
    """Stand-in for make_job (seconds instead of minutes): records the job and the work folder it got."""
    from dataclasses import asdict

    work.mkdir(parents=True, exist_ok=True)
    dest = out / job.name
    dest.mkdir()
    (dest / "job.json").write_text(json.dumps({**asdict(job), "pid": os.getpid(), "work": str(work)}))
    return dest


def _fake_recategorise(job_dir: Path) -> None:
    """Stand-in for recategorise: records the process it ran in."""
    (job_dir / "recategorised").write_text(str(os.getpid()))


def test_corpus_workers_make_the_same_jobs_in_parallel(tmp_path, monkeypatch) -> None:
    """``--workers 2`` makes exactly the jobs one worker makes (parameters drawn up front), in two processes,
    each job in its own work folder, which is cleaned up afterwards; jobs already made are not made again."""
    import training.corpus as corpus

    monkeypatch.setattr(corpus, "make_job", _fake_job)
    monkeypatch.setattr(corpus, "recategorise", _fake_recategorise)
    one = corpus.build_corpus(tmp_path / "one", 5, 1, seed=3, proteins=("adk_open", "hiv_protease"))
    two = corpus.build_corpus(tmp_path / "two", 5, 1, seed=3, proteins=("adk_open", "hiv_protease"), workers=2)
    pd.testing.assert_frame_equal(one, two)
    made = [json.loads((tmp_path / "two" / n / "job.json").read_text()) for n in two.name]
    alone = [json.loads((tmp_path / "one" / n / "job.json").read_text()) for n in one.name]
    assert [{k: v for k, v in m.items() if k not in ("pid", "work")} for m in made] == \
        [{k: v for k, v in m.items() if k not in ("pid", "work")} for m in alone]
    assert len({m["work"] for m in made}) == 6
    assert all(Path(m["work"]).name == m["name"] for m in made)
    assert all(m["pid"] != os.getpid() for m in made)
    assert not (tmp_path / "two" / ".work").exists()
    corpus.build_corpus(tmp_path / "two", 5, 1, seed=3, proteins=("adk_open", "hiv_protease"), workers=2)
    assert [json.loads((tmp_path / "two" / n / "job.json").read_text())["pid"] for n in two.name] == \
        [m["pid"] for m in made]
    assert all(int((tmp_path / "two" / n / "recategorised").read_text()) != os.getpid() for n in two.name)
    with pytest.raises(ValueError, match="workers"):
        corpus.build_corpus(tmp_path / "three", 1, 0, workers=0)


# -- what the labels allow ------------------------------------------------------------------------------
def test_limits_of_the_labels() -> None:
    """Within-job AUC counts only pairs inside a job; the merged floor keeps other classes' own targets; the
    targets-as-scores ceiling is zero when one threshold can separate them and not when J scales jobs apart."""
    from training.limits import merged_floor, target_ceiling, within_job_auc

    # Two jobs far apart, each perfectly ordered: 1.0 (pooled percentile ranks would give less).
    values = np.array([1.0, 2.0, 3.0, 10.0, 11.0])
    cats = np.array([5, 1, 1, 5, 1])
    jobs = np.array(["a", "a", "a", "b", "b"])
    assert within_job_auc(values, cats, jobs, (1,), (5,)) == 1.0
    assert within_job_auc(-values, cats, jobs, (1,), (5,)) == 0.0
    assert within_job_auc(np.ones(5), cats, jobs, (1,), (5,)) == 0.5
    assert np.isnan(within_job_auc(values, np.array([1, 1, 1, 5, 6]), np.array(list("aaabc")), (1,), (5,)))

    targets = np.array([0.9, 0.7, 0.4, 0.2, 0.0], np.float32)
    mse, rho = merged_floor(targets, np.array([1, 5, 2, 2, 6]), np.array(["a"] * 5), (1, 5))
    assert mse == pytest.approx((0.1**2 + 0.1**2) / 5, rel=1e-4) and rho > 0.9
    assert merged_floor(targets, np.array([1, 1, 2, 2, 6]), np.array(["a"] * 5), (5,))[0] == 0.0

    sizes = np.full(4, 100)
    good = np.array([True, True, False, False])
    assert target_ceiling(np.array([0.8, 0.6, 0.3, 0.0]), good, sizes)["particle_fpr"] == 0.0
    # A good class of a poor job (J 0.3) below a mixed class of a good one (J 0.9): no threshold separates them.
    scaled = target_ceiling(np.array([0.9 * 0.8, 0.3 * 0.6, 0.9 * 0.4, 0.3 * 0.0]), good, sizes)
    assert max(scaled["particle_fpr"], scaled["particle_fnr"]) == 0.5
