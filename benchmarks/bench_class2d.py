"""2D classification, our VDAM and EM against RELION 3.1's EM, on the same simulated mixture and cores.

A mixture with known labels: CFTR (6MSM) and adenylate kinase (1AKE) particles in all views, plus junk
(ice, carbon edges, aggregates, pure noise). The programs run one after the other; the table gives each
one's wall and CPU time and their ratios, the class purity (the fraction of particles that belong to
their class's majority label), the fraction of junk particles that end in junk-led classes, and the
number of non-empty classes.

    python benchmarks/bench_class2d.py                      # 10,000 particles, box 64, 3 Å/px, K 50
    python benchmarks/bench_class2d.py --n 2000 --K 20      # a quicker check
    python benchmarks/bench_class2d.py --only vdam          # re-run one program on the same particles
    python benchmarks/bench_class2d.py --only relion        # again after an interruption: RELION goes on

Outputs go to benchmarks/out/class2d/ (ignored by git); the table to benchmarks/results/class2d.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from _results import table_path
from _timing import children_cpu

from autoproc.demo import demo_model_path
from reconstruct.class2d import Class2DOptions, class2d
from reconstruct.files import read_particles
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles
from reconstruct.simulate.scoring import classification_quality, truth_labels

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "class2d"
PROGRAMS = {"vdam": "ours (class2d --algorithm vdam)", "em": "ours (class2d --algorithm em)",
            "relion": "RELION 3.1 (relion_refine, EM)"}


def _simulate(out: Path, args: argparse.Namespace) -> None:
    params = {k: getattr(args, k) for k in ("n", "box", "angpix", "snr", "junk")}
    stamp = out / "simulation.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    maps = [atomic_model_map(demo_model_path(), args.box, args.angpix),
            atomic_model_map(HERE.parent / "tests/data/1ake_adk_closed.pdb.gz", args.box, args.angpix)]
    simulate_particles(maps, ParticleSimulation(n_particles=args.n, box=args.box, pixel_size=args.angpix,
                                                snr=args.snr, junk_fraction=args.junk,
                                                max_offset=2 * args.angpix, seed=2024), out)
    stamp.write_text(json.dumps(params))


def quality(data_star: Path, labels: np.ndarray, n_classes: int) -> dict:
    """Purity, junk separation and class use of one classification against the truth labels."""
    q = classification_quality(read_particles(data_star).data.rlnClassNumber.to_numpy(), labels)
    return {**q, "empty": n_classes - q["non_empty"]}


def run_ours(args: argparse.Namespace, algorithm: str) -> tuple[float, float, Path]:
    out = Path(f"Ours_{algorithm}")
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    res = class2d(Class2DOptions(star=Path("Extract/job001/particles.star"), out=out,
                                 particle_diameter=args.diameter, n_classes=args.K, algorithm=algorithm))
    return time.perf_counter() - t, time.process_time() - c, res.data_star


RELION_ITER = 25


def _relion_done(rel: Path) -> tuple[int, float]:
    """The last iteration RELION finished writing in ``rel`` and when (0 if none): RELION writes an
    iteration's optimiser, model and data files, then its sampling.star last."""
    its = [int(f.name[6:9]) for f in rel.glob("run_it[0-9][0-9][0-9]_sampling.star")
           if all((rel / f.name.replace("sampling", part)).exists() for part in ("optimiser", "model", "data"))]
    if not its:
        return 0, 0.0
    return max(its), (rel / f"run_it{max(its):03d}_sampling.star").stat().st_mtime


def run_relion(args: argparse.Namespace) -> tuple[float, float | None, Path]:
    """RELION's 25 EM iterations. A run that was stopped (RELION at K 50 and 10,000 particles takes hours on
    2 cores, longer than a work session) goes on from its last finished iteration with ``--continue``; the
    wall time is then the sum over the segments, each up to the last iteration it finished (the unfinished
    iteration an interruption loses is not counted), and the CPU time is known only if no segment was cut.
    A finished run with the same K and mask is reused (delete Relion/ to time it again)."""
    rel = Path("Relion")
    config = {"K": args.K, "diameter": args.diameter, "iter": RELION_ITER}
    record = json.loads((rel / "segments.json").read_text()) if (rel / "segments.json").exists() else {}
    done, last = _relion_done(rel) if record.get("config") == config else (0, 0.0)
    if done == 0:
        shutil.rmtree(rel, ignore_errors=True)
        rel.mkdir()
        record = {"config": config, "segments": []}
    segments = record["segments"]
    for seg in segments:
        if "wall_s" not in seg:  # cut short: count it up to its last finished iteration
            seg.update(wall_s=max(0.0, last - seg["start"]), cpu_s=None, to_iter=done)
    common = ["--o", "Relion/run", "--iter", str(RELION_ITER), "--j", str(os.cpu_count() or 1), "--pool", "30",
              "--dont_combine_weights_via_disc"]
    if done:
        cmd = ["relion_refine", "--continue", f"Relion/run_it{done:03d}_optimiser.star", *common]
    else:
        cmd = ["relion_refine", "--i", "Extract/job001/particles.star", "--K", str(args.K), "--tau2_fudge", "2",
               "--particle_diameter", str(args.diameter), "--ctf", "--zero_mask", "--flatten_solvent",
               "--center_classes", "--psi_step", "12", "--offset_range", "5", "--offset_step", "2",
               "--oversampling", "1", "--norm", "--scale", *common]
    if done < RELION_ITER:
        logging.info("running %s", " ".join(cmd))
        segments.append({"start": time.time(), "from_iter": done})
        (rel / "segments.json").write_text(json.dumps(record))
        t, c = time.perf_counter(), children_cpu()
        with open(rel / "run.out", "a") as so, open(rel / "run.err", "a") as se:
            subprocess.run(cmd, stdout=so, stderr=se, check=True)
        segments[-1].update(wall_s=time.perf_counter() - t, cpu_s=children_cpu() - c, to_iter=RELION_ITER)
        (rel / "segments.json").write_text(json.dumps(record))
    else:
        logging.info("RELION already finished in %s: its times are reused (delete it to time it again)", rel.resolve())
    cpu = [seg["cpu_s"] for seg in segments]
    if len(segments) > 1:
        logging.info("RELION ran in %d segments (iterations %s)", len(segments),
                     ", ".join(f"{g['from_iter']}-{g['to_iter']}" for g in segments))
    return (sum(seg["wall_s"] for seg in segments), None if None in cpu else sum(cpu),
            rel / f"run_it{RELION_ITER:03d}_data.star")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="number of particles (default 10000)")
    ap.add_argument("--box", type=int, default=64, help="box size in pixels (default 64)")
    ap.add_argument("--angpix", type=float, default=3.0, help="pixel size in Å (default 3.0)")
    ap.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio of the particles (default 0.05)")
    ap.add_argument("--junk", type=float, default=0.2, help="fraction of junk particles (default 0.2)")
    ap.add_argument("--K", type=int, default=50, help="number of classes (default 50)")
    ap.add_argument("--diameter", type=float, default=160.0, help="mask diameter in Å (default 160)")
    ap.add_argument("--only", choices=("all", *PROGRAMS), default="all",
                    help="run one program; the others' last numbers on the same particles are reused (default all)")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="work directory (default benchmarks/out/class2d; elsewhere, the table goes there too)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    _simulate(out, args)
    os.chdir(out)
    labels = truth_labels(".")
    if args.only in ("all", "relion") and not shutil.which("relion_refine"):
        raise SystemExit("relion_refine is not on PATH: install RELION (apt-get install relion) or use --only vdam")
    for program in (PROGRAMS if args.only == "all" else (args.only,)):
        wall, cpu, data_star = run_relion(args) if program == "relion" else run_ours(args, program)
        row = {"program": PROGRAMS[program], "wall_s": wall, "cpu_s": cpu, **quality(data_star, labels, args.K)}
        if program == "relion":
            row["segments"] = len(json.loads(Path("Relion/segments.json").read_text())["segments"])
        Path(f"{program}.json").write_text(json.dumps(row))
    rows = {p: json.loads(Path(f"{p}.json").read_text()) for p in PROGRAMS if Path(f"{p}.json").exists()}
    write_table(rows, args, table_path("class2d.md", out, DEFAULT_OUT))


def write_table(rows: dict[str, dict], args: argparse.Namespace, path: Path) -> None:
    """The Markdown table (benchmarks/results/class2d.md for a run in the default work directory)."""
    lines = [f"# 2D classification: ours (VDAM, EM) vs RELION 3.1 EM ({args.n} particles, box {args.box}, "
             f"{args.angpix} Å/px, SNR {args.snr}, {100 * args.junk:.0f}% junk, K {args.K})", "",
             f"Same machine ({os.cpu_count()} cores), one program at a time. Purity: particles in their class's "
             "majority label (CFTR, adenylate kinase or junk); junk separation: junk particles in junk-led classes.",
             "", "| program | wall time (s) | CPU time (s) | purity | junk separation | non-empty classes |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        cpu = "n/a" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}"
        lines.append(f"| {r['program']} | {r['wall_s']:.0f} | {cpu} | {r['purity']:.3f} "
                     f"| {r['junk_separation']:.3f} | {r['non_empty']} |")
    cut = [r for r in rows.values() if r.get("segments", 1) > 1]
    if cut:
        lines += ["", f"{cut[0]['program']} was interrupted and went on with `--continue` ({cut[0]['segments']} "
                  "segments): its wall time is the sum over them, each up to its last finished iteration; its CPU "
                  "time is not known."]
    if "vdam" in rows:
        v = rows["vdam"]
        ratios = [f"{rows[k]['wall_s'] / v['wall_s']:.1f}x faster than {rows[k]['program']}" for k in ("em", "relion")
                  if k in rows]
        if ratios:
            lines += ["", "VDAM (wall time): " + ", ".join(ratios)]
    lines += ["", "Reproduce: `python benchmarks/bench_class2d.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "only")) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    path.write_text(text)


if __name__ == "__main__":
    main()
