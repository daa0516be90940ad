"""3D classification of adenylate kinase open (4AKE) vs closed (1AKE), 50/50: ours against RELION 3.1.

The reference is what a user would have: a consensus map of all particles, here the average of the two
states low-passed to --ini_high.  ``reconstruct class3d`` (EM, K 2, RELION's Class3D defaults otherwise)
and RELION 3.1's ``relion_refine`` (Class3D: EM, K 2, T 4, the same sampling, mask, low-pass and number of
iterations) classify the same particles on the same cores, one after the other.  The score is the
fraction of particles whose class holds a majority of their own state (class purity against the
simulator's labels), with the median angular error of the particles' orientations and the wall time.

    python benchmarks/bench_class3d.py                    # 4,000 particles, SNR 0.05, both programs
    python benchmarks/bench_class3d.py --n 1000 --iter 10 # a quicker check
    python benchmarks/bench_class3d.py --only relion      # re-run one program on the same particles
    python benchmarks/bench_class3d.py --only bounds      # only what any classifier could reach on them

Three bounds from the truth go under the table: the two true maps at each particle's true pose (perfect
alignment), the Bayes classifier that knows everything but the orientations (no program can beat it on
average), and how well the true map itself orients the particles at the programs' sampling.

Outputs go to benchmarks/out/class3d/ (ignored by git); the table to benchmarks/results/class3d.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from _results import table_path
from _timing import children_cpu

from reconstruct.backend import gpu_available
from reconstruct.class3d import Class3DOptions, class3d
from reconstruct.files import read_particles, read_star, write_star
from reconstruct.files.mrc import write_map
from reconstruct.files.stack import ImageSource
from reconstruct.fourier import centred_fft, shift_images
from reconstruct.fsc import shell_index
from reconstruct.geometry import angle_between, euler_to_matrix
from reconstruct.likelihood import score_poses
from reconstruct.masks import soft_sphere
from reconstruct.particles import CtfSource
from reconstruct.projector import Projector
from reconstruct.sampling import orientations
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles
from reconstruct.simulate.scoring import classification_quality, truth_labels

HERE = Path(__file__).resolve().parent
MODELS = (HERE.parent / "tests/data/4ake_adk_open.pdb.gz", HERE.parent / "tests/data/1ake_adk_closed.pdb.gz")
PROGRAMS = {"ours": "ours (reconstruct class3d, EM)", "relion": "RELION 3.1 (relion_refine, Class3D EM)"}


def _simulate(out: Path, args: argparse.Namespace) -> None:
    params = {k: getattr(args, k) for k in ("n", "box", "angpix", "snr")}
    stamp = out / "simulation.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    maps = [atomic_model_map(m, args.box, args.angpix) for m in MODELS]
    simulate_particles(maps, ParticleSimulation(n_particles=args.n, box=args.box, pixel_size=args.angpix,
                                                snr=args.snr, max_offset=2 * args.angpix, seed=11), out)
    write_map(out / "consensus.mrc", (maps[0] + maps[1]) / 2, args.angpix)
    stamp.write_text(json.dumps(params))


def _run_dir(args: argparse.Namespace, program: str) -> str:
    """One output directory (and JSON row) per program and E-step limit."""
    return program + ("" if args.strict_highres_exp <= 0 else f"_e{args.strict_highres_exp:g}")


def run_ours(out: Path, args: argparse.Namespace) -> tuple[float, float, Path]:
    run_dir = out / _run_dir(args, "Ours")
    shutil.rmtree(run_dir, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    res = class3d(Class3DOptions(star=out / "Extract/job001/particles.star", out=run_dir,
                                 particle_diameter=args.particle_diameter, ref=out / "consensus.mrc",
                                 n_classes=2, algorithm="em", n_iter=args.iter, ini_high=args.ini_high,
                                 healpix_order=args.healpix_order, max_healpix_order=args.healpix_order,
                                 strict_highres_exp=args.strict_highres_exp, stepsize=1.0, inflate=1.0, gpu=args.gpu,
                                 project_dir=out))
    return time.perf_counter() - t, time.process_time() - c, res.data_star


def run_relion(out: Path, args: argparse.Namespace) -> tuple[float, float, Path]:
    name = _run_dir(args, "Relion")
    shutil.rmtree(out / name, ignore_errors=True)
    (out / name).mkdir()
    cmd = ["relion_refine", "--i", "Extract/job001/particles.star", "--o", f"{name}/run", "--ref", "consensus.mrc",
           "--ini_high", str(args.ini_high), "--K", "2", "--iter", str(args.iter), "--tau2_fudge", "4",
           "--particle_diameter", str(args.particle_diameter), "--ctf", "--zero_mask", "--flatten_solvent",
           "--firstiter_cc", "--healpix_order", str(args.healpix_order), "--offset_range", "6", "--offset_step", "2",
           "--oversampling", "1", "--sym", "C1", "--norm", "--scale", "--pad", "2", "--j", str(os.cpu_count() or 1),
           "--pool", "30", "--dont_combine_weights_via_disc", "--strict_highres_exp", str(args.strict_highres_exp)]
    logging.info("running %s", " ".join(cmd))
    t, c = time.perf_counter(), children_cpu()
    with open(out / name / "run.out", "w") as so, open(out / name / "run.err", "w") as se:
        subprocess.run(cmd, stdout=so, stderr=se, check=True, cwd=out)
    return time.perf_counter() - t, children_cpu() - c, out / name / f"run_it{args.iter:03d}_data.star"


def _orientation_errors(data: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Angle (degrees) between each particle's orientation and its true one (rows in the same order)."""
    def mats(t: pd.DataFrame) -> np.ndarray:
        return euler_to_matrix(t.rlnAngleRot.to_numpy(), t.rlnAngleTilt.to_numpy(), t.rlnAnglePsi.to_numpy())

    return angle_between(mats(truth), mats(data))


def score(out: Path, data_star: Path) -> dict:
    """Purity against the states and the median angular error of the orientations (degrees)."""
    data = read_particles(data_star).data
    truth = pd.read_csv(out / "truth/particles_truth.csv")
    q = classification_quality(data["rlnClassNumber"].to_numpy(), truth_labels(out))
    err = _orientation_errors(data, truth)
    sizes = np.bincount(data["rlnClassNumber"].to_numpy(int), minlength=3)[1:] / len(data)
    return {"purity": q["purity"], "sizes": sizes.tolist(), "angle_err": float(np.median(err))}


@dataclass
class _TrueModel:
    """The particles as the simulator made them: images shifted by their true offsets (masked, half
    transforms), CTFs, 1/sigma2 per frequency (noise power per shell from the residuals against the
    truth, zero beyond Nyquist) and the grey-scale of the projections, fitted by least squares."""

    x: np.ndarray  # (B, N, N/2+1)
    ctf: np.ndarray  # (B, N, N/2+1)
    inv_sigma2: np.ndarray  # (N, N/2+1)
    scale: float
    label: np.ndarray  # (B,) 0 open, 1 closed
    rotations: np.ndarray  # (B, 3, 3) true orientations
    projectors: list[Projector]  # of the true maps, open then closed


def _true_model(out: Path, args: argparse.Namespace) -> _TrueModel:
    table = read_particles(out / "Extract/job001/particles.star")
    truth = pd.read_csv(out / "truth/particles_truth.csv")
    src = ImageSource(table, out)
    box, px = src.box, src.pixel_size
    rows = np.arange(len(truth))
    imgs = np.concatenate([im for _, im in src.batches(512, rows)])
    offsets = (np.stack([truth.rlnOriginXAngst, truth.rlnOriginYAngst], 1) / px).astype(np.float32)
    x = centred_fft(shift_images(imgs, offsets) * soft_sphere((box, box), args.particle_diameter / (2 * px), 5.0),
                    2)
    c = CtfSource(table, box, px)(rows, np)
    rot = euler_to_matrix(truth.rlnAngleRot.to_numpy(), truth.rlnAngleTilt.to_numpy(), truth.rlnAnglePsi.to_numpy())
    projectors = [Projector(atomic_model_map(m, box, px)) for m in MODELS]
    label = truth.map_index.to_numpy(int)
    own = np.empty_like(x)  # each particle's true projection, CTF-modulated
    for k, proj in enumerate(projectors):
        own[label == k] = c[label == k] * proj.project(rot[label == k])
    scale = float((np.conj(own) * x).real.sum() / (np.abs(own) ** 2).sum())
    shell = np.minimum(shell_index((box, box), np), box // 2 + 1)
    resid = np.abs(x - scale * own) ** 2
    sigma2 = np.bincount(shell.ravel(), resid.mean(0).ravel()) / np.maximum(np.bincount(shell.ravel()), 1)
    inv_sigma2 = np.where(shell <= box // 2, 1.0 / np.maximum(sigma2[shell], 1e-30), 0.0).astype(np.float32)
    return _TrueModel(x, c, inv_sigma2, scale, label, rot, projectors)


def true_pose_bound(model: _TrueModel) -> float:
    """Fraction of particles a likelihood ratio between the two true maps, at each particle's true
    orientation and offset, assigns to its own state: what classification could reach if alignment
    were perfect."""
    dist = [((np.abs(model.x - model.scale * model.ctf * proj.project(model.rotations)) ** 2)
             * model.inv_sigma2).sum(axis=(1, 2)) for proj in model.projectors]
    return float(np.mean((dist[1] < dist[0]).astype(int) == model.label))


def marginal_bound(model: _TrueModel, healpix_order: int, batch: int = 2048) -> float:
    """Fraction of particles assigned to their own state by the Bayes classifier that knows both true
    maps, the noise, the CTFs and the offsets but not the orientations: p(image | state) summed over
    a uniform grid of orientations (HEALPix ``healpix_order`` x psi).  No program that has to find the
    orientations can do better on average, so this bounds any 3D classification of these images."""
    box = model.x.shape[1]
    mask = model.inv_sigma2 > 0
    zero = np.zeros((1, 2), np.float32)
    rots, _ = orientations(healpix_order)
    log_evidence = []
    for proj in model.projectors:
        acc = np.full(len(model.x), -np.inf)
        for s in range(0, len(rots), batch):
            cross, power = score_poses(model.x, model.ctf, proj.project(rots[s:s + batch]), zero, model.inv_sigma2,
                                       box, mask, terms=True)
            ll = model.scale * cross[:, :, 0].astype(np.float64) - model.scale**2 * power
            acc = np.logaddexp(acc, np.logaddexp.reduce(ll, axis=1))
        log_evidence.append(acc)
    return float(np.mean((log_evidence[1] > log_evidence[0]).astype(int) == model.label))


def true_reference_alignment(out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Median angular error (°) and fraction within 15° when the open-state particles are aligned
    (one EM pass of ``class3d``, K 1, the benchmark's sampling) against the true open map itself:
    how well any reference could orient these particles."""
    blocks = read_star(out / "Extract/job001/particles.star")
    truth = pd.read_csv(out / "truth/particles_truth.csv")
    sel = truth.map_index.to_numpy() == 0
    blocks["particles"] = blocks["particles"][sel].reset_index(drop=True)
    write_star(out / "open_particles.star", blocks)
    write_map(out / "open_truth.mrc", atomic_model_map(MODELS[0], args.box, args.angpix), args.angpix)
    res = class3d(Class3DOptions(star=out / "open_particles.star", out=out / "TrueReference",
                                 particle_diameter=args.particle_diameter, ref=out / "open_truth.mrc", n_classes=1,
                                 algorithm="em", n_iter=1, healpix_order=args.healpix_order,
                                 max_healpix_order=args.healpix_order, stepsize=1.0, inflate=1.0, gpu=args.gpu,
                                 project_dir=out))
    err = _orientation_errors(read_particles(res.data_star).data, truth[sel])
    return float(np.median(err)), float(np.mean(err < 15))


def marginal_order(args: argparse.Namespace) -> int:
    """HEALPix order of the Bayes bound's orientation grid: finer than the programs' sampling, at least 7.5°."""
    return max(3, args.healpix_order + 1)


def _bounds(out: Path, args: argparse.Namespace) -> dict:
    """The truth bounds, computed once per simulation, mask and sampling (kept in OUT/bounds.json); a
    bound missing from an older file is added."""
    key = {"particle_diameter": args.particle_diameter, "healpix_order": args.healpix_order}
    path = out / "bounds.json"
    bounds = json.loads(path.read_text()) if path.exists() else {}
    if bounds.get("key") != key:
        bounds = {"key": key}
    if "true_pose" not in bounds or "marginal" not in bounds:
        model = _true_model(out, args)
        bounds["true_pose"] = true_pose_bound(model)
        bounds["marginal"] = marginal_bound(model, marginal_order(args))
        bounds["marginal_order"] = marginal_order(args)
    if "true_reference" not in bounds:
        bounds["true_reference"] = true_reference_alignment(out, args)
    path.write_text(json.dumps(bounds))
    return bounds


def bound_lines(bounds: dict) -> list[str]:
    """The bounds, as the table's closing paragraphs."""
    med, within = bounds["true_reference"]
    step = 60 / 2 ** bounds["marginal_order"]
    return ["", "Upper bound at perfect alignment (a likelihood ratio between the two true maps at each particle's "
            f"true orientation and offset): {100 * bounds['true_pose']:.1f}% assigned to their own state.", "",
            "Upper bound for any classifier that has to find the orientations (Bayes: p(image | state) with the true "
            f"maps, noise, CTFs and offsets, summed over a {step:g}° grid of orientations): "
            f"{100 * bounds['marginal']:.1f}% assigned to their own state.", "",
            "Alignment against the truth itself (the open particles, one pass of `class3d` K 1 with the true "
            f"open map as reference, same sampling): median angular error {med:.1f}°, {100 * within:.0f}% within 15°."]


def _where(args: argparse.Namespace, out: Path) -> str:
    """The table's command line: --out and --table when they are not the defaults."""
    parts = "" if out == (HERE / "out/class3d").resolve() else f" --out {os.path.relpath(out, HERE.parent)}"
    return parts + (f" --table {args.table}" if args.table else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="number of particles (default 4000)")
    p.add_argument("--box", type=int, default=48, help="box size in pixels (default 48)")
    p.add_argument("--particle_diameter", type=float, default=84.0,
                   help="mask diameter (Å): the open state's LID and NMP domains reach ~70 Å (default 84)")
    p.add_argument("--angpix", type=float, default=2.0, help="pixel size in Å (default 2.0)")
    p.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio of the particles (default 0.05)")
    p.add_argument("--iter", type=int, default=25, help="EM iterations (default 25)")
    p.add_argument("--ini_high", type=float, default=20.0, help="low-pass of the consensus reference (Å; default 20)")
    p.add_argument("--healpix_order", type=int, default=2, help="angular sampling of both programs (default 2 = 15°)")
    p.add_argument("--strict_highres_exp", type=float, default=-1.0,
                   help="both programs align and classify on frequencies up to this resolution (Å; -1: all)")
    p.add_argument("--only", choices=("all", *PROGRAMS, "table", "bounds"), default="all",
                   help="run one program; the other's last numbers on the same particles are reused; 'table' only "
                        "rewrites the table; 'bounds' only computes and prints the truth bounds (default all)")
    p.add_argument("--gpu", action="store_true", default=gpu_available(), help="run ours on the GPU")
    p.add_argument("--out", default=str(HERE / "out/class3d"), help="work directory (default benchmarks/out/class3d)")
    p.add_argument("--table", default=None,
                   help="where the Markdown table goes (default benchmarks/results/class3d.md for the default "
                        "--out, else OUT/class3d.md)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.particle_diameter > args.box * args.angpix:
        p.error("--particle_diameter is larger than the box")
    out = Path(args.out).resolve()
    _simulate(out, args)
    if args.only == "bounds":
        print("\n".join(bound_lines(_bounds(out, args))).strip())
        return
    if args.only in ("all", "relion") and not shutil.which("relion_refine"):
        raise SystemExit("relion_refine is not on PATH: install RELION (apt-get install relion) or use --only ours")
    for program in (PROGRAMS if args.only == "all" else () if args.only == "table" else (args.only,)):
        wall, cpu, data_star = run_relion(out, args) if program == "relion" else run_ours(out, args)
        row = {"program": PROGRAMS[program], "wall_s": wall, "cpu_s": cpu, "iter": args.iter,
               "healpix_order": args.healpix_order, "e_step_limit": args.strict_highres_exp, **score(out, data_star)}
        (out / f"{_run_dir(args, program)}.json").write_text(json.dumps(row))
    rows = [json.loads(f.read_text()) for k in PROGRAMS for f in sorted(out.glob(f"{k}*.json"))]
    dev = "GPU" if args.gpu else f"CPU ({os.cpu_count()} cores)"
    lines = ["# 3D classification: adenylate kinase open vs closed", "",
             f"{args.n} particles (50% 4AKE open, 50% 1AKE closed), box {args.box}, {args.angpix} Å/px, "
             f"SNR {args.snr}, mask {args.particle_diameter:g} Å; reference: the average of both states low-passed to "
             f"{args.ini_high:g} Å; K 2, EM, on {dev}, one program at a time.", "",
             f"    python benchmarks/bench_class3d.py --n {args.n} --snr {args.snr} --box {args.box} --angpix "
             f"{args.angpix:g} --iter {args.iter} --healpix_order {args.healpix_order} --strict_highres_exp "
             f"{args.strict_highres_exp:g}{_where(args, out)}", "",
             "| program | iterations | HEALPix order | E-step limit (Å) | particles assigned to their state's class "
             "| class sizes | median angular error (°) | wall time (s) | CPU time (s) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        limit = r.get("e_step_limit", -1.0)
        lines.append(f"| {r['program']} | {r['iter']} | {r['healpix_order']} | {limit:g} | {100 * r['purity']:.1f}% | "
                     f"{', '.join(f'{100 * x:.0f}%' for x in r['sizes'])} | {r['angle_err']:.1f} | "
                     f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    lines += bound_lines(_bounds(out, args))
    table = "\n".join(lines) + "\n"
    (Path(args.table) if args.table else table_path("class3d.md", out, HERE / "out/class3d")).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
