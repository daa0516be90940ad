"""``autoproc status``: where each scheme is, and every job's state and timing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .job_runner import job_status, read_record
from .scheme import Scheme
from .schemer import scheme_dir


@dataclass
class JobState:
    """One scheme job as the user sees it."""

    scheme: str
    node: str
    directory: str  # "" when it has not run
    status: str
    seconds: float  # wall time of all its launches
    launches: int


def job_states(project: Path, names: tuple[str, ...] = ("prep", "proc")) -> list[JobState]:
    """The jobs of the project's schemes in graph order with their status and wall time."""
    out = []
    for n in names:
        d = scheme_dir(project, n)
        if not (d / "scheme.star").exists():
            continue
        scheme = Scheme.read(d)
        for node, job in scheme.jobs.items():
            if not job.has_started or job.current_name == job.original_name:
                out.append(JobState(n, node, "", "not started", 0.0, 0))
                continue
            rec = read_record(project / job.current_name)
            launches = rec.get("launches", [])
            secs = sum(max(0.0, x.get("end", x["start"]) - x["start"]) for x in launches if "start" in x)
            out.append(JobState(n, node, job.current_name, job_status(project / job.current_name), secs,
                                len(launches)))
    return out


def status_text(project: Path) -> str:
    """A plain-text status report (``autoproc status DIR``)."""
    lines = [f"project {project.resolve()}"]
    for n in ("prep", "proc"):
        d = scheme_dir(project, n)
        if (d / "scheme.star").exists():
            lines.append(f"scheme {n}: at node {Scheme.read(d).current_node}")
    lines.append(f"{'scheme':7s} {'job':13s} {'directory':24s} {'status':12s} {'time':>8s}")
    for s in job_states(project):
        lines.append(f"{s.scheme:7s} {s.node:13s} {s.directory or '-':24s} {s.status:12s} {s.seconds:7.0f}s")
    return "\n".join(lines)
