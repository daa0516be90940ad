"""``autoproc report``: the project's HTML report, ``DIR/report.html``, rewritten as jobs finish.

One page, plain HTML and CSS (no scripts, no network resources): the schemes' state and every job's
status, wall time, launches and logs; then one section per step drawn from the jobs' own STAR and MRC
files (motion, CTF, picking, 2D classes with the ranker's scores and selection, initial model,
refinement with its FSC and the final map), plus any PNG a pre-processing job wrote. While a run holds
the schemes' locks the page reloads itself every ``refresh_s`` seconds.

Figures are PNG files in ``DIR/report/`` rather than inline base64: the page stays small and fast to
rewrite after every job, and a figure is redrawn only when the files it was drawn from change
(:class:`~autoproc.report_figures.FigureCache`); the pre-processing jobs' own PNGs are linked in place,
not copied. Each section is built on its own: an error in one (a half-written file) is logged and shown
in that section, and the rest of the report is still written.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from reconstruct.files.atomic import atomic_write_text

from .report_figures import FigureCache, natural_key
from .report_sections import (
    Context,
    class2d_section,
    ctf_section,
    esc,
    initial_model_section,
    motion_section,
    picking_section,
    refinement_section,
)

log = logging.getLogger("autoproc")
REPORT = "report.html"
FIGURES = "report"
REFRESH_S = 30

SECTIONS: tuple[tuple[str, str, Callable[[Context], str | None], str], ...] = (
    ("motion", "Motion correction", motion_section, "No motion correction job has written its micrographs yet."),
    ("ctf", "CTF estimation", ctf_section, "No CTF estimation job has written micrographs_ctf.star yet."),
    ("picking", "Picking and extraction", picking_section, "No picking or extraction job has written output yet."),
    ("class2d", "2D classes", class2d_section, "No 2D classification has written an iteration yet."),
    ("inimodel", "Initial model", initial_model_section, "No initial model job has written a map yet."),
    ("refine", "Refinement", refinement_section, "No 3D refinement has written a model yet."),
)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1d2329;
background:#f4f5f7}
header{background:#22313f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;font-size:13px;color:#c9d3dc}
nav{background:#fff;border-bottom:1px solid #dde1e6;padding:8px 24px;font-size:14px;position:sticky;top:0}
nav a{margin-right:16px;color:#22609c;text-decoration:none}
main{padding:8px 24px 40px;max-width:1240px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 18px;margin:16px 0}
h2{font-size:18px;margin:4px 0 10px} h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px} th,td{padding:4px 10px;border-bottom:1px solid #e6e9ed;text-align:left}
th{background:#f0f2f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff;background:#8a96a3}
.Succeeded{background:#2e8540} .Running{background:#1f6fbf} .Failed{background:#c0392b} .Aborted{background:#d35400}
.Scheduled{background:#8a96a3}
.muted{color:#6b7682} .job{color:#4a5561;font-size:13px} .big{font-size:16px}
.err{color:#c0392b;font-size:12px} .warn{background:#fff4e5;border-color:#f0b36b}
img.fig{max-width:100%;display:block;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.row img.fig{max-width:calc(50% - 8px);min-width:360px} img.jobpng{max-width:100%;max-height:460px;display:block}
.gallery{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:11px;color:#4a5561}
.classes{display:flex;flex-wrap:wrap;gap:8px}
.cls{border:3px solid #c5ccd3;padding:2px;border-radius:4px;width:104px}
.cls.selected{border-color:#2e8540} .cls.rejected{border-color:#c0392b;opacity:.75}
img.clsimg{width:100px;height:100px;display:block}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:14px;margin:6px 0}
dl.facts dt{color:#4a5561} dl.facts dd{margin:0;font-weight:600}
"""


def run_active(project: Path) -> bool:
    """Whether a run holds the project's scheme locks (a live process; RELION's pid-less lock counts too)."""
    for lock in project.glob(".relion_lock_scheme_*"):
        holder = lock / "lock_scheme"
        try:
            text = holder.read_text().strip()
        except OSError:
            continue
        if not text.isdigit():
            return True
        try:
            os.kill(int(text), 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            return True
        return True
    return False


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _job_rows(project: Path, ctx: Context) -> tuple[str, list[str]]:
    """The job table (every process of the pipeline and every scheme job not started) and the schemes' lines."""
    from .job_runner import job_status, read_record
    from .pipeline import Pipeline, Process
    from .scheme import Scheme
    from .status import job_states

    nodes: dict[str, str] = {}
    pending: list[tuple[str, str]] = []
    scheme_lines = []
    for d in sorted((project / "Schemes").glob("*/scheme.star")):
        sc = Scheme.read(d.parent)
        scheme_lines.append(f"<li>scheme <b>{esc(sc.name)}</b>: at node <code>{esc(sc.current_node)}</code></li>")
    try:
        states = job_states(project, tuple(p.parent.name for p in sorted((project / "Schemes").glob("*/scheme.star"))))
    except Exception as err:
        log.warning("report: could not read the schemes' jobs: %s", err)
        states = []
    for s in states:
        if s.directory:
            nodes[s.directory] = f"{s.scheme}/{s.node}"
        else:
            pending.append((s.scheme, s.node))
    processes = Pipeline.read(project).processes
    if not processes:  # no pipeline (jobs run by hand, or a copy without it): the job directories on disk
        processes = [Process(f"{d.parent.name}/{d.name}/", read_record(d).get("label", ""), "Scheduled")
                     for d in sorted((p for p in project.glob("*/job[0-9]*") if p.is_dir()),
                                     key=lambda p: natural_key(p.name))]
    known = {p.name for p in processes}
    extra = [d for d in nodes if d not in known]  # in a scheme but not (yet) in the pipeline
    now = time.time()
    rows = []
    for name, label, pipe_status in [(p.name, p.type_label, p.status) for p in processes] + \
                                    [(d, "", "Running") for d in extra]:
        job_dir = project / name
        status = job_status(job_dir) if job_dir.is_dir() else pipe_status
        launches = read_record(job_dir).get("launches", [])
        secs = sum(max(0.0, x.get("end", now) - x["start"]) for x in launches if "start" in x)
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(launches[0]["start"])) if launches and \
            "start" in launches[0] else ""
        logs = " ".join(ctx.link(job_dir / f, f) for f in ("run.out", "run.err") if (job_dir / f).exists())
        note = ""
        if status == "Failed" and (job_dir / "run.err").exists():
            lines = [ln for ln in (job_dir / "run.err").read_text(errors="replace").splitlines() if ln.strip()]
            note = f'<div class="err">{esc(lines[-1][:300])}</div>' if lines else ""
        rows.append(f"<tr><td>{ctx.link(job_dir, name)}</td><td>{esc(nodes.get(name, ''))}</td>"
                    f"<td>{esc(label)}</td><td><span class=\"badge {esc(status)}\">{esc(status)}</span>{note}</td>"
                    f"<td>{esc(started)}</td><td class=\"num\">{_duration(secs) if launches else ''}</td>"
                    f"<td class=\"num\">{len(launches)}</td><td>{logs}</td></tr>")
    for scheme, node in pending:
        rows.append(f"<tr><td class=\"muted\">-</td><td>{esc(scheme)}/{esc(node)}</td><td></td>"
                    f"<td><span class=\"badge\">not started</span></td><td></td><td></td><td></td><td></td></tr>")
    head = ("<tr><th>job</th><th>scheme node</th><th>type</th><th>status</th><th>started</th><th>wall time</th>"
            "<th>launches</th><th>logs</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>", scheme_lines


def _summary(project: Path, ctx: Context, active: bool) -> str:
    try:
        table, scheme_lines = _job_rows(project, ctx)
    except Exception as err:
        log.warning("report: job table skipped: %s", err, exc_info=True)
        table, scheme_lines = f'<p class="err">could not read the jobs: {esc(err)}</p>', []
    state = "running (this page reloads itself)" if active else "not running"
    facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in ctx.facts)
    return (f"<p>Run: <b>{esc(state)}</b></p>"
            + (f"<ul>{''.join(scheme_lines)}</ul>" if scheme_lines else '<p class="muted">No schemes installed.</p>')
            + (f'<h3>Key numbers</h3><dl class="facts">{facts}</dl>' if facts else "")
            + f"<h3>Jobs</h3>{table}")


def build_html(project: Path, active: bool | None = None, refresh_s: int = REFRESH_S) -> str:
    """The report page for the project as it is now (figures are written into ``project/report/``)."""
    project = Path(project)
    active = run_active(project) if active is None else active
    figures = FigureCache(project / FIGURES)
    ctx = Context(project, figures)
    bodies = []
    for sid, title, build, empty in SECTIONS:
        try:
            body = build(ctx)
            css = ""
            if body is None:
                body = f'<p class="muted">{esc(empty)}</p>'
        except Exception as err:
            log.warning("report: section %s skipped: %s", title, err, exc_info=True)
            body, css = f'<p class="err">This section could not be built: {esc(type(err).__name__)}: {esc(err)}</p>', \
                " warn"
        bodies.append(f'<section id="{sid}" class="step{css}"><h2>{esc(title)}</h2>{body}</section>')
    summary = _summary(project, ctx, active)
    figures.save()
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _, _ in (("summary", "Summary", None, ""),
                                                                                 *SECTIONS))
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if active and refresh_s > 0 else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>autoproc report: {esc(project.resolve().name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>autoproc report: {esc(project.resolve().name)}</h1>"
            f"<p>{esc(project.resolve())} · written {esc(stamp)}</p></header><nav>{nav}</nav><main>"
            f'<section id="summary"><h2>Summary</h2>{summary}</section>{"".join(bodies)}</main></body></html>\n')


def write_report(project: Path, active: bool | None = None, refresh_s: int = REFRESH_S) -> Path:
    """Write ``project/report.html`` atomically (figures in ``project/report/``) and return its path.

    ``active`` (default: whether a run holds the scheme locks) adds the auto-refresh tag. Errors inside
    a section are logged and shown in that section; only a failure to write the page itself raises.
    """
    project = Path(project)
    page = build_html(project, active, refresh_s)
    out = project / REPORT
    atomic_write_text(out, page)
    return out


def refresh_report(project: Path, active: bool | None = None) -> Path | None:
    """:func:`write_report` for the run loop: never raises (a report problem must not stop processing)."""
    try:
        return write_report(project, active)
    except Exception as err:
        log.warning("report: could not write %s: %s", Path(project) / REPORT, err, exc_info=True)
        return None


def _cmd_report(a: argparse.Namespace) -> None:
    project = Path(a.project)
    if not project.is_dir():
        from reconstruct.files.errors import InputError

        raise InputError(project, "is not a directory", "give the project directory of an autoproc run")
    active = {"auto": None, "yes": True, "no": False}[a.active]
    out = write_report(project, active, a.refresh_s)
    print(f"report written: {out} (figures in {project / FIGURES}/); open file://{out.resolve()}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``autoproc report DIR`` to a sub-command parser."""
    s = sub.add_parser("report", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="write the project's HTML report (DIR/report.html)",
                       description="Write DIR/report.html: the schemes' state, every job's status, wall time and "
                                   "logs, and per step the motion, CTF, picks, 2D classes with the ranker's "
                                   "scores and selection, initial model, FSC curves and the final map. Figures go "
                                   "to DIR/report/. 'autoproc run' keeps it current; this regenerates it.")
    s.add_argument("project", help="project directory")
    s.add_argument("--refresh_s", type=int, default=REFRESH_S,
                   help="while the run is active, the page reloads itself every this many seconds (0: never)")
    s.add_argument("--active", choices=("auto", "yes", "no"), default="auto",
                   help="whether to mark the run active (auto: a live process holds the scheme locks)")
    s.set_defaults(func=_cmd_report)

