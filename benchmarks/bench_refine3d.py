"""3D auto-refine, ours (plain and with SSRI) against RELION 3.1, on the same simulated particles and cores.

Simulated particles with known poses; the initial reference is the truth low-passed to 30 Å. The
programs run one after the other on this machine; the table reports each one's wall and CPU time, the
FSC of each final map against the truth (resolution at 0.5), each gold-standard resolution (FSC 0.143
of the half maps), the median angular and shift errors of the poses and, with SSRI, the seconds SSRI
adds per iteration. Data sets (``--set``):

- ``cftr``: CFTR (6MSM), 2,000 particles, box 96, 2 Å/px, SNR 0.05 (the refinement issue's set);
- ``tcr``: a T-cell receptor bound to HLA (3KPR chains A-E), rigid and asymmetric, box 64, 3 Å/px;
- ``adk_flex``: adenylate kinase drawn evenly from 9 states on the straight path from open (4AKE) to
  closed (1AKE): a flexible particle; its truth is the mean of the states.

    python benchmarks/bench_refine3d.py                           # CFTR: ours and RELION
    python benchmarks/bench_refine3d.py --set adk_flex --only all   # ours, ours --ssri and RELION
    python benchmarks/bench_refine3d.py --n 300 --box 48 --angpix 3.5   # a quick check
    python benchmarks/bench_refine3d.py --only ours_ssri          # re-run one program on the same particles

The simulated set is kept and reused while its parameters stay the same; each program's numbers are
kept in OUT/<program>.json, so the table can combine a RELION run with a later run of ours.
Outputs go to benchmarks/out/refine3d[_SET]/ (ignored by git); the table to
benchmarks/results/refine3d[_SET].md.
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
from reconstruct.files import read_map, read_particles, read_star, write_map
from reconstruct.fourier import lowpass_filter
from reconstruct.fsc import fsc, resolution_at
from reconstruct.geometry import angle_between
from reconstruct.particles import origins_px, rotations
from reconstruct.refine3d import Refine3DOptions, refine3d
from reconstruct.simulate import ParticleSimulation, atomic_model_map, morph_maps, simulate_particles
from reconstruct.ssri import SsriOptions

HERE = Path(__file__).resolve().parent
TESTS_DATA = HERE.parent / "tests" / "data"

# name -> (description, defaults of n, box, angpix, snr, diameter)
DATASETS: dict[str, tuple[str, dict[str, float]]] = {
    "cftr": ("CFTR (6MSM)", {"n": 2000, "box": 96, "angpix": 2.0, "snr": 0.05, "diameter": 150.0}),
    "tcr": ("TCR-HLA complex (3KPR chains A-E)",
            {"n": 2000, "box": 64, "angpix": 3.0, "snr": 0.05, "diameter": 170.0}),
    "adk_flex": ("adenylate kinase, 9 states from open to closed",
                 {"n": 2000, "box": 64, "angpix": 1.5, "snr": 0.1, "diameter": 84.0}),
}
PROGRAMS = {"ours": "ours.json", "relion": "relion.json", "ours_ssri": "ours_ssri.json"}
OUTPUT_DIRS = {"ours": "Ours", "relion": "Relion", "ours_ssri": "OursSSRI"}


def fsc_crossing(curve: np.ndarray, box: int, px: float, threshold: float = 0.5) -> float:
    """Resolution (Å) where ``curve`` first falls below ``threshold``, linearly interpolated between
    shells (finer than the shell grid, which at box 64 steps by about 1 Å near 10 Å)."""
    below = np.nonzero(curve[1:] < threshold)[0]
    if not below.size:
        return 2 * px
    k = int(below[0]) + 1
    return box * px / (k - 1 + (curve[k - 1] - threshold) / (curve[k - 1] - curve[k]))


def truth_scores(final_map: Path, truth: np.ndarray, px: float) -> dict:
    """FSC of a final map against the truth: interpolated 0.5 crossing and mean over shells 3..N/3."""
    curve = fsc(read_map(final_map)[0], truth)
    return {"fsc_truth_05_interp": fsc_crossing(curve, truth.shape[0], px),
            "fsc_truth_band_mean": float(curve[3:truth.shape[0] // 3].mean())}


def truth_maps(name: str, box: int, px: float) -> list[np.ndarray]:
    """The map(s) particles of data set ``name`` are drawn from (one per state)."""
    if name == "cftr":
        return [atomic_model_map(demo_model_path(), box, px)]
    if name == "tcr":
        return [atomic_model_map(HERE / "data" / "3kpr.cif.gz", box, px, chains="ABCDE")]
    return morph_maps(TESTS_DATA / "4ake_adk_open.pdb.gz", TESTS_DATA / "1ake_adk_closed.pdb.gz", 9, box, px)


def pose_errors(star: Path, truth: Path, px: float) -> tuple[float, float]:
    """Median angular error (degrees) and shift error (Å) of refined poses against the truth."""
    est, tru = read_particles(star), read_particles(truth)
    ang = angle_between(rotations(est), rotations(tru))
    shift = np.hypot(*((origins_px(est, px) - origins_px(tru, px)) * px).T)
    return float(np.median(ang)), float(np.median(shift))


def _simulate(out: Path, args: argparse.Namespace) -> np.ndarray:
    """The simulated particles and the 30 Å reference in ``out`` (reused when the parameters match)."""
    params = {k: getattr(args, k) for k in ("n", "box", "angpix", "snr")}
    if args.set != "cftr":
        params["set"] = args.set
    stamp = out / "simulation.json"
    maps = truth_maps(args.set, args.box, args.angpix)
    truth = np.mean(maps, axis=0)  # what a reconstruction of all the particles should give
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return truth
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    simulate_particles(maps, ParticleSimulation(n_particles=args.n, box=args.box, pixel_size=args.angpix,
                                                   snr=args.snr, max_offset=3 * args.angpix, seed=96), out)
    write_map(out / "ref30.mrc", lowpass_filter(truth, args.angpix, 30.0, ndim=3), args.angpix)
    stamp.write_text(json.dumps(params))
    return truth


def _row(name: str, wall: float, cpu: float, final_map: Path, gold: float, data_star: Path, truth: np.ndarray,
         px: float, **extra: object) -> dict:
    final, _ = read_map(final_map)
    ang, sh = pose_errors(data_star, Path("truth/particles_true.star"), px)
    r05 = resolution_at(fsc(final, truth), truth.shape[0], px, 0.5).angstrom
    return {"program": name, "wall_s": wall, "cpu_s": cpu, "fsc_truth_05": r05, "gold_0143": gold, "ang_err": ang,
            "shift_err": sh, **extra}


def run_ours(args: argparse.Namespace, truth: np.ndarray, ssri: bool = False) -> dict:
    """Our refine3d (with SSRI's maximisation if ``ssri``) on the simulated set; its wall time and quality."""
    out = Path("OursSSRI" if ssri else "Ours")
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    res = refine3d(Refine3DOptions(star=Path("Extract/job001/particles.star"), ref=Path("ref30.mrc"),
                                   out=out, particle_diameter=args.diameter, ini_high=30.0,
                                   offset_range=5, offset_step=1,
                                   auto_local_healpix_order=args.auto_local_healpix_order,
                                   ssri=SsriOptions() if ssri else None))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    name = "ours + SSRI (reconstruct refine3d --ssri, NumPy)" if ssri else "ours (reconstruct refine3d, NumPy)"
    extra = {"iterations": res.iterations}
    if ssri:
        extra["ssri_s_per_iteration"] = float(np.mean(res.ssri_seconds))
        # the SSRI half maps themselves, against the truth: what the prior gives before the final join
        halves = [read_map(out / f"run_half{h}_class001_ssri.mrc")[0] for h in (1, 2)]
        extra["ssri_halves_fsc_truth_05"] = max(resolution_at(fsc(h, truth), truth.shape[0], args.angpix, 0.5).angstrom
                                                for h in halves)
    return _row(name, wall, cpu, res.final_map, res.resolution, res.data_star, truth, args.angpix, **extra)


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
    t, c = time.perf_counter(), children_cpu()
    with open("Relion/run.out", "w") as so, open("Relion/run.err", "w") as se:
        subprocess.run(cmd, stdout=so, stderr=se, check=True)
    wall, cpu = time.perf_counter() - t, children_cpu() - c
    model = read_star("Relion/run_model.star")
    gold = float(model["model_general"]["rlnCurrentResolution"].iloc[0])
    iters = max(int(p.name[6:9]) for p in Path("Relion").glob("run_it[0-9][0-9][0-9]_optimiser.star"))
    return _row("RELION 3.1 (mpirun -n 3 relion_refine_mpi)", wall, cpu, Path("Relion/run_class001.mrc"), gold,
                Path("Relion/run_data.star"), truth, args.angpix, iterations=iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=tuple(DATASETS), default="cftr",
                    help="simulated data set (default cftr); it sets the defaults of the next five options")
    ap.add_argument("--n", type=int, help="number of particles (default: the set's, 2000)")
    ap.add_argument("--box", type=int, help="box size in pixels (default: the set's; cftr 96, tcr and adk_flex 64)")
    ap.add_argument("--angpix", type=float, help="pixel size in Å (default: the set's; cftr 2.0, tcr 3.0, "
                    "adk_flex 1.5)")
    ap.add_argument("--snr", type=float, help="signal-to-noise ratio of the images (default: the set's; "
                    "cftr and tcr 0.05, adk_flex 0.1)")
    ap.add_argument("--diameter", type=float, help="mask diameter in Å (default: the set's; cftr 150, tcr 170, "
                    "adk_flex 84)")
    ap.add_argument("--auto_local_healpix_order", type=int, default=4,
                    help="HEALPix order from which searches are local, both programs (default 4, RELION's)")
    ap.add_argument("--only", choices=("both", "all", "table", *PROGRAMS), default="both",
                    help="which programs to run: both (ours and RELION), all (ours, RELION, ours --ssri), one, "
                         "or none (table: rebuild the table from the kept results); the others' last numbers on "
                         "the same particles are reused (default both)")
    ap.add_argument("--out", help="work directory (default benchmarks/out/refine3d for cftr, "
                    "benchmarks/out/refine3d_SET otherwise; elsewhere, the table goes there too)")
    args = ap.parse_args()
    for k, v in DATASETS[args.set][1].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    suffix = "" if args.set == "cftr" else f"_{args.set}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out or HERE / "out" / f"refine3d{suffix}").resolve()
    truth = _simulate(out, args)
    os.chdir(out)
    run = {"both": ("ours", "relion"), "all": ("ours", "relion", "ours_ssri"), "table": ()}.get(args.only,
                                                                                                 (args.only,))
    if "relion" in run and not shutil.which("relion_refine_mpi"):
        raise SystemExit("relion_refine_mpi is not on PATH: install RELION (apt-get install relion) or use "
                         "--only ours")
    for program in run:
        row = run_relion(args, truth) if program == "relion" else run_ours(args, truth, ssri=program == "ours_ssri")
        Path(PROGRAMS[program]).write_text(json.dumps(row))
    rows = [{**json.loads(Path(f).read_text()), **truth_scores(Path(OUTPUT_DIRS[p]) / "run_class001.mrc", truth,
                                                               args.angpix)}
            for p, f in PROGRAMS.items() if Path(f).exists() and (Path(OUTPUT_DIRS[p]) / "run_class001.mrc").exists()]
    write_table(rows, args, table_path(f"refine3d{suffix}.md", out, HERE / "out" / f"refine3d{suffix}"))


def write_table(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """The Markdown table of the programs (their time ratio, SSRI's gain) at ``path``."""
    nan = float("nan")
    lines = [f"# 3D auto-refine: ours vs RELION 3.1 ({args.n} particles of {DATASETS[args.set][0]}, box {args.box}, "
             f"{args.angpix} Å/px, SNR {args.snr})", "", f"Same machine ({os.cpu_count()} cores), one program at a "
             "time; reference = truth low-passed to 30 Å; auto-local HEALPix order "
             f"{args.auto_local_healpix_order} for all.", "",
             "| program | wall time (s) | CPU time (s) | iterations | FSC-vs-truth 0.5 (Å) | same, interpolated (Å) "
             "| mean FSC-vs-truth, shells 3..N/3 | gold-standard 0.143 (Å) | median angular error (°) "
             "| median shift error (Å) | SSRI s/iteration |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ssri = f"{r['ssri_s_per_iteration']:.1f}" if "ssri_s_per_iteration" in r else ""
        lines.append(f"| {r['program']} | {r['wall_s']:.0f} | {r.get('cpu_s', nan):.0f} | {r.get('iterations', '')} "
                     f"| {r['fsc_truth_05']:.2f} | {r['fsc_truth_05_interp']:.2f} | {r['fsc_truth_band_mean']:.3f} "
                     f"| {r['gold_0143']:.2f} | {r['ang_err']:.2f} | {r['shift_err']:.2f} | {ssri} |")
    by = {r["program"].split(" (")[0]: r for r in rows}
    if "ours" in by and "RELION 3.1" in by:
        o, r = by["ours"], by["RELION 3.1"]
        lines += ["", f"Ratio ours / RELION: wall time {o['wall_s'] / r['wall_s']:.2f}, "
                  f"CPU time {o.get('cpu_s', nan) / r.get('cpu_s', nan):.2f}"]
    if "ours + SSRI" in by:
        s = by["ours + SSRI"]
        gains = ", ".join(f"{by[k]['fsc_truth_05_interp'] - s['fsc_truth_05_interp']:+.2f} Å over {k}"
                          for k in ("ours", "RELION 3.1") if k in by)
        lines += ["", f"SSRI's FSC-vs-truth gain (interpolated 0.5 crossing): {gains} (positive: SSRI better). "
                  "Its regularised half maps "
                  f"(run_half?_class001_ssri.mrc) reach {s.get('ssri_halves_fsc_truth_05', nan):.2f} Å against the "
                  "truth; the gold-standard resolution is that of the plain half maps."]
    lines += ["", "Reproduce: `python benchmarks/bench_refine3d.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "only")) + " --only all`"]
    text = "\n".join(lines) + "\n"
    print(text)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
