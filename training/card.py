"""Publish a trained ranker: copy its weights into ``models/`` with a model card (JSON and Markdown).

The JSON card is what ``ranker score`` checks the shipped file against (SHA-256) and where it takes the
default selection threshold from; the Markdown card is for people: data, metrics, version, how to
reproduce.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ranker.network import sha256

from .chimeras import split_chimeras
from .targets import BLUR_FACTOR


def _row(name: str, m: dict[str, Any]) -> str:
    return (f"| {name} | {m['jobs']} | {m['classes']} | {m['mse']:.4f} | {m['spearman']:.3f} | {m['auc_good']:.3f} "
            f"| {m['particle_fpr']:.3f} | {m['particle_fnr']:.3f} |")


def _run_jobs(metrics: dict[str, Any]) -> set[str]:
    """Every job a training run used (training, validation and test), from its metrics.json."""
    return {name for part in metrics.get("jobs", {}).values() for name in part}


def _publish_context(stage: Path, target: Path, network_sha256: str) -> dict[str, Any]:
    """Copy the run's job-context stage beside the published weights; its card entry and metrics."""
    report = json.loads(stage.with_suffix(".json").read_text())
    if report["network_sha256"] != network_sha256:
        raise ValueError(f"{stage} was fitted on other weights than the run's ({report['network_sha256'][:12]}...)")
    shutil.copyfile(stage, target)
    metrics = {"test_held_out_protein": report["test"], "test_network_only": report["test_network"],
               "fitting_jobs_out_of_fold": report["out_of_fold"]}
    return {"context": {"file": target.name, "sha256": sha256(target), "default_threshold": report["default_threshold"],
                        "fitted_on": report["fitted_on"], "trees": report["trees"], "metrics": metrics}}


def publish(run: Path, out_dir: Path, ablation: Path | None = None, corpus: list[Path] | None = None,
            name: str = "class_ranker_v1", notes: Path | None = None) -> dict[str, Any]:
    """Copy ``run``/class_ranker.pt to ``out_dir``/NAME.pt and write NAME.json and NAME.md; the card.
    ``notes``: a Markdown file whose text becomes the card's Notes section (comparisons, caveats)."""
    metrics = json.loads((run / "metrics.json").read_text())
    weights = out_dir / f"{name}.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "class_ranker.pt", weights)
    digest = sha256(weights)
    card: dict[str, Any] = {
        "name": name, "version": "autoproc-ranker-1.0", "sha256": digest, "file": weights.name,
        "architecture": "RELION-5 class ranker v1.0 layout (CNN 64x64 + 24 features, 589,003 parameters)",
        "default_threshold": metrics["default_threshold"],
        "metrics": {"validation": metrics.get("validation_network", metrics["validation"]),
                    "test_held_out_protein": metrics["test"]},
        "training": {k: metrics["options"][k] for k in ("epochs", "lr", "weight_decay", "batch_size", "seed",
                                                        "held_out", "val_fraction", "patience")}
        | {"val_by": metrics["options"].get("val_by", "job")}
        | {"epochs_run": metrics["epochs"], "train_classes": metrics["train_classes"],
           "train_seconds": round(metrics["train_seconds"], 1)},
        "zero_granulometry": True,
    }
    if ablation is not None:
        zeroed = json.loads((ablation / "metrics.json").read_text())
        card["metrics"]["features_zeroed"] = zeroed.get("test_network", zeroed["test"])
    stage = run / "class_ranker.context.npz"
    if stage.exists():
        card.update(_publish_context(stage, out_dir / f"{name}.context.npz", digest))
        card["metrics"] = {"validation": card["metrics"]["validation"]} | card["context"].pop("metrics") | {
            k: v for k, v in card["metrics"].items() if k not in ("validation", "test_held_out_protein")}
    data_lines: list[str] = []
    indexes = [pd.read_csv(c / "corpus.csv").assign(root=str(c)) for c in corpus or [] if (c / "corpus.csv").exists()]
    index = pd.concat(indexes, ignore_index=True) if indexes else pd.DataFrame(
        {"root": [], "name": [], "held_out": []})
    made = index[np.array([(Path(r) / n / "job.json").exists() for r, n in zip(index.root, index.name)], bool)]
    used = metrics.get("jobs")  # the run's own split; older runs: every job made but the held-out protein's
    done = (made[made.name.isin(used.get("train", []) + used.get("validation", []))] if used is not None
            else made[~made.held_out.astype(bool)])
    run_jobs = made[made.name.isin(_run_jobs(metrics))] if used is not None else made  # test jobs too
    if len(done):
        card["data"] = {"jobs": len(done), "jobs_used": len(run_jobs), "jobs_planned": len(index),
                        "proteins": sorted(done.protein.unique()),
                        "snr": [float(done.snr.min()), float(done.snr.max())],
                        "junk_fraction": [float(done.junk_fraction.min()), float(done.junk_fraction.max())],
                        "box": sorted(int(b) for b in done.box.unique()),
                        "pixel_size": [float(done.pixel_size.min()), float(done.pixel_size.max())]}
        d = card["data"]
        named, n_chimeras = split_chimeras(d["proteins"])
        shown = named + ([f"{n_chimeras} chimeras (chimera_0 to chimera_{n_chimeras - 1}: domains of the "
                          "training models packed into new shapes)"] if n_chimeras else [])
        listed = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else "".join(shown)
        data_lines = [f"- {d['jobs']} simulated Class2D jobs for training and validation (our VDAM, 8-16 classes, "
                      f"600-1300 particles each) of "
                      f"{listed}; SNR {d['snr'][0]:.3f}-{d['snr'][1]:.3f}, junk "
                      f"{d['junk_fraction'][0]:.0%}-{d['junk_fraction'][1]:.0%} (ice, carbon, aggregates, noise), "
                      f"neighbours 0-30%, box {d['box']}, {d['pixel_size'][0]:.2f}-{d['pixel_size'][1]:.2f} Å/px, "
                      "defocus 0.5-3.5 µm" + (f"; {len(run_jobs)} of the {len(index)} jobs of the corpus below, "
                                               "test jobs included" + (" (it was not complete)." if len(made) <
                                                                       len(index) else ".")
                                               if len(run_jobs) < len(index) else ".")]
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=1, default=float))
    m = card["metrics"]
    held = metrics["options"].get("held_out")
    val_by_text = ("protein: all jobs of proteins never seen in training" if card["training"]["val_by"] == "protein"
                   else "job")
    md = [f"# Model card: {name} ({card['version']})", "",
          f"- File: `{weights.name}`, SHA-256 `{digest}`", f"- Architecture: {card['architecture']}; output linear, "
          "trained towards RELION's targets in [0, 1]; granulometry features (slots 15-20) zeroed in training and "
          "scoring."]
    if "context" in card:
        c = card["context"]
        md += [f"- Job-context stage: `{c['file']}`, SHA-256 `{c['sha256']}`: {c['trees']['n_estimators']} "
               f"regression trees of depth {c['trees']['max_depth']} (scikit-learn gradient boosting, stored as "
               "arrays) that re-score each class from its network score, its features and summaries of its job "
               f"(`ranker/context.py`), fitted on the network's scores of {c['fitted_on']['jobs']} jobs "
               f"({c['fitted_on']['classes']} classes) of the training proteins; `--no_context` scores with the "
               "network alone.",
               f"- Default selection threshold (`ranker score --min_score`): {c['default_threshold']:.3f}, chosen on "
               "the stage's out-of-fold scores of those jobs to balance particle false positives and false "
               "negatives against truth-good classes; for the network alone "
               f"{card['default_threshold']:.3f} (chosen so on the validation jobs)."]
    else:
        md.append(f"- Default selection threshold (`ranker score --min_score`): {card['default_threshold']:.3f}, "
                  "chosen on the validation jobs to balance particle false positives and false negatives against "
                  "truth-good classes.")
    md += ["", "## Training data", *data_lines,
          "- Targets as RELION's training script: job score J (from the SNR and junk fraction) x category (from "
          "the truth: pure good particles, mostly good, mixed, blurred, neighbour-contaminated, junk; blurred = "
          "good particles whose noise-free average -- made from their true poses and the classification's "
          "alignments -- is one view of the particle (Fourier ring correlation 0.5 with the best-matching "
          f"projection) only to a resolution more than {BLUR_FACTOR} times coarser than the job's typical pure "
          "class) "
          "x resolution relative to the job's best; see `training/targets.py`.",
          f"- Validation: {m['validation']['jobs']} jobs split off by {val_by_text} (scikit-learn GroupShuffleSplit); "
          "test: "
          f"all {m['test_held_out_protein']['jobs']} jobs of `{held}`, a protein never seen in training.", "",
          "## Metrics", "",
          "| set | jobs | classes | MSE | Spearman | AUC good vs rest | particle FPR | particle FNR |",
          "|---|---:|---:|---:|---:|---:|---:|---:|", _row("validation (network)", m["validation"])]
    if "context" in card:
        md.append(_row("fitting jobs of the job-context stage, out-of-fold", m["fitting_jobs_out_of_fold"]))
    md.append(_row(f"**test (held-out protein {held})**", m["test_held_out_protein"]))
    if "context" in card:
        md.append(_row("test, network alone (`--no_context`)", m["test_network_only"]))
    if "features_zeroed" in m:
        md.append(_row("test, network trained with features zeroed (alone)", m["features_zeroed"]))
    t = card["training"]
    make = []
    for c in corpus or []:
        meta = json.loads((c / "corpus.json").read_text()) if (c / "corpus.json").exists() else {}
        idx = index[index.root == str(c)]
        n_jobs = meta.get("n_jobs", int((~idx.held_out.astype(bool)).sum()))
        n_held = meta.get("n_held_out", int(idx.held_out.astype(bool).sum()))
        prot, n_chimeras = split_chimeras(meta.get("proteins") or [])
        n_made = int((run_jobs.root == str(c)).sum())  # older runs: the jobs made now
        what = "this model used" if used is not None else "made so far:"
        make.append(f"ranker make-corpus --o {c.name} --n_jobs {n_jobs} --n_held_out {n_held} --seed "
                    f"{meta.get('seed', 0)}" + (f" --proteins {' '.join(prot)}" if prot else "")
                    + (f" --chimeras {n_chimeras}" if n_chimeras else "")
                    + (f"   # {what} {n_made} of its {len(idx)} jobs" if n_made < len(idx) else ""))
    data = " ".join(Path(d).name for d in metrics["options"]["data"])
    val_by = " --val_by protein" if t["val_by"] == "protein" else ""
    md += ["", "## Reproduce", "", "```bash", *make,
           f"ranker train --data {data} --o run --held_out {held} --epochs {t['epochs']} --lr {t['lr']} "
           f"--patience {t['patience']} --seed {t['seed']}{val_by}",
           f"ranker train --data {data} --o run_nofeat --held_out {held} --epochs {t['epochs']} --lr {t['lr']} "
           f"--patience {t['patience']} --seed {t['seed']}{val_by} --no_features",
           *([f"ranker fit-context --model run/class_ranker.pt --data {data} --held_out {held}   # the job-context "
              "stage (train fits one too, on its own training and validation jobs)"] if "context" in card else []),
           f"python -m training.card --run run --ablation run_nofeat --corpus {data} --o models", "```", ""]
    if notes is not None:
        md += ["## Notes", "", notes.read_text().strip(), ""]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    return card


def main(argv: list[str] | None = None) -> None:
    """``python -m training.card --run DIR --o models``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="output directory of `ranker train`")
    ap.add_argument("--ablation", default=None, help="output of the same training with --no_features")
    ap.add_argument("--corpus", nargs="*", default=None,
                    help="the corpus directories it was trained on (for the card's data section)")
    ap.add_argument("--o", default=str(Path(__file__).resolve().parents[1] / "models"), help="models directory")
    ap.add_argument("--notes", default=None, help="Markdown file: the card's Notes section (comparisons, caveats)")
    a = ap.parse_args(argv)
    card = publish(Path(a.run), Path(a.o), Path(a.ablation) if a.ablation else None,
                   [Path(c) for c in a.corpus] if a.corpus else None, notes=Path(a.notes) if a.notes else None)
    print(json.dumps(card["metrics"], indent=1, default=float))


if __name__ == "__main__":
    main()
