"""The ranker's job-context stage: trees stored as arrays predict as scikit-learn's do, load safely, learn
a job's make-up that one class does not show, and are used (or not) by scoring, the model store and the card."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from helpers import DATA
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.metrics import roc_auc_score

from ranker.context import JobContext, context_path, context_table
from ranker.model_store import load_model, model_card
from ranker.network import ClassRankerNet, save_checkpoint
from reconstruct.files import InputError
from training.context import TooFewJobs, export, fit_context, rescore_samples
from training.data import job_samples

FIXTURE_JOB = DATA / "ranker_job_tcr"


def _jobs(n_jobs: int, seed: int) -> dict[str, np.ndarray]:
    """Synthetic jobs whose targets are J x (class base): the 'network' sees the base (with noise) but not J,
    which only the job as a whole shows (its mean rotational accuracy feature follows J)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("p", "n", "f", "job", "y")}
    for j in range(n_jobs):
        k = int(rng.integers(6, 13))
        quality = rng.uniform(0.3, 1.0)
        base = rng.choice([1.0, 0.6, 0.3, 0.0], size=k)
        f = rng.normal(size=(k, 24))
        f[:, 0] = 2.0 * quality - 1.0 + 0.1 * rng.normal(size=k)
        rows["p"].append(np.clip(0.65 * base + 0.1 + 0.05 * rng.normal(size=k), 0, 1))
        rows["n"].append(rng.integers(20, 200, size=k))
        rows["f"].append(f)
        rows["job"].append(np.full(k, f"job{seed}_{j}"))
        rows["y"].append(quality * base)
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["p"] = out["p"].astype(np.float32)  # as the network gives them
    return out


def test_trees_as_arrays_predict_as_scikit_learn(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 44))
    y = np.clip(0.5 + 0.2 * x[:, 0] - 0.1 * x[:, 3] * x[:, 5], 0, 1)
    trees = GradientBoostingRegressor(n_estimators=40, max_depth=3, random_state=0).fit(x[:300], y[:300])
    stage = export(trees, "ab" * 32)
    assert np.allclose(stage.predict(x[300:]), np.clip(trees.predict(x[300:]), 0, 1), atol=1e-6)
    stage.default_threshold = 0.3
    path = stage.save(tmp_path / "w.context.npz")
    again = JobContext.load(path)
    assert np.array_equal(again.predict(x), stage.predict(x)) and again.default_threshold == 0.3
    assert again.network_sha256 == "ab" * 32
    np.save(tmp_path / "bad.npy", np.array([{"code": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a job-context stage"):  # object arrays need pickle: refused
        JobContext.load(tmp_path / "bad.npy")
    stage.right[0, 0] = 10**6  # a child outside its tree
    with pytest.raises(InputError, match="inconsistent"):
        JobContext.load(stage.save(tmp_path / "bad_child.npz"))
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="not a job-context stage"):
        JobContext.load(tmp_path / "cut.npz")


def test_context_table_summarises_the_job():
    p = np.array([0.2, 0.8, 0.5])
    f = np.zeros((3, 24))
    f[:, 0] = [1.0, 2.0, 3.0]
    t = context_table(p, np.array([10, 30, 60]), f)
    assert t.shape == (3, 44)
    assert np.allclose(t[:, 1], [0.1, 0.3, 0.6]) and np.all(t[:, 2] == 3)
    assert np.allclose(t[:, 4], 0.8) and np.allclose(t[:, 8], 0.1 * 0.2 + 0.3 * 0.8 + 0.6 * 0.5)
    assert np.allclose(t[:, 9], [1 / 3, 1, 2 / 3]) and np.allclose(t[:, 10], [-0.6, 0, -0.3])
    assert np.allclose(t[:, 12], 2.0) and np.allclose(t[:, 16], 1.0) and np.array_equal(t[:, 20:], f)
    with pytest.raises(ValueError, match="context needs"):
        context_table(p, np.ones(2), f)


def test_stage_learns_what_only_the_job_shows():
    """Fitted on some synthetic jobs, the stage brings held-out jobs' scores much closer to their targets
    than the per-class scores are; jobs of fewer than three classes keep their scores."""
    fit, test = _jobs(80, 1), _jobs(30, 2)
    fitted = fit_context(fit["p"], fit["n"], fit["f"], fit["job"], fit["y"], "0" * 64, seed=0)
    assert fitted.out_of_fold.shape == fit["y"].shape
    q = rescore_samples(fitted.stage, test["p"], test["n"], test["f"], test["job"])
    mse_net, mse_ctx = np.mean((test["p"] - test["y"]) ** 2), np.mean((q - test["y"]) ** 2)
    assert mse_ctx < 0.5 * mse_net, (mse_net, mse_ctx)
    oof_mse = np.mean((fitted.out_of_fold - fit["y"]) ** 2)
    assert oof_mse < 0.6 * np.mean((fit["p"] - fit["y"]) ** 2)
    one = test["job"] == test["job"][0]
    assert np.array_equal(rescore_samples(None, test["p"], test["n"], test["f"], test["job"]), test["p"])
    assert np.array_equal(fitted.stage.rescore(test["p"][one][:2], test["n"][one][:2], test["f"][one][:2]),
                          test["p"][one][:2])  # two classes: too little context
    few = _jobs(3, 3)
    with pytest.raises(TooFewJobs):
        fit_context(few["p"], few["n"], few["f"], few["job"], few["y"], "0" * 64)


def test_shipped_stage_matches_its_card_and_is_used_by_default(tmp_path, caplog):
    card = model_card()
    model = load_model()
    assert model.context is not None and model.context.network_sha256 == model.sha256
    assert model.threshold == pytest.approx(card["context"]["default_threshold"])
    assert model.threshold_for(False) == pytest.approx(card["default_threshold"])
    alone = load_model(context=False)
    assert alone.context is None and alone.threshold == pytest.approx(card["default_threshold"])
    s = job_samples(FIXTURE_JOB)
    from training.train import sample_scores

    scores, net = sample_scores(model, s), sample_scores(alone, s)
    assert not np.allclose(scores, net)
    good, junk = np.isin(s.categories, (1, 5, 3)), s.categories == 6
    keep = good | junk
    assert roc_auc_score(good[keep], scores[keep]) > 0.8
    # weights copied elsewhere with a stage fitted on other weights: scored by the network alone, with a warning
    path = tmp_path / "w.pt"
    save_checkpoint(ClassRankerNet(), path, version="t", zero_granulometry=True, default_threshold=0.4)
    shutil.copy(context_path(model.path), context_path(path))
    with caplog.at_level(logging.WARNING):
        other = load_model(path)
    assert other.context is None and other.threshold == 0.4 and "fitted on other weights" in caplog.text


def test_damaged_shipped_stage_is_refused(tmp_path, monkeypatch):
    import ranker.model_store as store

    for name in ("class_ranker_v1.pt", "class_ranker_v1.json", "class_ranker_v1.context.npz"):
        shutil.copy(store.CLASS_RANKER.parent / name, tmp_path / name)
    stage = tmp_path / "class_ranker_v1.context.npz"
    raw = bytearray(stage.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stage.write_bytes(bytes(raw))
    monkeypatch.setattr(store, "CLASS_RANKER", tmp_path / "class_ranker_v1.pt")
    monkeypatch.setattr(store, "CLASS_RANKER_CARD", tmp_path / "class_ranker_v1.json")
    with pytest.raises(InputError, match="checksum does not match"):
        store.load_model()
    assert store.load_model(context=False).context is None
    stage.unlink()
    with pytest.raises(InputError, match="missing"):
        store.load_model()
    assert json.loads((tmp_path / "class_ranker_v1.json").read_text())["context"]["file"] == stage.name


@pytest.mark.slow
def test_fit_context_from_the_command_line_and_score_with_it(tmp_path, capsys):
    """`ranker fit-context` writes the stage and its report beside copied weights; `ranker score` with those
    weights then uses it (its scores differ from `--no_context`'s), and the selection follows its threshold."""
    from helpers import make_class2d_job

    from ranker.cli import main as ranker_main
    from reconstruct.files import read_star

    patterns = ((1, 2, 6, 1), (1, 6, 6, 5), (2, 1, 1, 6), (5, 5, 2, 6))
    for i in range(16):
        make_class2d_job(tmp_path / "corpus" / f"job{i:02d}", categories=patterns[i % 4], seed=i,
                         score=0.3 + 0.7 * (i % 5) / 4)
    weights = tmp_path / "w.pt"
    shutil.copy(load_model().path, weights)
    assert ranker_main(["fit-context", "--model", str(weights), "--data", str(tmp_path / "corpus")]) == 0
    report = json.loads((tmp_path / "w.context.json").read_text())
    assert report["fitted_on"] == {"classes": 64, "jobs": 16} and "test" not in report
    assert 0 <= report["default_threshold"] <= 1 and report["network_sha256"] == load_model().sha256
    assert "w.context.npz" in capsys.readouterr().out
    job = tmp_path / "Class2D" / "job007"
    make_class2d_job(job, categories=(1, 2, 6, 1))
    scores = {}
    for flag in ([], ["--no_context"]):
        sel = tmp_path / "Select" / ("plain" if flag else "context")
        assert ranker_main(["score", str(job), "--o", str(sel), "--model", str(weights), "--project_dir",
                            str(tmp_path), *flag]) == 0
        ranked = read_star(sel / "rank_model.star")["model_classes"]
        scores[bool(flag)] = ranked.rlnClassScore.to_numpy()
        chosen = next(iter(read_star(sel / "backup_selection.star").values())).rlnSelected.to_numpy()
        threshold = report["default_threshold"] if not flag else load_model(context=False).threshold
        assert np.array_equal(chosen.astype(bool), scores[bool(flag)] >= threshold)
    assert not np.allclose(scores[True], scores[False])


def test_stage_sees_the_features_as_its_network_does(tmp_path, monkeypatch):
    """Ours zero the granulometry slots, RELION-5's do not: the stage is fitted on what scoring will give it."""
    import training.train as train
    from ranker.features import GRANULO

    seen = []

    class Seen(Exception):
        pass

    def capture(scores, sizes, features, *args, **kwargs):
        seen.append(features)
        raise Seen

    monkeypatch.setattr(train, "fit_context", capture)
    s = job_samples(FIXTURE_JOB)
    for zero in (True, False):
        path = tmp_path / f"w{zero}.pt"
        save_checkpoint(ClassRankerNet(), path, version="t", zero_granulometry=zero)
        with pytest.raises(Seen):
            train.fit_job_context(load_model(path), s)
        assert np.all(seen[-1][:, GRANULO] == 0) == zero
        assert np.array_equal(np.delete(seen[-1], GRANULO, axis=1), np.delete(s.features, GRANULO, axis=1))


def test_card_publishes_the_stage_with_its_weights(tmp_path):
    """`python -m training.card` copies a run's stage beside the weights, records its checksum and threshold,
    and reports the test with the stage and with the network alone; a stage of other weights is refused."""
    from ranker.network import sha256
    from training.card import publish

    run = tmp_path / "run"
    run.mkdir()
    (run / "class_ranker.pt").write_bytes(b"weights")
    split = {"classes": 10, "jobs": 2, "mse": 0.02, "spearman": 0.8, "auc_good": 0.8, "particle_fpr": 0.2,
             "particle_fnr": 0.2, "threshold": 0.3}
    better = split | {"mse": 0.01, "spearman": 0.9}
    (run / "metrics.json").write_text(json.dumps({
        "validation": split, "test": split, "default_threshold": 0.3, "epochs": 1, "train_classes": 10,
        "train_seconds": 1.0, "options": {"epochs": 1, "lr": 0.001, "weight_decay": 0.0, "batch_size": 32,
                                          "seed": 1, "held_out": "tcr_hla", "val_fraction": 0.2, "patience": 5,
                                          "data": ["corpus"]}}))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 44))
    trees = GradientBoostingRegressor(n_estimators=5, max_depth=2).fit(x, x[:, 0])
    stage = export(trees, sha256(run / "class_ranker.pt"))
    stage.save(run / "class_ranker.context.npz")
    report = {"network_sha256": stage.network_sha256, "default_threshold": 0.25, "trees": {"n_estimators": 5,
              "max_depth": 2}, "fitted_on": {"classes": 90, "jobs": 9}, "test": better, "test_network": split,
              "out_of_fold": split}
    (run / "class_ranker.context.json").write_text(json.dumps(report))
    card = publish(run, tmp_path / "models")
    published = tmp_path / "models" / "class_ranker_v1.context.npz"
    assert card["context"]["sha256"] == sha256(published) and card["context"]["default_threshold"] == 0.25
    assert card["metrics"]["test_held_out_protein"]["mse"] == 0.01 and card["metrics"]["test_network_only"] == split
    text = (tmp_path / "models" / "class_ranker_v1.md").read_text()
    assert "| **test (held-out protein tcr_hla)** | 2 | 10 | 0.0100 | 0.900 |" in text
    assert "ranker fit-context --model run/class_ranker.pt" in text and "0.250, chosen on" in text
    (run / "class_ranker.pt").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="fitted on other weights"):
        publish(run, tmp_path / "models")
