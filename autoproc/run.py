"""``autoproc run``: the prep and proc schemes of a project, interleaved in one process until the work is done.

RELION runs ``relion_schemer`` once per scheme, each looping on its ``wait`` until ``exit_maxtime``.
Here one process gives each scheme a pass up to its ``wait`` in turn; when a round of passes ran no job
it sleeps ``wait_sec`` (watching for an abort) unless no more input can arrive, in which case the run is
complete. A killed run restarts where it stopped: the schemes' current nodes are in their
``scheme.star`` and finished jobs are recognised as up to date.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .job_runner import ABORT_NOW, run_commands
from .scheme import Scheme
from .schemer import PassResult, Schemer, scheme_dir, scheme_lock

log = logging.getLogger("autoproc")


@dataclass
class RunOutcome:
    """How a run ended: complete, failed, aborted or stopped at the maximum time."""

    state: str
    message: str = ""
    rounds: int = 0
    passes: list[tuple[str, PassResult]] = field(default_factory=list)


@contextlib.contextmanager
def _locks(project: Path, names: Sequence[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(scheme_lock(scheme_dir(project, n)))
        yield


def run_schemes(project: Path, names: Sequence[str] = ("prep", "proc"),
                input_complete: Callable[[], bool] = lambda: True, poll_s: float = 2.0,
                runner: Callable[..., None] = run_commands,
                after_pass: Callable[[str, PassResult], None] | None = None) -> RunOutcome:
    """Run the schemes until a round runs nothing and ``input_complete()``; see the module docstring."""
    project = Path(project)
    outcome = RunOutcome("complete")
    active = list(names)
    with _locks(project, names):
        for n in names:  # a new run: no stale abort request, and exit_maxtime counts from now (as RELION's)
            (scheme_dir(project, n) / ABORT_NOW).unlink(missing_ok=True)
            (scheme_dir(project, n) / ".maxtime_deadline").unlink(missing_ok=True)
        while active:
            outcome.rounds += 1
            ran = 0
            for n in list(active):
                result = Schemer(project, n, runner).run_pass()
                outcome.passes.append((n, result))
                if after_pass is not None:
                    after_pass(n, result)
                ran += result.jobs_run
                if result.state in ("failed", "aborted"):
                    outcome.state, outcome.message = result.state, result.message
                    log.error("%s", result.message)
                    return outcome
                if result.state == "exited":
                    log.info("%s", result.message)
                    active.remove(n)
            if ran == 0 and input_complete():
                outcome.message = "all input processed; nothing left to do"
                break
            if ran == 0 and active:
                wait = min(_wait_seconds(project, n) for n in active)
                log.info("waiting %.0f s for new input", wait)
                if _sleep_watching(project, active, wait, poll_s):
                    outcome.state, outcome.message = "aborted", "aborted while waiting"
                    return outcome
        else:
            outcome.state, outcome.message = "stopped", "every scheme reached its exit"
    return outcome


def _wait_seconds(project: Path, name: str) -> float:
    scheme = Scheme.read(scheme_dir(project, name))
    return float(scheme.get("wait_sec")) if scheme.kind_of("wait_sec") == "float" else 60.0


def _sleep_watching(project: Path, names: Sequence[str], seconds: float, poll_s: float) -> bool:
    """Sleep, returning early (True) when an abort is requested."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if any((scheme_dir(project, n) / ABORT_NOW).exists() for n in names):
            return True
        time.sleep(min(poll_s, max(0.0, end - time.monotonic())))
    return False


def request_abort(project: Path, names: Sequence[str] = ("prep", "proc")) -> list[str]:
    """``autoproc abort``: touch RELION_JOB_ABORT_NOW in each scheme and in its current job's directory."""
    touched = []
    for n in names:
        d = scheme_dir(project, n)
        if not (d / "scheme.star").exists():
            continue
        (d / ABORT_NOW).touch()
        touched.append(str((d / ABORT_NOW).relative_to(project)))
        scheme = Scheme.read(d)
        job = scheme.jobs.get(scheme.current_node)
        if job is not None and job.has_started and (project / job.current_name).is_dir():
            (project / job.current_name / ABORT_NOW).touch()
            touched.append(job.current_name + ABORT_NOW)
    return touched


def reset_schemes(project: Path, names: Sequence[str] = ("prep", "proc")) -> None:
    """``autoproc reset``: RELION's ``relion_schemer --reset`` on each scheme (job directories are kept)."""
    for n in names:
        d = scheme_dir(project, n)
        if (d / "scheme.star").exists():
            scheme = Scheme.read(d)
            scheme.reset()
            scheme.write()
            (d / ".maxtime_deadline").unlink(missing_ok=True)
