"""3D auto-refine, ours against RELION 3.1, on the same simulated particles and the same cores.

Simulated CFTR (6MSM) particles with known poses; the initial reference is the truth low-passed to 30 Å.
Both programs run one after the other on this machine; the table reports each one's wall time and
their ratio, the FSC of each final map against the truth (resolution at 0.5), each gold-standard
resolution (FSC 0.143 of the half maps), and the median angular and shift errors of the poses.

    python benchmarks/bench_refine3d.py                         # the issue's set: 2,000 particles, box 96
    python benchmarks/bench_refine3d.py --n 300 --box 48 --angpix 3.5   # a quick check
    python benchmarks/bench_refine3d.py --only ours             # re-run one program on the same particles

The simulated set is kept and reused while its parameters stay the same; each program's numbers are
kept in OUT/<program>.json, so the table can combine a RELION run with a later run of ours.
Outputs go to benchmarks/out/refine3d/ (ignored by git); the table to benchmarks/results/refine3d.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from autoproc.demo import demo_model_path
from reconstruct.files import read_map, read_particles, read_star, write_map
from reconstruct.fourier import lowpass_filter
from reconstruct.fsc import fsc, resolution_at
from reconstruct.geometry import angle_between
from reconstruct.particles import origins_px, rotations
from reconstruct.refine3d import Refine3DOptions, refine3d
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles


def pose_errors(star: Path, truth: Path, px: float) -> tuple[float, float]:
    """Median angular error (degrees) and shift error (Å) of refined poses against the truth."""
    est, tru = read_particles(star), read_particles(truth)
    ang = angle_between(rotations(est), rotations(tru))
    shift = np.hypot(*((origins_px(est, px) - origins_px(tru, px)) * px).T)
    return float(np.median(ang)), float(np.median(shift))


def _simulate(out: Path, args: argparse.Namespace) -> np.ndarray:
    """The simulated particles and the 30 Å reference in ``out`` (reused when the parameters match)."""
    params = {k: getattr(args, k) for k in ("n", "box", "angpix", "snr")}
    stamp = out / "simulation.json"
    truth = atomic_model_map(demo_model_path(), args.box, args.angpix)
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return truth
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    simulate_particles([truth], ParticleSimulation(n_particles=args.n, box=args.box, pixel_size=args.angpix,
                                                   snr=args.snr, max_offset=3 * args.angpix, seed=96), out)
    write_map(out / "ref30.mrc", lowpass_filter(truth, args.angpix, 30.0, ndim=3), args.angpix)
    stamp.write_text(json.dumps(params))
    return truth


def _row(name: str, wall: float, cpu: float, final_map: Path, gold: float, data_star: Path, truth: np.ndarray,
         px: float) -> dict:
    final, _ = read_map(final_map)
    ang, sh = pose_errors(data_star, Path("truth/particles_true.star"), px)
    r05 = resolution_at(fsc(final, truth), truth.shape[0], px, 0.5).angstrom
    return {"program": name, "wall_s": wall, "cpu_s": cpu, "fsc_truth_05": r05, "gold_0143": gold, "ang_err": ang,
            "shift_err": sh}


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (mpirun and its ranks)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def run_ours(args: argparse.Namespace, truth: np.ndarray) -> dict:
    """Our refine3d on the simulated set; its wall time and quality."""
    shutil.rmtree("Ours", ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    res = refine3d(Refine3DOptions(star=Path("Extract/job001/particles.star"), ref=Path("ref30.mrc"),
                                   out=Path("Ours"), particle_diameter=args.diameter, ini_high=30.0,
                                   offset_range=5, offset_step=1,
                                   auto_local_healpix_order=args.auto_local_healpix_order))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return _row("ours (reconstruct refine3d, NumPy)", wall, cpu, res.final_map, res.resolution, res.data_star, truth,
                args.angpix)


def run_relion(args: argparse.Namespace, truth: np.ndarray) -> dict:
    """RELION 3.1's auto-refine on the same particles with the same settings."""
    shutil.rmtree("Relion", ignore_errors=True)
    Path("Relion").mkdir()
    # 3 ranks (a leader and one worker per half) on however many cores there are, as RELION needs.
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
           "--o", "Relion/run", "--auto_refine",
           "--split_random_halves", "--i", "Extract/job001/particles.star", "--ref", "ref30.mrc",
           "--firstiter_cc", "--ini_high", "30", "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2",
           "--ctf", "--particle_diameter", str(args.diameter), "--flatten_solvent", "--zero_mask",
           "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order",
           str(args.auto_local_healpix_order), "--offset_range", "5", "--offset_step", "1", "--sym", "C1",
           "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1"]
    logging.info("running %s", " ".join(cmd))
    t, c = time.perf_counter(), _children_cpu()
    with open("Relion/run.out", "w") as so, open("Relion/run.err", "w") as se:
        subprocess.run(cmd, stdout=so, stderr=se, check=True)
    wall, cpu = time.perf_counter() - t, _children_cpu() - c
    model = read_star("Relion/run_model.star")
    gold = float(model["model_general"]["rlnCurrentResolution"].iloc[0])
    return _row("RELION 3.1 (mpirun -n 3 relion_refine_mpi)", wall, cpu, Path("Relion/run_class001.mrc"), gold,
                Path("Relion/run_data.star"), truth, args.angpix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
    ap.add_argument("--box", type=int, default=96, help="box size in pixels (default 96)")
    ap.add_argument("--angpix", type=float, default=2.0, help="pixel size in Å (default 2.0)")
    ap.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio of the images (default 0.05)")
    ap.add_argument("--diameter", type=float, default=150.0, help="mask diameter in Å (default 150)")
    ap.add_argument("--auto_local_healpix_order", type=int, default=4,
                    help="HEALPix order from which searches are local, both programs (default 4, RELION's)")
    ap.add_argument("--only", choices=("both", "ours", "relion"), default="both",
                    help="run only one program; the other's last numbers are reused (default both)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "refine3d"),
                    help="work directory (default benchmarks/out/refine3d)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    truth = _simulate(out, args)
    os.chdir(out)
    if args.only in ("both", "ours"):
        Path("ours.json").write_text(json.dumps(run_ours(args, truth)))
    if args.only in ("both", "relion"):
        if not shutil.which("relion_refine_mpi"):
            raise SystemExit("relion_refine_mpi is not on PATH: install RELION (apt-get install relion) or use "
                             "--only ours")
        Path("relion.json").write_text(json.dumps(run_relion(args, truth)))
    rows = [json.loads(Path(f).read_text()) for f in ("ours.json", "relion.json") if Path(f).exists()]
    write_table(rows, args)


def write_table(rows: list[dict], args: argparse.Namespace) -> None:
    """The Markdown table of both programs (and their wall-time ratio) in benchmarks/results."""
    lines = [f"# 3D auto-refine: ours vs RELION 3.1 ({args.n} CFTR particles, box {args.box}, {args.angpix} Å/px, "
             f"SNR {args.snr})", "", f"Same machine ({os.cpu_count()} cores), one program at a time; "
             "reference = truth low-passed to 30 Å; auto-local HEALPix order "
             f"{args.auto_local_healpix_order} for both.", "",
             "| program | wall time (s) | CPU time (s) | FSC-vs-truth 0.5 (Å) | gold-standard 0.143 (Å) "
             "| median angular error (°) | median shift error (Å) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['wall_s']:.0f} | {r.get('cpu_s', float('nan')):.0f} "
                     f"| {r['fsc_truth_05']:.2f} | {r['gold_0143']:.2f} "
                     f"| {r['ang_err']:.2f} | {r['shift_err']:.2f} |")
    if len(rows) == 2:
        lines += ["", f"Wall-time ratio ours / RELION: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}"]
    lines += ["", "Reproduce: `python benchmarks/bench_refine3d.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "only")) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    res_dir = Path(__file__).resolve().parent / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "refine3d.md").write_text(text)


if __name__ == "__main__":
    main()
