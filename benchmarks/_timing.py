"""Shared by the benchmarks that run a peer program (RELION) as a subprocess: CPU time of finished child
processes, and one-row inputs for measuring a program's fixed start-up cost."""

from __future__ import annotations

import resource
from pathlib import Path


def children_cpu() -> float:
    """User + system CPU seconds of finished child processes (mpirun and its ranks)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def first_row_star(root: Path, name: str, table: str) -> str:
    """Write ``<stem>_first.star`` next to ``root/name``: its optics and the first row of ``table``, so a
    job on it measures a program's fixed cost (the job on all rows minus this one: the cost per row)."""
    from reconstruct.files import read_star, write_star

    blocks = read_star(root / name)
    out = name.replace(".star", "_first.star")
    write_star(root / out, {"optics": blocks["optics"], table: blocks[table].iloc[:1]})
    return out
