"""Time to score a Class2D job's classes with the shipped ranker (features, 64x64 images, network, job context).

The classes of a real Class2D job (default: the test fixture, a simulated TCR-HLA job) are tiled to
--classes classes; the whole `ranker score` path (feature extraction, image preparation, network on the
CPU) is timed, median of --repeats runs, with the threads torch and NumPy use by default.

    python benchmarks/bench_ranker.py                       # 100 classes
    python benchmarks/bench_ranker.py --job Class2D/job012 --classes 200

The table goes to benchmarks/results/ranker_speed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from ranker.inputs import job_inputs
from ranker.job import read_class_job
from ranker.model_store import load_model
from ranker.score import score_inputs

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "tests" / "data" / "ranker_job_tcr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=str(FIXTURE), help="Class2D job directory (default: the test fixture job)")
    ap.add_argument("--classes", type=int, default=100, help="classes to score (default 100)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (default 5)")
    a = ap.parse_args()
    job = read_class_job(a.job, project_dir=a.job)
    reps = -(-a.classes // job.n_classes)
    idx = np.tile(np.arange(job.n_classes), reps)[: a.classes]
    classes = job.classes.iloc[idx].reset_index(drop=True)
    classes["rlnClassDistribution"] = np.maximum(classes.rlnClassDistribution, 20 / len(job.data.data))
    job = dataclasses.replace(job, images=job.images[idx], classes=classes)
    model = load_model()
    prep, net = [], []
    for _ in range(a.repeats + 1):
        t0 = time.perf_counter()
        inputs = job_inputs(job)
        t1 = time.perf_counter()
        score_inputs(model, inputs, job.n_classes)
        t2 = time.perf_counter()
        prep.append(t1 - t0)
        net.append(t2 - t1)
    prep, net = np.median(prep[1:]), np.median(net[1:])
    text = "\n".join([
        f"# Ranker scoring speed ({os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        "", f"{a.classes} classes of box {job.box} ({Path(a.job).name}), median of {a.repeats} runs after a warm-up.",
        "", "| features + 64x64 images (s) | network + job-context stage (s) | total (s) | classes per second |",
        "|---:|---:|---:|---:|",
        f"| {prep:.3f} | {net:.3f} | {prep + net:.3f} | {a.classes / (prep + net):.0f} |", "",
        f"Reproduce: `python benchmarks/bench_ranker.py --classes {a.classes} --repeats {a.repeats}`", ""])
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ranker_speed.md").write_text(text)


if __name__ == "__main__":
    main()
