"""The report's per-step sections: each finds the latest job of its kind, reads its STAR/MRC files and
returns an HTML fragment with figures drawn from them, plus the PNGs the job wrote itself.

Every section tolerates a job that is still running (files missing or from an earlier iteration);
:mod:`autoproc.report` turns an exception in one section into a note in that section only.
"""

from __future__ import annotations

import html
import json
import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reconstruct.files.mrc import read_map
from reconstruct.files.stack import parse_image_name
from reconstruct.files.star import read_star

from .report_figures import (
    FigureCache,
    bin_and_lowpass,
    display_range,
    draw_map_views,
    natural_key,
    pyplot,
    save,
    save_image,
)

NOT_OBSERVED = -9999.0  # motion correction's marker for a frame without a measured shift
DEFAULT_CTF_CUTOFF = 6.0  # Å, the prep/proc schemes' micrograph selection on rlnCtfMaxResolution
MAX_PICK_FILES = 5000  # per-micrograph coordinate files read for the counts plot
MAX_JOB_PNGS = 3  # PNGs a pre-processing job wrote that are shown inline


def esc(x: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(x), quote=True)


@dataclass
class Context:
    """What every section needs: the project, the figure cache, and a place for the summary's key numbers."""

    project: Path
    figures: FigureCache
    facts: list[tuple[str, str]] = field(default_factory=list)

    def jobs(self, directory: str) -> list[Path]:
        """The job directories ``<directory>/jobNNN/`` in job-number order."""
        return sorted((p for p in (self.project / directory).glob("job[0-9]*") if p.is_dir()),
                      key=lambda p: natural_key(p.name))

    def latest(self, directory: str, has: Callable[[Path], bool]) -> Path | None:
        """The newest job of a kind for which ``has(job_dir)`` holds."""
        return next((j for j in reversed(self.jobs(directory)) if has(j)), None)

    def rel(self, path: Path) -> str:
        """A project-relative POSIX path (for hrefs; report.html lies in the project)."""
        try:
            return path.resolve().relative_to(self.project.resolve()).as_posix()
        except ValueError:
            return path.as_posix()

    def href(self, path: Path) -> str:
        """A URL for a file of the project, with its modification time so a refreshed page reloads it."""
        try:
            v = path.stat().st_mtime_ns
        except OSError:
            v = 0
        return f"{urllib.parse.quote(self.rel(path))}?v={v}"

    def img(self, path: Path, alt: str, css: str = "fig") -> str:
        """An <img> of a project file."""
        return f'<img class="{css}" src="{esc(self.href(path))}" alt="{esc(alt)}">'

    def figure(self, name: str, sources: list[Path], draw: Callable[[Path], None], alt: str) -> str:
        """A cached figure of the report directory as an <img>."""
        return self.img(self.figures.figure(name, sources, draw), alt)

    def link(self, path: Path, text: str | None = None) -> str:
        """A link to a project file."""
        return f'<a href="{esc(urllib.parse.quote(self.rel(path)))}">{esc(text or path.name)}</a>'

    def fact(self, key: str, value: str) -> None:
        """A key number for the summary."""
        self.facts.append((key, value))


def row(images: list[str]) -> str:
    """Figures side by side (they wrap on a narrow window)."""
    return f'<div class="row">{"".join(images)}</div>' if images else ""


def job_heading(ctx: Context, job: Path, extra: str = "") -> str:
    """The line naming the job a section shows."""
    return f'<p class="job">from {ctx.link(job, ctx.rel(job) + "/")}{esc(extra)}</p>'


def job_pngs(ctx: Context, job: Path, limit: int = MAX_JOB_PNGS, exclude: tuple[str, ...] = ()) -> str:
    """The first ``limit`` PNGs a job wrote (any name, any depth) inline, and how many more there are."""
    found = sorted((p for p in job.rglob("*.png") if p.name not in exclude and not p.name.startswith(".")),
                   key=lambda p: natural_key(str(p)))
    if not found:
        return ""
    shown = "".join(f'<figure class="thumb">{ctx.img(p, p.name, "jobpng")}<figcaption>{ctx.link(p, ctx.rel(p))}'
                    f'</figcaption></figure>' for p in found[:limit])
    more = f'<p class="muted">and {len(found) - limit} more PNGs in the job directory</p>' if len(found) > limit else ""
    return f'<h3>Images written by the job</h3><div class="gallery">{shown}</div>{more}'


def _table(path: Path, block: str) -> pd.DataFrame:
    """One block of a STAR file (the only block when a file has just one)."""
    blocks = read_star(path)
    if block in blocks:
        return blocks[block]
    if len(blocks) == 1:
        return next(iter(blocks.values()))
    raise KeyError(f"{path} has no data_{block} block")


def _optics_value(path: Path, label: str) -> float:
    """A value of the first optics group (0 when absent)."""
    blocks = read_star(path)
    optics = blocks.get("optics")
    if optics is None or label not in optics.columns or optics.empty:
        return 0.0
    return float(optics[label].iloc[0])


def _job_option(job: Path, option: str) -> str | None:
    """An option of the job's job.star, if it has one."""
    p = job / "job.star"
    if not p.exists():
        return None
    values = read_star(p).get("joboptions_values")
    if values is None or values.empty:
        return None
    hit = values[values["rlnJobOptionVariable"] == option]
    return None if hit.empty else str(hit["rlnJobOptionValue"].iloc[0])


def _float_option(job: Path, option: str) -> float | None:
    v = _job_option(job, option)
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _integer_ticks(ax: object, n: int) -> None:
    """Micrograph numbers 1..n on the x axis (no 1.5, 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # type: ignore[attr-defined]
    ax.set_xlim(0.5, max(n, 1) + 0.5)  # type: ignore[attr-defined]


# ---- motion correction ---------------------------------------------------------------------------
def motion_section(ctx: Context) -> str | None:
    """Accumulated motion per micrograph, drift trajectories of a few, and the job's own PNGs."""
    job = ctx.latest("MotionCorr", lambda j: (j / "corrected_micrographs.star").exists())
    if job is None:
        return None
    star = job / "corrected_micrographs.star"
    mics = _table(star, "micrographs")
    px = _optics_value(star, "rlnMicrographOriginalPixelSize") or _optics_value(star, "rlnMicrographPixelSize")
    parts = [job_heading(ctx, job, f": {len(mics)} micrographs")]
    figs = []
    ctx.fact("micrographs motion-corrected", str(len(mics)))
    if "rlnAccumMotionTotal" in mics.columns and len(mics):
        tot = mics["rlnAccumMotionTotal"].to_numpy(float)
        ctx.fact("mean accumulated motion", f"{tot.mean():.1f} Å")

        def draw(out: Path) -> None:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=100)
            x = np.arange(1, len(mics) + 1)
            for label, name in (("rlnAccumMotionTotal", "total"), ("rlnAccumMotionEarly", "early"),
                                ("rlnAccumMotionLate", "late")):
                if label in mics.columns:
                    ax.plot(x, mics[label].to_numpy(float), marker="o", ms=3, lw=1, label=name)
            _integer_ticks(ax, len(mics))
            ax.set_xlabel("micrograph")
            ax.set_ylabel("accumulated motion (Å)")
            ax.set_title("Accumulated motion per micrograph", fontsize=9)
            ax.legend(fontsize=7)
            save(fig, out)

        figs.append(ctx.figure(f"motion_{job.name}.png", [star], draw, "accumulated motion per micrograph"))
    metas = [ctx.project / str(m) for m in mics.get("rlnMicrographMetadata", pd.Series(dtype=str)).head(4)]
    metas = [m for m in metas if m.exists()]
    if metas:
        figs.append(ctx.figure(f"drift_{job.name}.png", metas, lambda out: _draw_drift(metas, px, out),
                               "drift trajectories"))
    parts.append(row(figs))
    parts.append(job_pngs(ctx, job))
    return "".join(parts)


def _draw_drift(metas: list[Path], pixel_size: float, out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metas), figsize=(2.4 * len(metas) + 0.4, 2.7), dpi=100, squeeze=False)
    unit, scale = ("Å", pixel_size) if pixel_size > 0 else ("px", 1.0)
    for ax, meta in zip(axes[0], metas):
        gs = _table(meta, "global_shift")
        xy = gs[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
        xy = xy[(xy != NOT_OBSERVED).all(axis=1)] * scale
        ax.plot(xy[:, 0], xy[:, 1], "-o", ms=2.5, lw=1)
        if len(xy):
            ax.plot(xy[:1, 0], xy[:1, 1], "o", color="tab:red", ms=5, label="first frame")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(meta.stem, fontsize=7)
        ax.set_xlabel(f"x ({unit})", fontsize=7)
        ax.set_ylabel(f"y ({unit})", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Drift trajectories (global shifts)", fontsize=9)
    save(fig, out)


# ---- CTF ------------------------------------------------------------------------------------------
def ctf_cutoff(ctx: Context) -> tuple[float, Path | None]:
    """The micrograph selection's maximum rlnCtfMaxResolution (Å) and the Select job it comes from."""
    for job in reversed(ctx.jobs("Select")):
        if _job_option(job, "select_label") == "rlnCtfMaxResolution":
            v = _float_option(job, "select_maxval")
            if v is not None:
                return v, job
    return DEFAULT_CTF_CUTOFF, None


def ctf_section(ctx: Context) -> str | None:
    """Defocus per micrograph, the fit-resolution histogram with the selection line, a diagnostic PNG."""
    job = ctx.latest("CtfFind", lambda j: (j / "micrographs_ctf.star").exists())
    if job is None:
        return None
    star = job / "micrographs_ctf.star"
    mics = _table(star, "micrographs")
    cutoff, select_job = ctf_cutoff(ctx)
    parts = [job_heading(ctx, job, f": {len(mics)} micrographs")]
    figs = []
    ctx.fact("micrographs with a CTF fit", str(len(mics)))
    if "rlnDefocusU" in mics.columns and len(mics):
        def draw_defocus(out: Path) -> None:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=100)
            x = np.arange(1, len(mics) + 1)
            for label in ("rlnDefocusU", "rlnDefocusV"):
                if label in mics.columns:
                    ax.plot(x, mics[label].to_numpy(float) / 1e4, marker="o", ms=3, lw=1, label=label[3:])
            _integer_ticks(ax, len(mics))
            ax.set_xlabel("micrograph")
            ax.set_ylabel("defocus (µm)")
            ax.set_title("Defocus per micrograph", fontsize=9)
            ax.legend(fontsize=7)
            save(fig, out)

        figs.append(ctx.figure(f"ctf_defocus_{job.name}.png", [star], draw_defocus, "defocus per micrograph"))
        mean_df = (mics["rlnDefocusU"].to_numpy(float) + mics.get("rlnDefocusV", mics["rlnDefocusU"]).to_numpy(float))
        ctx.fact("defocus range", f"{mean_df.min() / 2e4:.2f} to {mean_df.max() / 2e4:.2f} µm")
    if "rlnCtfMaxResolution" in mics.columns and len(mics):
        res = mics["rlnCtfMaxResolution"].to_numpy(float)
        passing = int((res <= cutoff).sum())
        where = f" (from {ctx.rel(select_job)}/job.star)" if select_job is not None else " (the schemes' default)"
        parts.append(f"<p>{passing} of {len(res)} micrographs have a CTF fit to {cutoff:g} Å or better, the "
                     f"selection's limit{esc(where)}.</p>")
        ctx.fact("micrographs passing the CTF selection", f"{passing} of {len(res)} (≤ {cutoff:g} Å)")

        def draw_hist(out: Path) -> None:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=100)
            hi = max(float(res.max()), cutoff) * 1.05
            ax.hist(res, bins=np.linspace(0.0, hi, 31), color="tab:blue", alpha=0.8)
            ax.axvline(cutoff, color="tab:red", ls="--", lw=1.2, label=f"selection: ≤ {cutoff:g} Å")
            ax.set_xlabel("CTF max resolution (Å)")
            ax.set_ylabel("micrographs")
            ax.set_title("Resolution of the CTF fit", fontsize=9)
            ax.legend(fontsize=7)
            save(fig, out)

        sources = [star] + ([select_job / "job.star"] if select_job is not None else [])
        figs.append(ctx.figure(f"ctf_maxres_{job.name}.png", sources, draw_hist, "CTF max resolution histogram"))
    parts.append(row(figs))
    parts.append(job_pngs(ctx, job, limit=1))
    return "".join(parts)


# ---- picking and extraction -----------------------------------------------------------------------
def picking_section(ctx: Context) -> str | None:
    """Picks over one low-passed micrograph, particles per micrograph, and the extraction's particle count."""
    job = ctx.latest("AutoPick", lambda j: (j / "autopick.star").exists())
    extract = ctx.latest("Extract", lambda j: (j / "particles.star").exists())
    if job is None and extract is None:
        return None
    parts = []
    if job is not None:
        star = job / "autopick.star"
        coords = _table(star, "coordinate_files")
        files = [ctx.project / str(c) for c in coords["rlnMicrographCoordinates"].head(MAX_PICK_FILES)]
        counts = ctx.figures.value(f"pick_counts_{job.name}", [star], lambda: [_count_rows(f) for f in files])
        total = int(sum(c for c in counts if c > 0))
        parts.append(job_heading(ctx, job, f": {total} particles picked on {len(coords)} micrographs"))
        ctx.fact("particles picked", f"{total} on {len(coords)} micrographs")
        if counts:
            def draw_counts(out: Path) -> None:
                plt = pyplot()
                fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=100)
                ax.bar(np.arange(1, len(counts) + 1), np.maximum(np.asarray(counts), 0), color="tab:blue")
                _integer_ticks(ax, len(counts))
                ax.set_xlabel("micrograph")
                ax.set_ylabel("particles picked")
                ax.set_title("Particles per micrograph", fontsize=9)
                save(fig, out)

            figs = [ctx.figure(f"pick_counts_{job.name}.png", [star], draw_counts, "particles per micrograph")]
        else:
            figs = []
        first = next(((str(m), ctx.project / str(c)) for m, c, n in
                      zip(coords["rlnMicrographName"], coords["rlnMicrographCoordinates"], counts)
                      if n > 0 and (ctx.project / str(m)).exists()), None)
        if first is not None:
            mic, pick_file = ctx.project / first[0], first[1]
            diameter = _float_option(job, "log_diam_max") or 0.0
            figs.append(ctx.figure(f"picks_{job.name}.png", [mic, pick_file, job / "job.star"],
                                   lambda out: _draw_picks(mic, pick_file, diameter, out),
                                   "picks on a low-passed micrograph"))
        parts.append(row(figs))
        parts.append(job_pngs(ctx, job, limit=1))
    if extract is not None:
        star = extract / "particles.star"
        n = ctx.figures.value(f"extracted_{extract.name}", [star], lambda: _count_rows(star, "particles"))
        box = ctx.figures.value(f"extract_box_{extract.name}", [star],
                                lambda: int(_optics_value(star, "rlnImageSize")))
        ctx.fact("particles extracted", str(n))
        parts.append(f"<p>Extraction {ctx.link(extract, ctx.rel(extract) + '/')}: {n} particles"
                     f"{f', box {box} px' if box else ''}.</p>")
    return "".join(parts)


def _count_rows(path: Path, block: str = "") -> int:
    """Rows of a STAR table (-1 when the file is missing or unreadable: a micrograph still being picked)."""
    try:
        if not path.exists():
            return -1
        blocks = read_star(path)
        table = blocks.get(block) if block else None
        if table is None:
            table = next(b for name, b in blocks.items() if name != "optics")
        return len(table)
    except Exception:
        return -1


def _draw_picks(mic_path: Path, pick_file: Path, diameter: float, out: Path) -> None:
    from matplotlib.collections import EllipseCollection

    plt = pyplot()
    mic, px = read_map(mic_path, check_finite=False)
    if mic.ndim == 3:
        mic = mic[0]
    img, f = bin_and_lowpass(mic, px)
    picks = _table(pick_file, "")
    xy = picks[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) / f
    d = diameter / (px * f) if diameter > 0 and px > 0 else 0.04 * max(img.shape)
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * img.shape[0] / img.shape[1] + 0.3), dpi=100)
    lo, hi = display_range(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="upper")  # RELION's picks: y down from the top row
    ax.add_collection(EllipseCollection(np.full(len(xy), d), np.full(len(xy), d), np.zeros(len(xy)), units="xy",
                                        offsets=xy, offset_transform=ax.transData, facecolors="none",
                                        edgecolors="lime", linewidths=1.0))
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{mic_path.name}: {len(xy)} picks (low-passed to 20 Å, binned {f}x)", fontsize=8)
    save(fig, out)


# ---- 2D classification and the class ranker -------------------------------------------------------
@dataclass
class Ranking:
    """The class ranker's output for a Class2D job."""

    job: Path
    scores: np.ndarray  # (K,), -999 for classes it did not score
    selected: np.ndarray | None  # bool (K,)
    threshold: float | None


def _last_model(job: Path, pattern: str = "run_it[0-9]*_model.star") -> Path | None:
    found = sorted(job.glob(pattern), key=lambda p: natural_key(p.name))
    return found[-1] if found else None


def _ranking_for(ctx: Context, class_job: Path, n_classes: int) -> Ranking | None:
    """The newest class-ranker Select job whose rank_model.star scores this Class2D job's classes."""
    want = ctx.rel(class_job)
    for job in reversed(ctx.jobs("Select")):
        rank = job / "rank_model.star"
        if not rank.exists():
            continue
        classes = _table(rank, "model_classes")
        if len(classes) != n_classes or "rlnClassScore" not in classes.columns:
            continue
        _, stack = parse_image_name(str(classes["rlnReferenceImage"].iloc[0]))
        if not Path(stack).as_posix().startswith(want + "/"):
            continue
        selected = None
        backup = job / "backup_selection.star"
        if backup.exists():
            sel = _table(backup, "").iloc[:, 0].to_numpy(int)
            selected = sel.astype(bool) if len(sel) == n_classes else None
        return Ranking(job, classes["rlnClassScore"].to_numpy(float), selected, _float_option(job, "rank_threshold"))
    return None


def class2d_section(ctx: Context) -> str | None:
    """The last iteration's class averages sorted by size, with the ranker's scores and selection."""
    job = ctx.latest("Class2D", lambda j: _last_model(j) is not None)
    if job is None:
        return None
    model_path = _last_model(job)
    assert model_path is not None
    model = read_star(model_path)
    classes = model["model_classes"]
    groups = model.get("model_groups")
    n_parts = int(groups["rlnGroupNrParticles"].astype(float).sum()) if groups is not None else 0
    names = [parse_image_name(str(r)) for r in classes["rlnReferenceImage"]]
    stack = ctx.project / names[0][1]
    images, _ = read_map(stack, check_finite=False)
    images = images.reshape((-1, *images.shape[-2:]))[np.array([i for i, _ in names])]
    dist = classes["rlnClassDistribution"].to_numpy(float)
    k = len(dist)
    rank = _ranking_for(ctx, job, k)
    it = model_path.name.split("_")[1][2:]
    parts = [job_heading(ctx, job, f": {k} classes of {n_parts} particles, iteration {int(it)}")]
    if rank is not None:
        thr = f" (threshold {rank.threshold:g})" if rank.threshold is not None else ""
        if rank.selected is not None:
            n_sel = int(rank.selected.sum())
            sel_parts = round(float(dist[rank.selected].sum()) * n_parts)
            parts.append(f"<p>Class ranker {ctx.link(rank.job, ctx.rel(rank.job) + '/')}{esc(thr)}: {n_sel} of {k} "
                         f"classes selected, about {sel_parts} particles. Green frame: selected; red: rejected.</p>")
            ctx.fact("2D classes selected by the ranker", f"{n_sel} of {k} (~{sel_parts} particles)")
        else:
            parts.append(f"<p>Class ranker {ctx.link(rank.job, ctx.rel(rank.job) + '/')}{esc(thr)}: scores only "
                         f"(no selection written yet).</p>")
    else:
        parts.append('<p class="muted">Not ranked yet.</p>')
    order = np.argsort(-dist, kind="stable")
    cells = []
    for c in order:
        name = f"class2d_{job.name}_{c + 1:03d}.png"
        png = ctx.figures.figure(name, [model_path, stack], lambda out, c=c: save_image(images[c], out))
        state, label = "", ""
        if rank is not None:
            s = rank.scores[c]
            label = " · not scored" if s <= -999 else f" · score {s:.2f}"
            if rank.selected is not None:
                state = " selected" if rank.selected[c] else " rejected"
        cells.append(f'<figure class="cls{state}" data-class="{c + 1}">{ctx.img(png, f"class {c + 1}", "clsimg")}'
                     f'<figcaption>#{c + 1} · {100 * dist[c]:.1f}%{esc(label)}</figcaption></figure>')
    parts.append(f'<div class="classes">{"".join(cells)}</div>')
    links = [p for p in (job / "run_classes.png", *(([rank.job / "rank_gallery.png"]) if rank else [])) if p.exists()]
    if links:
        parts.append(f"<p>Galleries written by the jobs: {', '.join(ctx.link(p, ctx.rel(p)) for p in links)}</p>")
    return "".join(parts)


# ---- initial model --------------------------------------------------------------------------------
def initial_model_section(ctx: Context) -> str | None:
    """Central slices of the initial model (or, while it runs, of the last iteration's largest class)."""
    def current(j: Path) -> tuple[Path, str] | None:
        if (j / "initial_model.mrc").exists():
            return j / "initial_model.mrc", "initial_model.mrc"
        found = sorted(j.glob("run_it[0-9]*_class[0-9]*.mrc"), key=lambda p: natural_key(p.name))
        if found:
            it = found[-1].name.split("_")[1]
            return found[-1], f"{found[-1].name} (in progress, iteration {int(it[2:])})"
        return None

    job = ctx.latest("InitialModel", lambda j: current(j) is not None)
    if job is None:
        return None
    found = current(job)
    assert found is not None
    path, what = found
    vol, px = read_map(path, check_finite=False)
    parts = [job_heading(ctx, job, f": {what}, box {vol.shape[-1]} px, {px:.3g} Å/px")]
    parts.append(ctx.figure(f"inimodel_{job.name}.png", [path],
                            lambda out: draw_map_views(vol, out, f"{ctx.rel(path)}", projections=False),
                            "initial model central slices"))
    slices = sorted(job.glob("*_slices.png"), key=lambda p: natural_key(p.name))
    if slices:
        parts.append(f'<h3>Classes of the last iteration (the job\'s own plot)</h3>'
                     f'<figure class="thumb">{ctx.img(slices[-1], slices[-1].name, "jobpng")}</figure>')
    return "".join(parts)


# ---- refinement -----------------------------------------------------------------------------------
def refinement_section(ctx: Context) -> str | None:
    """The gold-standard FSC (and the FSC with the truth for the demo), the final map's slices and projections."""
    def model_of(j: Path) -> Path | None:
        return j / "run_model.star" if (j / "run_model.star").exists() else _last_model(j)

    job = ctx.latest("Refine3D", lambda j: model_of(j) is not None)
    if job is None:
        return None
    model_path = model_of(job)
    assert model_path is not None
    final = model_path.name == "run_model.star"
    model = read_star(model_path)
    general = model["model_general"].iloc[0]
    box, px = int(general["rlnOriginalImageSize"]), float(general["rlnPixelSize"])
    curve_df = model.get("model_class_1")
    status = "final" if final else f"in progress, {model_path.name.split('_')[1]}"
    parts = [job_heading(ctx, job, f" ({status}): box {box} px, {px:.3g} Å/px")]
    demo = _demo_result(ctx.project)
    figs: list[str] = []
    if curve_df is not None and "rlnGoldStandardFsc" in curve_df.columns:
        from reconstruct.fsc import resolution_at

        fsc = curve_df["rlnGoldStandardFsc"].to_numpy(float)
        k = curve_df["rlnResolution"].to_numpy(float) if "rlnResolution" in curve_df.columns else \
            np.arange(len(fsc)) / (box * px)
        res = resolution_at(fsc, box, px, 0.143).angstrom
        parts.append(f'<p class="big">Gold-standard resolution (FSC 0.143): <b>{res:.2f} Å</b></p>')
        ctx.fact("resolution (gold-standard FSC 0.143)", f"{res:.2f} Å")
        if demo is not None:
            parts.append(f"<p>Demo: FSC with the true map 0.5 at {demo['resolution_fsc05']:.2f} Å, 0.143 at "
                         f"{demo['resolution_fsc0143']:.2f} Å (correlation {demo['correlation']:.3f}, map "
                         f"{esc(demo.get('map', ''))}).</p>")
            ctx.fact("FSC with the truth (demo), 0.5", f"{demo['resolution_fsc05']:.2f} Å")
        sources = [model_path] + ([ctx.project / "demo_result.json"] if demo is not None else [])
        figs.append(ctx.figure(f"fsc_{job.name}.png", sources, lambda out: _draw_fsc(k, fsc, res, px, demo, out),
                               "FSC curves"))
    maps = [job / "run_class001.mrc"] if final else sorted(job.glob("run_it[0-9]*_half1_class001.mrc"),
                                                           key=lambda p: natural_key(p.name))[-1:]
    if maps and maps[-1].exists():
        vol, _ = read_map(maps[-1], check_finite=False)
        figs.append(ctx.figure(f"map_{job.name}.png", [maps[-1]],
                               lambda out: draw_map_views(vol, out, ctx.rel(maps[-1])), "final map"))
    parts.append(row(figs))
    return "".join(parts)


def _demo_result(project: Path) -> dict | None:
    p = project / "demo_result.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return d if isinstance(d, dict) and "fsc" in d else None


def _draw_fsc(k: np.ndarray, fsc: np.ndarray, res: float, px: float, demo: dict | None, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(k, fsc, lw=1.6, label=f"half maps (gold standard): {res:.2f} Å at 0.143")
    if demo is not None:
        t = np.asarray(demo["fsc"], float)
        ax.plot(t[:, 0], t[:, 1], lw=1.6, label=f"map vs truth: {demo['resolution_fsc05']:.2f} Å at 0.5")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.text(0.0, 0.51, "0.5", color="grey", fontsize=7)
    ax.axhline(0.143, color="tab:red", lw=0.9, ls="--")
    ax.text(0.0, 0.153, "0.143", color="tab:red", fontsize=7)
    nyquist = 0.5 / px
    ax.set_xlim(0, nyquist)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    top = ax.twiny()
    top.set_xlim(0, nyquist)
    ticks = np.linspace(0, nyquist, 6)[1:]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1 / t:.1f}" for t in ticks], fontsize=7)
    top.set_xlabel("resolution (Å)", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    if math.isfinite(res) and res > 0:
        ax.axvline(1.0 / res, color="tab:red", lw=0.6, alpha=0.5)
    save(fig, out)
