"""What the 24 features add to the whole ranker: network and job-context stage, with and without them.

For each of two networks -- the one trained with features (default: the shipped weights) and its twin trained
with them zeroed (``ranker train --no_features``) -- a job-context stage is fitted on its scores of every job but
the held-out group's (for the twin, with the features zeroed in the stage's inputs too, so nothing sees them),
and both are scored on the held-out group's jobs. Nothing is written but the printed table.

    python benchmarks/ranker_ablation.py --corpus CORPUS --ablation run_nofeat/class_ranker.pt [--model W]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ranker.model_store import load_model
from ranker.score import network_features
from training.context import fit_context, rescore_samples
from training.data import load_samples
from training.limits import calibrate_threshold
from training.train import evaluate, network_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", required=True, help="corpus directories (ranker make-corpus --o)")
    ap.add_argument("--ablation", required=True, help="weights trained with --no_features")
    ap.add_argument("--model", default=None, help="weights trained with the features (default: the shipped ones)")
    ap.add_argument("--held_out", default="tcr_hla", help="group whose jobs are the test (default tcr_hla)")
    ap.add_argument("--seed", type=int, default=12, help="seed of the stages' trees (default 12)")
    ap.add_argument("--cache", default=None, help="directory of prepared inputs (.npz)")
    a = ap.parse_args()
    samples = load_samples([Path(c) for c in a.corpus], Path(a.cache) if a.cache else None)
    test = samples.group == a.held_out
    fit, held = samples.subset(~test), samples.subset(test)
    print("| network | stage | MSE | Spearman | particle FPR / FNR (threshold) |\n|---|---|---:|---:|---:|")
    for name, weights, zeroed in (("with features", a.model, False), ("features zeroed", a.ablation, True)):
        model = load_model(weights, context=False)
        fit_f, held_f = (np.zeros_like(s.features) if zeroed else network_features(model, s.features)
                         for s in (fit, held))
        fitted = fit_context(network_scores(model.net, fit, model.zero_granulometry), fit.sizes, fit_f,
                             fit.job, fit.targets, model.sha256, a.seed)
        threshold = calibrate_threshold(fitted.out_of_fold, fit.good, fit.sizes)
        net = network_scores(model.net, held, model.zero_granulometry)
        rows = (("alone", net, model.threshold),
                ("job context" + (", features zeroed" if zeroed else ""),
                 rescore_samples(fitted.stage, net, held.sizes, held_f, held.job), threshold))
        for stage, scores, thr in rows:
            m = evaluate(scores, held, thr)
            print(f"| {name} | {stage} | {m['mse']:.4f} | {m['spearman']:.3f} | {m['particle_fpr']:.3f} / "
                  f"{m['particle_fnr']:.3f} ({thr:.3f}) |")


if __name__ == "__main__":
    main()
