"""``autoproc``: the automated pipeline's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reconstruct.cli import run_command
from reconstruct.files.errors import InputError

if TYPE_CHECKING:
    from .shipped_schemes import Settings

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
log = logging.getLogger("autoproc")


def _cmd_demo_data(a: argparse.Namespace) -> None:
    from .demo import write_demo_data

    star = write_demo_data(a.o, a.movies, a.seed)
    print(f"demo movies written; import them from {star} (truth in {a.o}/truth)")


def _parse_sets(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--set proc/class2d:nr_classes=50`` -> {"proc/class2d": {"nr_classes": "50"}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        try:
            job, rest = item.split(":", 1)
            option, value = rest.split("=", 1)
        except ValueError:
            raise InputError(None, f"--set {item!r} is not SCHEME/JOB:OPTION=VALUE",
                             "e.g. --set proc/class2d:nr_classes=50") from None
        out.setdefault(job.strip(), {})[option.strip()] = value.strip()
    return out


def _settings(a: argparse.Namespace, project: Path) -> Settings:
    """The project's stored settings (first run: the demo's or relion_it.py's), changed by the flags given."""
    from .demo import demo_settings
    from .shipped_schemes import Settings, load_settings

    stored = load_settings(project)
    st = stored if stored is not None else demo_settings(fast=a.fast) if a.demo else Settings()
    given = {"movies": a.movies, "angpix": a.angpix, "voltage": a.kv, "cs": a.cs, "q0": a.q0,
             "dose_per_frame": a.dose, "gain": a.gain, "gain_rot": a.gain_rot, "gain_flip": a.gain_flip,
             "particle_diameter": a.diameter, "symmetry": a.sym, "class2d_classes": a.class2d_classes,
             "rank_threshold": a.rank_threshold, "min_particles_3d": a.min_particles_3d,
             "do_at_most": a.do_at_most, "wait_sec": a.wait_sec, "maxtime_hr": a.maxtime_hr}
    st = replace(st, **{k: v for k, v in given.items() if v is not None})
    if a.bin_factor is not None:
        st = replace(st, bin_factor=a.bin_factor)
    if a.gpu:
        st = replace(st, use_gpu=True)
    extra = {job: dict(opts) for job, opts in st.extra.items()}
    for job, opts in _parse_sets(a.set or []).items():
        extra.setdefault(job, {}).update(opts)
    return replace(st, extra=extra)


def _execution(a: argparse.Namespace):
    from .execution import ExecutionOptions, Resources, parse_resources

    base = Resources(timeout_min=a.timeout_min, cpus=a.cpus, gpus=a.gpus, partition=a.partition)
    per_type = {}
    for item in a.resources or []:
        try:
            jt, rest = item.split(":", 1)
            spec = dict(kv.split("=", 1) for kv in rest.split(","))
            per_type[jt.strip()] = parse_resources(spec, base)
        except ValueError as err:
            raise InputError(None, f"--resources {item!r}: {err}",
                             "write e.g. Class2D:partition=gpu,gpus=1,timeout_min=600") from None
    return ExecutionOptions(a.executor, base, per_type, a.max_requeue, array_tasks=a.array_tasks,
                            array_parallelism=a.array_parallelism)


def _cmd_run(a: argparse.Namespace) -> None:
    from .demo import compare_with_truth, write_demo_data
    from .run import run_schemes
    from .schemer import SchemeLocked, lock_holder, scheme_dir
    from .shipped_schemes import install_schemes, save_settings
    from .status import status_text

    project = Path(a.o)
    for name in ("prep", "proc"):  # before anything is touched: is another run at work here?
        holder = lock_holder(scheme_dir(project, name))
        if holder is not None:
            raise SchemeLocked(scheme_dir(project, name), holder)
    project.mkdir(parents=True, exist_ok=True)
    if a.demo:
        if not (project / "movies.star").exists():
            log.info("writing the demo data set (simulated CFTR movies) into %s", project)
            write_demo_data(project, a.max_movies)
    elif a.empiar:
        pass
    elif a.movies is None and not (project / "Schemes" / "prep" / "scheme.star").exists():
        raise InputError(None, "nothing to process", "give --demo, --empiar ID or --movies 'Movies/*.tif' "
                                                     "with the acquisition parameters")
    st = _settings(a, project)
    input_complete = lambda: not a.wait_for_movies  # noqa: E731
    download = None
    if a.empiar:
        from .empiar import EmpiarClient
        from .empiar_run import start_empiar

        overrides = {"pixel_size": a.angpix, "voltage": a.kv, "cs": a.cs, "amplitude_contrast": a.q0,
                     "symmetry": a.sym, "particle_diameter": a.diameter, "dose_per_frame": a.dose,
                     "gain_reference": a.gain, "gain_rot": a.gain_rot, "gain_flip": a.gain_flip}
        client = EmpiarClient(a.empiar_api, a.empiar_files)
        st, download = start_empiar(project, a.empiar, overrides, st, a.max_movies, a.download_workers, client)
        input_complete = download.finished
    install_schemes(project, st)
    save_settings(project, st)
    from .execution import make_runner

    runner = make_runner(_execution(a))
    outcome = run_schemes(project, input_complete=input_complete, runner=runner)
    from .report import refresh_report

    refresh_report(project, active=False)
    if download is not None and download.error is not None:
        print(f"autoproc run: the download stopped early: {download.error}", file=sys.stderr)
    print(status_text(project))
    if outcome.state != "complete":
        print(f"autoproc run: {outcome.state}: {outcome.message}", file=sys.stderr)
        raise SystemExit(1)
    if a.demo:
        maps = sorted(project.glob("Refine3D/job*/run_class001.mrc"))
        if not maps:
            print("autoproc run: the demo finished without a refined map (too few particles selected?); "
                  "see 'autoproc status' and the jobs' run.err", file=sys.stderr)
            raise SystemExit(1)
        r = compare_with_truth(project, maps[-1])
        refresh_report(project, active=False)
        print(f"refined map {r.map}: FSC with the truth 0.5 at {r.resolution_fsc05:.1f} Å, "
              f"0.143 at {r.resolution_fsc0143:.1f} Å (CC {r.correlation:.3f}); details in {project}/demo_result.json")


def _cmd_status(a: argparse.Namespace) -> None:
    from .status import status_text

    _require_project(Path(a.project))
    print(status_text(Path(a.project)))


def _cmd_abort(a: argparse.Namespace) -> None:
    from .run import request_abort

    _require_project(Path(a.project))
    for f in request_abort(Path(a.project)):
        print(f"touched {f}")


def _cmd_reset(a: argparse.Namespace) -> None:
    from .run import reset_schemes

    _require_project(Path(a.project))
    reset_schemes(Path(a.project), tuple(a.scheme) if a.scheme else ("prep", "proc"))
    print("schemes reset: variables to their reset values, jobs to not started (job directories are kept)")


def _require_project(project: Path) -> None:
    if not (project / "Schemes").is_dir():
        raise InputError(project, "no Schemes/ directory: not an autoproc project", "start one with 'autoproc run'")


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "run", formatter_class=HELP_FORMAT, help="process a data set from movies to a refined map",
        description="Install RELION-4's prep and proc schemes into the project directory --o (or keep the "
                    "ones there) and run them: import, motion correction, CTF estimation, micrograph selection "
                    "by CTF resolution, LoG picking, extraction, VDAM 2D classification, class ranking, VDAM "
                    "initial model, 3D auto-refine. Jobs are RELION job directories with default_pipeline.star; "
                    "run again after a kill or abort to continue; jobs whose options and inputs did not change "
                    "are not run again. Settings left unset take the demo's values with --demo, else "
                    "relion_it.py's defaults.")
    src = s.add_argument_group("what to process")
    src.add_argument("--o", required=True, help="project directory (created if needed)")
    src.add_argument("--demo", action="store_true",
                     help="the built-in simulated CFTR data set (no network), then the FSC of the map with the truth")
    src.add_argument("--fast", action="store_true", help="with --demo: smaller classification runs (for tests)")
    src.add_argument("--empiar", default=None, help="EMPIAR entry to download and process, e.g. 10288")
    src.add_argument("--empiar_api", default="https://www.ebi.ac.uk/empiar/api", help="EMPIAR API base URL")
    src.add_argument("--empiar_files", default="https://ftp.ebi.ac.uk/empiar/world_availability",
                     help="EMPIAR file tree base URL (or a mirror)")
    src.add_argument("--download_workers", type=int, default=4, help="parallel downloads")
    src.add_argument("--movies", default=None, help="movie pattern inside the project, e.g. 'Movies/*.tif'")
    src.add_argument("--max_movies", "--max-movies", dest="max_movies", type=int, default=None,
                     help="process only this many movies (demo: how many to simulate)")
    src.add_argument("--wait_for_movies", action="store_true",
                     help="keep waiting for new movies (on-the-fly) until --maxtime_hr instead of finishing")
    acq = s.add_argument_group("acquisition (default: the data set's, else required)")
    acq.add_argument("--angpix", type=float, default=None, help="movie pixel size (Å)")
    acq.add_argument("--kv", type=float, default=None, help="voltage (kV)")
    acq.add_argument("--cs", type=float, default=None, help="spherical aberration (mm)")
    acq.add_argument("--q0", type=float, default=None, help="amplitude contrast")
    acq.add_argument("--dose", type=float, default=None, help="dose per frame (e/Å^2)")
    acq.add_argument("--gain", default=None, help="gain reference inside the project")
    acq.add_argument("--gain_rot", type=int, default=None, help="gain rotation, RELION's 0-3 (x 90 degrees)")
    acq.add_argument("--gain_flip", type=int, default=None, help="gain flip, RELION's 0 none, 1 up-down, 2 left-right")
    acq.add_argument("--bin_factor", type=int, default=None, help="binning in motion correction (2 for super-res)")
    acq.add_argument("--diameter", type=float, default=None, help="longest particle diameter D (Å)")
    acq.add_argument("--sym", default=None, help="point group of the particle (initial model aligns to it)")
    proc = s.add_argument_group("processing")
    proc.add_argument("--class2d_classes", type=int, default=None, help="2D classes (relion_it.py: 100)")
    proc.add_argument("--rank_threshold", type=float, default=None, help="minimum class score (paper: 0.15)")
    proc.add_argument("--min_particles_3d", type=int, default=None,
                      help="selected particles needed before the 3D steps run (RELION: 5000)")
    proc.add_argument("--do_at_most", type=int, default=None, help="movies per motion-correction pass (RELION: 50)")
    proc.add_argument("--wait_sec", type=float, default=None, help="seconds between passes while waiting for movies")
    proc.add_argument("--maxtime_hr", type=float, default=None, help="stop after this many hours (RELION: 48)")
    proc.add_argument("--set", action="append", metavar="SCHEME/JOB:OPTION=VALUE",
                      help="set any job option, e.g. --set proc/class2d:nr_classes=50 (repeatable)")
    proc.add_argument("--gpu", action="store_true", help="run the GPU-capable jobs on the GPU")
    ex = s.add_argument_group("execution (one pipeline job = one scheduler job, through submitit)")
    ex.add_argument("--executor", choices=("local", "slurm", "subprocess"), default="local",
                    help="local: submitit's local executor; slurm: submit each job to SLURM (the project must be on "
                         "a shared file system); subprocess: plain child processes")
    ex.add_argument("--partition", default=None, help="SLURM partition for every job")
    ex.add_argument("--timeout_min", type=float, default=24 * 60.0,
                    help="time limit per job (minutes); a job that reaches it is requeued and continues")
    ex.add_argument("--cpus", type=int, default=2, help="CPUs per job")
    ex.add_argument("--gpus", type=int, default=0, help="GPUs per job")
    ex.add_argument("--resources", action="append", metavar="JOBTYPE:KEY=VALUE[,KEY=VALUE]",
                    help="per job type, e.g. --resources Class2D:partition=gpu,gpus=1,timeout_min=600 (repeatable; "
                         "keys: partition, gpus, cpus, timeout_min, mem_gb)")
    ex.add_argument("--max_requeue", type=int, default=3, help="requeues of a timed-out or preempted job")
    ex.add_argument("--array_tasks", type=int, default=0,
                    help="split each per-micrograph job (motion correction, CTF, picking, extraction) into this "
                         "many array tasks over its micrographs (0: one task)")
    ex.add_argument("--array_parallelism", type=int, default=4, help="array tasks running at once")
    s.set_defaults(func=_cmd_run)


def build_parser() -> argparse.ArgumentParser:
    """The ``autoproc`` argument parser."""
    p = argparse.ArgumentParser(prog="autoproc", formatter_class=HELP_FORMAT,
                                description="Automated cryo-EM processing, from movies to a refined map.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub)
    for name, func, text in (("status", _cmd_status, "show where each scheme is and every job's state and time"),
                             ("abort", _cmd_abort, "stop a running 'autoproc run' and its current job"),
                             ("reset", _cmd_reset, "reset the schemes (RELION's relion_schemer --reset)")):
        s = sub.add_parser(name, formatter_class=HELP_FORMAT, help=text, description=text)
        s.add_argument("project", help="project directory")
        if name == "reset":
            s.add_argument("--scheme", action="append", choices=("prep", "proc"), help="only this scheme")
        s.set_defaults(func=func)
    from .empiar import register as register_empiar
    from .report import register as register_report

    register_empiar(sub)
    register_report(sub)
    s = sub.add_parser("demo-data", formatter_class=HELP_FORMAT,
                       help="write the built-in simulated data set (CFTR movies with known truth)",
                       description="Simulate micrograph movies of CFTR (PDB 6MSM, shipped with the package) "
                                   "with drift, dose, CTF and noise; no network needed.")
    s.add_argument("--o", required=True, help="output project directory")
    s.add_argument("--movies", type=int, default=None, help="number of movies (default: the demo's 8)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: the demo's fixed seed)")
    s.set_defaults(func=_cmd_demo_data)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoproc`` console script."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
