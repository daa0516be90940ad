"""Where the class ranker's scores miss on held-out jobs: per category, sharp vs blurred, and the job's quality.

Scores the held-out group of a corpus (default: the TCR-HLA jobs of `ranker make-corpus`) with a model (default:
the shipped one) and prints

- MSE and Spearman against the targets, and each truth category's class count, mean target and mean score;
- how well the scores separate pure good views (category 1) from blurred classes of good particles (3), as an
  AUC, beside the same AUC from the job's quality J alone (a model that only read the data set's quality);
- whether J can be read off the features: the Spearman correlation between J and a per-job estimate of the
  particles' SNR from each class average's protein and solvent standard deviations and its particle count,
  (protein std^2 - solvent std^2) / solvent std^2 / N, median over the job's classes;
- what no model can beat on these labels: the particle FPR/FNR of the targets themselves used as scores at their
  best single threshold (J scales a job's classes together, so good classes of a poor data set score below mixed
  classes of a good one), and the MSE and Spearman of a predictor that knows every target except which of
  categories 1 and 5 (or 1, 5 and 2) a class is, within its job;
- whether those categories can be seen at all: their AUC within jobs by score, and by how well each class's
  noise-free average (true poses) and its actual average match their best projection of the truth
  (``view_match`` and ``average_match`` of ``class_truth.csv``).

    python benchmarks/ranker_diagnostics.py --corpus benchmarks/out/ranker_corpus/corpus
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import mean_squared_error, roc_auc_score

from ranker.features import FEATURE_MEAN, FEATURE_NAMES, FEATURE_STD
from ranker.model_store import load_model
from training.data import Samples, load_samples
from training.limits import merged_floor, target_ceiling, within_job_auc
from training.targets import BEST, BLURRED, CATEGORY_NAMES, GOOD, MIN_PARTICLES, MIXED
from training.train import sample_scores


def snr_estimate(s: Samples) -> np.ndarray:
    """Per class, log of (protein std^2 - solvent std^2) / solvent std^2 / N: the class average's signal-to-noise
    divided by its particle count, i.e. about the particles' SNR (raw features: undo RELION's normalisation)."""
    idx = [FEATURE_NAMES.index(n) for n in ("protein_std", "solvent_std")]
    protein, solvent = (s.features[:, i] * FEATURE_STD[i] + FEATURE_MEAN[i] for i in idx)
    ratio = np.maximum(protein**2 - solvent**2, 1e-6) / np.maximum(solvent**2, 1e-9)
    return np.log(ratio / np.maximum(s.sizes, 1))


def job_scores(s: Samples, corpus: Path) -> np.ndarray:
    """Each class's job score J (first line of its job's job_score.txt)."""
    j = {name: float((corpus / name / "job_score.txt").read_text().split()[0]) for name in np.unique(s.job)}
    return np.array([j[name] for name in s.job])


def class_truth(corpus: Path, jobs: np.ndarray) -> pd.DataFrame:
    """The ``class_truth.csv`` rows (classes of more than 10 particles) of ``jobs``, with a ``job`` column."""
    parts = [pd.read_csv(corpus / j / "class_truth.csv").assign(job=j) for j in np.unique(jobs)
             if (corpus / j / "class_truth.csv").is_file()]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return table[table.n > MIN_PARTICLES] if len(table) else table


def print_limits(s: Samples, pred: np.ndarray, corpus: Path) -> None:
    """What no model can beat on these labels, and whether the categories can be seen (module docstring)."""
    c = target_ceiling(s.targets, s.good, s.sizes)
    print(f"targets as scores: best single threshold {c['threshold']:.3f} gives particle FPR {c['particle_fpr']:.3f}, "
          f"FNR {c['particle_fnr']:.3f}")
    for merged in ((BEST, GOOD), (BEST, GOOD, MIXED)):
        mse, rho = merged_floor(s.targets, s.categories, s.job, merged)
        print(f"all targets known but categories {'/'.join(map(str, merged))} merged within a job: "
              f"MSE {mse:.4f}, Spearman {rho:.3f}")
    truth = class_truth(corpus, s.job)
    truth_cats = truth.category.to_numpy(int) if len(truth) else np.zeros(0, int)
    truth_jobs = truth.job.to_numpy() if len(truth) else np.zeros(0, str)
    pairs = (((BEST,), (GOOD,)), ((BEST, GOOD), (MIXED,)))
    for pos, neg in pairs:
        line = f"within-job AUC {'/'.join(map(str, pos))} vs {'/'.join(map(str, neg))}: by score " \
               f"{within_job_auc(pred, s.categories, s.job, pos, neg):.3f}"
        for col in ("view_match", "average_match"):
            if col in truth:
                auc = within_job_auc(truth[col].to_numpy(float), truth_cats, truth_jobs, pos, neg)
                line += f", by {col} {auc:.3f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="corpus directory (ranker make-corpus --o)")
    ap.add_argument("--group", default="tcr_hla", help="held-out protein whose jobs are scored (default tcr_hla)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--cache", default=None, help="directory for the per-job sample cache (default: none)")
    ap.add_argument("--no_context", action="store_true", help="the network's scores, without the job-context stage")
    a = ap.parse_args()
    corpus = Path(a.corpus)
    samples = load_samples([corpus], Path(a.cache) if a.cache else None)
    test = samples.subset(samples.group == a.group)
    if len(test) == 0:
        raise SystemExit(f"no jobs of {a.group!r} in {corpus}")
    model = load_model(a.model, context=not a.no_context)
    pred = sample_scores(model, test)
    print("scores:", "network + job-context stage" if model.context is not None else "network alone")
    j = job_scores(test, corpus)
    print(f"{a.group}: {np.unique(test.job).size} jobs, {len(test)} classes; MSE "
          f"{mean_squared_error(test.targets, pred):.4f}, Spearman {spearmanr(pred, test.targets).statistic:.3f}")
    rows = [{"category": f"{c} {CATEGORY_NAMES.get(int(c), '?')}", "classes": int((test.categories == c).sum()),
             "mean target": test.targets[test.categories == c].mean(), "mean score": pred[test.categories == c].mean()}
            for c in np.unique(test.categories)]
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))
    sharp = np.isin(test.categories, (BEST, BLURRED))
    if len(np.unique(test.categories[sharp])) == 2:
        best = test.categories[sharp] == BEST
        print(f"AUC pure good (1) vs blurred (3): by score {roc_auc_score(best, pred[sharp]):.3f}, by the job score J "
              f"alone {roc_auc_score(best, j[sharp]):.3f}")
    est = pd.Series(snr_estimate(samples)).groupby(samples.job).transform("median").to_numpy()
    j_all = job_scores(samples, corpus)
    for name, mask in (("held-out", samples.group == a.group), ("training-protein", samples.group != a.group)):
        first = mask & ~pd.Series(samples.job).duplicated().to_numpy()  # one row per job
        print(f"Spearman(J, job-median SNR estimate), {name} jobs: {spearmanr(est[first], j_all[first]).statistic:.3f}")
    print_limits(test, pred, corpus)


if __name__ == "__main__":
    main()
