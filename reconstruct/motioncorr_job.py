"""Motion correction job (like ``relion_run_motioncorr --use_own``): movies.star in, a MotionCorr job out.

For each movie: gain (frames x gain, rotated/flipped as --gain_rot/--gain_flip), defect and hot-pixel
repair, optional Fourier binning, whole-frame then patch alignment (:mod:`reconstruct.motion`),
dose-weighted (and optionally plain) sums, a summed amplitude spectrum for CTF estimation, and
RELION's per-movie files (EER movies rendered in fractions of ``--eer_grouping`` internal frames,
with RELION's EER gain rule): ``<stem>.mrc``, ``<stem>_noDW.mrc``, ``<stem>_PS.mrc``, ``<stem>.star``
(data_general, data_global_shift, data_local_motion_model, data_hot_pixels, data_local_shift),
``<stem>.log`` and a drift plot ``<stem>_shifts.png``.  The job writes ``corrected_micrographs.star``.
A movie that cannot be read or is inconsistent is skipped with a log line and listed in
``skipped_movies.txt``; the batch goes on.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import fft_module, get_xp, to_numpy
from .cli_options import add_gpu_flag
from .files.atomic import atomic_path, atomic_write_text
from .files.eer import DEFAULT_GROUPING, check_grouping, eer_gain
from .files.errors import InputError
from .files.movies import is_eer, read_gain, read_movie, read_movie_header
from .files.mrc import write_map
from .files.star import read_star, read_table, write_star
from .memory import check_fits
from .motion import (
    DoseWeights,
    LocalModel,
    accumulated_motion,
    align_stack,
    apply_shifts,
    binned_aligned_frames,
    binned_patch_grid,
    crop_half_rect,
    defect_mask,
    dose_per_frame_equivalent,
    extract_patches,
    fit_local_model,
    fix_defects,
    group_frames,
    patch_binning,
    patch_grid,
    power_spectrum,
    sum_global,
    sum_tiles,
    tile_centres,
    tile_layout,
)
from .progress import progress

log = logging.getLogger("reconstruct")
NOT_OBSERVED = -9999.0
FIT_RMSD_LIMIT = 10.0  # px: RELION disables local correction when the polynomial fits worse than this


@dataclass
class MotionCorrOptions:
    """Options of ``reconstruct motioncorr`` (RELION's relion_run_motioncorr names and defaults)."""

    input: Path  # --i: movies.star
    output: Path  # --o: the job directory, e.g. MotionCorr/job002
    first_frame_sum: int = 1
    last_frame_sum: int = -1  # 0 or negative: the last frame
    bin_factor: float = 1.0
    bfactor: float = 150.0  # px^2, as RELION's --bfactor
    gainref: Path | None = None
    gain_rot: int = 0  # 0-3: quarter turns clockwise as relion_display shows them
    gain_flip: int = 0  # 0: none, 1: upside down (flip Y), 2: left-right (flip X)
    patch_x: int = 5
    patch_y: int = 5
    group_frames: int = 1
    eer_grouping: int = DEFAULT_GROUPING  # EER internal frames per movie frame (fraction)
    eer_upsampling: int = 1  # 1: the detector's 4K grid (2, 8K, is not supported)
    defect_file: Path | None = None
    dose_weighting: bool = False
    dose_per_frame: float = 1.0
    preexposure: float = 0.0
    voltage: float = -1.0  # kV; -1: from the optics table
    angpix: float = -1.0  # Å; -1: from the optics table
    save_noDW: bool = False
    grouping_for_ps: int = -1  # -1: no power spectrum
    ps_size: int = 512
    float16: bool = False
    max_iter: int = 5
    skip_defect: bool = False
    dose_motionstats_cutoff: float = 4.0
    do_at_most: int = -1
    only_do_unfinished: bool = False
    skip_logfile: bool = False  # no per-movie drift plots
    project_dir: Path | None = None
    gpu: bool | None = False
    seed: int = 0


@dataclass
class MovieResult:
    """What one corrected movie produced (for the job's STAR file and for callers/tests)."""

    movie: str
    micrograph: Path
    shifts: np.ndarray  # (n_used, 2) global correction, unbinned px
    frame_numbers: np.ndarray  # 1-based frames used
    model: LocalModel | None
    seconds: float


def output_stem(movie: str) -> str:
    """RELION's output root of a movie path: the path without its extension, other dots made '_'."""
    p = Path(movie)
    if p.is_absolute():
        p = Path(*p.parts[1:])
    root = str(p.with_suffix("")) if p.suffix else str(p)
    return root.replace(".", "_")


def _transform_gain(gain: np.ndarray, rot: int, flip: int) -> np.ndarray:
    """RELION's --gain_rot (quarter turns clockwise in relion_display, y down) then --gain_flip."""
    if rot not in (0, 1, 2, 3):
        raise InputError(None, f"--gain_rot must be 0, 1, 2 or 3, not {rot}")
    if flip not in (0, 1, 2):
        raise InputError(None, f"--gain_flip must be 0, 1 or 2, not {flip}")
    out = np.rot90(gain, k=-rot)
    if flip == 1:
        out = out[::-1, :]
    elif flip == 2:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def _read_defects(path: Path, ny: int, nx: int) -> np.ndarray:
    """A MotionCor2 defect list (.txt: x y w h per line) or a defect map image (non-zero = bad)."""
    bad = np.zeros((ny, nx), dtype=bool)
    if path.suffix.lower() == ".txt":
        try:
            rows = np.loadtxt(path, ndmin=2)
        except ValueError as err:
            raise InputError(path, f"not a MotionCor2 defect list ({err})",
                             "each line must be 'x y w h'; convert SerialEM defect files (IMOD clip defect)") from None
        for x, y, w, h in rows.astype(int)[:, :4]:  # a handful of rectangles
            bad[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = True
        return bad
    img = read_gain(path)
    if img.shape != (ny, nx):
        raise InputError(path, f"defect map is {img.shape[1]} x {img.shape[0]} but movies are {nx} x {ny}")
    return img != 0


class _Skip(Exception):
    """A per-movie problem: the movie is skipped and listed, the batch goes on."""


class MotionCorrJob:
    """State shared by all movies of one job (inputs, gain, optics); :meth:`run` does the work."""

    def __init__(self, opts: MotionCorrOptions):
        self.opts = opts
        self.root = Path(opts.project_dir) if opts.project_dir else Path(".")
        self.out = Path(opts.output)
        if opts.float16 and opts.grouping_for_ps <= 0:
            raise InputError(None, "--float16 needs --grouping_for_ps",
                             "CTF estimation must then use the power spectra (as in RELION)")
        if opts.bin_factor < 1:
            raise InputError(None, f"--bin_factor must be >= 1, not {opts.bin_factor}")
        star = self.root / opts.input
        self.movies = read_table(star, "movies", required=("rlnMicrographMovieName",))
        names = self.movies.data["rlnMicrographMovieName"].astype(str)
        self.eer = bool(len(names)) and is_eer(names.iloc[0])
        if self.eer:
            check_grouping(opts.eer_grouping, opts.eer_upsampling)
            if not all(is_eer(m) for m in names):
                raise InputError(star, "mixes EER and other movies",
                                 "import EER movies in their own job (their gain and frames are handled differently)")
        self.optics = self.movies.optics.copy()
        if "rlnVoltage" not in self.optics.columns:
            if opts.voltage <= 0:
                raise InputError(star, "data_optics has no rlnVoltage", "pass --voltage")
            self.optics["rlnVoltage"] = opts.voltage
        if "rlnMicrographOriginalPixelSize" not in self.optics.columns:
            if opts.angpix <= 0:
                raise InputError(star, "data_optics has no rlnMicrographOriginalPixelSize", "pass --angpix")
            self.optics["rlnMicrographOriginalPixelSize"] = opts.angpix
        self.gain_path: Path | None = opts.gainref
        if self.gain_path is None and "rlnMicrographGainName" in self.optics.columns:
            self.gain_path = Path(str(self.optics["rlnMicrographGainName"].iloc[0]))
            log.info("using the gain reference %s named in %s", self.gain_path, star)
        self.gain: np.ndarray | None = None
        self.gain_used: str | None = None
        if self.gain_path is not None:
            if self.gain_path.suffix.lower().startswith(".dm"):
                raise InputError(self.gain_path, "Digital Micrograph gain references cannot be read",
                                 "convert it to MRC first (IMOD dm2mrc)")
            raw = read_gain(self.root / self.gain_path)
            if self.eer:
                raw = self._eer_gain(raw, str(names.iloc[0]))
            self.gain = _transform_gain(raw, opts.gain_rot, opts.gain_flip)
            self.gain_used = str(self.gain_path)
        self.xp = get_xp(opts.gpu)
        self.rng = np.random.default_rng(opts.seed)
        self.defects: np.ndarray | None = None

    def _eer_gain(self, raw: np.ndarray, first_movie: str) -> np.ndarray:
        """RELION's EER gain rule: a Thermo Fisher ``.gain`` (TIFF, read flipped as all TIFFs) is flipped
        back and used as it is; any other gain holds counts and is inverted (:func:`eer_gain`)."""
        multiplicative = self.gain_path is not None and self.gain_path.suffix.lower() == ".gain"
        try:
            head = read_movie_header(self.root / first_movie, self.opts.eer_grouping)
            shape: tuple[int, int] | None = (head.ny, head.nx)
        except InputError:
            shape = None  # the movie's own problem is reported when it is corrected
        log.info("EER gain reference %s: %s", self.gain_path,
                 "Thermo Fisher .gain, used as it is" if multiplicative else "counts, inverted (mean / gain)")
        return eer_gain(raw[::-1] if multiplicative else raw, multiplicative, shape)

    # ------------------------------------------------------------------ bookkeeping
    def names(self, movie: str) -> dict[str, Path]:
        """Output paths of one movie."""
        stem = self.out / output_stem(movie)
        return {k: Path(f"{stem}{suffix}") for k, suffix in
                (("mrc", ".mrc"), ("noDW", "_noDW.mrc"), ("ps", "_PS.mrc"), ("star", ".star"), ("log", ".log"),
                 ("png", "_shifts.png"))}

    def is_done(self, movie: str) -> bool:
        """RELION's --only_do_unfinished test: the sum, the motion STAR (and the spectrum) exist."""
        n = self.names(movie)
        return n["mrc"].exists() and n["star"].exists() and (self.opts.grouping_for_ps <= 0 or n["ps"].exists())

    def optics_row(self, group: int) -> pd.Series:
        """The optics-table row of a group."""
        rows = self.optics[self.optics["rlnOpticsGroup"].astype(int) == int(group)]
        return rows.iloc[0]

    # ------------------------------------------------------------------ one movie
    def correct(self, movie: str, group: int) -> MovieResult:
        """Correct one movie and write its files; raises _Skip for a per-movie problem."""
        opts, xp = self.opts, self.xp
        t0 = time.monotonic()
        names = self.names(movie)
        lines: list[str] = [f"Working on {movie}", ""]
        path = self.root / movie
        try:
            head = read_movie_header(path, opts.eer_grouping)
        except InputError as err:
            raise _Skip(str(err)) from None
        ny, nx, n_all = head.ny, head.nx, head.n_frames
        lines.append(f"Movie size: X = {nx} Y = {ny} N = {n_all}")
        if self.eer:
            lines.append(f"EER movie: fractions of {opts.eer_grouping} internal frames (upsampling 1)")
        last = n_all if opts.last_frame_sum <= 0 else opts.last_frame_sum
        if last > n_all:
            raise _Skip(f"{path}: has {n_all} frames but --last_frame_sum is {last} (truncated movie?)")
        used = np.arange(max(opts.first_frame_sum, 1), last + 1)
        if len(used) // max(opts.group_frames, 1) < 3:
            raise _Skip(f"{path}: too few frames ({len(used)}) to align")
        if self.gain is not None and self.gain.shape != (ny, nx):
            raise _Skip(f"{path}: frames are {nx} x {ny} but the gain reference is "
                        f"{self.gain.shape[1]} x {self.gain.shape[0]}")
        lines.append("Frames to be used: " + " ".join(str(f) for f in used))
        # The frames and their half transforms are held at once, plus chunk-sized temporaries.
        check_fits(int(2.3 * 4 * len(used) * ny * nx), xp, f"motion correction of {path.name}",
                   "free memory (fewer jobs at once) or use fewer frames (--first_frame_sum/--last_frame_sum)")
        try:
            frames, _ = read_movie(path, used - 1, opts.eer_grouping)
        except InputError as err:
            raise _Skip(str(err)) from None
        optics = self.optics_row(group)
        angpix = float(optics["rlnMicrographOriginalPixelSize"])
        voltage = float(optics["rlnVoltage"])
        fr = xp.asarray(frames)
        del frames
        gain = xp.asarray(self.gain) if self.gain is not None else None
        if gain is not None:
            fr *= gain
        if opts.defect_file is not None and self.defects is None:
            self.defects = _read_defects(self.root / opts.defect_file, ny, nx)
        dmap = xp.asarray(self.defects) if self.defects is not None else None
        bad, hot = defect_mask(fr, gain, dmap, detect_hot=not opts.skip_defect)
        n_bad = int(bad.sum())
        lines.append(f"Detected {int(hot.sum())} hot pixels; {n_bad} defect pixels in all replaced")
        if n_bad > 0.2 * ny * nx:
            raise _Skip(f"{path}: {n_bad} of {ny * nx} pixels are defective (wrong gain reference or empty frames?)")
        fr = fix_defects(fr, bad, self.rng)
        hot_xy = np.argwhere(to_numpy(hot))[:, ::-1]
        fft = fft_module(xp)
        # Early binning (RELION's default): Fourier-crop every frame before aligning.
        bin_f = opts.bin_factor
        nyb, nxb = int(ny / bin_f), int(nx / bin_f)
        if (nyb % 2 or nxb % 2) and bin_f != 1:
            raise _Skip(f"{path}: {nx} x {ny} binned by {bin_f} is {nxb} x {nyb}; the binned size must be even")
        local_ok = opts.patch_x > 2 and opts.patch_y > 2
        ft = fft.rfft2(fr)
        if bin_f != 1 or not local_ok:
            del fr  # the full-size buffer is kept only to receive the aligned frames of the local sums
            fr = None
        if bin_f != 1:
            ft = crop_half_rect(ft, nyb, nxb) * np.float32(nyb * nxb / (ny * nx))
            lines.append(f"Image size after binning: X = {nxb} Y = {nyb}")
        px_b = angpix * bin_f
        if opts.grouping_for_ps > 0:
            ps, ps_px = power_spectrum(ft, nyb, nxb, px_b, opts.grouping_for_ps, opts.ps_size)
            write_map(names["ps"], to_numpy(ps), ps_px)
            lines.append(f"Written the power spectrum for CTF estimation: {names['ps']} ({ps_px:.4f} Å/px)")
        bfac = opts.bfactor / bin_f ** 2
        glob = align_stack(ft, nyb, nxb, bfac, opts.max_iter)
        lines += ["", "Global alignment:"] + [f" Iteration {i + 1}: RMSD = {r:.4f} px" for i, r in enumerate(glob.rmsd)]
        gshift = glob.shifts  # binned px
        model = None
        lines += ["", "Local alignments:", f"Patches: X = {opts.patch_x} Y = {opts.patch_y}"]
        weight_fn = None
        if opts.dose_weighting:
            weight_fn = DoseWeights(dose_per_frame_equivalent(used, opts.dose_per_frame, opts.preexposure, voltage),
                                    px_b, xp)
        if local_ok:
            # Patches are aligned on globally aligned frames resampled to the frequencies the B-factor
            # keeps; the sums are tiles of the full-size aligned frames, written over the raw ones.
            my, mx = patch_binning(nyb, nxb, bfac, opts.patch_x, opts.patch_y)
            ry, rx = my / nyb, mx / nxb
            grid = binned_patch_grid(patch_grid(nyb, nxb, opts.patch_x, opts.patch_y), ry, rx, my, mx)
            small = binned_aligned_frames(ft, gshift, nyb, nxb, my, mx)
            patches, zc = group_frames(extract_patches(small, grid), opts.group_frames)
            del small
            pres = align_stack(fft.rfft2(patches), grid.height, grid.width, bfac * ry * rx, opts.max_iter,
                               search_range=50.0 * min(ry, rx))
            del patches
            if fr is None:  # binned: real frames of the binned size
                fr = xp.empty((len(used), nyb, nxb), dtype=xp.float32)
            for s in range(0, len(used), 8):  # globally aligned frames (exact shifts), over the raw ones
                fr[s:s + 8] = fft.irfft2(apply_shifts(ft[s:s + 8], gshift[s:s + 8], nyb, nxb), s=(nyb, nxb))
            del ft
            conv = to_numpy(pres.converged)
            centres = grid.centres / np.array([rx, ry])
            model = fit_local_model(to_numpy(pres.shifts) / np.array([rx, ry]), zc, centres, nyb, nxb,
                                    weights=np.where(conv, 1.0, 0.25))
            lines.append(f"Patches converged: {int(conv.sum())} / {conv.size}")
            lines.append(f"Polynomial fit RMSD: X = {model.rmsd[0] * bin_f:.4f} px Y = {model.rmsd[1] * bin_f:.4f} px")
            if max(model.rmsd) * bin_f >= FIT_RMSD_LIMIT:
                lines.append("The polynomial motion model did not explain the observation very well; "
                             "local correction is disabled for this micrograph.")
                model = None
        else:
            lines.append("Too few patches to do local alignments. Local alignment is skipped.")
        if local_ok and model is None:  # local correction failed: tiles with the global shifts only
            layout = tile_layout(nyb, nxb, 0.0)
            sums = sum_tiles(fr, xp.zeros((len(used), layout.ty, layout.tx, 2), dtype=xp.float32), layout,
                             weight_fn)
            del fr
        elif model is not None:
            z = np.arange(len(used), dtype=float)
            probe = np.stack(np.meshgrid(np.linspace(0, nxb, 9), np.linspace(0, nyb, 9)), -1).reshape(-1, 2)
            lx, ly = model.shift_at(probe[None, :, 0] / nxb - 0.5, probe[None, :, 1] / nyb - 0.5, z[:, None])
            layout = tile_layout(nyb, nxb, float(np.abs(np.concatenate([lx, ly])).max()))
            cy, cx = tile_centres(layout)
            sx, sy = model.shift_at(cx[None, None, :] / nxb - 0.5, cy[None, :, None] / nyb - 0.5,
                                    z[:, None, None])
            tshift = xp.asarray(np.stack(np.broadcast_arrays(sx, sy), -1), dtype=xp.float32)
            sums = sum_tiles(fr, tshift, layout, weight_fn)
            del fr
        else:
            sums = sum_global(ft, gshift, nyb, nxb, weight_fn)
            del ft
        out_px = angpix * bin_f
        if not opts.dose_weighting:
            write_map(names["mrc"], to_numpy(sums[0]), out_px, float16=opts.float16)
            lines.append(f"Written aligned sum to {names['mrc']}")
        else:
            if opts.save_noDW:
                write_map(names["noDW"], to_numpy(sums[0]), out_px, float16=opts.float16)
                lines.append(f"Written aligned but non-dose weighted sum to {names['noDW']}")
            write_map(names["mrc"], to_numpy(sums[1]), out_px, float16=opts.float16)
            lines.append(f"Written aligned and dose-weighted sum to {names['mrc']}")
        shifts_px = to_numpy(gshift).astype(float) * bin_f
        if model is not None:
            model = LocalModel(model.coeff_x * bin_f, model.coeff_y * bin_f, (model.rmsd[0] * bin_f,
                               model.rmsd[1] * bin_f), model.observed * bin_f, model.fitted * bin_f, model.z,
                               model.centres * bin_f)
        self._write_motion_star(names["star"], movie, head, used, shifts_px, model, hot_xy, angpix, voltage)
        dt = time.monotonic() - t0
        lines.append(f"Done in {dt:.1f} s")
        atomic_write_text(names["log"], "\n".join(lines) + "\n")
        if not opts.skip_logfile:
            _plot_shifts(names["png"], movie, shifts_px, model, nx, ny)
        return MovieResult(movie, names["mrc"], shifts_px, used, model, dt)

    def _write_motion_star(self, path: Path, movie: str, head: Any, used: np.ndarray, shifts: np.ndarray,
                           model: LocalModel | None, hot_xy: np.ndarray, angpix: float, voltage: float) -> None:
        """The per-movie motion STAR file in RELION's Micrograph::write layout."""
        general: dict[str, Any] = {"rlnImageSizeX": head.nx, "rlnImageSizeY": head.ny, "rlnImageSizeZ": head.n_frames,
                                   "rlnMicrographMovieName": movie}
        if self.gain_used:
            general["rlnMicrographGainName"] = self.gain_used
        if self.opts.defect_file is not None:
            general["rlnMicrographDefectFile"] = str(self.opts.defect_file)
        if self.eer:
            general.update({"rlnEERUpsampling": int(self.opts.eer_upsampling),
                            "rlnEERGrouping": int(self.opts.eer_grouping)})
        general.update({"rlnMicrographBinning": float(self.opts.bin_factor),
                        "rlnMicrographOriginalPixelSize": angpix,
                        "rlnMicrographDoseRate": float(self.opts.dose_per_frame),
                        "rlnMicrographPreExposure": float(self.opts.preexposure),
                        "rlnVoltage": voltage, "rlnMicrographStartFrame": int(used[0]),
                        "rlnMotionModelVersion": 1 if model is not None else 0})
        allx = np.full(head.n_frames, NOT_OBSERVED)
        ally = np.full(head.n_frames, NOT_OBSERVED)
        allx[used - 1], ally[used - 1] = shifts[:, 0], shifts[:, 1]
        blocks: dict[str, Any] = {"general": general, "global_shift": pd.DataFrame({
            "rlnMicrographFrameNumber": np.arange(1, head.n_frames + 1), "rlnMicrographShiftX": allx,
            "rlnMicrographShiftY": ally})}
        if model is not None:
            blocks["local_motion_model"] = pd.DataFrame({"rlnMotionModelCoeffsIdx": np.arange(36),
                                                         "rlnMotionModelCoeff": model.coefficients()})
        if len(hot_xy):
            blocks["hot_pixels"] = pd.DataFrame({"rlnCoordinateX": hot_xy[:, 0].astype(float),
                                                 "rlnCoordinateY": hot_xy[:, 1].astype(float)})
        if model is not None:
            p, g = model.observed.shape[:2]
            blocks["local_shift"] = pd.DataFrame({
                "rlnMicrographFrameNumber": np.tile(model.z + used[0], p),
                "rlnCoordinateX": np.repeat(model.centres[:, 0], g),
                "rlnCoordinateY": np.repeat(model.centres[:, 1], g),
                "rlnMicrographShiftX": model.observed[..., 0].ravel(),
                "rlnMicrographShiftY": model.observed[..., 1].ravel()})
        write_star(path, blocks)

    # ------------------------------------------------------------------ the batch
    def run(self) -> Path:
        """Process the movies (respecting --only_do_unfinished and --do_at_most) and write the job STAR."""
        opts = self.opts
        data = self.movies.data
        todo, listed = [], []
        for i, movie in enumerate(data["rlnMicrographMovieName"].astype(str)):
            done = opts.only_do_unfinished and self.is_done(movie)
            if not done and 0 <= opts.do_at_most <= len(todo):
                continue  # left for a later run (RELION: not listed)
            listed.append(i)
            if not done:
                todo.append(i)
        if opts.only_do_unfinished:
            log.info("motioncorr: %d of %d movies already done", len(listed) - len(todo), len(data))
        self._check_gain_size([str(data["rlnMicrographMovieName"].iloc[i]) for i in todo])
        self.out.mkdir(parents=True, exist_ok=True)
        skipped: list[tuple[str, str]] = []
        for i in progress(todo, len(todo), "motion correction", "movie"):
            movie = str(data["rlnMicrographMovieName"].iloc[i])
            try:
                res = self.correct(movie, int(data["rlnOpticsGroup"].iloc[i]))
                log.debug("%s: %.1f s", movie, res.seconds)
            except _Skip as err:
                log.warning("motioncorr: skipping %s: %s", movie, err)
                skipped.append((movie, str(err)))
            except (ValueError, MemoryError) as err:
                log.warning("motioncorr: skipping %s: %s", movie, err, exc_info=log.isEnabledFor(logging.DEBUG))
                skipped.append((movie, f"{type(err).__name__}: {err}"))
        if skipped:
            atomic_write_text(self.out / "skipped_movies.txt", "".join(f"{m}\t{r}\n" for m, r in skipped))
            log.warning("motioncorr: %d movie(s) skipped, listed in %s", len(skipped), self.out / "skipped_movies.txt")
        return self._write_job_star(listed)

    def _check_gain_size(self, movies: list[str]) -> None:
        """A gain reference that fits none of the first readable movie's frames is the user's error."""
        if self.gain is None:
            return
        for movie in movies[:5]:
            try:
                head = read_movie_header(self.root / movie, self.opts.eer_grouping)
            except InputError:
                continue
            if self.gain.shape == (head.ny, head.nx):
                return
            hint = ("the rotated gain would fit: check --gain_rot" if self.gain.shape == (head.nx, head.ny)
                    else "use the gain reference recorded with these movies")
            raise InputError(self.gain_path, f"the gain reference (after --gain_rot/--gain_flip) is "
                             f"{self.gain.shape[1]} x {self.gain.shape[0]} px but {movie} has "
                             f"{head.nx} x {head.ny} px frames", hint)

    def _write_job_star(self, rows: list[int]) -> Path:
        """corrected_micrographs.star: every listed movie whose outputs exist, with motion statistics."""
        opts, data = self.opts, self.movies.data
        recs = []
        for i in rows:
            movie = str(data["rlnMicrographMovieName"].iloc[i])
            n = self.names(movie)
            if not n["mrc"].exists():
                continue
            rec: dict[str, Any] = {}
            if opts.dose_weighting and opts.save_noDW:
                rec["rlnMicrographNameNoDW"] = str(n["noDW"])
            if opts.grouping_for_ps > 0:
                rec["rlnCtfPowerSpectrum"] = str(n["ps"])
            rec.update({"rlnMicrographName": str(n["mrc"]), "rlnMicrographMetadata": str(n["star"]),
                        "rlnOpticsGroup": int(data["rlnOpticsGroup"].iloc[i])})
            if n["star"].exists():
                b = read_star(n["star"])
                gen, gs = b["general"].iloc[0], b["global_shift"]
                ok = gs["rlnMicrographShiftX"].to_numpy(float) != NOT_OBSERVED
                tot, early, late = accumulated_motion(
                    gs[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)[ok],
                    gs["rlnMicrographFrameNumber"].to_numpy(int)[ok], float(gen["rlnMicrographDoseRate"]),
                    float(gen["rlnMicrographPreExposure"]), opts.dose_motionstats_cutoff)
                rec.update({"rlnAccumMotionTotal": tot, "rlnAccumMotionEarly": early, "rlnAccumMotionLate": late})
            recs.append(rec)
        optics = self.optics.copy()
        optics["rlnMicrographPixelSize"] = optics["rlnMicrographOriginalPixelSize"].astype(float) * opts.bin_factor
        star = self.out / "corrected_micrographs.star"
        write_star(star, {"optics": optics, "micrographs": pd.DataFrame(recs)})
        log.info("motioncorr: %d micrographs in %s", len(recs), star)
        return star


def _plot_shifts(out: Path, movie: str, shifts: np.ndarray, model: LocalModel | None, nx: int, ny: int) -> None:
    """Drift plot as RELION's <stem>_shifts.eps: the global track, and patch tracks (observed grey,
    fitted black, start red) drawn at the patch centres, trajectories scaled x40; y down as in RELION."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 40.0
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    cx, cy = nx / 2.0, ny / 2.0
    ax.plot(cx + scale * shifts[:, 0], cy + scale * shifts[:, 1], color="blue", lw=1)
    ax.plot(cx + scale * shifts[0, 0], cy + scale * shifts[0, 1], "o", color="red", ms=3)
    if model is not None:
        for c, obs, fit in zip(model.centres, model.observed, model.fitted):
            ax.plot(c[0] + scale * obs[:, 0], c[1] + scale * obs[:, 1], color="0.5", lw=0.7)
            ax.plot(c[0] + scale * fit[:, 0], c[1] + scale * fit[:, 1], color="black", lw=0.8)
            ax.plot(c[0] + scale * fit[0, 0], c[1] + scale * fit[0, 1], "o", color="red", ms=2)
    ax.set_xlim(0, nx)
    ax.set_ylim(ny, 0)
    ax.set_aspect("equal")
    ax.set_xlabel(f"X (in pixels; trajectory scaled by {scale:.0f})")
    ax.set_ylabel(f"Y (in pixels; trajectory scaled by {scale:.0f})")
    ax.set_title(Path(movie).name, fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def run_motioncorr(opts: MotionCorrOptions) -> Path:
    """Run a motion-correction job; returns the path of corrected_micrographs.star."""
    return MotionCorrJob(opts).run()


# ---------------------------------------------------------------------------------------- CLI
def _cmd(a: argparse.Namespace) -> None:
    opts = MotionCorrOptions(
        input=Path(a.i), output=Path(a.o), first_frame_sum=a.first_frame_sum, last_frame_sum=a.last_frame_sum,
        bin_factor=a.bin_factor, bfactor=a.bfactor, gainref=Path(a.gainref) if a.gainref else None,
        gain_rot=a.gain_rot, gain_flip=a.gain_flip, patch_x=a.patch_x, patch_y=a.patch_y,
        group_frames=a.group_frames, eer_grouping=a.eer_grouping, eer_upsampling=a.eer_upsampling,
        defect_file=Path(a.defect_file) if a.defect_file else None,
        dose_weighting=a.dose_weighting, dose_per_frame=a.dose_per_frame, preexposure=a.preexposure,
        voltage=a.voltage, angpix=a.angpix, save_noDW=a.save_noDW, grouping_for_ps=a.grouping_for_ps,
        ps_size=a.ps_size, float16=a.float16, max_iter=a.max_iter, skip_defect=a.skip_defect,
        dose_motionstats_cutoff=a.dose_motionstats_cutoff, do_at_most=a.do_at_most,
        only_do_unfinished=a.only_do_unfinished, skip_logfile=a.skip_logfile,
        project_dir=Path(a.project_dir) if a.project_dir else None, gpu=a.gpu, seed=a.random_seed)
    star = run_motioncorr(opts)
    print(f"wrote {star}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``motioncorr`` subcommand to a ``reconstruct`` subparsers object."""
    s = sub.add_parser(
        "motioncorr", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="motion-correct movies (like relion_run_motioncorr --use_own)",
        description="Beam-induced motion correction: whole-frame then patch alignment (RELION's polynomial "
                    "deformation model, fitted robustly), dose weighting, power spectra; writes a RELION "
                    "MotionCorr job directory. MRC, TIFF and EER movies.")
    s.add_argument("--i", required=True, help="movies.star from an Import job")
    s.add_argument("--o", required=True, help="output job directory, e.g. MotionCorr/job002")
    s.add_argument("--first_frame_sum", type=int, default=1, help="first frame to use (1-based)")
    s.add_argument("--last_frame_sum", type=int, default=-1, help="last frame to use (0 or negative: all)")
    s.add_argument("--bin_factor", type=float, default=1.0, help="Fourier binning factor (may be non-integer)")
    s.add_argument("--bfactor", type=float, default=150.0, help="B-factor (px^2) weighting the cross-correlations")
    s.add_argument("--gainref", default=None,
                   help="gain reference (MRC/TIFF), multiplied into the frames (default: rlnMicrographGainName)")
    s.add_argument("--gain_rot", type=int, default=0, choices=(0, 1, 2, 3),
                   help="rotate the gain this many times 90 degrees clockwise (MotionCor2's RotGain)")
    s.add_argument("--gain_flip", type=int, default=0, choices=(0, 1, 2),
                   help="flip the gain: 1 upside down (Y), 2 left to right (X) (MotionCor2's FlipGain)")
    s.add_argument("--patch_x", type=int, default=5, help="patches along X (<= 2: global alignment only)")
    s.add_argument("--patch_y", type=int, default=5, help="patches along Y (<= 2: global alignment only)")
    s.add_argument("--group_frames", type=int, default=1, help="sum this many frames for patch alignment")
    s.add_argument("--eer_grouping", type=int, default=DEFAULT_GROUPING,
                   help="EER movies: internal frames summed into one movie frame (fraction); internal frames "
                        "left over after the last whole fraction are not used. --dose_per_frame is then the dose "
                        "of one fraction")
    s.add_argument("--eer_upsampling", type=int, default=1, choices=(1,),
                   help="EER movies: 1 renders the detector's 4K grid (8K super-resolution is not supported)")
    s.add_argument("--defect_file", default=None, help="MotionCor2 defect list (x y w h, .txt) or defect map image")
    s.add_argument("--dose_weighting", action="store_true", help="dose-weight the sum (Grant & Grigorieff 2015)")
    s.add_argument("--dose_per_frame", type=float, default=1.0, help="exposure per frame (e/Å^2)")
    s.add_argument("--preexposure", type=float, default=0.0, help="exposure before the first frame (e/Å^2)")
    s.add_argument("--voltage", type=float, default=-1.0, help="kV, if movies.star has no rlnVoltage")
    s.add_argument("--angpix", type=float, default=-1.0,
                   help="movie pixel size (Å), if movies.star has no rlnMicrographOriginalPixelSize")
    s.add_argument("--save_noDW", action="store_true", help="also write the sum without dose weighting (_noDW.mrc)")
    s.add_argument("--grouping_for_ps", type=int, default=-1,
                   help="sum this many frames per power spectrum and write _PS.mrc (-1: none)")
    s.add_argument("--ps_size", type=int, default=512, help="edge of the power spectrum image (even)")
    s.add_argument("--float16", action="store_true", help="write sums as float16 (MRC mode 12)")
    s.add_argument("--max_iter", type=int, default=5, help="alignment iterations")
    s.add_argument("--skip_defect", action="store_true", help="do not detect hot pixels")
    s.add_argument("--dose_motionstats_cutoff", type=float, default=4.0,
                   help="exposure (e/Å^2) separating early from late accumulated motion")
    s.add_argument("--do_at_most", type=int, default=-1, help="process at most this many unprocessed movies")
    s.add_argument("--only_do_unfinished", action="store_true", help="skip movies whose outputs exist")
    s.add_argument("--skip_logfile", action="store_true", help="do not draw per-movie drift plots")
    s.add_argument("--use_own", action="store_true", help="accepted for RELION compatibility (always on)")
    s.add_argument("--j", type=int, default=1, help="accepted for RELION compatibility (FFTs use all cores)")
    s.add_argument("--random_seed", type=int, default=0, help="seed for the defect-pixel noise")
    s.add_argument("--project_dir", default=None, help="directory that movie paths are relative to (default: cwd)")
    add_gpu_flag(s)
    s.set_defaults(func=_cmd)
