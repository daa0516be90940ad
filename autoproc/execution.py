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
# Per-micrograph jobs that can be split into an array of tasks over their input table's rows.
ARRAY_JOBS = ("MotionCorr", "CtfFind", "AutoPick", "Extract")


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
    array_tasks: int = 0  # split per-micrograph jobs into this many array tasks (0 or 1: one task)
    array_parallelism: int = 4  # array tasks running at once

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
            params.update(cpus_per_task=res.cpus, tasks_per_node=1)
            if res.gpus > 0:
                params["gpus_per_node"] = res.gpus
            if res.partition:
                params["slurm_partition"] = res.partition
            if res.mem_gb:
                params["mem_gb"] = res.mem_gb
        elif res.gpus:
            params["gpus_per_node"] = res.gpus
        ex.update_parameters(**params)
        name = str(job_dir.relative_to(project))
        resume = resume_commands or commands
        chunks = self._array_chunks(commands, project, job_dir) if job_dir.parent.name in ARRAY_JOBS else []
        if chunks:
            # The array does the per-micrograph work; one more task (the continue commands) then finds
            # every micrograph done and writes the job's STAR file over all of them.
            cap = max(1, self.options.array_parallelism)
            if self.options.executor == "slurm":
                ex.update_parameters(slurm_array_parallelism=cap)
                waves = [chunks]
            else:  # submitit's local executor has no array cap: submit in waves of ``cap``
                waves = [chunks[i:i + cap] for i in range(0, len(chunks), cap)]
            for wave in waves:
                tasks = [CommandTask(c, [self._continued(x) for x in c], str(project.resolve()),
                                     str(job_dir.resolve())) for c in wave]
                with ex.batch():  # one SLURM job array; each task requeues on its own
                    pending = [ex.submit(t) for t in tasks]
                log.info("%s: %d array task(s) submitted (%s)", name, len(pending), self.options.executor)
                self._wait(pending, name, abort_files)
            commands = resume
        task = CommandTask(commands, resume, str(project.resolve()), str(job_dir.resolve()))
        job = ex.submit(task)
        log.info("%s: submitted as %s job %s", name, self.options.executor, job.job_id)
        self._wait([job], name, abort_files)

    def _wait(self, jobs: list[Any], name: str, abort_files: Sequence[Path]) -> None:
        """Wait for scheduler jobs; cancel them on an abort; a failed one raises :class:`JobFailed`."""
        try:
            while not all(j.done() for j in jobs):
                if any(f.exists() for f in abort_files):
                    for j in jobs:
                        j.cancel(check=False)
                    raise JobAborted(f"{name}/ aborted")
                time.sleep(self.options.poll_s)
        except KeyboardInterrupt:  # Ctrl-C: do not leave scheduler jobs writing into the project
            for j in jobs:
                j.cancel(check=False)
            raise
        for j in jobs:
            try:
                j.result()
            except Exception as err:  # submitit wraps the task's exception (FailedJobError, UncompletedJobError)
                text = str(err).strip().splitlines()
                hint = next((ln for ln in reversed(text) if "exited with" in ln or "Error" in ln),
                            text[-1] if text else "")
                raise JobFailed(hint.strip() or f"{name}/ failed in the scheduler") from None

    @staticmethod
    def _continued(cmd: Sequence[str]) -> list[str]:
        return list(cmd) if "--only_do_unfinished" in cmd else [*cmd, "--only_do_unfinished"]

    def _array_chunks(self, commands: Sequence[Sequence[str]], project: Path, job_dir: Path) -> list[list[list[str]]]:
        """Commands for each array task: the job's command on every n-th row of its input table."""
        n = self.options.array_tasks
        if n < 2 or len(commands) != 1 or "--i" not in commands[0]:
            return []
        from reconstruct.files.star import read_star, write_star

        cmd = list(commands[0])
        k = cmd.index("--i") + 1
        blocks = read_star(project / cmd[k])
        table = next((b for b in ("movies", "micrographs") if b in blocks), None)
        if table is None or len(blocks[table]) < 2:
            return []
        n = min(n, len(blocks[table]))
        out = []
        for i in range(n):
            part = job_dir / "array" / f"task{i + 1:03d}_{Path(cmd[k]).name}"
            write_star(part, {**blocks, table: blocks[table].iloc[i::n].reset_index(drop=True)})
            out.append([[*cmd[:k], str(part.relative_to(project)), *cmd[k + 1:]]])
        return out



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
