"""The built-in demo end to end: timing per job, final resolution against the truth, and kill/resume.

1. ``autoproc run --demo`` uninterrupted: wall time of every job and the refined map's FSC with the truth.
2. The same run killed (SIGKILL to its whole process group, as a closed terminal or a node failure would)
   at ``--kills`` random moments, re-run after each kill, then to the end: the same final result, and no
   job that had finished is ever launched again (each job's ``autoproc_job.json`` lists its launches).

    python benchmarks/bench_demo.py [--fast] [--kills 5] [--seed 1] [--only full|kill]

Writes benchmarks/results/demo.md; projects under benchmarks/out/demo_* (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _cmd(project: Path, fast: bool) -> list[str]:
    cmd = [sys.executable, "-m", "autoproc.cli", "run", "--demo", "--o", str(project)]
    return cmd + (["--fast"] if fast else [])


def run_full(project: Path, fast: bool) -> tuple[float, int]:
    """Run the demo to the end; returns (wall seconds, exit status)."""
    start = time.monotonic()
    with open(project.parent / f"{project.name}.log", "w") as log:
        rc = subprocess.call(_cmd(project, fast), stdout=log, stderr=subprocess.STDOUT)
    return time.monotonic() - start, rc


def run_killed(project: Path, fast: bool, kill_times: list[float]) -> tuple[float, int, list[str]]:
    """Run, killing the whole process group after each of ``kill_times`` seconds, then run to the end."""
    start = time.monotonic()
    notes = []
    with open(project.parent / f"{project.name}.log", "w") as log:
        for t in kill_times:
            proc = subprocess.Popen(_cmd(project, fast), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(t)
                notes.append(f"finished before the kill at {t:.0f} s")
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                node = _current_nodes(project)
                notes.append(f"killed after {t:.0f} s at {node}")
        rc = subprocess.call(_cmd(project, fast), stdout=log, stderr=subprocess.STDOUT)
    return time.monotonic() - start, rc, notes


def _current_nodes(project: Path) -> str:
    from autoproc.scheme import Scheme

    out = []
    for n in ("prep", "proc"):
        d = project / "Schemes" / n
        if (d / "scheme.star").exists():
            out.append(f"{n}:{Scheme.read(d).current_node}")
    return ", ".join(out)


def job_table(project: Path) -> list[dict]:
    """Per job: directory, status, wall time, launches and whether a finished job was launched again."""
    from autoproc.job_runner import read_record
    from autoproc.status import job_states

    rows = []
    for s in job_states(project):
        rec = read_record(project / s.directory) if s.directory else {}
        launches = rec.get("launches", [])
        first_ok = next((i for i, x in enumerate(launches) if x.get("status") == "Succeeded"), None)
        relaunched = first_ok is not None and first_ok < len(launches) - 1
        rows.append({"scheme": s.scheme, "job": s.node, "dir": s.directory, "status": s.status,
                     "seconds": s.seconds, "launches": len(launches), "relaunched_after_success": relaunched})
    return rows


def result(project: Path) -> dict:
    """The demo's comparison with the truth (demo_result.json)."""
    path = project / "demo_result.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _summary(r: dict) -> str:
    nan = float("nan")
    return (f"Final map {r.get('map')}: FSC with the truth 0.5 at {r.get('resolution_fsc05', nan):.1f} Å, "
            f"0.143 at {r.get('resolution_fsc0143', nan):.1f} Å, CC {r.get('correlation', nan):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="the test suite's reduced demo settings")
    ap.add_argument("--kills", type=int, default=5, help="random kill moments")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=("full", "kill"), default=None)
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    tag = "fast" if a.fast else "full"
    lines = [f"# Demo end to end ({tag} settings)", "",
             f"`python benchmarks/bench_demo.py{' --fast' if a.fast else ''}` on {os.cpu_count()} cores.", ""]
    full = OUT / f"demo_{tag}"
    if a.only in (None, "full"):
        shutil.rmtree(full, ignore_errors=True)
        wall, rc = run_full(full, a.fast)
        r = result(full)
        lines += [f"## Uninterrupted: exit {rc}, {wall:.0f} s wall", "", _summary(r),
                  "", "| scheme | job | directory | status | wall (s) |", "|---|---|---|---|---:|"]
        total = 0.0
        for row in job_table(full):
            total += row["seconds"]
            lines.append(f"| {row['scheme']} | {row['job']} | {row['dir']} | {row['status']} | {row['seconds']:.0f} |")
        lines += [f"| | all jobs | | | {total:.0f} |", ""]
    if a.only in (None, "kill"):
        ref_wall = json.loads((OUT / f"demo_{tag}_wall.json").read_text())["wall"] \
            if (OUT / f"demo_{tag}_wall.json").exists() else 600.0
        if a.only is None:
            ref_wall = wall  # type: ignore[possibly-undefined]
        rng = np.random.default_rng(a.seed)
        times = sorted(rng.uniform(0.05, 0.9, a.kills) * ref_wall)
        gaps = list(np.diff([0.0, *times]))
        killed = OUT / f"demo_{tag}_killed"
        shutil.rmtree(killed, ignore_errors=True)
        wall_k, rc_k, notes = run_killed(killed, a.fast, [max(5.0, g) for g in gaps])
        rk = result(killed)
        rows = job_table(killed)
        redone = [r["job"] for r in rows if r["relaunched_after_success"]]
        lines += [f"## Killed {len(notes)} times, re-run each time: exit {rc_k}, {wall_k:.0f} s wall in all", ""]
        lines += [f"- {n}" for n in notes]
        lines += ["", _summary(rk),
                  f"Finished jobs launched again: {', '.join(redone) if redone else 'none'}", "",
                  "| job | directory | status | launches |", "|---|---|---|---:|"]
        lines += [f"| {r['job']} | {r['dir']} | {r['status']} | {r['launches']} |" for r in rows]
    if a.only == "full":
        (OUT / f"demo_{tag}_wall.json").write_text(json.dumps({"wall": wall}))  # type: ignore[possibly-undefined]
    (HERE / "results" / f"demo_{tag}{'_' + a.only if a.only else ''}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
