"""Executing a Scheme (RELION-4's ``relion_schemer --run``), with make-like re-runs.

The schemer walks the scheme's graph from its current node: operators set variables, jobs run in their
RELION job directories, ``scheme.star`` is rewritten after every node (so a killed run restarts at the
node it was on). Differences from RELION, on purpose:

- A job whose options and input files are unchanged since it last succeeded is not run again, so a
  re-run after a kill never re-does a finished job, and changing one job's parameters re-runs that job
  and, through their changed inputs, exactly the jobs that depend on it.
- An interrupted job (killed, failed or aborted) resumes in its own directory (``--continue`` /
  ``--only_do_unfinished``) when its options and inputs are unchanged.
- ``wait`` hands control back to the caller (:mod:`autoproc.run` interleaves the prep and proc schemes
  in one process and decides when to sleep and when all work is done).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from reconstruct.files.errors import InputError

from .job_runner import (
    ABORT_NOW,
    SUCCESS,
    JobAborted,
    JobFailed,
    JobRun,
    Signature,
    execute,
    read_record,
    run_commands,
    write_record,
)
from .job_star import JobStar, substitute
from .job_types import import_signature, job_type
from .operators import evaluate
from .pipeline import locked_pipeline
from .scheme import UNDEFINED, Scheme

log = logging.getLogger("autoproc")
# Jobs whose output lists the same items as their input (one corrected micrograph per movie, ...).
_PER_ITEM = ("MotionCorr", "CtfFind")
_RESUMABLE_ITERATIONS = ("relion.class2d", "relion.initialmodel", "relion.refine3d", "relion.class3d")


def _rows(path: Path) -> int | None:
    """Items in a movies/micrographs/particles/coordinate-files STAR file (None if it has no such table)."""
    from reconstruct.files.star import read_star

    if not path.exists():
        return None
    blocks = read_star(path)
    for table in ("movies", "micrographs", "particles", "coordinate_files"):
        if table in blocks:
            return len(blocks[table])
    return None


@dataclass
class PassResult:
    """What one pass of a scheme up to its next ``wait`` did."""

    state: str  # waiting | exited | failed | aborted
    jobs_run: int = 0
    message: str = ""


class SchemeLocked(InputError):
    """Another live process runs this scheme."""

    def __init__(self, directory: Path, holder: str) -> None:
        lock = directory.parent.parent / f".relion_lock_scheme_{directory.name}"
        who = f"process {holder}" if holder.isdigit() else "another program (the lock names no process)"
        super().__init__(directory, f"scheme {directory.name} is being run by {who}",
                         f"wait for it, stop it with 'autoproc abort', or delete {lock} if nothing runs")


def scheme_dir(project: Path, name: str) -> Path:
    """``Schemes/<name>/`` of a project."""
    return project / "Schemes" / name


def job_dir_lookup(project: Path) -> Callable[[str, str], str | None]:
    """Map ``(scheme, job)`` to the job's current directory, reading other schemes' scheme.star as needed."""
    cache: dict[str, Scheme] = {}

    def lookup(scheme_name: str, job: str) -> str | None:
        if scheme_name not in cache:
            d = scheme_dir(project, scheme_name)
            if not (d / "scheme.star").exists():
                return None
            cache[scheme_name] = Scheme.read(d)
        j = cache[scheme_name].jobs.get(job)
        if j is None or not j.has_started or j.current_name == j.original_name:
            return None
        return j.current_name

    return lookup


def lock_holder(directory: Path) -> str | None:
    """The live process holding a scheme's run lock (pid, or 'unknown' for a lock without one), else None."""
    lock = directory.parent.parent / f".relion_lock_scheme_{directory.name}"
    if not lock.is_dir():
        return None
    holder = (lock / "lock_scheme").read_text().strip() if (lock / "lock_scheme").exists() else ""
    if not holder.isdigit():
        return "unknown"
    return holder if _alive(int(holder)) and int(holder) != os.getpid() else None


@contextlib.contextmanager
def scheme_lock(directory: Path) -> Iterator[None]:
    """RELION's per-scheme run lock ``.relion_lock_scheme_NAME/lock_scheme``; a dead holder's lock is taken over."""
    name = directory.name
    lock = directory.parent.parent / f".relion_lock_scheme_{name}"
    try:
        lock.mkdir()
    except FileExistsError:
        holder = lock_holder(directory)
        if holder is not None:
            raise SchemeLocked(directory, holder) from None
        log.info("scheme %s: taking over the lock left by a stopped run", name)
    (lock / "lock_scheme").write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        (lock / "lock_scheme").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            lock.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Schemer:
    """Runs one scheme of a project."""

    def __init__(self, project: Path, name: str, runner: Callable[..., None] = run_commands) -> None:
        self.project = project
        self.name = name
        self.directory = scheme_dir(project, name)
        self.runner = runner

    @property
    def abort_file(self) -> Path:
        """Touching this stops the scheme (and its running job) at the next check."""
        return self.directory / ABORT_NOW

    def run_pass(self) -> PassResult:
        """Execute nodes until the next ``wait`` (passing through one at the start), an exit, or a failure."""
        scheme = Scheme.read(self.directory)
        node = scheme.current_node if scheme.current_node != UNDEFINED else scheme.start_node
        jobs_run = 0
        first = True
        while node != UNDEFINED:
            if self.abort_file.exists():
                scheme.current_node = node
                scheme.write()
                return PassResult("aborted", jobs_run, f"scheme {self.name} aborted at {node}")
            if node in scheme.operators:
                op = scheme.operators[node]
                if op.type == "wait":
                    if not first:
                        scheme.current_node = node
                        scheme.write()
                        return PassResult("waiting", jobs_run)
                elif op.type == "exit":
                    scheme.current_node = scheme.next_node(node)
                    scheme.write()
                    return PassResult("exited", jobs_run, f"scheme {self.name}: exit at {node}")
                elif op.type == "exit_maxtime":
                    if self._maxtime_passed(scheme, op.input1):
                        scheme.current_node = node
                        scheme.write()
                        return PassResult("exited", jobs_run, f"scheme {self.name}: maximum time reached")
                else:
                    try:
                        evaluate(op, scheme, self.project, self._resolver())
                    except (ValueError, KeyError, OSError) as err:
                        scheme.current_node = node
                        scheme.write()
                        return PassResult("failed", jobs_run, f"scheme {self.name}, operator {node}: {err}")
            elif node in scheme.jobs:
                scheme.current_node = node
                scheme.write()
                try:
                    ran = self._run_job(scheme, node)
                except JobAborted as err:
                    return PassResult("aborted", jobs_run, str(err))
                except (JobFailed, ValueError, KeyError) as err:
                    return PassResult("failed", jobs_run, f"scheme {self.name}, job {node}: {err}")
                except Exception as err:  # e.g. a STAR file that cannot be read, a pipeline lock held too long
                    return PassResult("failed", jobs_run, f"scheme {self.name}, job {node}: "
                                                          f"{type(err).__name__}: {err}")
                jobs_run += int(ran)
            else:
                return PassResult("failed", jobs_run, f"scheme {self.name}: unknown node {node!r}")
            first = False
            node = scheme.next_node(node)
            scheme.current_node = node
            scheme.write()
        return PassResult("exited", jobs_run, f"scheme {self.name}: reached the end of the graph")

    def _resolver(self) -> Callable[[str], str]:
        lookup = job_dir_lookup(self.project)

        def resolve(path: str) -> str:
            from .job_star import rewrite_scheme_paths
            return rewrite_scheme_paths(path, lookup)

        return resolve

    def _maxtime_passed(self, scheme: Scheme, hours_token: str) -> bool:
        """exit_maxtime: the deadline is set on the run's first pass (in a file that each new run removes)."""
        deadline_file = self.directory / ".maxtime_deadline"
        if not deadline_file.exists():
            hours = float(scheme.get(hours_token)) if scheme.kind_of(hours_token) else float(hours_token)
            deadline_file.write_text(f"{time.time() + hours * 3600.0}\n")
            return False
        return time.time() > float(deadline_file.read_text())

    def _run_job(self, scheme: Scheme, node: str) -> bool:
        """Run a job node if it is not up to date; returns whether anything ran."""
        sj = scheme.jobs[node]
        template = JobStar.read(self.directory / sj.original_name / "job.star")

        def variable(name: str) -> float | bool | str | None:
            return scheme.get(name) if scheme.kind_of(name) else None

        options = substitute(template.options, variable, job_dir_lookup(self.project))
        jt = job_type(template.type_label)
        label = jt.label(options)
        extra = import_signature(options, self.project) if jt.base == "relion.import" else []
        sig = Signature.of(label, options, self.project, jt.inputs(options), extra)
        previous = sj.current_name if sj.has_started and sj.current_name != sj.original_name else None
        record = read_record(self.project / previous) if previous else {}
        name, cont = None, False
        if previous and not record:  # killed before its first launch was recorded: start it in place
            name, cont = previous, False
        elif previous and record.get("options") == sig.options:
            done = (self.project / previous / SUCCESS).exists() and record.get("state") == "done"
            if done and record.get("inputs") == sig.inputs and not record.get("partial"):
                log.info("%s (%s): up to date", previous, node)
                return False
            if sj.mode == "continue":
                name, cont = previous, True
            elif not done and record.get("inputs") == sig.inputs:
                name, cont = previous, self._has_progress(jt.base, self.project / previous)
                log.info("%s (%s): resuming the interrupted job", previous, node)
        if name is None:
            with locked_pipeline(self.project) as pipe:  # the scheme records the new job before the lock goes
                name = pipe.add_job(jt.directory, label)
                sj.current_name, sj.has_started = name, True
                scheme.write()
        elif name == previous and record:
            cont = cont or sj.mode == "continue"
        log.info("%s (%s): %s", name, node, "continuing" if cont else "running")
        start = time.monotonic()
        execute(self.project, JobRun(jt, name, options, sig, cont), [self.abort_file], self.runner)
        if jt.directory in _PER_ITEM:
            self._mark_partial(jt.inputs(options), jt.outputs(options, name), self.project / name)
        log.info("%s (%s): finished in %.0f s", name, node, time.monotonic() - start)
        return True

    def _mark_partial(self, inputs: list[str], outputs: list[tuple[str, str]], job_dir: Path) -> None:
        """A per-micrograph job that listed fewer items than its input and made progress (e.g. capped by
        ``--do_at_most``) is marked partial, so the next pass runs it again instead of calling it up to date.
        No progress (micrographs skipped as unreadable) ends that: the run does not loop on bad files."""
        if not inputs or not outputs or not outputs[0][0].endswith(".star") or not inputs[0].endswith(".star"):
            return
        n_in, n_out = _rows(self.project / inputs[0]), _rows(self.project / outputs[0][0])
        record = read_record(job_dir)
        before = record.get("output_rows", -1)
        record["partial"] = bool(n_in is not None and n_out is not None and n_out < n_in and n_out > before)
        record["output_rows"] = n_out if n_out is not None else -1
        write_record(job_dir, record)

    @staticmethod
    def _has_progress(base: str, job_dir: Path) -> bool:
        """Whether an interrupted job left something to continue from (a written iteration)."""
        if base in _RESUMABLE_ITERATIONS:
            return any(job_dir.glob("run_it*_optimiser.star"))
        return True
