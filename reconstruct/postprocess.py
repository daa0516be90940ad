"""Post-processing of two half maps (RELION's ``relion_postprocess``).

Masked and unmasked FSC, the phase-randomisation correction for the mask's own correlation (the
halves' phases are randomised beyond the resolution where the unmasked FSC falls below 0.8, and the
masked FSC of those is removed from the masked FSC), the resolution at FSC 0.143, an automatic
Guinier B-factor, and a sharpened, FSC-weighted and low-passed map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .backend import fft_module
from .files.errors import InputError
from .files.mrc import read_map, write_map
from .files.star import write_star
from .fourier import lowpass_filter, radius_grid
from .fsc import fsc, resolution_at, shell_index, shell_resolutions
from .masks import threshold_mask

log = logging.getLogger("reconstruct")


@dataclass
class PostprocessOptions:
    """Options of ``reconstruct postprocess`` (RELION names in brackets)."""

    half1: Path  # --i
    half2: Path  # --i2 (RELION derives it from --i)
    out: Path  # --o: root name; writes ROOT.mrc, ROOT_masked.mrc, ROOT.star, ROOT_fsc.png
    mask: Path | None = None  # --mask; None: automatic from the average map
    angpix: float = -1.0  # --angpix
    ini_threshold: float | None = None  # automatic mask: threshold of the 15 Å low-passed average
    extend: float = 3.0  # automatic mask: pixels to grow
    soft_edge: float = 6.0  # automatic mask: cosine edge width
    autob_lowres: float = 10.0  # --autob_lowres (Å)
    adhoc_bfac: float | None = None  # --adhoc_bfac: use this B-factor instead of fitting one
    randomise_at_fsc: float = 0.8  # --randomize_at_fsc


@dataclass
class PostprocessResult:
    """The numbers and files a caller wants."""

    resolution: float
    bfactor: float
    fsc_corrected: np.ndarray
    fsc_unmasked: np.ndarray
    star: Path
    map: Path
    masked_map: Path
    mask: Path


def randomise_phases(volume: np.ndarray, from_shell: int, rng: np.random.Generator) -> np.ndarray:
    """Replace the phases of all Fourier components at or beyond ``from_shell`` by random ones."""
    fft = fft_module(np)
    ft = fft.rfftn(volume)
    shells = shell_index(volume.shape, np)
    sel = shells >= from_shell
    ft[sel] = np.abs(ft[sel]) * np.exp(2j * np.pi * rng.random(int(sel.sum())))
    return fft.irfftn(ft, s=volume.shape).astype(np.float32)


def automatic_mask(average: np.ndarray, pixel_size: float, threshold: float | None, extend: float,
                   soft_edge: float) -> tuple[np.ndarray, float]:
    """A soft mask from the 15 Å low-passed average: threshold (default: mean + 5 sd of the box's outer
    shell, which holds only solvent), grown by ``extend`` px, with a ``soft_edge`` px cosine edge."""
    lp = lowpass_filter(average, pixel_size, 15.0, ndim=3)
    if threshold is None:
        n = average.shape[0]
        c = np.arange(n) - n // 2
        r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
        outer = lp[r > 0.42 * n]
        threshold = float(outer.mean() + 5 * outer.std())
        threshold = min(threshold, float(lp.max()) * 0.5)
    return threshold_mask(lp, threshold, extend, soft_edge), threshold


def guinier_bfactor(volume: np.ndarray, pixel_size: float, low: float, high: float) -> tuple[float, float, float]:
    """Fit ln |F| against 1/d^2 between ``low`` and ``high`` Å: returns (B, intercept, correlation).

    The amplitude falls as exp(-B s^2 / 4), so B = -4 * slope; sharpening applies -B.
    """
    box = volume.shape[0]
    ft = np.abs(fft_module(np).rfftn(volume))
    shells = shell_index(volume.shape, np).ravel()
    n = box // 2 + 1
    inside = shells < n
    amp = np.bincount(shells[inside], ft.ravel()[inside], minlength=n) / np.maximum(
        np.bincount(shells[inside], minlength=n), 1)
    s = shell_resolutions(box, pixel_size)
    sel = (s > 0) & (s >= 1.0 / low) & (s <= 1.0 / high) & (amp > 0)
    if sel.sum() < 3:
        raise ValueError(f"too few shells between {low:.1f} and {high:.1f} Å to fit a B-factor; "
                         "give --adhoc_bfac or lower --autob_lowres")
    x, y = s[sel] ** 2, np.log(amp[sel])
    slope, intercept = np.polyfit(x, y, 1)
    corr = float(np.corrcoef(x, y)[0, 1])
    return float(-4.0 * slope), float(intercept), corr


def postprocess(opt: PostprocessOptions) -> PostprocessResult:
    """Run the post-processing and write RELION's outputs beside ``opt.out``."""
    h1, p1 = read_map(opt.half1)
    h2, p2 = read_map(opt.half2)
    if h1.shape != h2.shape or h1.ndim != 3:
        raise InputError(opt.half2, f"half maps must be 3D maps of one shape ({h1.shape} vs {h2.shape})")
    px = opt.angpix if opt.angpix > 0 else (p1 or p2)
    if px <= 0:
        raise InputError(opt.half1, "the half maps' headers give no pixel size", "pass --angpix")
    box = h1.shape[0]
    average = (h1 + h2) / 2
    out = Path(opt.out)
    if opt.mask is not None:
        mask, _ = read_map(opt.mask)
        if mask.shape != h1.shape:
            raise InputError(opt.mask, f"mask is {mask.shape}, maps are {h1.shape}")
        if mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
            raise InputError(opt.mask, f"mask values run {mask.min():.3g}..{mask.max():.3g}; expected 0..1")
        mask_path = Path(opt.mask)
        threshold = float("nan")
    else:
        mask, threshold = automatic_mask(average, px, opt.ini_threshold, opt.extend, opt.soft_edge)
        mask_path = out.parent / f"{out.name}_automask.mrc"
        write_map(mask_path, mask, px)
    unmasked = fsc(h1, h2)
    masked = fsc(h1 * mask, h2 * mask)
    below = np.nonzero(unmasked[1:] < opt.randomise_at_fsc)[0]
    rand_shell = int(below[0]) + 1 if below.size else len(unmasked) - 1
    rng = np.random.default_rng(0)
    r1, r2 = randomise_phases(h1, rand_shell, rng), randomise_phases(h2, rand_shell, rng)
    rand = fsc(r1 * mask, r2 * mask)
    corrected = masked.copy()
    beyond = np.arange(len(masked)) >= rand_shell
    corrected[beyond] = (masked[beyond] - rand[beyond]) / np.maximum(1 - rand[beyond], 1e-6)
    res = resolution_at(corrected, box, px, 0.143)
    final_res = res.angstrom
    if opt.adhoc_bfac is not None:
        bfac_fit, intercept, corr = -float(opt.adhoc_bfac), 0.0, 0.0
        sharpen_b = float(opt.adhoc_bfac)
    else:
        try:
            bfac_fit, intercept, corr = guinier_bfactor(average * mask, px, opt.autob_lowres, final_res)
        except ValueError as err:  # resolution too low for a Guinier fit: no sharpening, as RELION
            log.warning("%s; not sharpening (B = 0)", err)
            bfac_fit, intercept, corr = 0.0, 0.0, 0.0
        sharpen_b = -bfac_fit + 0.0  # no "-0.0" in logs
    # Sharpen, weight by the FSC (sqrt(2 FSC / (1 + FSC))) and low-pass at the final resolution.
    fft = fft_module(np)
    ft = fft.rfftn(average)
    k = radius_grid((box,) * 3, np) / (box * px)
    shells = np.clip(shell_index((box,) * 3, np), 0, len(corrected) - 1)
    c = np.clip(corrected, 0, 1)
    weight = np.sqrt(2 * c / (1 + c))[shells]
    ft *= np.exp(-sharpen_b * k * k / 4.0) * weight
    sharp = fft.irfftn(ft, s=(box,) * 3).astype(np.float32)
    sharp = lowpass_filter(sharp, px, final_res, ndim=3)
    map_path = out.parent / f"{out.name}.mrc"
    masked_path = out.parent / f"{out.name}_masked.mrc"
    write_map(map_path, sharp, px)
    write_map(masked_path, sharp * mask, px)
    s = shell_resolutions(box, px)
    ang = np.where(s > 0, 1 / np.maximum(s, 1e-12), 999.0)
    star = out.parent / f"{out.name}.star"
    guinier_sel = s > 0
    amp = np.abs(fft.rfftn(average)).ravel()
    sh = shell_index((box,) * 3, np).ravel()
    inside = sh < len(s)
    mean_amp = np.bincount(sh[inside], amp[inside], minlength=len(s)) / np.maximum(
        np.bincount(sh[inside], minlength=len(s)), 1)
    write_star(star, {
        "general": {"rlnFinalResolution": final_res, "rlnBfactorUsedForSharpening": sharpen_b,
                    "rlnUnfilteredMapHalf1": str(opt.half1), "rlnUnfilteredMapHalf2": str(opt.half2),
                    "rlnMaskName": str(mask_path), "rlnRandomiseFrom": box * px / max(rand_shell, 1),
                    "rlnPostprocessedMap": str(map_path), "rlnPostprocessedMapMasked": str(masked_path),
                    "rlnParticleBoxFractionSolventMask": float(box**3 / max(mask.sum(), 1)),
                    "rlnFittedSlopeGuinierPlot": -bfac_fit / 4, "rlnFittedInterceptGuinierPlot": intercept,
                    "rlnCorrelationFitGuinierPlot": corr},
        "fsc": pd.DataFrame({"rlnSpectralIndex": np.arange(len(s)), "rlnResolution": s,
                             "rlnAngstromResolution": ang, "rlnFourierShellCorrelationCorrected": corrected,
                             "rlnFourierShellCorrelationUnmaskedMaps": unmasked,
                             "rlnFourierShellCorrelationMaskedMaps": masked,
                             "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": rand}),
        "guinier": pd.DataFrame({"rlnResolutionSquared": s[guinier_sel] ** 2,
                                 "rlnLogAmplitudesOriginal": np.log(np.maximum(mean_amp[guinier_sel], 1e-30))}),
    })
    from .plots import plot_fsc

    plot_fsc({"corrected (masked)": corrected, "unmasked": unmasked, "masked": masked,
              "phase-randomised masked": rand}, box, px, out.parent / f"{out.name}_fsc.png",
             thresholds=(0.143,), title=f"Post-processing: {final_res:.2f} Å at FSC 0.143")
    log.info("final resolution %.2f Å, B-factor for sharpening %.1f Å^2 (mask threshold %.3g)",
             final_res, sharpen_b, threshold)
    return PostprocessResult(final_res, sharpen_b, corrected, unmasked, star, map_path, masked_path, mask_path)
