"""3D auto-refine, ours against RELION 3.1, on the same simulated particles and the same cores.

Simulated CFTR (6MSM) particles with known poses; the initial reference is the truth low-passed to 30 Å.
Both programs run one after the other on this machine; the table reports each one's wall time and
their ratio, the FSC of each final map against the truth (resolution at 0.5), each gold-standard
resolution (FSC 0.143 of the half maps), and the median angular and shift errors of the poses.

    python benchmarks/bench_refine3d.py                         # the issue's set: 2,000 particles, box 96
    python benchmarks/bench_refine3d.py --n 300 --box 48 --angpix 3.5   # a quick check

Outputs go to benchmarks/out/refine3d/ (ignored by git); the table to benchmarks/results/refine3d.md.
"""

from __future__ import annotations

import argparse
import logging
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--angpix", type=float, default=2.0)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--diameter", type=float, default=150.0)
    ap.add_argument("--auto_local_healpix_order", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "refine3d"))
    ap.add_argument("--skip_relion", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    box, px = args.box, args.angpix
    truth = atomic_model_map(demo_model_path(), box, px)
    simulate_particles([truth], ParticleSimulation(n_particles=args.n, box=box, pixel_size=px, snr=args.snr,
                                                   max_offset=3 * px, seed=96), out)
    write_map(out / "ref30.mrc", lowpass_filter(truth, px, 30.0, ndim=3), px)
    os.chdir(out)
    rows = []
    common = dict(particle_diameter=args.diameter, ini_high=30.0, offset_range=5, offset_step=1,
                  auto_local_healpix_order=args.auto_local_healpix_order)
    t = time.perf_counter()
    ours = refine3d(Refine3DOptions(star=Path("Extract/job001/particles.star"), ref=Path("ref30.mrc"),
                                    out=Path("Ours"), **common))
    t_ours = time.perf_counter() - t
    final, _ = read_map(ours.final_map)
    ang, sh = pose_errors(ours.data_star, Path("truth/particles_true.star"), px)
    rows.append(("ours", t_ours, resolution_at(fsc(final, truth), box, px, 0.5).angstrom, ours.resolution, ang, sh))
    if not args.skip_relion and shutil.which("relion_refine_mpi"):
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
        t = time.perf_counter()
        with open("Relion/run.out", "w") as so, open("Relion/run.err", "w") as se:
            subprocess.run(cmd, stdout=so, stderr=se, check=True)
        t_rel = time.perf_counter() - t
        rel_map, _ = read_map("Relion/run_class001.mrc")
        model = read_star("Relion/run_model.star")
        rel_gold = float(model["model_general"]["rlnCurrentResolution"].iloc[0])
        ang_r, sh_r = pose_errors(Path("Relion/run_data.star"), Path("truth/particles_true.star"), px)
        rows.append(("RELION 3.1 (mpirun -n 3)", t_rel, resolution_at(fsc(rel_map, truth), box, px, 0.5).angstrom,
                     rel_gold, ang_r, sh_r))
    lines = [f"# 3D auto-refine: ours vs RELION 3.1 ({args.n} CFTR particles, box {box}, {px} Å/px, SNR {args.snr})",
             "", f"Same machine ({os.cpu_count()} cores), run one after the other; "
             "reference = truth low-passed to 30 Å.", "",
             "| program | wall time (s) | FSC-vs-truth 0.5 (Å) | gold-standard 0.143 (Å) "
             "| median angular error (°) | median shift error (Å) |", "|---|---:|---:|---:|---:|---:|"]
    for name, tm, r05, gold, a, s in rows:
        lines.append(f"| {name} | {tm:.0f} | {r05:.2f} | {gold:.2f} | {a:.2f} | {s:.2f} |")
    if len(rows) == 2:
        lines += ["", f"Wall-time ratio ours / RELION: {rows[0][1] / rows[1][1]:.2f}"]
    lines += ["", "Reproduce: `python benchmarks/bench_refine3d.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "skip_relion")) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    res_dir = Path(__file__).resolve().parent / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "refine3d.md").write_text(text)


if __name__ == "__main__":
    main()
