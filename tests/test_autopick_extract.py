"""LoG picking (``reconstruct autopick``) and particle extraction (``reconstruct extract``) against
simulated micrographs with known particle positions (and, where installed, against relion_autopick)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from autoproc.demo import demo_model_path
from reconstruct.autopick_job import AutopickOptions, job_relative_name, output_root, run_autopick
from reconstruct.autopick_job import register as register_autopick
from reconstruct.extract_job import ExtractOptions, run_extract
from reconstruct.extract_job import register as register_extract
from reconstruct.extraction import (
    cut_boxes,
    default_bg_radius,
    extract_particles,
    extraction_box_sizes,
    integer_centres,
    normalise_background,
)
from reconstruct.files import ImageSource, read_map, read_particles, read_star, write_map, write_star
from reconstruct.files.star import read_table
from reconstruct.log_picker import LoGParams, greedy_peaks, log_diameters
from reconstruct.simulate import MovieSimulation, atomic_model_map, simulate_movies
from reconstruct.simulate.noise import coloured_noise, noise_spectrum

PX = 2.0
DMIN, DMAX = 100.0, 140.0  # CFTR (6MSM) is about 136 x 80 x 75 Å
MICS = ["MotionCorr/job002/Movies/movie_0001.mrc", "MotionCorr/job002/Movies/movie_0002.mrc"]
NOISE = "MotionCorr/job002/Movies/noise.mrc"
BROKEN = "MotionCorr/job002/Movies/broken.mrc"
CTF_STAR = "CtfFind/job003/micrographs_ctf.star"


@contextlib.contextmanager
def inside(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Two 512-px CFTR micrographs (2 Å/px, 20 particles, drift-free movies summed), a noise-only
    micrograph and a truncated one, a micrographs_ctf.star with the true defoci, then AutoPick/job005."""
    root = tmp_path_factory.mktemp("autopick")
    vol = atomic_model_map(demo_model_path(), 96, PX)
    cfg = MovieSimulation(n_movies=2, size=512, pixel_size=PX, n_frames=2, particles_per_movie=20,
                          particle_diameter=150.0, snr=0.7, drift_step=0.0, seed=7)
    truth = simulate_movies([vol], PX, cfg, root / "sim")
    rows = []
    for k, name in enumerate(MICS):
        frames, _ = read_map(root / "sim" / "Movies" / f"movie_{k + 1:04d}.mrcs")
        write_map(root / name, frames.sum(axis=0), PX)
        t = truth[truth.movie == f"Movies/movie_{k + 1:04d}.mrcs"].iloc[0]
        rows.append({"rlnMicrographName": name, "rlnOpticsGroup": 1, "rlnDefocusU": t.rlnDefocusU,
                     "rlnDefocusV": t.rlnDefocusV, "rlnDefocusAngle": t.rlnDefocusAngle,
                     "rlnCtfFigureOfMerit": 0.2, "rlnCtfMaxResolution": 4.0})
    rng = np.random.default_rng(3)
    write_map(root / NOISE, 4.0 + coloured_noise(1, 512, noise_spectrum(512, PX), rng)[0], PX)
    write_map(root / BROKEN, np.zeros((64, 64), np.float32), PX)
    with open(root / BROKEN, "r+b") as fh:  # truncate the data: an unreadable micrograph in the batch
        fh.truncate(2000)
    rows += [{**rows[0], "rlnMicrographName": NOISE}, {**rows[0], "rlnMicrographName": BROKEN}]
    optics = pd.DataFrame([{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
                            "rlnMicrographOriginalPixelSize": PX, "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
                            "rlnAmplitudeContrast": 0.1, "rlnMicrographPixelSize": PX}])
    write_star(root / CTF_STAR, {"optics": optics, "micrographs": pd.DataFrame(rows)})
    with inside(root):
        run_autopick(AutopickOptions(Path(CTF_STAR), Path("AutoPick/job005"), DMIN, DMAX,
                                     LoG_adjust_threshold=1.0))
    return root


def truth_xy(root: Path, k: int) -> np.ndarray:
    t = pd.read_csv(root / "sim" / "truth" / "particles_truth.csv")
    return t[t.movie == f"Movies/movie_{k + 1:04d}.mrcs"][["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()


def picks(root: Path, name: str) -> pd.DataFrame:
    return next(iter(read_star(root / (output_root(name, "AutoPick/job005") + "_autopick.star")).values()))


def test_log_picks_match_truth(project):
    """Precision and recall >= 0.9 within a quarter of the maximum diameter; RELION 4's outputs."""
    tol = 0.25 * DMAX / PX
    hits_p = hits_r = n_picks = n_true = 0
    for k, name in enumerate(MICS):
        df = picks(project, name)
        assert list(df.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber",
                                    "rlnAutopickFigureOfMerit", "rlnAnglePsi"]
        xy = truth_xy(project, k)
        d = np.hypot(df.rlnCoordinateX.to_numpy()[:, None] - xy[None, :, 0],
                     df.rlnCoordinateY.to_numpy()[:, None] - xy[None, :, 1])
        hits_p += int((d.min(axis=1) < tol).sum())
        hits_r += int((d.min(axis=0) < tol).sum())
        n_picks, n_true = n_picks + len(df), n_true + len(xy)
    assert hits_p / n_picks >= 0.9, f"precision {hits_p}/{n_picks}"
    assert hits_r / n_true >= 0.9, f"recall {hits_r}/{n_true}"
    listed = read_star(project / "AutoPick/job005/autopick.star")["coordinate_files"]
    assert listed.rlnMicrographName.tolist() == [*MICS, NOISE]
    assert listed.rlnMicrographCoordinates.tolist()[0] == "AutoPick/job005/Movies/movie_0001_autopick.star"
    assert (project / "AutoPick/job005/Movies/movie_0001_autopick.png").stat().st_size > 1000
    assert (project / "AutoPick/job005/logfile.pdf").exists()
    skipped = (project / "AutoPick/job005/skipped_micrographs.txt").read_text()
    assert BROKEN in skipped and "movie_0001" not in skipped


def test_noise_only_micrograph_has_weak_picks(project):
    """RELION's threshold is relative to each micrograph, so pure noise still gets picks, but their
    FOMs lie below those of real particles: a FOM floor at extraction removes them."""
    noise = picks(project, NOISE)
    real = pd.concat([picks(project, m) for m in MICS])
    assert noise.rlnAutopickFigureOfMerit.max() < np.percentile(real.rlnAutopickFigureOfMerit, 10)
    floor = float(noise.rlnAutopickFigureOfMerit.max())
    with inside(project):
        out = run_extract(ExtractOptions(Path(CTF_STAR), Path("AutoPick/job005/autopick.star"), Path("Extract/job010"),
                                         96, scale=48, minimum_pick_fom=floor))
    parts = read_particles(project / out).data
    assert NOISE not in set(parts.rlnMicrographName)
    assert len(parts) == int((real.rlnAutopickFigureOfMerit > floor).sum()) >= 0.9 * len(real)


def test_empty_pick_file_and_resume(project, caplog):
    """No picks: an empty coordinate file and a log line; --only_do_unfinished redoes only missing files."""
    caplog.set_level(logging.INFO, logger="reconstruct")
    with inside(project):
        run_autopick(AutopickOptions(Path(CTF_STAR), Path("AutoPick/job007"), DMIN, DMAX, LoG_adjust_threshold=999.0,
                                     overlays=0))
    assert "no particles picked" in caplog.text
    f0 = project / "AutoPick/job007/Movies/movie_0001_autopick.star"
    assert len(next(iter(read_star(f0).values()))) == 0
    f1 = project / "AutoPick/job007/Movies/movie_0002_autopick.star"
    before = f0.stat().st_mtime_ns
    f1.unlink()
    with inside(project):
        run_autopick(AutopickOptions(Path(CTF_STAR), Path("AutoPick/job007"), DMIN, DMAX, LoG_adjust_threshold=999.0,
                                     overlays=0, only_do_unfinished=True))
    assert f0.stat().st_mtime_ns == before and f1.exists()
    listed = read_star(project / "AutoPick/job007/autopick.star")["coordinate_files"]
    assert len(listed) == 3


@pytest.fixture(scope="module")
def extracted(project) -> Path:
    """Extract/job006 from the TRUE coordinates: box 96 -> 48, normalised, inverted, float16."""
    rows = [{"rlnMicrographName": m, "rlnMicrographCoordinates": f"sim/truth/coords/movie_{k + 1:04d}_autopick.star"}
            for k, m in enumerate(MICS)]
    write_star(project / "truth_coords.star", {"coordinate_files": pd.DataFrame(rows)})
    with inside(project):
        run_extract(ExtractOptions(Path(CTF_STAR), Path("truth_coords.star"), Path("Extract/job006"), 96, scale=48,
                                   norm=True, invert_contrast=True, float16=True))
    return project / "Extract/job006/particles.star"


def test_extract_outputs_as_relion(project, extracted):
    table = read_particles(extracted)
    n_true = sum(len(truth_xy(project, k)) for k in range(len(MICS)))
    assert len(table) == n_true
    opt = table.optics.iloc[0]
    assert opt.rlnImagePixelSize == pytest.approx(PX * 96 / 48) and int(opt.rlnImageSize) == 48
    assert int(opt.rlnImageDimensionality) == 2 and "rlnMicrographPixelSize" not in table.optics.columns
    assert table.data.rlnImageName.iloc[0] == "000001@Extract/job006/Movies/movie_0001.mrcs"
    ctf = read_table(project / CTF_STAR, "micrographs").data.set_index("rlnMicrographName")
    for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit"):
        assert np.allclose(table.data[col], ctf.loc[table.data.rlnMicrographName, col].to_numpy())
    for k, m in enumerate(MICS):
        stack = project / "Extract/job006" / Path(job_relative_name(m)).with_suffix(".mrcs")
        with mrcfile.open(stack, permissive=True) as mrc:
            assert int(mrc.header.mode) == 12 and mrc.data.shape == (len(truth_xy(project, k)), 48, 48)
        per_mic = read_star(stack.with_name(stack.stem + "_extract.star"))["images"]
        assert len(per_mic) == len(truth_xy(project, k))
    with ImageSource(table, project_dir=project) as src:
        imgs = src.read(np.arange(len(table)))
    assert imgs.shape == (n_true, 48, 48) and src.pixel_size == pytest.approx(4.0)
    bg = np.hypot(*np.meshgrid(np.arange(48) - 24, np.arange(48) - 24)) > default_bg_radius(48)
    # --invert_contrast after --norm: the background has mean 0 and std 1 (float16 rounding aside)
    assert np.abs(imgs[:, bg].mean(axis=1)).max() < 5e-3
    assert np.abs(imgs[:, bg].std(axis=1) - 1).max() < 5e-3


def _offset(avg: np.ndarray) -> np.ndarray:
    """(x, y) of the point about which ``avg`` is most symmetric, relative to pixel N//2."""
    n = avg.shape[0]
    rot = np.roll(avg[::-1, ::-1], 1, axis=(0, 1))  # 180° rotation about pixel n//2
    cc = np.fft.irfft2(np.fft.rfft2(avg) * np.conj(np.fft.rfft2(rot)), s=avg.shape)
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)
    shift = np.array([ix, iy], float)
    for axis, k in ((1, ix), (0, iy)):  # parabolic sub-pixel refinement of the peak
        lo, mid, hi = (np.take(cc, (k + d) % n, axis=axis)[iy if axis == 1 else ix] for d in (-1, 0, 1))
        shift[1 - axis] += 0.5 * (lo - hi) / (lo - 2 * mid + hi)
    shift[shift > n // 2] -= n
    return shift / 2


def test_extracted_particles_are_centred(project, extracted):
    """The average of random views is point-symmetric about the particle centre: it sits at pixel N/2
    (plus RELION's truncation of the coordinates, +0.5 px on average at full scale)."""
    table = read_particles(extracted)
    with ImageSource(table, project_dir=project) as src:
        avg = src.read(np.arange(len(table))).astype(np.float64).mean(axis=0)
    off = _offset(avg)
    assert np.all(np.abs(off - 0.25) <= 0.75), off  # 0.5 original px = 0.25 px after 2x down-scaling
    # Coordinates moved by (+8, -6) original px move the particles by (-4, +3) px in the 48-px boxes.
    rows = []
    for k, m in enumerate(MICS):
        coords = read_star(project / f"sim/truth/coords/movie_{k + 1:04d}_autopick.star")[""]
        coords = coords.assign(rlnCoordinateX=coords.rlnCoordinateX + 8, rlnCoordinateY=coords.rlnCoordinateY - 6)
        write_star(project / f"shifted_{k}.star", {"": coords})
        rows.append({"rlnMicrographName": m, "rlnMicrographCoordinates": f"shifted_{k}.star"})
    write_star(project / "shifted_list.star", {"coordinate_files": pd.DataFrame(rows)})
    with inside(project):
        out = run_extract(ExtractOptions(Path(CTF_STAR), Path("shifted_list.star"), Path("Extract/job008"), 96,
                                         scale=48, invert_contrast=True))
    shifted = read_particles(project / out)
    with ImageSource(shifted, project_dir=project) as src:
        avg2 = src.read(np.arange(len(shifted))).astype(np.float64).mean(axis=0)
    off2 = _offset(avg2 - avg2.mean())
    assert np.all(np.abs(off2 - np.array([-4.0, 3.0]) - 0.25) <= 0.75), off2


def test_extract_resume_keeps_counts(project, extracted):
    """--only_do_unfinished redoes a micrograph whose stack is missing; particles.star still matches the stacks."""
    stack = project / "Extract/job006/Movies/movie_0002.mrcs"
    other = project / "Extract/job006/Movies/movie_0001.mrcs"
    before = other.stat().st_mtime_ns
    stack.unlink()
    with inside(project):
        run_extract(ExtractOptions(Path(CTF_STAR), Path("truth_coords.star"), Path("Extract/job006"), 96, scale=48,
                                   norm=True, invert_contrast=True, float16=True, only_do_unfinished=True))
    assert other.stat().st_mtime_ns == before and stack.exists()
    table = read_particles(extracted)
    counts = table.data.rlnImageName.str.split("@").str[1].value_counts()
    for path, n in counts.items():
        with mrcfile.open(project / path, permissive=True) as mrc:
            assert mrc.data.shape[0] == n


def test_cut_boxes_edges_and_normalisation():
    """RELION's edge rule (nearest edge pixel), truncated centres, and normalise() with a ramp."""
    mic = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    boxes = cut_boxes(mic, np.array([2, 25]), np.array([20, 38]), 8)
    assert boxes.shape == (2, 8, 8) and boxes[0, 4, 4] == mic[20, 2]
    assert np.all(boxes[0, :, 0] == mic[16:24, 0]) and np.all(boxes[0, :, 1] == mic[16:24, 0])
    assert np.all(boxes[1, 6:, :] == boxes[1, 5, :])  # rows past y = 39 repeat the last row
    rng = np.random.default_rng(0)
    c = np.arange(32) - 16
    ramp = 3.0 * c[None, :] - 2.0 * c[:, None] + 50.0
    imgs = (ramp + rng.normal(0, 2.0, (4, 32, 32))).astype(np.float32)
    out, ok = normalise_background(imgs, 12)
    bg = np.hypot(*np.meshgrid(c, c)) > 12
    assert ok.all() and np.abs(out[:, bg].mean(axis=1)).max() < 1e-4
    assert np.abs(out[:, bg].std(axis=1) - 1).max() < 1e-4
    assert np.abs(out.std(axis=(1, 2)) - 1).max() < 0.05  # the ramp is gone everywhere, not only outside


def test_extraction_geometry_is_exact():
    """Blobs at known sub-pixel positions land at pixel N/2 + (coordinate - trunc(coordinate)), down-scaled too."""
    yy, xx = np.mgrid[:200, :300]
    pts = np.array([[100.3, 80.7], [150.9, 120.2], [60.5, 60.5]])
    mic = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 32.0) for x, y in pts).astype(np.float32)
    for box, scale in ((32, -1), (32, 16)):
        imgs, _ = extract_particles(mic, *integer_centres(pts[:, 0], pts[:, 1]), box, scale=scale)
        n = imgs.shape[-1]
        c = np.arange(n) - n // 2
        cx = (imgs.sum(axis=1) * c).sum(axis=1) / imgs.sum(axis=(1, 2))
        cy = (imgs.sum(axis=2) * c).sum(axis=1) / imgs.sum(axis=(1, 2))
        expect = (pts - np.trunc(pts)) * n / box
        assert np.allclose(np.stack([cx, cy], axis=1), expect, atol=0.01)


def test_greedy_rounds_equal_sequential_greedy():
    """The vectorised rounds take exactly the peaks of RELION's one-at-a-time loop."""
    rng = np.random.default_rng(5)
    fom = rng.random((60, 70)).astype(np.float32) - 0.3
    radius = rng.choice([3, 5, 6], size=fom.shape).astype(np.int32)
    ours = greedy_peaks(fom, radius, 6)
    work, ref = fom.copy(), []
    yy, xx = np.mgrid[:60, :70]
    while work.max() > 0:
        i, j = np.unravel_index(np.argmax(work), work.shape)
        ref.append(i * 70 + j)
        work[(yy - i) ** 2 + (xx - j) ** 2 < radius[i, j] ** 2] = 0
    assert ours.tolist() == ref


def test_box_sizes_and_diameters():
    assert extraction_box_sizes(160, 0.86) == (280, 96)  # EMPIAR-10288 in relion_it.py
    assert extraction_box_sizes(100, 1.0) == (150, 48)
    assert extraction_box_sizes(150, 1.0, max_pixel_size=2.0) == (226, 128)
    assert extraction_box_sizes(40, 3.0) == (20, 20)  # the down-scaled box never exceeds the box
    assert log_diameters(150, 180).tolist() == [30, 38, 50, 75, 150, 165, 180, 360, 540, 720, 900]
    with pytest.raises(ValueError):
        LoGParams(180, 150).check()


def test_register_subcommands():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register_autopick(sub)
    register_extract(sub)
    a = p.parse_args(["autopick", "--i", "m.star", "--odir", "AutoPick/job005", "--LoG", "--LoG_diam_min", "150",
                      "--LoG_diam_max", "180", "--only_do_unfinished"])
    assert a.LoG and a.LoG_diam_max == 180 and a.LoG_maxres == 20 and a.only_do_unfinished and a.gpu is False
    e = p.parse_args(["extract", "--i", "c.star", "--coord_list", "a.star", "--part_dir", "Extract/job006",
                      "--extract_size", "166", "--scale", "48", "--norm", "--float16", "--minimum_pick_fom", "-3"])
    assert e.scale == 48 and e.bg_radius == -1 and e.minimum_pick_fom == -3 and e.func is not None
    helptext = sub.choices["extract"].format_help()
    assert "(default: -999.0)" in helptext and "--invert_contrast" in helptext


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_autopick") is None, reason="RELION 3.1 is not installed")
def test_same_picks_and_foms_as_relion_autopick(project, tmp_path):
    """relion_autopick --LoG on the same micrographs gives the same coordinates and FOMs."""
    optics = read_table(project / CTF_STAR, "micrographs").optics
    write_star(tmp_path / "mics.star", {"optics": optics, "micrographs": pd.DataFrame(
        {"rlnMicrographName": [str(project / m) for m in MICS], "rlnOpticsGroup": 1})})
    res = subprocess.run(["relion_autopick", "--i", "mics.star", "--odir", "AutoPick/", "--pickname", "autopick",
                          "--LoG", "--LoG_diam_min", str(DMIN), "--LoG_diam_max", str(DMAX), "--shrink", "0",
                          "--lowpass", "20", "--LoG_adjust_threshold", "1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for m in MICS:
        theirs = next(iter(read_star(next((tmp_path / "AutoPick").rglob(Path(m).stem + "_autopick.star"))).values()))
        ours = picks(project, m)
        assert len(ours) == len(theirs)
        assert np.allclose(np.sort(ours.rlnAutopickFigureOfMerit), np.sort(theirs.rlnAutopickFigureOfMerit),
                           rtol=1e-4)
        d = np.hypot(ours.rlnCoordinateX.to_numpy()[:, None] - theirs.rlnCoordinateX.to_numpy()[None],
                     ours.rlnCoordinateY.to_numpy()[:, None] - theirs.rlnCoordinateY.to_numpy()[None])
        assert d.min(axis=1).max() < 6.0  # RELION's float rounding of its scale can move a pick by 1 work px
