"""Train the class ranker, calibrate its selection threshold and write the weights with a model card.

Validation is split by job (never by class: classes of one job share its noise and its score), with
scikit-learn's ``GroupShuffleSplit``; the jobs of a held-out group (a protein never seen in training)
form the test set the card reports. The threshold is chosen on the validation jobs to balance the
particle false-positive and false-negative rates against truth-good classes (``roc_curve`` weighted by
class size), then reported on the test jobs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import mean_squared_error, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit

from ranker.context import JobContext, context_path
from ranker.model_store import RankerModel, load_model
from ranker.network import ClassRankerNet, save_checkpoint, sha256
from ranker.score import network_features, predict, zero_granulometry
from reconstruct.files.atomic import atomic_write_text

from .context import TREES, TooFewJobs, fit_context, rescore_samples
from .data import Samples, load_samples, summary
from .limits import calibrate_threshold, particle_rates, target_ceiling

log = logging.getLogger(__name__)
VERSION = "autoproc-ranker-1.0"


@dataclass
class TrainOptions:
    """Options of ``ranker train`` (defaults: RELION's script, except the learning rate and epochs)."""

    data: list[Path]
    out: Path
    epochs: int = 200
    lr: float = 5e-5
    weight_decay: float = 5e-4
    batch_size: int = 32
    dropout: float = 0.3
    seed: int = 12
    val_fraction: float = 0.2
    held_out: str | None = None  # group (protein) whose jobs are the test set
    val_by: str = "job"  # "protein": validation jobs are all the jobs of some proteins, never seen in training
    patience: int = 20
    accelerator: str = "auto"
    resume: bool = False
    use_features: bool = True
    cache: Path | None = None
    job_context: bool = True  # fit the job-context stage on the trained network's scores


def split_by_job(samples: Samples, val_fraction: float, seed: int, held_out: str | None, val_by: str = "job"
                 ) -> tuple[Samples, Samples, Samples]:
    """Train / validation / test samples: test = the held-out group's jobs; validation = whole jobs, or with
    ``val_by="protein"`` every job of a fraction of the groups (so early stopping and the threshold are chosen
    on proteins the network never saw, as the test protein is; jobs without a protein are their own group)."""
    if val_by not in ("job", "protein"):
        raise ValueError(f"val_by must be 'job' or 'protein': got {val_by!r}")
    test_mask = samples.group == held_out if held_out else np.zeros(len(samples), bool)
    rest = np.nonzero(~test_mask)[0]
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    groups = samples.job[rest] if val_by == "job" else samples.group[rest]
    tr, va = next(splitter.split(rest, groups=groups))
    train_mask = np.zeros(len(samples), bool)
    val_mask = np.zeros(len(samples), bool)
    train_mask[rest[tr]] = True
    val_mask[rest[va]] = True
    return samples.subset(train_mask), samples.subset(val_mask), samples.subset(test_mask)


def evaluate(pred: np.ndarray, samples: Samples, threshold: float) -> dict[str, Any]:
    """MSE, Spearman, AUC (good vs rest) and particle FPR/FNR at ``threshold`` of scores ``pred`` of
    ``samples``, and the particle FPR/FNR of the targets themselves as scores at their best threshold
    (``targets_as_scores``)."""
    if len(samples) == 0:
        return {}
    good = samples.good
    fpr, fnr = particle_rates(pred, good, samples.sizes, threshold)
    return {"classes": len(samples), "jobs": int(np.unique(samples.job).size),
            "mse": float(mean_squared_error(samples.targets, pred)),
            "spearman": float(spearmanr(pred, samples.targets).statistic),
            "auc_good": float(roc_auc_score(good, pred)) if 0 < good.sum() < len(good) else float("nan"),
            "particle_fpr": fpr, "particle_fnr": fnr, "threshold": threshold,
            "targets_as_scores": target_ceiling(samples.targets, good, samples.sizes)}


def network_scores(net: ClassRankerNet, samples: Samples, zero_granulo: bool = True) -> np.ndarray:
    """The network's scores of ``samples`` (granulometry zeroed, as ours are trained)."""
    return predict(net, samples.images, zero_granulometry(samples.features) if zero_granulo else samples.features)


def sample_scores(model: RankerModel, samples: Samples) -> np.ndarray:
    """Final scores of ``samples`` as ``ranker score`` gives them: network, then the job-context stage."""
    net = network_scores(model.net, samples, model.zero_granulometry)
    feats = network_features(model, samples.features)
    return rescore_samples(model.context, net, samples.sizes, feats, samples.job)


def fit_job_context(model: RankerModel, samples: Samples, seed: int = 12) -> tuple[JobContext, np.ndarray]:
    """Fit the job-context stage on ``model``'s network scores of ``samples`` (training and validation jobs),
    with the features as that network sees them (as scoring will), and calibrate its threshold on out-of-fold
    scores; returns the stage and those scores."""
    fitted = fit_context(network_scores(model.net, samples, model.zero_granulometry), samples.sizes,
                         network_features(model, samples.features), samples.job, samples.targets, model.sha256, seed)
    fitted.stage.default_threshold = calibrate_threshold(fitted.out_of_fold, samples.good, samples.sizes)
    return fitted.stage, fitted.out_of_fold


def train(opt: TrainOptions) -> dict[str, Any]:
    """Fit, calibrate, evaluate and export; returns the metrics written to ``out/metrics.json``."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .module import RankerData, RankerModule

    L.seed_everything(opt.seed, workers=True)
    # Weight decay drives some weights and Adam moments into subnormal floats, which slow CPU maths
    # by orders of magnitude after ~50 epochs; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    opt.out.mkdir(parents=True, exist_ok=True)
    samples = load_samples(opt.data, opt.cache)
    log.info("samples by group:\n%s", summary(samples))
    train_s, val_s, test_s = split_by_job(samples, opt.val_fraction, opt.seed, opt.held_out, opt.val_by)
    log.info("split by %s: %d train classes, %d validation (%d jobs of %d groups), %d test (%s)", opt.val_by,
             len(train_s), len(val_s), len(np.unique(val_s.job)), len(np.unique(val_s.group)), len(test_s),
             opt.held_out or "none held out")
    module = RankerModule(opt.lr, opt.weight_decay, opt.dropout, opt.use_features)
    ckpt_dir = opt.out / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_mse", mode="min", save_last=True)
    trainer = L.Trainer(max_epochs=opt.epochs, accelerator=opt.accelerator, devices=1, deterministic=True,
                        callbacks=[best, EarlyStopping("val_mse", patience=opt.patience, mode="min")],
                        logger=CSVLogger(opt.out, name="logs"), enable_model_summary=False, log_every_n_steps=5)
    last = ckpt_dir / "last.ckpt"
    t0 = time.perf_counter()
    trainer.fit(module, RankerData(train_s, val_s, opt.batch_size, opt.seed),
                ckpt_path=str(last) if opt.resume and last.exists() else None)
    seconds = time.perf_counter() - t0
    best_module = RankerModule.load_from_checkpoint(best.best_model_path or str(last), weights_only=False)
    net = best_module.net.cpu().eval()
    if not opt.use_features:
        net = _features_off(net)
    val_pred = network_scores(net, val_s)
    threshold = calibrate_threshold(val_pred, val_s.good, val_s.sizes)
    metrics = {"validation_network": evaluate(val_pred, val_s, threshold),
               "test_network": evaluate(network_scores(net, test_s), test_s, threshold),
               "train_classes": len(train_s), "epochs": int(trainer.current_epoch), "train_seconds": seconds,
               "jobs": {name: sorted(map(str, np.unique(part.job))) for name, part in
                        (("train", train_s), ("validation", val_s), ("test", test_s))},
               "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opt).items()
                           if k != "data"} | {"data": [str(d) for d in opt.data]}}
    weights = opt.out / "class_ranker.pt"
    save_checkpoint(net, weights, version=VERSION, zero_granulometry=True, default_threshold=threshold,
                    use_features=opt.use_features)
    metrics["sha256"] = sha256(weights)
    metrics["network_threshold"] = threshold
    metrics.update({"validation": metrics["validation_network"], "test": metrics["test_network"],
                    "default_threshold": threshold})
    if opt.job_context:
        metrics.update(_with_context(net, weights, metrics["sha256"], train_s, val_s, test_s, opt.seed))
    atomic_write_text(opt.out / "metrics.json", json.dumps(metrics, indent=1, default=float))
    log.info("validation: %s", metrics["validation"])
    log.info("test (%s): %s", opt.held_out, metrics["test"])
    return metrics


def _with_context(net: ClassRankerNet, weights: Path, digest: str, train_s: Samples, val_s: Samples,
                  test_s: Samples, seed: int) -> dict[str, Any]:
    """Fit, save and measure the job-context stage of freshly trained weights (metrics: validation scores
    are out-of-fold, the stage never saw the test jobs)."""
    model = load_model(weights, context=False)
    try:
        report = fit_and_save_context(model, Samples.concat([train_s, val_s]), test_s, context_path(weights), seed,
                                      validation_jobs=np.unique(val_s.job))
    except TooFewJobs as e:
        log.warning("no job-context stage: %s; the network's scores are the model's scores", e)
        return {}
    return {"validation": report["validation"], "test": report.get("test", {}),
            "default_threshold": report["default_threshold"], "context_sha256": report["sha256"]}


def fit_and_save_context(model: RankerModel, fit_s: Samples, test_s: Samples, out: Path, seed: int = 12,
                         validation_jobs: np.ndarray | None = None) -> dict[str, Any]:
    """Fit the job-context stage of ``model``'s network on ``fit_s``, write it to ``out`` and a report beside it
    (``.json``: what it was fitted on, out-of-fold metrics overall and on ``validation_jobs``, test metrics);
    returns the report."""
    stage, oof = fit_job_context(model, fit_s, seed)
    stage.save(out)
    threshold = float(stage.default_threshold)
    report: dict[str, Any] = {"network_sha256": model.sha256, "sha256": sha256(out), "default_threshold": threshold,
                              "fitted_on": {"classes": len(fit_s), "jobs": int(np.unique(fit_s.job).size)},
                              "out_of_fold": evaluate(oof, fit_s, threshold), "trees": TREES}
    if validation_jobs is not None:
        in_val = np.isin(fit_s.job, validation_jobs)
        report["validation"] = evaluate(oof[in_val], fit_s.subset(in_val), threshold)
    if len(test_s):
        scored = replace(model, threshold=threshold, context=stage, network_threshold=model.threshold)
        report["test"] = evaluate(sample_scores(scored, test_s), test_s, threshold)
        report["test_network"] = evaluate(network_scores(model.net, test_s, model.zero_granulometry), test_s,
                                          model.threshold)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=1, default=float))
    return report


def _features_off(net: ClassRankerNet) -> ClassRankerNet:
    """A network trained with its features zeroed ignores them: make that part of its weights."""
    with torch.no_grad():
        net.classifier_images_and_features[1].weight[:, 48:] = 0.0
    return net

