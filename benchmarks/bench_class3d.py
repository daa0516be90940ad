"""3D classification of adenylate kinase open (4AKE) vs closed (1AKE), 50/50: particles assigned right.

The reference is what a user would have: a consensus map of all particles, here the average of the two
states low-passed to --ini_high.  ``reconstruct class3d`` (EM, K 2, RELION's Class3D defaults otherwise)
classifies; the score is the fraction of particles whose class holds a majority of their own state
(class purity against the simulator's labels), with the wall time.

    python benchmarks/bench_class3d.py                    # 4,000 particles, SNR 0.05
    python benchmarks/bench_class3d.py --n 1000 --iter 10 # a quicker check

Outputs go to benchmarks/out/class3d/ (ignored by git); the table to benchmarks/results/class3d.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from reconstruct.backend import gpu_available
from reconstruct.class3d import Class3DOptions, class3d
from reconstruct.files import read_particles
from reconstruct.files.mrc import write_map
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles
from reconstruct.simulate.scoring import classification_quality, truth_labels

HERE = Path(__file__).resolve().parent
MODELS = (HERE.parent / "tests/data/4ake_adk_open.pdb.gz", HERE.parent / "tests/data/1ake_adk_closed.pdb.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--particle_diameter", type=float, default=84.0,
                   help="mask diameter (Å): the open state's LID and NMP domains reach ~70 Å")
    p.add_argument("--angpix", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--iter", type=int, default=25, help="EM iterations")
    p.add_argument("--ini_high", type=float, default=20.0)
    p.add_argument("--gpu", action="store_true", default=gpu_available())
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = HERE / "out/class3d"
    params = {k: getattr(args, k) for k in ("n", "box", "angpix", "snr")}
    if args.particle_diameter > args.box * args.angpix:
        p.error("--particle_diameter is larger than the box")
    stamp = out / "simulation.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == params):
        out.mkdir(parents=True, exist_ok=True)
        maps = [atomic_model_map(m, args.box, args.angpix) for m in MODELS]
        simulate_particles(maps, ParticleSimulation(n_particles=args.n, box=args.box, pixel_size=args.angpix,
                                                    snr=args.snr, max_offset=2 * args.angpix, seed=11), out)
        write_map(out / "consensus.mrc", (maps[0] + maps[1]) / 2, args.angpix)
        stamp.write_text(json.dumps(params))
    t = time.perf_counter()
    res = class3d(Class3DOptions(star=out / "Extract/job001/particles.star", out=out / "Class3D/job001",
                                 particle_diameter=args.particle_diameter, ref=out / "consensus.mrc",
                                 n_classes=2, algorithm="em", n_iter=args.iter, ini_high=args.ini_high,
                                 stepsize=1.0, inflate=1.0, gpu=args.gpu, project_dir=out))
    wall = time.perf_counter() - t
    classes = read_particles(res.data_star).data.rlnClassNumber.to_numpy()
    q = classification_quality(classes, truth_labels(out))
    dev = "GPU" if args.gpu else "CPU (2 cores)"
    table = "\n".join([
        "# 3D classification: adenylate kinase open vs closed", "",
        f"{args.n} particles (50% 4AKE open, 50% 1AKE closed), box {args.box}, {args.angpix} Å/px, SNR {args.snr}, "
        f"mask {args.particle_diameter:g} Å; "
        f"reference: the average of both states low-passed to {args.ini_high:g} Å; `reconstruct class3d` EM, K 2, "
        f"{args.iter} iterations, on {dev}.", "",
        f"    python benchmarks/bench_class3d.py --n {args.n} --snr {args.snr} --iter {args.iter}", "",
        "| particles assigned to their state's class | class sizes | wall time |", "|---|---|---|",
        f"| {100 * q['purity']:.1f}% | {', '.join(f'{100 * x:.0f}%' for x in res.class_distribution)} | "
        f"{wall:.0f} s |", ""])
    path = HERE / "results/class3d.md"
    path.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
