"""3D initial model without a reference: success rate over seeds on three simulated sets, with wall time.

Sets (simulated with known truth):
  cftr    CFTR (6MSM), C1
  sym     a C4 assembly of HIV protease dimers (training.corpus's hiv_c4), run in C1 and aligned to C4
  hetero  70% CFTR and 30% a different particle (TCR-HLA, 3KPR): the model should be CFTR's

Each run is ``reconstruct initialmodel`` (VDAM, K 3) with its own --random_seed; the initial model is then
aligned to the truth with ``align_maps`` (rotation, shift and hand).  Success: FSC >= 0.5 at 3x the pixel
size or better.  The issue's protocol is 10 seeds x 200 mini-batches per set; on a 2-core CPU that is
hours per set, so ``--seeds`` and ``--iter`` scale it down and the table says what was run.

    python benchmarks/bench_initialmodel.py --sets cftr sym hetero --seeds 10 --iter 200   # the full protocol
    python benchmarks/bench_initialmodel.py --sets cftr --seeds 3 --iter 100               # a 2-core check
    python benchmarks/bench_initialmodel.py --sets cftr --seeds 1 --relion                 # RELION 3.1 beside ours

``--relion`` runs RELION 3.1's InitialModel job (SGD with its GUI's defaults; 3.1 has no VDAM) after each of our
runs, same particles, seed and cores, scored the same way.  It is slow on a CPU: K 3 took ~2.5 min per SGD
iteration of 100-200 particles on 2 shared cores, and the job has 300 iterations.

Whether a set allows success at all is measured too: its "limit" is where the FSC between two half-set
reconstructions of the first map's particles *at their true poses* (masked to the particle) falls to 0.143, i.e.
where a perfectly filtered map of all of them would meet the truth at FSC 0.5.  A set whose limit is not
clearly finer than 3x the pixel size cannot be passed by any program (at SNR 0.1 and 2,000 particles CFTR's limit
is 12.8 Å, so the default is SNR 0.5 and 4,000 particles: 9.1 Å).

Outputs go to benchmarks/out/initialmodel/ (ignored by git; --out elsewhere); the table to
benchmarks/results/initialmodel.md, rewritten after every run, and every finished run (with its settings and the
code's commit) to benchmarks/results/initialmodel_runs.json, which later invocations read: the protocol accumulates
over sessions even when the work folder is not kept (the simulations are deterministic). Seeds run in turn across
the sets (seed 0 of each, then seed 1, ...). Stopped runs resume: seeds already scored are kept, and a cut seed
goes on from its last written mini-batch. Two invocations can share the cores: each run is locked while it runs,
so the other skips it and takes the next (--first_seed N starts from seed N); both write the same record and
table. ``--table_only`` rewrites the table from the record without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from _results import table_path
from _timing import children_cpu

from reconstruct.align_maps import align_maps
from reconstruct.backend import gpu_available
from reconstruct.class3d import Class3DOptions, class3d
from reconstruct.files.atomic import atomic_path
from reconstruct.files.mrc import read_map, write_map
from reconstruct.files.star import read_star, write_star
from reconstruct.fsc import fsc, resolution_at
from reconstruct.masks import soft_sphere
from reconstruct.reconstruct_job import ReconstructOptions, reconstruct_particles
from reconstruct.simulate import ParticleSimulation, simulate_particles
from training.corpus import protein_map

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "initialmodel"
SETS = {  # maps (first = the one the model should match), fractions, symmetry, particle diameter (Å)
    "cftr": (("cftr",), None, "C1", 160.0),
    "sym": (("hiv_c4",), None, "C4", 130.0),
    "hetero": (("cftr", "tcr_hla"), (0.7, 0.3), "C1", 170.0),
}


def _simulate(name: str, out: Path, args: argparse.Namespace) -> np.ndarray:
    proteins, fractions, _, _ = SETS[name]
    params = {"set": name, "n": args.n, "box": args.box, "angpix": args.angpix, "snr": args.snr}
    stamp = out / "simulation.json"
    truth = out / "truth_model.mrc"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return read_map(truth)[0]
    if out.is_dir() and any(_held(lock) for lock in out.glob("*_seed*.lock")):
        raise SystemExit(f"{out} holds runs of another invocation on other particles (not {params}): "
                         "give this one its own --out")
    shutil.rmtree(out, ignore_errors=True)  # runs on other particles must be neither kept nor continued
    out.mkdir(parents=True)
    maps = [protein_map(p, args.box, args.angpix) for p in proteins]
    simulate_particles(maps, ParticleSimulation(n_particles=args.n, box=args.box, pixel_size=args.angpix,
                                                snr=args.snr, fractions=fractions, max_offset=2 * args.angpix,
                                                seed=77), out)
    write_map(truth, maps[0], args.angpix)
    stamp.write_text(json.dumps(params))
    return maps[0]


def information_limit(name: str, out: Path, args: argparse.Namespace) -> float:
    """Resolution (Å) at which the masked FSC of two half-set reconstructions of the first map's particles
    at their true poses falls to 0.143: the finest FSC-0.5 match to the truth any program can reach here."""
    stamp = out / "limit.json"
    if stamp.exists():
        return json.loads(stamp.read_text())["limit_A"]
    true = read_star(out / "truth/particles_true.star")
    truth = pd.read_csv(out / "truth/particles_truth.csv")
    mine = set(truth.loc[truth["map_index"] == 0, "rlnImageName"])
    parts = true["particles"][true["particles"]["rlnImageName"].isin(mine)]
    halves = []
    for h in (0, 1):
        star = out / f"truth/half{h + 1}_true.star"
        write_star(star, {"optics": true["optics"], "particles": parts.iloc[h::2]})
        halves.append(reconstruct_particles(ReconstructOptions(star=star, out=out / f"truth/half{h + 1}_true.mrc",
                                                               project_dir=out)))
    mask = soft_sphere((args.box,) * 3, SETS[name][3] / 2 / args.angpix, 5.0, np)
    limit = resolution_at(fsc(halves[0] * mask, halves[1] * mask), args.box, args.angpix, 0.143).angstrom
    stamp.write_text(json.dumps({"limit_A": limit, "particles": len(parts)}))
    return limit


def _held(lock: Path) -> bool:
    """Whether another process holds ``lock`` (a run's :func:`_claim`)."""
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def prepare_set(name: str, args: argparse.Namespace) -> tuple[np.ndarray, float, list[dict]]:
    """One set's truth map, true-pose limit and the runs already scored with these settings; the set is
    prepared under a lock, so two invocations starting together simulate it once."""
    out = Path(args.out).resolve() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        truth = _simulate(name, out, args)
        limit = information_limit(name, out, args)
    logging.info("%s: true-pose limit %.1f Å (success needs %.1f Å)", name, limit, 3 * args.angpix)
    runs = out / "runs.json"  # this work folder's runs (kept before the record below existed)
    local = [{**r, "settings": _settings(args)} for r in (json.loads(runs.read_text()) if runs.exists() else [])]
    record = _read_record(args)
    kept = {_key(r) for r in record}
    known = record + [r for r in local if _key(r) not in kept]
    return truth, limit, _matching(known, [name], args)


def _matching(rows: list[dict], sets: list[str], args: argparse.Namespace) -> list[dict]:
    """The runs of ``sets`` made with this invocation's settings, mini-batches and device, seeds below --seeds."""
    return [r for r in rows if r["set"] in sets and r.get("settings") == _settings(args) and r["seed"] < args.seeds
            and (_program(r) == "relion" or (r.get("iter") == args.iter and r.get("gpu") == args.gpu))]


def _settings(args: argparse.Namespace) -> dict:
    """What makes a set's particles: the simulation is deterministic, so runs with equal settings share data."""
    return {"n": args.n, "box": args.box, "angpix": args.angpix, "snr": args.snr}


def _key(row: dict) -> tuple:
    return row["set"], row["seed"], _program(row), row.get("iter"), row.get("gpu"), json.dumps(row.get("settings"))


def _record_path(args: argparse.Namespace) -> Path:
    """Every finished run, kept with the table (benchmarks/results/ for the default --out), so the protocol's
    ~30 runs can accumulate over sessions whose work folders are not kept."""
    return table_path("initialmodel_runs.json", Path(args.out), DEFAULT_OUT)


def _read_record(args: argparse.Namespace) -> list[dict]:
    path = _record_path(args)
    return json.loads(path.read_text()) if path.exists() else []


@contextlib.contextmanager
def _record_lock(args: argparse.Namespace) -> Iterator[None]:
    """Hold the record's lock: several invocations may share the record and the table (one per core, say)."""
    with open(_record_path(args).with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _add_to_record(row: dict, args: argparse.Namespace) -> list[dict]:
    """Add (or replace) one finished run in the record, written atomically; call it holding
    :func:`_record_lock`. Returns the whole record."""
    path = _record_path(args)
    rows = [r for r in _read_record(args) if _key(r) != _key(row)] + [row]
    rows.sort(key=lambda r: (r["set"], r["seed"], _program(r), json.dumps(r.get("settings"))))
    _write_atomic(path, json.dumps(rows, indent=1) + "\n")
    return rows


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _claim(set_dir: Path, seed: int, program: str) -> Iterator[bool]:
    """Hold an exclusive lock on one run (set, seed, program) while it runs; yields False, holding nothing,
    when another invocation holds it, so two invocations on the same work folder never run the same seed."""
    set_dir.mkdir(parents=True, exist_ok=True)
    with open(set_dir / f"{program}_seed{seed}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _commit() -> str | None:
    """The code's git commit, stored with each run (results may change with the code); taken when the
    benchmark starts, since the code it runs is the code it imported then, with "+modified" when the
    working tree's reconstruct/ differs from that commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=HERE).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return f"{head}+modified" if git("status", "--porcelain", "--", "../reconstruct") else head or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_seed(name: str, seed: int, truth: np.ndarray, limit: float, args: argparse.Namespace) -> dict:
    """One seed of one set: wall time, FSC 0.5 resolution against the truth after alignment, success.

    A run that was stopped goes on from its last written mini-batch (``--continue``); its wall time is then
    the sum of its segments, each up to its last finished write-out (time lost to the interruption is not
    counted), its CPU time is not recorded, and its code is the commits of all segments ("a>b")."""
    out = Path(args.out).resolve() / name
    _, _, sym, diameter = SETS[name]
    job = out / f"InitialModel/seed{seed}"
    resume, spent, commits = _spent_before(job, args.iter, args.gpu)
    commits.append(args.commit or "?")
    start, cpu = time.time(), time.process_time()
    job.parent.mkdir(parents=True, exist_ok=True)
    (job.parent / f"seed{seed}.start").write_text(json.dumps({"start": start, "spent_s": spent, "iter": args.iter,
                                                              "gpu": args.gpu, "commits": commits}))
    res = class3d(Class3DOptions(star=out / "Extract/job001/particles.star", out=job, particle_diameter=diameter,
                                 n_iter=args.iter, align_sym=sym, seed=seed, gpu=args.gpu, project_dir=out,
                                 resume=resume))
    wall = spent + time.time() - start
    cpu = None if resume else time.process_time() - cpu
    model, _ = read_map(res.initial_model)
    al = align_maps(model, truth, args.angpix)
    resol = resolution_at(al.fsc, args.box, args.angpix, 0.5).angstrom
    row = {"set": name, "seed": seed, "iter": args.iter, "gpu": args.gpu, "wall_s": wall, "fsc05_A": resol,
           "cc": al.correlation, "mirrored": al.mirrored, "largest_class": float(res.class_distribution.max()),
           "resumed": resume, "limit_A": limit, "success": resol <= 3 * args.angpix + 1e-6, "cpu_s": cpu,
           "commit": ">".join(dict.fromkeys(commits))}
    logging.info("%s seed %d: %.0f s, FSC 0.5 at %.1f Å (CC %.3f) -> %s", name, seed, wall, resol, al.correlation,
                 "success" if row["success"] else "failure")
    return row


RELION_SGD = ["--sgd", "--denovo_3dref", "--sgd_ini_iter", "50", "--sgd_inbetween_iter", "200", "--sgd_fin_iter", "50",
              "--sgd_write_iter", "20", "--sgd_ini_resol", "35", "--sgd_fin_resol", "15", "--sgd_ini_subset", "100",
              "--sgd_fin_subset", "500", "--ctf", "--sym", "C1", "--flatten_solvent", "--zero_mask", "--pad", "1",
              "--skip_gridding", "--oversampling", "1", "--healpix_order", "1", "--offset_range", "6",
              "--offset_step", "2", "--dont_combine_weights_via_disc", "--pool", "3"]
"""RELION 3.1's InitialModel job (its GUI's defaults: SGD, 50 + 200 + 50 iterations on subsets of 100 then 500,
resolution cut at 35 then 15 Å, 15° sampling)."""


def run_relion_seed(name: str, seed: int, truth: np.ndarray, limit: float, args: argparse.Namespace) -> dict:
    """RELION 3.1's SGD initial model on the same particles and cores, K as ours, scored like ours: its most
    populated class after ``align_maps`` to the truth."""
    out = Path(args.out).resolve() / name
    _, _, _, diameter = SETS[name]
    job = out / f"Relion/seed{seed}"
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    cmd = ["relion_refine", "--i", "Extract/job001/particles.star", "--o", f"{job.relative_to(out)}/run",
           "--K", "3", "--particle_diameter", f"{diameter:g}", "--random_seed", str(seed + 1),
           "--j", str(os.cpu_count() or 1), *RELION_SGD]
    logging.info("%s seed %d: %s", name, seed, " ".join(cmd))
    t, c = time.perf_counter(), children_cpu()
    with open(job / "run.out", "w") as so, open(job / "run.err", "w") as se:
        subprocess.run(cmd, stdout=so, stderr=se, check=True, cwd=out)
    wall, cpu = time.perf_counter() - t, children_cpu() - c
    model_star = sorted(job.glob("run_it[0-9][0-9][0-9]_model.star"))[-1]
    classes = read_star(model_star)["model_classes"]
    largest = int(np.argmax(classes["rlnClassDistribution"].to_numpy()))
    model, _ = read_map(out / str(classes["rlnReferenceImage"].iloc[largest]))
    al = align_maps(model, truth, args.angpix)
    resol = resolution_at(al.fsc, args.box, args.angpix, 0.5).angstrom
    row = {"set": name, "seed": seed, "program": "relion", "iter": 300, "gpu": False, "wall_s": wall,
           "cpu_s": cpu, "fsc05_A": resol, "cc": al.correlation, "mirrored": al.mirrored,
           "largest_class": float(classes["rlnClassDistribution"].max()), "resumed": False, "limit_A": limit,
           "success": resol <= 3 * args.angpix + 1e-6}
    logging.info("%s seed %d, RELION: %.0f s, FSC 0.5 at %.1f Å (CC %.3f)", name, seed, wall, resol, al.correlation)
    return row


def _spent_before(job: Path, n_iter: int, gpu: bool) -> tuple[bool, float, list[str]]:
    """Whether a stopped run of ``job`` can go on (same mini-batches and device, an iteration written), the
    seconds it had spent up to its last written iteration (from its segment's start to that iteration's
    optimiser.star, the file class3d writes last and resumes from, plus earlier segments' time) and the
    commits its segments ran ("?" where not recorded)."""
    stamp = job.parent / f"{job.name}.start"
    seg = json.loads(stamp.read_text()) if stamp.exists() else {}
    written = sorted(job.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
    if not written or seg.get("iter") != n_iter or seg.get("gpu") != gpu:
        shutil.rmtree(job, ignore_errors=True)
        return False, 0.0, []
    return True, seg["spent_s"] + max(0.0, written[-1].stat().st_mtime - seg["start"]), seg.get("commits", ["?"])


def _program(row: dict) -> str:
    return row.get("program", "ours")


def _has_run(rows: list[dict], name: str, seed: int, program: str) -> bool:
    return any(r["set"] == name and r["seed"] == seed and _program(r) == program for r in rows)


def _table_rows(all_rows: list[dict], sets: list[str], program: str) -> list[str]:
    """One Markdown row per set with runs of ``program``: successes, FSC 0.5 and CC per seed, median wall time, and
    the commit of the code each seed ran ("?" where not recorded)."""
    lines = []
    for name in sets:
        rows = sorted((r for r in all_rows if r["set"] == name and _program(r) == program), key=lambda r: r["seed"])
        if not rows:
            continue
        ok = sum(r["success"] for r in rows)
        seeds = ", ".join(str(r["seed"]) for r in rows)
        resol = ", ".join(f"{r['fsc05_A']:.1f}" for r in rows)
        cc = ", ".join(f"{r['cc']:.2f}" for r in rows)
        limit = rows[0].get("limit_A")
        code = ", ".join(r.get("commit") or "?" for r in rows)
        shown = "n/a" if limit is None else f"{limit:.1f} Å"
        cpu = [r["cpu_s"] for r in rows if r.get("cpu_s") is not None]
        cpu_text = f"{np.median(cpu):.0f} s ({len(cpu)} of {len(rows)})" if cpu else "n/a"
        lines.append(f"| {name} | {shown} | {ok}/{len(rows)} | {seeds} | {resol} | {cc} |"
                     f" {np.median([r['wall_s'] for r in rows]):.0f} s | {cpu_text} | {code} |")
    return lines


def write_table(all_rows: list[dict], args: argparse.Namespace) -> Path:
    dev = "GPU" if args.gpu else "CPU (2 cores)"
    lines = ["# 3D initial model: success rate over seeds", "",
             f"Simulated sets of {args.n} particles, box {args.box}, {args.angpix} Å/px, SNR {args.snr}; "
             f"`reconstruct initialmodel` K 3, {args.iter} mini-batches, on {dev}. Success: after `align_maps` to "
             f"the truth, FSC >= 0.5 at {3 * args.angpix:.0f} Å (3x the pixel size) or better.", "",
             f"    python benchmarks/bench_initialmodel.py --sets {' '.join(args.sets)} --seeds {args.seeds} "
             f"--iter {args.iter} --n {args.n} --snr {args.snr}" + (" --gpu" if args.gpu else "")
             + (" --relion" if args.relion else ""), "",
             "True-pose limit: where the masked FSC of two half-set reconstructions of the model's particles at "
             "their true poses falls to 0.143 -- the finest FSC-0.5 match to the truth any program could reach on "
             "the set.", "",
             "| set | true-pose limit | successes | seeds | FSC 0.5 vs truth per seed (Å) | CC per seed | median wall "
             "time per run | median CPU time per run (runs) | code per seed |", "|---" * 9 + "|"]
    lines += _table_rows(all_rows, args.sets, "ours")
    relion = [r for r in all_rows if _program(r) == "relion" and r["set"] in args.sets]
    if relion:
        lines += ["", "RELION 3.1's InitialModel job on the same particles and cores (`relion_refine --sgd "
                  "--denovo_3dref`, its GUI's defaults: 50 + 200 + 50 SGD iterations on subsets of 100 then 500, "
                  "resolution cut at 35 then 15 Å; K 3 like ours, its most populated class scored the same way; "
                  "RELION 3.1 has no VDAM, and its 15 Å cut keeps it from 12 Å by design):", "",
                  "| set | true-pose limit | successes | seeds | FSC 0.5 vs truth per seed (Å) | CC per seed | median "
                  "wall time per run | median CPU time per run (runs) | code per seed | ours faster (wall, same "
                  "seeds) |", "|---" * 10 + "|"]
        ours = {(r["set"], r["seed"]): r["wall_s"] for r in all_rows if _program(r) == "ours"}
        for name in args.sets:
            pairs = [(r["wall_s"], ours[(name, r["seed"])]) for r in relion
                     if r["set"] == name and (name, r["seed"]) in ours]
            ratio = f"{np.median([a / b for a, b in pairs]):.1f}x" if pairs else "n/a"
            lines += [f"{line} {ratio} |" for line in _table_rows(all_rows, [name], "relion")]
    lines += ["", "Wall times depend on what else ran on the machine (two invocations share its cores when run as "
              "the docstring says); CPU time is each run's own, recorded since 2026-12-04 for runs not resumed. "
              "Code: the commit of the code each run used (\"a>b\": a stopped run resumed under newer code)."]
    resumed = sum(r.get("resumed", False) for r in all_rows if r["set"] in args.sets)
    if resumed:
        lines += ["", f"{resumed} run(s) were stopped and went on from their last written mini-batch: their wall time "
                  "is the sum of their segments, each up to its last write-out."]
    path = table_path("initialmodel.md", Path(args.out), DEFAULT_OUT)
    _write_atomic(path, "\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    p.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 make the table")
    p.add_argument("--first_seed", type=int, default=0,
                   help="run seeds from this one on (another invocation can run the lower ones on another core)")
    p.add_argument("--iter", type=int, default=200, help="VDAM mini-batches per run")
    p.add_argument("--n", type=int, default=4000, help="particles per set")
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--angpix", type=float, default=4.0)
    p.add_argument("--snr", type=float, default=0.5,
                   help="signal-to-noise ratio of the particles (the table gives what it allows: the true-pose limit)")
    p.add_argument("--gpu", action="store_true", default=gpu_available())
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="work directory (default benchmarks/out/initialmodel; elsewhere, the table goes there too)")
    p.add_argument("--relion", action="store_true",
                   help="after each of our runs, RELION 3.1's InitialModel job (SGD) on the same particles and seed")
    p.add_argument("--table_only", action="store_true",
                   help="rewrite the table from the record of finished runs and stop (nothing is run)")
    args = p.parse_args()
    if not 0 <= args.first_seed < args.seeds:
        p.error(f"--first_seed must be between 0 and --seeds - 1 ({args.seeds - 1})")
    if args.table_only:
        _write_table_from_record(args, args.sets)
        return
    if args.relion and not shutil.which("relion_refine"):
        p.error("--relion needs relion_refine on PATH (apt-get install relion)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.commit = _commit()
    sets = {name: prepare_set(name, args) for name in args.sets}
    rows = [r for _, _, done in sets.values() for r in done]
    with _record_lock(args):
        for row in rows:  # runs found only in a work folder's runs.json go into the record too
            _add_to_record(row, args)
    # Seed by seed across the sets, so a partial run (the protocol takes hours on a CPU) covers every set.
    programs = {"ours": run_seed, **({"relion": run_relion_seed} if args.relion else {})}
    for seed in range(args.first_seed, args.seeds):
        for name, (truth, limit, _) in sets.items():
            for program, run in programs.items():
                if _has_run(rows, name, seed, program):
                    continue
                with _claim(Path(args.out).resolve() / name, seed, program) as mine:
                    if not mine:
                        logging.info("%s seed %d (%s) is running in another invocation: skipped", name, seed, program)
                        continue
                    if _has_run(_matching(_read_record(args), [name], args), name, seed, program):
                        continue  # another invocation finished it meanwhile
                    row = run(name, seed, truth, limit, args)
                rows.append({"settings": _settings(args), "commit": args.commit, **row})
                # The table shows the record's runs, so it includes those another invocation finished meanwhile.
                with _record_lock(args):
                    rows = _matching(_add_to_record(rows[-1], args), list(sets), args)
                    print(f"table: {write_table(rows, args)}")
    _write_table_from_record(args, list(sets))


def _write_table_from_record(args: argparse.Namespace, sets: list[str]) -> None:
    with _record_lock(args):
        print(f"table: {write_table(_matching(_read_record(args), sets, args), args)}")


if __name__ == "__main__":
    main()
