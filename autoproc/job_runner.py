"""Running one pipeline job in its RELION job directory.

RELION's contract: ``job.star`` and ``note.txt`` in the directory, each command's output appended to
``run.out``/``run.err``, the exit markers ``RELION_JOB_EXIT_SUCCESS``/``_FAILURE``/``_ABORTED`` (stale
ones removed first), ``RELION_JOB_ABORT_NOW`` honoured, ``default_pipeline.star`` kept current. Ours on
top: ``autoproc_job.json`` records a signature of the options and of the input files, so a re-run
knows whether a finished job is still up to date, and an interrupted one resumes in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconstruct.files.atomic import atomic_write_text

from .job_star import JobStar
from .job_types import JobType
from .pipeline import PIPELINE, locked_pipeline

log = logging.getLogger("autoproc")

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
RECORD = "autoproc_job.json"
_PROGRAMS = {"reconstruct": "reconstruct.cli", "ranker": "ranker.cli", "autoproc": "autoproc.cli"}
_HASH_LIMIT = 64 * 2**20  # files above this are identified by size and mtime instead of content


class JobFailed(RuntimeError):
    """A job's command exited with an error; the message points at its run.err."""


class JobAborted(RuntimeError):
    """A job was aborted (``RELION_JOB_ABORT_NOW``)."""


def job_status(job_dir: Path) -> str:
    """RELION's status of a job directory from its exit markers."""
    if (job_dir / SUCCESS).exists():
        return "Succeeded"
    if (job_dir / FAILURE).exists():
        return "Failed"
    if (job_dir / ABORTED).exists():
        return "Aborted"
    return "Running" if (job_dir / RECORD).exists() else "Scheduled"


def file_signature(path: Path) -> str:
    """Content hash of an input file (size and mtime for very large ones); 'missing' if absent."""
    if not path.exists():
        return "missing"
    st = path.stat()
    if path.is_dir() or st.st_size > _HASH_LIMIT:
        return f"size={st.st_size};mtime={st.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class Signature:
    """What a job's result depends on: its type and options, and the contents of its inputs."""

    options: str
    inputs: str

    @classmethod
    def of(cls, label: str, options: dict[str, str], project: Path, inputs: Sequence[str],
           extra: Sequence[str] = ()) -> Signature:
        """The signature of running ``label`` with ``options`` on the given input files now."""
        return cls(_digest([label, options]),
                   _digest([[p, file_signature(project / p)] for p in inputs] + [list(extra)]))


def read_record(job_dir: Path) -> dict:
    """The job's ``autoproc_job.json`` (empty when absent or unreadable)."""
    try:
        return json.loads((job_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def write_record(job_dir: Path, record: dict) -> None:
    """Write the job's ``autoproc_job.json`` atomically."""
    atomic_write_text(job_dir / RECORD, json.dumps(record, indent=1))


def argv_for(cmd: Sequence[str]) -> list[str]:
    """The argv that runs one of our programs with this interpreter (no reliance on PATH)."""
    prog = cmd[0]
    if prog in _PROGRAMS:
        return [sys.executable, "-m", _PROGRAMS[prog], *cmd[1:]]
    return list(cmd)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGKILL when autoproc dies, so a killed run leaves no orphan writing files."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def run_commands(commands: Sequence[Sequence[str]], project: Path, job_dir: Path,
                 abort_files: Sequence[Path] = (), resume_commands: Sequence[Sequence[str]] | None = None,
                 poll_s: float = 0.5) -> None:
    """Run the commands one after another from ``project``, appending to run.out/run.err.

    Raises :class:`JobFailed` on a non-zero exit and :class:`JobAborted` when an abort file appears.
    ``resume_commands`` (what a requeued job would run) matter to schedulers only.
    """
    out_path, err_path = job_dir / "run.out", job_dir / "run.err"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for cmd in commands:
        with open(out_path, "ab") as out, open(err_path, "ab") as err:
            proc = subprocess.Popen(argv_for(cmd), cwd=project, stdout=out, stderr=err, env=env,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            while proc.poll() is None:
                if any(f.exists() for f in abort_files):
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    raise JobAborted(f"{job_dir.relative_to(project)}/ aborted by {ABORT_NOW}")
                time.sleep(poll_s)
        if proc.returncode != 0:
            raise JobFailed(f"{job_dir.relative_to(project)}/: '{shlex.join(cmd[:2])} ...' exited with "
                            f"{proc.returncode}: {_last_error(err_path)} (full log: "
                            f"{err_path.relative_to(project)})")


def _last_error(err_path: Path) -> str:
    lines = [ln for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no message"])[-1].strip()


@dataclass
class JobRun:
    """One launch of a job: where, what, and whether it continues an earlier launch."""

    job_type: JobType
    name: str  # e.g. "Class2D/job008/"
    options: dict[str, str]
    signature: Signature
    is_continue: bool


def execute(project: Path, run: JobRun, abort_files: Sequence[Path] = (),
            runner: Callable[..., None] = run_commands) -> None:
    """Run a job in its directory with RELION's markers and logs; the pipeline records its status and edges.

    ``runner`` runs the command list (the default runs subprocesses here; a scheduler-backed runner
    can be passed instead). Raises :class:`JobFailed` or :class:`JobAborted` after marking the job.
    """
    job_dir = project / run.name
    job_dir.mkdir(parents=True, exist_ok=True)
    for marker in (SUCCESS, FAILURE, ABORTED, ABORT_NOW):
        (job_dir / marker).unlink(missing_ok=True)
    JobStar(run.job_type.label(run.options), run.options, run.is_continue).write(job_dir / "job.star")
    commands = run.job_type.commands(run.options, run.name, run.is_continue)
    with open(job_dir / "note.txt", "a") as note:
        note.write(f"++++ Executing new job on {time.strftime('%a %b %d %H:%M:%S %Y')}\n")
        note.write("".join(f"++++ with the following command(s):\n{shlex.join(c)}\n" for c in commands))
        note.write("++++\n")
    record = read_record(job_dir) if run.is_continue else {}
    record.update(options=run.signature.options, inputs=run.signature.inputs, state="running",
                  label=run.job_type.label(run.options), commands=[shlex.join(c) for c in commands])
    record.setdefault("launches", []).append({"start": time.time()})
    write_record(job_dir, record)
    outputs = run.job_type.outputs(run.options, run.name)
    with locked_pipeline(project) as pipe:
        pipe.set_status(run.name, "Running")
        pipe.connect(run.name, [(p, pipe.nodes.get(p, _guess_label(p))) for p in run.job_type.inputs(run.options)],
                     outputs)
    _refresh_report(project)
    try:
        runner(commands, project, job_dir, [job_dir / ABORT_NOW, *abort_files],
               resume_commands=run.job_type.commands(run.options, run.name, True))
    except JobAborted:
        _finish(project, run.name, record, "Aborted", ABORTED)
        raise
    except Exception as err:  # the command's failure, or the scheduler's (submission refused, lock timeout...)
        with open(job_dir / "run.err", "a") as fh:
            fh.write(f"autoproc: {err}\n")
        _finish(project, run.name, record, "Failed", FAILURE)
        raise JobFailed(str(err) if isinstance(err, JobFailed) else f"{type(err).__name__}: {err}") from None
    missing = [p for p, _ in outputs if not (project / p).exists()]
    if missing:
        msg = f"{run.name}: finished but did not write {', '.join(missing)}"
        with open(job_dir / "run.err", "a") as fh:
            fh.write(f"autoproc: {msg}\n")
        _finish(project, run.name, record, "Failed", FAILURE)
        raise JobFailed(msg)
    record["state"] = "done"
    _finish(project, run.name, record, "Succeeded", SUCCESS)


def _finish(project: Path, name: str, record: dict, status: str, marker: str) -> None:
    job_dir = project / name
    record["launches"][-1]["end"] = time.time()
    record["launches"][-1]["status"] = status
    if status != "Succeeded":
        record["state"] = status.lower()
    write_record(job_dir, record)
    with locked_pipeline(project) as pipe:
        pipe.set_status(name, status)
    with contextlib.suppress(OSError):
        shutil.copy2(project / PIPELINE, job_dir / PIPELINE)
    (job_dir / marker).touch()
    _refresh_report(project)


def _refresh_report(project: Path) -> None:
    """Keep report.html current as jobs start and finish (it never raises)."""
    from .report import refresh_report

    refresh_report(project)


def _guess_label(path: str) -> str:
    """A node label for an input that no job of this project wrote (e.g. a user's reference map)."""
    if path.endswith(".mrc"):
        return "DensityMap.mrc"
    if "particles" in path:
        return "ParticlesData.star.relion"
    if "micrographs" in path:
        return "MicrographsData.star.relion"
    return "MicrographMoviesData.star.relion" if "movies" in path else "ProcessData.star.relion"
