"""The HTML report (autoproc.report): every section from real-format job files, partial projects, broken
files, the figure cache, the CLI, and (where Chromium is installed) a render in a real browser."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoproc.pipeline import Pipeline, Process
from autoproc.report import REPORT, refresh_report, register, write_report
from autoproc.shipped_schemes import Settings, install_schemes
from reconstruct.files import write_map, write_stack, write_star
from reconstruct.files.star import make_optics

STAGES = ("import", "motion", "ctf", "select_mics", "autopick", "extract", "class2d", "rank", "inimodel", "refine")
DIRS = {"import": "Import", "motion": "MotionCorr", "ctf": "CtfFind", "select_mics": "Select", "autopick": "AutoPick",
        "extract": "Extract", "class2d": "Class2D", "rank": "Select", "inimodel": "InitialModel", "refine": "Refine3D"}
LABELS = {"import": "relion.import.movies", "motion": "relion.motioncorr.own", "ctf": "relion.ctffind.ctffind4",
          "select_mics": "relion.select.onvalue", "autopick": "relion.autopick.log", "extract": "relion.extract",
          "class2d": "relion.class2d", "rank": "relion.select.class2dauto", "inimodel": "relion.initialmodel",
          "refine": "relion.refine3d"}
MAXRES = [4.5, 5.2, 8.0, 5.9]  # micrograph 3 fails the 6 Å selection
PICKS = [5, 3, 0, 4]
DIST = np.array([0.1, 0.4, 0.05, 0.3, 0.15])  # class sizes: sorted order 2, 4, 5, 1, 3
SCORES = np.array([0.6, 0.9, -999.0, 0.05, 0.3])
SELECTED = np.array([1, 1, 0, 0, 1])
BOX3D, PX3D, CROSS = 32, 2.0, 9  # the refinement's FSC falls below 0.143 after shell 9: 32 * 2 / 9 = 7.11 Å


def _job(project: Path, stage: str, number: int, pipe: Pipeline, status: str = "Succeeded",
         options: dict[str, str] | None = None) -> Path:
    name = f"{DIRS[stage]}/job{number:03d}/"
    d = project / name
    d.mkdir(parents=True)
    pipe.processes.append(Process(name, LABELS[stage], status))
    pipe.job_counter = number + 1
    t0 = 1.7e9 + 100 * number
    launch = {"start": t0, "end": t0 + 12.5 * number, "status": status} if status != "Running" else {"start": t0}
    (d / "autoproc_job.json").write_text(json.dumps({"state": "done", "launches": [launch]}))
    (d / "run.out").write_text(f"{stage} log\n")
    (d / "run.err").write_text("" if status != "Failed" else "ERROR: something broke in this job\n")
    marker = {"Succeeded": "RELION_JOB_EXIT_SUCCESS", "Failed": "RELION_JOB_EXIT_FAILURE"}.get(status)
    if marker:
        (d / marker).touch()
    opts = options or {}
    write_star(d / "job.star", {"job": {"rlnJobTypeLabel": LABELS[stage], "rlnJobIsContinue": 0, "rlnJobIsTomo": 0},
                                "joboptions_values": pd.DataFrame({"rlnJobOptionVariable": list(opts),
                                                                   "rlnJobOptionValue": list(opts.values())})})
    return d


def _blobs(shape: tuple[int, int], xy: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    d2 = (xx[None] - xy[:, 0, None, None]) ** 2 + (yy[None] - xy[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * sigma * sigma)).sum(axis=0).astype(np.float32)


def make_project(root: Path, upto: str = "refine", demo: bool = True) -> Path:
    """A project with real-format outputs of every job up to ``upto`` (tiny: 4 micrographs, 5 classes, 32^3)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline()
    stages = STAGES[: STAGES.index(upto) + 1]
    mics = [f"MotionCorr/job002/Movies/mic{i}.mrc" for i in range(4)]
    optics = make_optics(1.0)
    for n, stage in enumerate(stages, start=1):
        if stage == "import":
            d = _job(root, stage, n, pipe)
            write_star(d / "movies.star", {"optics": optics, "movies": pd.DataFrame(
                {"rlnMicrographMovieName": [f"Movies/mic{i}.mrcs" for i in range(4)], "rlnOpticsGroup": 1})})
        elif stage == "motion":
            d = _job(root, stage, n, pipe)
            (d / "Movies").mkdir()
            for i, m in enumerate(mics):
                xy = np.column_stack([rng.uniform(40, 216, PICKS[i]), rng.uniform(40, 216, PICKS[i])])
                write_map(root / m, _blobs((256, 256), xy, 6.0) + 0.3 * rng.standard_normal((256, 256)), 1.0)
                np.save(d / "Movies" / f"mic{i}_xy.npy", xy)
                shifts = np.cumsum(rng.normal(0.5, 0.3, (8, 2)), axis=0)
                shifts[0] = NOT_OBSERVED if i == 0 else shifts[0]
                write_star(d / "Movies" / f"mic{i}.star", {
                    "general": {"rlnImageSizeX": 256, "rlnImageSizeY": 256, "rlnMicrographDoseRate": 1.0,
                                "rlnMicrographPreExposure": 0.0},
                    "global_shift": pd.DataFrame({"rlnMicrographFrameNumber": np.arange(1, 9),
                                                  "rlnMicrographShiftX": shifts[:, 0],
                                                  "rlnMicrographShiftY": shifts[:, 1]})})
            write_star(d / "corrected_micrographs.star", {"optics": optics, "micrographs": pd.DataFrame({
                "rlnMicrographName": mics, "rlnMicrographMetadata": [m[:-4] + ".star" for m in mics],
                "rlnOpticsGroup": 1, "rlnAccumMotionTotal": [9.0, 7.5, 12.0, 6.0],
                "rlnAccumMotionEarly": [4.0, 3.0, 6.0, 2.5], "rlnAccumMotionLate": [5.0, 4.5, 6.0, 3.5]})})
            _png(d / "Movies" / "mic0_shifts.png")
        elif stage == "ctf":
            d = _job(root, stage, n, pipe)
            write_star(d / "micrographs_ctf.star", {"optics": optics, "micrographs": pd.DataFrame({
                "rlnMicrographName": mics, "rlnOpticsGroup": 1, "rlnDefocusU": [15000.0, 18000, 21000, 24000],
                "rlnDefocusV": [14500.0, 17600, 20400, 23800], "rlnCtfFigureOfMerit": 0.2,
                "rlnCtfMaxResolution": MAXRES})})
            (d / "Movies").mkdir()
            _png(d / "Movies" / "mic0_diagnostic.png")
        elif stage == "select_mics":
            d = _job(root, stage, n, pipe, options={"select_label": "rlnCtfMaxResolution", "select_maxval": "6"})
        elif stage == "autopick":
            d = _job(root, stage, n, pipe, options={"log_diam_max": "16"})
            files = []
            for i in range(len(mics)):
                xy = np.load(root / "MotionCorr/job002/Movies" / f"mic{i}_xy.npy")
                f = d / "Movies" / f"mic{i}_autopick.star"
                f.parent.mkdir(exist_ok=True)
                write_star(f, {"": pd.DataFrame({"rlnCoordinateX": xy[:, 0], "rlnCoordinateY": xy[:, 1],
                                                 "rlnAutopickFigureOfMerit": 1.0})})
                files.append(str(f.relative_to(root)))
            write_star(d / "autopick.star", {"coordinate_files": pd.DataFrame(
                {"rlnMicrographName": mics, "rlnMicrographCoordinates": files})})
        elif stage == "extract":
            d = _job(root, stage, n, pipe)
            write_star(d / "particles.star", {"optics": make_optics(2.0, box=32), "particles": pd.DataFrame(
                {"rlnImageName": [f"{i + 1:06d}@{d.relative_to(root)}/p.mrcs" for i in range(12)],
                 "rlnMicrographName": mics[0], "rlnOpticsGroup": 1})})
        elif stage == "class2d":
            d = _job(root, stage, n, pipe)
            rel = f"{d.relative_to(root)}/run_it030_classes.mrcs"
            yy, xx = np.mgrid[:32, :32] - 16
            refs = np.stack([np.exp(-(xx ** 2 + yy ** 2) / (2 * (2 + k) ** 2)) for k in range(5)]).astype(np.float32)
            write_stack(root / rel, refs, 2.0)
            write_star(d / "run_it030_model.star", {
                "model_general": {"rlnReferenceDimensionality": 2, "rlnPixelSize": 2.0, "rlnNrClasses": 5},
                "model_classes": pd.DataFrame({"rlnReferenceImage": [f"{k + 1:06d}@{rel}" for k in range(5)],
                                               "rlnClassDistribution": DIST}),
                "model_groups": pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupNrParticles": [1000]})})
            write_star(d / "run_it010_model.star", {"model_general": {"rlnPixelSize": 2.0},
                                                    "model_classes": pd.DataFrame({"rlnReferenceImage": ["x"]})})
        elif stage == "rank":
            d = _job(root, stage, n, pipe, options={"do_class_ranker": "Yes", "rank_threshold": "0.15"})
            rel = f"Class2D/job{n - 1:03d}/run_it030_classes.mrcs"
            write_star(d / "rank_model.star", {"model_classes": pd.DataFrame({
                "rlnReferenceImage": [f"{k + 1:06d}@{rel}" for k in range(5)], "rlnClassScore": SCORES,
                "rlnClassDistribution": DIST})})
            write_star(d / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": SELECTED})})
        elif stage == "inimodel":
            d = _job(root, stage, n, pipe)
            write_map(d / "initial_model.mrc", _volume(), PX3D)
            _png(d / "run_it030_slices.png")
        elif stage == "refine":
            d = _job(root, stage, n, pipe)
            shells = np.arange(BOX3D // 2 + 1)
            fsc = np.where(shells <= CROSS, 1.0 - 0.08 * shells, 0.05)
            write_star(d / "run_model.star", {
                "model_general": {"rlnReferenceDimensionality": 3, "rlnOriginalImageSize": BOX3D, "rlnPixelSize": PX3D},
                "model_classes": pd.DataFrame({"rlnReferenceImage": [f"{d.relative_to(root)}/run_class001.mrc"]}),
                "model_class_1": pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": shells / (BOX3D * PX3D),
                                               "rlnGoldStandardFsc": fsc})})
            write_map(d / "run_class001.mrc", _volume(), PX3D)
            if demo:
                (root / "demo_result.json").write_text(json.dumps({
                    "map": f"{d.relative_to(root)}/run_class001.mrc", "resolution_fsc05": 9.1,
                    "resolution_fsc0143": 7.4, "correlation": 0.91,
                    "fsc": [[float(s / (BOX3D * PX3D)), float(max(0.0, 1 - 0.09 * s))] for s in shells]}))
    pipe.write(root)
    return root


NOT_OBSERVED = -9999.0


def _volume() -> np.ndarray:
    z, y, x = np.mgrid[:BOX3D, :BOX3D, :BOX3D] - BOX3D // 2
    big = np.exp(-((x - 4) ** 2 + y ** 2 + (z / 2) ** 2) / 18.0)
    small = np.exp(-((x + 6) ** 2 + (y - 3) ** 2 + z ** 2) / 8.0)
    return (big + 0.5 * small).astype(np.float32)


def _png(path: Path) -> None:
    """A small PNG as a job would write one (any name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, np.outer(np.arange(20), np.arange(30)).astype(float), cmap="viridis")


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)"[^>]*>(.*?)</section>', page, re.S))


def _images(project: Path, page: str) -> list[Path]:
    return [project / src.split("?")[0] for src in re.findall(r'<img [^>]*src="([^"]+)"', page)]


def _check_png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= 8 and float(img.std()) > 0.0, path
    return img


def test_full_report_has_every_section_from_the_files(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    out = write_report(project, active=True)
    page = out.read_text()
    assert out == project / REPORT and page.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="30">' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    secs = _sections(page)
    assert list(secs) == ["summary", "motion", "ctf", "picking", "class2d", "inimodel", "refine"]
    for sid, body in secs.items():
        assert "could not be built" not in body, (sid, body)
    imgs = _images(project, page)
    assert len(imgs) == len(set(imgs)) >= 17
    for p in imgs:
        _check_png(p)
    # summary: every job with its status, wall time and log links
    s = secs["summary"]
    for stage, n in zip(STAGES, range(1, 11)):
        assert f"{DIRS[stage]}/job{n:03d}/" in s
    assert s.count("badge Succeeded") == 10 and 'href="Refine3D/job010/run.out"' in s
    assert "2m05s" in s  # job 10: 12.5 s x 10
    # CTF: the selection line comes from the Select job's job.star (6 Å): micrograph 3 fails
    assert "3 of 4 micrographs have a CTF fit to 6 Å or better" in secs["ctf"]
    assert "mic0_diagnostic.png" in secs["ctf"] and "mic0_shifts.png" in secs["motion"]
    # picking: counts from the coordinate files; the micrograph with picks is drawn with green circles
    assert f"{sum(PICKS)} particles picked on 4 micrographs" in secs["picking"]
    assert "12 particles" in secs["picking"]
    picks = _check_png(project / "report" / "picks_job005.png")
    green = (picks[..., 1] > 0.7) & (picks[..., 0] < 0.4) & (picks[..., 2] < 0.4)
    assert green.sum() > 100
    # 2D: sorted by size, scores and selection from the ranker's files
    c = secs["class2d"]
    order = [int(k) for k in re.findall(r'data-class="(\d+)"', c)]
    assert order == list(np.argsort(-DIST, kind="stable") + 1)
    for k in range(5):
        state = "selected" if SELECTED[k] else "rejected"
        assert re.search(rf'class="cls {state}" data-class="{k + 1}"', c), k
    assert "#2 · 40.0% · score 0.90" in c and "#3 · 5.0% · not scored" in c
    assert "3 of 5 classes selected, about 650 particles" in c and "iteration 30" in c
    # refinement: the resolution where the half-map FSC crosses 0.143, and the demo's numbers
    assert f"<b>{BOX3D * PX3D / CROSS:.2f} Å</b>" in secs["refine"]
    assert "0.5 at 9.10 Å" in secs["refine"]
    views = _check_png(project / "report" / "map_job010.png")
    assert views.shape[0] > 400  # two rows: slices and projections
    assert "initial_model.mrc" in secs["inimodel"] and "run_it030_slices.png" in secs["inimodel"]


def test_partial_projects_and_inactive_runs(tmp_path: Path) -> None:
    only_import = make_project(tmp_path / "a", upto="import")
    page = write_report(only_import, active=False).read_text()
    assert "http-equiv" not in page
    secs = _sections(page)
    assert "Import/job001/" in secs["summary"]
    for sid in ("motion", "ctf", "picking", "class2d", "inimodel", "refine"):
        assert "yet" in secs[sid] and "<img" not in secs[sid], sid
    # mid-run: 2D classification written, not ranked; the auto-refresh follows the scheme lock of a live process
    mid = make_project(tmp_path / "b", upto="class2d")
    install_schemes(mid, Settings())
    lock = mid / ".relion_lock_scheme_proc"
    lock.mkdir()
    (lock / "lock_scheme").write_text(f"{os.getpid()}\n")
    page = write_report(mid).read_text()
    assert "http-equiv" in page and "Not ranked yet." in _sections(page)["class2d"]
    assert "No 3D refinement" in _sections(page)["refine"]
    summary = _sections(page)["summary"]
    assert "scheme <b>prep</b>" in summary and "scheme <b>proc</b>" in summary
    assert "proc/refine3d" in summary and "not started" in summary


def test_broken_file_only_breaks_its_section_and_cache_reuses_figures(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", upto="autopick")
    (project / "CtfFind/job003/micrographs_ctf.star").write_text("data_micrographs\nloop_\n_rlnDefocusU\nnot a number")
    (project / "default_pipeline.star").write_text("garbage")
    out = refresh_report(project, active=False)
    assert out is not None
    secs = _sections(out.read_text())
    assert "could not be built" in secs["ctf"] and "could not read the jobs" in secs["summary"]
    assert "could not be built" not in secs["motion"] + secs["picking"]
    png = project / "report" / "picks_job005.png"
    before = png.stat().st_mtime_ns
    t0 = time.perf_counter()
    write_report(project)
    assert png.stat().st_mtime_ns == before and time.perf_counter() - t0 < 1.0  # nothing changed: nothing redrawn
    (project / "AutoPick/job005/autopick.star").unlink()  # the job is re-running: its figures are dropped
    write_report(project)
    assert not png.exists()


def test_register_adds_the_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = make_project(tmp_path / "p", upto="motion")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["report", str(project), "--refresh_s", "10", "--active", "yes"])
    a.func(a)
    assert "report written" in capsys.readouterr().out
    assert '<meta http-equiv="refresh" content="10">' in (project / REPORT).read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium is not installed (apt-get install chromium) so the report cannot be rendered")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    report = write_report(project, active=False)
    shot = tmp_path / "shot.png"
    script = Path(__file__).parents[1] / "benchmarks" / "report_screenshot.py"
    r = subprocess.run([sys.executable, str(script), str(report), "--o", str(shot), "--height", "2400"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    img = _check_png(shot)
    assert img.shape[1] == 1280
    assert "console errors: 0" in r.stdout and "missing images: 0" in r.stdout
