"""Projection and back-projection throughput (slices per second) at box 64/128/256, batch 256.

Runs on NumPy, and on CuPy when a GPU is present.  Writes a Markdown table to
benchmarks/results/projector_<device>.md (the README links to it).

    python benchmarks/bench_projector.py [--boxes 64 128 256] [--batch 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from reconstruct.backend import get_xp, gpu_available
from reconstruct.geometry import random_rotations
from reconstruct.projector import BackProjector, Projector


def _sync(xp) -> None:
    if xp.__name__ == "cupy":
        xp.cuda.Stream.null.synchronize()


def bench(xp, box: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """(projector set-up s, projected slices/s, back-projected slices/s), best of ``repeats``."""
    rng = np.random.default_rng(0)
    vol = xp.asarray(rng.normal(size=(box, box, box)).astype(np.float32))
    mats = xp.asarray(random_rotations(batch, rng))
    t = time.perf_counter()
    pr = Projector(vol)
    _sync(xp)
    setup = time.perf_counter() - t
    best_p = best_b = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        ft = pr.project(mats)
        _sync(xp)
        best_p = min(best_p, time.perf_counter() - t)
        bp = BackProjector(box, xp=xp)
        t = time.perf_counter()
        bp.insert(ft, mats)
        _sync(xp)
        best_b = min(best_b, time.perf_counter() - t)
    return setup, batch / best_p, batch / best_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    devices = [("numpy", get_xp(False))]
    if gpu_available():
        devices.append(("cupy", get_xp(True)))
    for name, xp in devices:
        if name == "numpy":
            where = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        else:
            where = "GPU: " + xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        rows = [f"# Projector throughput ({name})", "", f"{where}; batch {args.batch}; padding 2, trilinear; "
                "float32; best of " f"{args.repeats}.", "",
                "| box | projector set-up (s) | projection (slices/s) | back-projection (slices/s) |",
                "|---:|---:|---:|---:|"]
        for box in args.boxes:
            setup, p, b = bench(xp, box, args.batch, args.repeats)
            rows.append(f"| {box} | {setup:.2f} | {p:,.0f} | {b:,.0f} |")
            print(rows[-1], flush=True)
        out = Path(__file__).parent / "results" / f"projector_{name}.md"
        out.write_text("\n".join(rows) + "\n\nReproduce: `python benchmarks/bench_projector.py`\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
