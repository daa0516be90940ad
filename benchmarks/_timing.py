"""CPU time of finished child processes, for benchmarks that run a peer program (RELION) as a subprocess."""

from __future__ import annotations

import resource


def children_cpu() -> float:
    """User + system CPU seconds of finished child processes (mpirun and its ranks)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime
