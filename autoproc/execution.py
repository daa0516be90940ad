"""Where a job's commands run: here as subprocesses, or as one scheduler job each through ``submitit``.

One pipeline job is one scheduler job on the shared file system (the project directory): submitit's
local executor by default (a separate process, with submitit's timeout and requeue handling), or SLURM
with a partition, GPUs, CPUs and a time limit per job type. A job that times out or is preempted is
requeued and continues from its last checkpoint: the requeued task runs the job's *continue* commands
(``--continue`` for classification and refinement, ``--only_do_unfinished`` for per-micrograph jobs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .job_runner import JobAborted, JobFailed, run_commands

log = logging.getLogger("autoproc")
EXECUTORS = ("local", "slurm", "subprocess")


@dataclass
class Resources:
    """What one job asks the scheduler for."""

    timeout_min: float = 24 * 60.0
    cpus: int = 2
    gpus: int = 0
    partition: str | None = None
    mem_gb: float | None = None


@dataclass
class ExecutionOptions:
    """How jobs are executed; ``per_type`` overrides resources by job directory (``Class2D``, ``MotionCorr``...)."""

    executor: str = "local"
    default: Resources = field(default_factory=Resources)
    per_type: dict[str, Resources] = field(default_factory=dict)
    max_requeue: int = 3
    poll_s: float = 1.0

    def resources(self, job_dir: Path) -> Resources:
        """The resources for a job directory like ``Class2D/job007``."""
        return self.per_type.get(job_dir.parent.name, self.default)


class CommandTask:
    """A picklable callable that runs a job's commands inside the scheduler job.

    submitit calls :meth:`checkpoint` when the job is about to time out or is preempted; the requeued
    task runs the job's continue commands, so the work done so far is kept.
    """

    def __init__(self, commands: Sequence[Sequence[str]], resume_commands: Sequence[Sequence[str]],
                 project: str, job_dir: str) -> None:
        self.commands = [list(c) for c in commands]
        self.resume_commands = [list(c) for c in resume_commands]
        self.project = project
        self.job_dir = job_dir

    def __call__(self) -> int:
        """Run the commands (raises on failure, so the scheduler job fails)."""
        job_dir = Path(self.job_dir)
        run_commands(self.commands, Path(self.project), job_dir, [job_dir / "RELION_JOB_ABORT_NOW"])
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue with the continue commands (submitit's Checkpointable protocol)."""
        import submitit

        log.info("%s: requeued; it will continue from its last checkpoint", self.job_dir)
        return submitit.helpers.DelayedSubmission(
            CommandTask(self.resume_commands, self.resume_commands, self.project, self.job_dir))


class SubmititRunner:
    """Runs each job's commands as one submitit job (local processes or SLURM) and waits for it."""

    def __init__(self, options: ExecutionOptions) -> None:
        if options.executor not in ("local", "slurm"):
            raise ValueError(f"SubmititRunner runs the local or slurm executor, not {options.executor!r}")
        self.options = options

    def __call__(self, commands: Sequence[Sequence[str]], project: Path, job_dir: Path,
                 abort_files: Sequence[Path] = (), resume_commands: Sequence[Sequence[str]] | None = None) -> None:
        import submitit

        res = self.options.resources(job_dir.relative_to(project))
        ex = submitit.AutoExecutor(folder=job_dir / "submitit", cluster=self.options.executor,
                                   slurm_max_num_timeout=self.options.max_requeue)
        params: dict[str, Any] = {"timeout_min": int(res.timeout_min), "name": str(job_dir.relative_to(project))}
        if self.options.executor == "slurm":
            params.update(cpus_per_task=res.cpus, gpus_per_node=res.gpus, tasks_per_node=1)
            if res.partition:
                params["slurm_partition"] = res.partition
            if res.mem_gb:
                params["mem_gb"] = res.mem_gb
        elif res.gpus:
            params["gpus_per_node"] = res.gpus
        ex.update_parameters(**params)
        task = CommandTask(commands, resume_commands or commands, str(project.resolve()), str(job_dir.resolve()))
        job = ex.submit(task)
        log.info("%s: submitted as %s job %s", job_dir.relative_to(project), self.options.executor, job.job_id)
        while not job.done():
            if any(f.exists() for f in abort_files):
                job.cancel(check=False)
                raise JobAborted(f"{job_dir.relative_to(project)}/ aborted")
            time.sleep(self.options.poll_s)
        try:
            job.result()
        except Exception as err:  # submitit wraps the task's exception (FailedJobError, UncompletedJobError)
            text = str(err).strip().splitlines()
            hint = next((ln for ln in reversed(text) if "exited with" in ln or "Error" in ln), text[-1] if text else "")
            raise JobFailed(hint.strip() or f"{job_dir.relative_to(project)}/ failed in the scheduler") from None


def make_runner(options: ExecutionOptions) -> Any:
    """The command runner for ``options.executor``."""
    if options.executor == "subprocess":
        return run_commands
    if options.executor not in EXECUTORS:
        raise ValueError(f"unknown executor {options.executor!r} (choose from {', '.join(EXECUTORS)})")
    return SubmititRunner(options)


def parse_resources(spec: Mapping[str, str], base: Resources) -> Resources:
    """``{"partition": "gpu", "gpus": "1", "timeout_min": "600"}`` on top of ``base``."""
    kw: dict[str, Any] = dict(base.__dict__)
    for k, v in spec.items():
        if k not in kw:
            raise ValueError(f"unknown resource {k!r} (known: {', '.join(kw)})")
        kw[k] = v if k == "partition" else float(v) if k in ("timeout_min", "mem_gb") else int(v)
    return Resources(**kw)
