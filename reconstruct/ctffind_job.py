"""RELION's CtfFind job (CTFFIND-4 as ``relion_run_ctffind`` runs it) on a motion-corrected micrograph set.

Reads ``corrected_micrographs.star``; per micrograph writes, under the job directory and mirroring
the input's path below its job directory (RELION's rule), ``<stem>.ctf`` (the CTFFIND-style
diagnostic: fitted |CTF| on the left half, background-subtracted spectrum on the right),
``<stem>_ctffind4.log`` (CTFFIND's summary lines, which RELION's parser also reads) and
``<stem>_ctffind4.png`` (1D fit and the 2D half/half); then ``micrographs_ctf.star``: the optics
table as input, and every micrograph that was fitted with rlnCtfImage, rlnDefocusU/V,
rlnCtfAstigmatism, rlnDefocusAngle, rlnCtfFigureOfMerit, rlnCtfMaxResolution (and rlnPhaseShift).

With ``--use_given_ps`` the movie's power spectrum from motion correction (rlnCtfPowerSpectrum,
``*_PS.mrc``) is fitted instead of the micrograph, as RELION does: RELION writes it as a centred
(zero frequency at N/2), full square amplitude spectrum (the sum of |F| over frame groups, Fourier-
resampled to ``--ps_size``), with the spectrum's own pixel size in the header; its size replaces
``--box``.  A micrograph that cannot be fitted (unreadable, blank, NaN) is skipped with a log line
and listed at the end; the batch goes on.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import get_xp
from .cli_options import add_gpu_flag
from .ctf import Optics
from .ctf_fit import CtfFit, CtfSearch, diagnostic_image, estimate_ctf
from .files.atomic import atomic_path, atomic_write_text
from .files.errors import InputError
from .files.mrc import read_map, write_map
from .files.star import MetadataTable, write_star
from .progress import progress
from .select_job import read_relion_table

log = logging.getLogger("reconstruct")
OUTPUT_STAR = "micrographs_ctf.star"
CTF_LABELS = ("rlnCtfImage", "rlnDefocusU", "rlnDefocusV", "rlnCtfAstigmatism", "rlnDefocusAngle",
              "rlnCtfFigureOfMerit", "rlnCtfMaxResolution")


@dataclass
class CtffindOptions:
    """Options of ``reconstruct ctffind`` (RELION's CtfFind job names; lengths in Å)."""

    star: Path  # --i: corrected_micrographs.star
    out: Path  # --o: the job directory, e.g. CtfFind/job003
    box: int = 512  # --box: FFT box of the amplitude spectrum
    resmin: float = 30.0
    resmax: float = 5.0
    dfmin: float = 5000.0
    dfmax: float = 50000.0
    dfstep: float = 500.0
    dast: float = 100.0  # astigmatism restraint (CTFFIND's expected astigmatism)
    use_given_ps: bool = False
    use_noDW: bool = False
    do_phaseshift: bool = False
    phase_min: float = 0.0
    phase_max: float = 180.0
    phase_step: float = 10.0
    only_do_unfinished: bool = False
    plots: bool = True
    gpu: bool | None = False

    def search(self) -> CtfSearch:
        """The fitting ranges as :class:`CtfSearch`."""
        return CtfSearch(self.resmin, self.resmax, self.dfmin, self.dfmax, self.dfstep, self.dast,
                         self.do_phaseshift, self.phase_min, self.phase_max, self.phase_step)


@dataclass
class MicrographResult:
    """The fitted values of one micrograph, as they go into micrographs_ctf.star."""

    defocus_u: float
    defocus_v: float
    defocus_angle: float
    phase_shift: float
    score: float
    max_resolution: float
    ctf_image: str


def output_stem(source: str, out_dir: Path) -> Path:
    """RELION's output stem: the input path below its ``Dir/jobNNN/`` (else the path itself, or the
    file name for absolute or ``..`` paths) under the job directory, without the extension."""
    p = Path(source)
    parts = p.parts
    for i in range(len(parts) - 1):
        if re.fullmatch(r"job\d+", parts[i]):
            p = Path(*parts[i + 1:])
            break
    if p.is_absolute() or ".." in p.parts:
        p = Path(p.name)
    return out_dir / p.with_suffix("")


def _log_text(source: str, fit: CtfFit, optics: Optics, opts: CtffindOptions, input_pixel: float) -> str:
    """A CTFFIND-4-style summary; the 'Estimated ...', 'Score' and 'Thon rings' lines are laid out
    as CTFFIND prints them, so RELION's own log parser reads them too."""
    lines = [
        "cryoem-autoproc CTF estimation (CTFFIND-4 algorithm)",
        f"Input file                      : {source}",
        f"Pixel size of input             : {input_pixel:.4f} Angstroms",
        f"Acceleration voltage            : {optics.voltage:.1f} kV",
        f"Spherical aberration            : {optics.cs:.2f} mm",
        f"Amplitude contrast              : {optics.amplitude_contrast:.3f}",
        f"Box size                        : {fit.box}",
        f"Resolution range for fitting    : {opts.resmin:.1f} to {opts.resmax:.1f} Angstroms",
        f"Defocus search                  : {opts.dfmin:.1f} to {opts.dfmax:.1f} step {opts.dfstep:.1f} Angstroms",
        f"Astigmatism restraint           : {opts.dast:.1f} Angstroms",
        "",
        f"Estimated defocus values        : {fit.defocus_u:.2f} , {fit.defocus_v:.2f} Angstroms",
        f"Estimated azimuth of astigmatism: {fit.defocus_angle:.2f} degrees",
    ]
    if opts.do_phaseshift:
        rad = math.radians(fit.phase_shift)
        lines.append(f"Additional phase shift          : {fit.phase_shift:.3f} degrees ({rad:.3f} radians) "
                     f"({rad / math.pi:.3f} pi)")
    lines += [
        f"Score                           : {fit.score:.5f}",
        f"Pixel size for fitting          : {fit.pixel_size:.3f} Angstroms",
        f"Thon rings with good fit up to  : {fit.max_resolution:.1f} Angstroms",
        f"Significance of the Thon rings  : {fit.significance:.1f} (robust z-score; < 4.5 means no fit)",
        "",
    ]
    return "\n".join(lines)


_LOG_PATTERNS = {
    "defocus": re.compile(r"Estimated defocus values\s*:\s*(\S+)\s*,\s*(\S+)"),
    "angle": re.compile(r"Estimated azimuth of astigmatism\s*:\s*(\S+)"),
    "phase": re.compile(r"Additional phase shift\s*:\s*(\S+)"),
    "score": re.compile(r"Score\s*:\s*(\S+)"),
    "maxres": re.compile(r"Thon rings with good fit up to\s*:\s*(\S+)"),
}


def read_ctffind_log(path: Path) -> dict[str, float] | None:
    """The fitted values from a ``*_ctffind4.log`` (ours or CTFFIND's); None if incomplete."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = {k: p.search(text) for k, p in _LOG_PATTERNS.items()}
    if not all(found[k] for k in ("defocus", "angle", "score", "maxres")):
        return None
    try:
        out = {"defocus_u": float(found["defocus"].group(1)), "defocus_v": float(found["defocus"].group(2)),
               "defocus_angle": float(found["angle"].group(1)), "score": float(found["score"].group(1)),
               "max_resolution": float(found["maxres"].group(1)),
               "phase_shift": float(found["phase"].group(1)) if found["phase"] else 0.0}
    except ValueError:
        return None
    return out if all(np.isfinite(list(out.values()))) else None


def plot_fit(fit: CtfFit, image: np.ndarray, title: str, out: Path) -> Path:
    """PNG of a fit: the 1D equi-phase profile (renormalised) with the fitted |CTF| and the windowed
    fit correlation, the fit resolution marked; beside it the 2D diagnostic (fit left, data right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100, gridspec_kw={"width_ratios": [1.5, 1]})
    k = fit.frequency
    sel = slice(fit.first_bin, None)
    prof = fit.profile[sel]
    lo, hi = np.percentile(prof, [2, 98]) if prof.size else (0.0, 1.0)
    scaled = (prof - lo) / (hi - lo) if hi > lo else prof
    ax.plot(k[sel], scaled, color="0.55", lw=0.8, label="spectrum (equi-phase average)")
    ax.plot(k[sel], fit.fit_profile[sel], color="tab:red", lw=0.9, label="fitted |CTF|")
    ax.plot(k[sel], fit.frc[sel], color="tab:blue", lw=1.2, label="fit correlation (windowed)")
    if fit.max_resolution < fit.box * fit.pixel_size:
        ax.axvline(1.0 / fit.max_resolution, color="tab:green", ls="--", lw=1,
                   label=f"good fit up to {fit.max_resolution:.2f} Å")
    ax.axhline(0.5, color="0.7", lw=0.6, ls=":")
    ax.set_xlim(0, k[-1])
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    top = ax.twiny()
    top.set_xlim(0, k[-1])
    ticks = np.linspace(0, k[-1], 6)[1:]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1 / t:.1f}" for t in ticks], fontsize=7)
    top.set_xlabel("resolution (Å)", fontsize=8)
    ax2.imshow(image, cmap="gray", origin="lower")
    ax2.set_xticks([])
    ax2.set_yticks([])
    ax2.set_title("fit | spectrum", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _optics_of(table: MetadataTable, row: int) -> tuple[Optics, float]:
    group = int(table.data["rlnOpticsGroup"].iloc[row])
    o = table.optics[table.optics["rlnOpticsGroup"].astype(int) == group].iloc[0]
    px_label = "rlnMicrographPixelSize" if "rlnMicrographPixelSize" in table.optics.columns \
        else "rlnMicrographOriginalPixelSize"
    if px_label not in table.optics.columns:
        raise InputError(table.path, "data_optics has no rlnMicrographPixelSize",
                         "give the micrographs' pixel size (Å) for every optics group")
    return Optics(float(o["rlnVoltage"]), float(o["rlnSphericalAberration"]),
                  float(o["rlnAmplitudeContrast"])), float(o[px_label])


def _source(table: MetadataTable, row: int, opts: CtffindOptions) -> tuple[str, bool]:
    """The file to fit (power spectrum, non-dose-weighted or dose-weighted micrograph) and whether
    it is a power spectrum."""
    data = table.data
    if opts.use_given_ps and "rlnCtfPowerSpectrum" in data.columns:
        return str(data["rlnCtfPowerSpectrum"].iloc[row]), True
    if opts.use_noDW and "rlnMicrographNameNoDW" in data.columns:
        return str(data["rlnMicrographNameNoDW"].iloc[row]), False
    return str(data["rlnMicrographName"].iloc[row]), False


def _fit_one(source: str, is_ps: bool, optics: Optics, pixel: float, opts: CtffindOptions, xp: Any) -> CtfFit:
    image, header_px = read_map(source)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {image.shape}")
    if not is_ps:
        return estimate_ctf(xp.asarray(image), pixel, optics, opts.search(), opts.box)
    if image.shape[0] != image.shape[1] or image.shape[0] % 2:
        raise ValueError(f"a power spectrum must be square with an even size, got {image.shape}")
    if not header_px > 0:
        raise ValueError("the power spectrum's header has no pixel size")
    spec = xp.asarray(image)
    if float(spec.std()) == 0.0:
        raise ValueError("the power spectrum is blank (constant)")
    return estimate_ctf(None, header_px, optics, opts.search(), image.shape[0], given_spectrum=spec)


def run_ctffind(opts: CtffindOptions) -> Path:
    """Fit the CTF of every micrograph in ``opts.star``; write the per-micrograph files and
    ``micrographs_ctf.star`` in ``opts.out``; return the STAR file's path."""
    opts.search().check()
    if opts.use_given_ps and opts.use_noDW:
        log.info("ctffind: --use_given_ps takes precedence over --use_noDW where a power spectrum is listed")
    table = read_relion_table(opts.star, "micrographs", required=("rlnMicrographName",),
                       optics_required=("rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
                                        "rlnAmplitudeContrast"))
    if opts.use_given_ps and "rlnCtfPowerSpectrum" not in table.data.columns:
        log.warning("ctffind: %s has no rlnCtfPowerSpectrum column: fitting the micrographs themselves",
                    opts.star)
    if opts.use_noDW and "rlnMicrographNameNoDW" not in table.data.columns:
        log.warning("ctffind: %s has no rlnMicrographNameNoDW column: using rlnMicrographName", opts.star)
    xp = get_xp(opts.gpu)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, MicrographResult] = {}
    failed: list[tuple[str, str]] = []
    reused = 0
    n = len(table)
    for row in progress(range(n), n, "ctffind", "micrograph"):
        source, is_ps = _source(table, row, opts)
        stem = output_stem(source, out)
        ctf_path, log_path = Path(f"{stem}.ctf"), Path(f"{stem}_ctffind4.log")
        ctf_name = f"{ctf_path}:mrc"
        if opts.only_do_unfinished and ctf_path.exists():
            old = read_ctffind_log(log_path)
            if old is not None:
                results[row] = MicrographResult(ctf_image=ctf_name, **old)
                reused += 1
                continue
        try:
            optics, pixel = _optics_of(table, row)
            fit = _fit_one(source, is_ps, optics, pixel, opts, xp)
            image = diagnostic_image(fit, optics, opts.resmin)
            write_map(ctf_path, image, fit.pixel_size)
            atomic_write_text(log_path, _log_text(source, fit, optics, opts, pixel))
            if opts.plots:
                plot_fit(fit, image, f"{Path(source).name}: U {fit.defocus_u:.0f}, V {fit.defocus_v:.0f} Å, "
                         f"{fit.defocus_angle:.1f}°, FOM {fit.score:.3f}", Path(f"{stem}_ctffind4.png"))
        except (InputError, ValueError, OSError) as err:
            log.warning("ctffind: skipping %s: %s", source, err)
            failed.append((source, str(err)))
            continue
        results[row] = MicrographResult(fit.defocus_u, fit.defocus_v, fit.defocus_angle, fit.phase_shift,
                                        fit.score, fit.max_resolution, ctf_name)
    star = out / OUTPUT_STAR
    write_star(star, {"optics": table.optics, "micrographs": _output_rows(table.data, results, opts)})
    log.info("ctffind: %d of %d micrographs in %s (%d reused from an earlier run, %d failed)",
             len(results), n, star, reused, len(failed))
    for source, why in failed:
        log.info("ctffind: failed: %s (%s)", source, why)
    return star


def _output_rows(data: pd.DataFrame, results: dict[int, MicrographResult], opts: CtffindOptions) -> pd.DataFrame:
    rows = sorted(results)
    df = data.iloc[rows].reset_index(drop=True).drop(
        columns=[c for c in (*CTF_LABELS, "rlnPhaseShift") if c in data.columns])
    res = [results[r] for r in rows]
    df["rlnCtfImage"] = [r.ctf_image for r in res]
    df["rlnDefocusU"] = [r.defocus_u for r in res]
    df["rlnDefocusV"] = [r.defocus_v for r in res]
    df["rlnCtfAstigmatism"] = [abs(r.defocus_u - r.defocus_v) for r in res]
    df["rlnDefocusAngle"] = [r.defocus_angle for r in res]
    df["rlnCtfFigureOfMerit"] = [r.score for r in res]
    df["rlnCtfMaxResolution"] = [r.max_resolution for r in res]
    if opts.do_phaseshift:
        df["rlnPhaseShift"] = [r.phase_shift for r in res]
    return df


def _cmd(a: argparse.Namespace) -> None:
    opts = CtffindOptions(
        star=Path(a.i), out=Path(a.o), box=a.box, resmin=a.resmin, resmax=a.resmax, dfmin=a.dfmin,
        dfmax=a.dfmax, dfstep=a.dfstep, dast=a.dast, use_given_ps=a.use_given_ps, use_noDW=a.use_noDW,
        do_phaseshift=a.do_phaseshift, phase_min=a.phase_min, phase_max=a.phase_max, phase_step=a.phase_step,
        only_do_unfinished=a.only_do_unfinished, plots=not a.no_plots, gpu=a.gpu)
    star = run_ctffind(opts)
    print(f"wrote {star}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ctffind`` subcommand to a ``reconstruct`` subparser set."""
    s = sub.add_parser(
        "ctffind", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="estimate each micrograph's CTF (like RELION's CtfFind job with CTFFIND-4)",
        description="Fit defocus U/V, astigmatism angle (and phase shift) to every micrograph's Thon rings "
                    "as CTFFIND-4 does, and write RELION's micrographs_ctf.star with per-micrograph .ctf "
                    "diagnostics, _ctffind4.log summaries and PNG plots.")
    s.add_argument("--i", required=True, help="input micrographs STAR file (MotionCorr's corrected_micrographs.star)")
    s.add_argument("--o", required=True, help="output job directory, e.g. CtfFind/job003")
    s.add_argument("--box", "--Box", dest="box", type=int, default=512,
                   help="size (px) of the amplitude spectrum (FFT box of the averaged tiles)")
    s.add_argument("--resmin", "--ResMin", dest="resmin", type=float, default=30.0,
                   help="lowest resolution (Å) used in the fit")
    s.add_argument("--resmax", "--ResMax", dest="resmax", type=float, default=5.0,
                   help="highest resolution (Å) used in the fit")
    s.add_argument("--dfmin", "--dFMin", dest="dfmin", type=float, default=5000.0, help="lowest defocus searched (Å)")
    s.add_argument("--dfmax", "--dFMax", dest="dfmax", type=float, default=50000.0, help="highest defocus searched (Å)")
    s.add_argument("--dfstep", "--FStep", dest="dfstep", type=float, default=500.0,
                   help="step of the exhaustive defocus search (Å)")
    s.add_argument("--dast", "--dAst", dest="dast", type=float, default=100.0,
                   help="expected astigmatism (Å) restraining the fit, as CTFFIND's; <= 0: no restraint")
    s.add_argument("--use_given_ps", action="store_true",
                   help="fit the power spectra from motion correction (rlnCtfPowerSpectrum) instead of the micrographs")
    s.add_argument("--use_noDW", action="store_true",
                   help="fit the non-dose-weighted micrographs (rlnMicrographNameNoDW) where listed")
    s.add_argument("--do_phaseshift", action="store_true", help="also fit a phase shift (phase plate)")
    s.add_argument("--phase_min", type=float, default=0.0, help="lowest phase shift searched (degrees)")
    s.add_argument("--phase_max", type=float, default=180.0, help="highest phase shift searched (degrees)")
    s.add_argument("--phase_step", type=float, default=10.0, help="step of the phase-shift search (degrees)")
    s.add_argument("--only_do_unfinished", action="store_true",
                   help="keep the results of micrographs whose .ctf and _ctffind4.log already exist")
    s.add_argument("--no_plots", action="store_true", help="do not write the per-micrograph PNG plots")
    add_gpu_flag(s)
    s.set_defaults(func=_cmd)

