"""The project's ``default_pipeline.star``: jobs (processes), their files (nodes) and the edges between them.

Kept current as jobs start and finish, in RELION 4's layout and with RELION's lock (the directory
``.relion_lock/`` holding ``lock_default_pipeline.star``), so RELION's GUI can open an autoproc project.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reconstruct.files.star import read_star, write_star

PIPELINE = "default_pipeline.star"
STATUSES = ("Running", "Scheduled", "Succeeded", "Failed", "Aborted")
_LEGACY_STATUS = {0: "Running", 1: "Scheduled", 2: "Succeeded", 3: "Failed", 4: "Aborted"}
LOCK_WAIT_S = 120.0


@dataclass
class Process:
    """One job of the pipeline."""

    name: str  # e.g. "Class2D/job008/"
    type_label: str
    status: str = "Running"
    alias: str = "None"


@dataclass
class Pipeline:
    """The whole of ``default_pipeline.star``."""

    job_counter: int = 1
    processes: list[Process] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)  # file -> node type label
    input_edges: list[tuple[str, str]] = field(default_factory=list)  # (node, process)
    output_edges: list[tuple[str, str]] = field(default_factory=list)  # (process, node)

    @classmethod
    def read(cls, project: Path) -> Pipeline:
        """Read the project's pipeline (a new, empty one when the file does not exist yet)."""
        path = project / PIPELINE
        if not path.exists():
            return cls()
        b = read_star(path)
        p = cls(job_counter=int(b["pipeline_general"].iloc[0]["rlnPipeLineJobCounter"]))
        for _, r in b.get("pipeline_processes", pd.DataFrame()).iterrows():
            status = r.get("rlnPipeLineProcessStatusLabel")
            if status is None or pd.isna(status):
                status = _LEGACY_STATUS.get(int(r.get("rlnPipeLineProcessStatus", 0)), "Running")
            label = r.get("rlnPipeLineProcessTypeLabel", r.get("rlnPipeLineProcessType", ""))
            p.processes.append(Process(str(r["rlnPipeLineProcessName"]), str(label), str(status),
                                       str(r.get("rlnPipeLineProcessAlias", "None"))))
        for _, r in b.get("pipeline_nodes", pd.DataFrame()).iterrows():
            p.nodes[str(r["rlnPipeLineNodeName"])] = str(r.get("rlnPipeLineNodeTypeLabel",
                                                                r.get("rlnPipeLineNodeType", "")))
        for _, r in b.get("pipeline_input_edges", pd.DataFrame()).iterrows():
            p.input_edges.append((str(r["rlnPipeLineEdgeFromNode"]), str(r["rlnPipeLineEdgeProcess"])))
        for _, r in b.get("pipeline_output_edges", pd.DataFrame()).iterrows():
            p.output_edges.append((str(r["rlnPipeLineEdgeProcess"]), str(r["rlnPipeLineEdgeToNode"])))
        return p

    def write(self, project: Path) -> None:
        """Write the pipeline atomically."""
        procs = self.processes
        write_star(project / PIPELINE, {
            "pipeline_general": {"rlnPipeLineJobCounter": self.job_counter},
            "pipeline_processes": pd.DataFrame({
                "rlnPipeLineProcessName": [q.name for q in procs],
                "rlnPipeLineProcessAlias": [q.alias for q in procs],
                "rlnPipeLineProcessTypeLabel": [q.type_label for q in procs],
                "rlnPipeLineProcessStatusLabel": [q.status for q in procs]}),
            "pipeline_nodes": pd.DataFrame({"rlnPipeLineNodeName": list(self.nodes),
                                            "rlnPipeLineNodeTypeLabel": list(self.nodes.values())}),
            "pipeline_input_edges": pd.DataFrame({"rlnPipeLineEdgeFromNode": [e[0] for e in self.input_edges],
                                                  "rlnPipeLineEdgeProcess": [e[1] for e in self.input_edges]}),
            "pipeline_output_edges": pd.DataFrame({"rlnPipeLineEdgeProcess": [e[0] for e in self.output_edges],
                                                   "rlnPipeLineEdgeToNode": [e[1] for e in self.output_edges]}),
        })

    def process(self, name: str) -> Process | None:
        """The process called ``name`` (with its trailing slash), if any."""
        return next((q for q in self.processes if q.name == name), None)

    def add_job(self, directory: str, type_label: str) -> str:
        """Register a new job ``<directory>/jobNNN/`` with the next number; returns its name."""
        name = f"{directory}/job{self.job_counter:03d}/"
        self.job_counter += 1
        self.processes.append(Process(name, type_label, "Running"))
        return name

    def set_status(self, name: str, status: str) -> None:
        """Set a job's status label."""
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        proc = self.process(name)
        if proc is not None:
            proc.status = status

    def connect(self, name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]) -> None:
        """Record a job's input and output nodes (file, node type label) and their edges."""
        for path, label in inputs:
            self.nodes.setdefault(path, label)
            if (path, name) not in self.input_edges:
                self.input_edges.append((path, name))
        for path, label in outputs:
            self.nodes[path] = label
            if (name, path) not in self.output_edges:
                self.output_edges.append((name, path))


@contextlib.contextmanager
def locked_pipeline(project: Path, timeout_s: float = LOCK_WAIT_S) -> Iterator[Pipeline]:
    """Read-modify-write the pipeline under RELION's lock; the changes are written on leaving the block."""
    lock_dir = project / ".relion_lock"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock_dir.mkdir()
            break
        except FileExistsError:
            if _stale(lock_dir):
                _remove_lock(lock_dir)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock_dir} has been held for over {timeout_s:.0f} s; if no RELION or autoproc "
                                   f"process is running in {project}, delete it and retry") from None
            time.sleep(0.2)
    (lock_dir / "lock_default_pipeline.star").write_text(f"{os.getpid()}\n")
    try:
        pipeline = Pipeline.read(project)
        yield pipeline
        pipeline.write(project)
    finally:
        _remove_lock(lock_dir)


def _stale(lock_dir: Path) -> bool:
    """A lock left by a process of ours that no longer exists (RELION's locks carry no pid: never stale)."""
    try:
        pid = int((lock_dir / "lock_default_pipeline.star").read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_lock(lock_dir: Path) -> None:
    (lock_dir / "lock_default_pipeline.star").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        lock_dir.rmdir()
