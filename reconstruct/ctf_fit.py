"""CTF estimation from a micrograph's amplitude spectrum, after CTFFIND-4 (Rohou & Grigorieff 2015).

The steps, each vectorised over pixels and over candidate CTFs:

1. Amplitude spectrum: micrographs with pixels finer than 1.4 Å are Fourier-binned to about 1.4 Å
   (CTFFIND's resampling, so the box samples the Thon rings finely); then the power spectra of
   half-overlapping, Hann-windowed ``box``-sized tiles are averaged and square-rooted.  RELION's
   ``*_PS.mrc`` (a centred amplitude spectrum of the movie) can be used instead.
2. Background: as CTFFIND, the central cross is clipped, a box convolution of width
   ``box * pixel / resmin * sqrt(2)`` (cross excluded, low-resolution centre left alone) is
   subtracted, and high values are thresholded.
3. Search: the 1D rotational average is compared with |CTF| for every defocus from ``dfmin`` to
   ``dfmax`` in ``dfstep`` (and every phase shift when asked), refined at a tenth of the step; then a
   2D grid of mean defocus x astigmatism x angle around it and a batched pattern search refine
   (defocus U, V, angle[, phase]).  Every candidate set is one matrix product: chi for all pixels and
   candidates is ``features (P, 5) @ coefficients (5, C)``.
4. Score (rlnCtfFigureOfMerit): CTFFIND 4.1's normalised (mean-subtracted) cross-correlation between
   the background-subtracted amplitude spectrum and |CTF| over resmin..resmax (central cross excluded),
   minus its astigmatism restraint 0.5 (U - V)^2 / dast^2 / n_pixels.
5. Fit resolution (rlnCtfMaxResolution), CTFFIND 4.1.14's "Thon rings with good fit up to": the
   spectrum is averaged along equi-phase contours of the fitted CTF (so astigmatism does not blur
   the rings), the 1D average is renormalised ring by ring (in each zero-to-peak interval the values
   are replaced, by rank, by the fit's values there, so only ring positions count), and a windowed
   correlation with the fit is taken (window half-width max(n/40, 1.5 ring widths)).  Scanning from
   10% of the bins outwards, the fit resolution is the first bin where the correlation falls below
   0.5 after more than 3 bins above 0.66, or below 0.1 after more than 3 bins above 0.1.

Conventions are RELION's (:mod:`reconstruct.ctf`): defocus positive for underfocus, defocus U along
the astigmatism angle measured from the x axis (image columns) towards y (rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, fft_module, ndimage_module, to_numpy
from .ctf import Optics, electron_wavelength

FIT_PIXEL_SIZE = 1.4  # Å: CTFFIND resamples finer micrographs to this before computing the spectrum
MIN_SIGNIFICANCE = 4.5  # below this z-score the rings are not told apart from noise (noise: 2.2-3.8)
_CHUNK = 1 << 22  # elements of one (pixels x candidates) block


@dataclass(frozen=True)
class CtfSearch:
    """What to search (RELION's CtfFind options; lengths in Å, angles in degrees)."""

    resmin: float = 30.0
    resmax: float = 5.0
    dfmin: float = 5000.0
    dfmax: float = 50000.0
    dfstep: float = 500.0
    dast: float = 100.0  # astigmatism restraint; <= 0: none
    fit_phase: bool = False
    phase_min: float = 0.0
    phase_max: float = 180.0
    phase_step: float = 10.0

    def check(self) -> None:
        """Raise ValueError for an impossible search range."""
        if not 0 < self.resmax < self.resmin:
            raise ValueError(f"need 0 < resmax ({self.resmax}) < resmin ({self.resmin})")
        if not 0 <= self.dfmin < self.dfmax or self.dfstep <= 0:
            raise ValueError(f"need 0 <= dfmin ({self.dfmin}) < dfmax ({self.dfmax}) and dfstep > 0")
        if self.fit_phase and (self.phase_step <= 0 or self.phase_max < self.phase_min):
            raise ValueError("need phase_step > 0 and phase_max >= phase_min")


@dataclass
class CtfFit:
    """A fitted CTF with what the diagnostics need (arrays are NumPy)."""

    defocus_u: float
    defocus_v: float
    defocus_angle: float
    phase_shift: float  # degrees; 0 unless fitted
    score: float  # rlnCtfFigureOfMerit
    max_resolution: float  # rlnCtfMaxResolution, Å
    significance: float  # robust z-score of the fit among defoci dfmin..dfmax (see ring_significance)
    pixel_size: float  # of the spectrum that was fitted
    box: int
    spectrum: np.ndarray  # background-subtracted amplitude spectrum, centred (box, box)
    frequency: np.ndarray  # 1/Å of the 1D bins
    profile: np.ndarray  # equi-phase average of the spectrum
    profile_renormalised: np.ndarray
    fit_profile: np.ndarray  # |CTF| on the bins
    frc: np.ndarray  # windowed correlation of the renormalised profile with the fit
    first_bin: int  # first bin of the fit range
    last_good_bin: int

    @property
    def astigmatism(self) -> float:
        """|U - V| in Å (rlnCtfAstigmatism)."""
        return abs(self.defocus_u - self.defocus_v)


# ----------------------------------------------------------------------------------------------
# Spectrum


def bin_to_pixel_size(image: Any, pixel_size: float, target: float = FIT_PIXEL_SIZE) -> tuple[Any, float]:
    """Fourier-crop a (ny, nx) image so its pixel is about ``target`` Å (unchanged if already coarser)."""
    if pixel_size >= target:
        return image, pixel_size
    xp = array_module(image)
    ny, nx = image.shape
    my = max(2, round(ny * pixel_size / target / 2) * 2)
    mx = max(2, round(nx * pixel_size / target / 2) * 2)
    fft = fft_module(xp)
    ft = fft.rfft2(image.astype(xp.float32))
    rows = xp.concatenate([xp.arange(my // 2), xp.arange(ny - my // 2, ny)])
    small = ft[rows][:, : mx // 2 + 1]
    out = fft.irfft2(small, s=(my, mx)) * (my * mx / (ny * nx))
    return out.astype(xp.float32), pixel_size * nx / mx


def tile_starts(n: int, box: int) -> np.ndarray:
    """Start indices of half-overlapping tiles covering ``n`` pixels (first and last flush)."""
    count = max(1, math.ceil((n - box) / (box / 2)) + 1)
    return np.round(np.linspace(0, n - box, count)).astype(int)


def amplitude_spectrum(image: Any, box: int) -> Any:
    """Centred amplitude spectrum (box, box), zero frequency at box//2: the square root of the mean
    power spectrum of half-overlapping Hann-windowed tiles (Welch's method)."""
    xp = array_module(image)
    ny, nx = image.shape
    if min(ny, nx) < box:
        raise ValueError(f"image {nx} x {ny} is smaller than the box {box}")
    fft = fft_module(xp)
    n = xp.arange(box, dtype=xp.float32)
    w1 = 0.5 - 0.5 * xp.cos(2 * xp.pi * n / box)
    window = (w1[:, None] * w1[None, :]).astype(xp.float32)
    xs = xp.asarray(tile_starts(nx, box))
    cols = xs[:, None] + xp.arange(box)[None, :]  # (tx, box)
    power = xp.zeros((box, box // 2 + 1), dtype=xp.float32)
    count = 0
    for y0 in tile_starts(ny, box):  # one strip of tiles at a time bounds the memory
        strip = image[int(y0): int(y0) + box].astype(xp.float32)
        tiles = xp.transpose(strip[:, cols], (1, 0, 2))  # (tx, box, box)
        tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
        ft = fft.rfft2(tiles * window)
        power += (ft.real**2 + ft.imag**2).sum(axis=0)
        count += tiles.shape[0]
    return centred_full(xp.sqrt(power / count))


def centred_full(half: Any) -> Any:
    """A Hermitian-symmetric half array (N, N/2+1) in FFT order as a full centred (N, N) array."""
    xp = array_module(half)
    n = half.shape[0]
    full = xp.empty((n, n), dtype=half.dtype)
    full[:, : n // 2 + 1] = half
    neg_rows = (-xp.arange(n)) % n
    full[:, n // 2 + 1:] = half[neg_rows][:, n // 2 - 1: 0: -1]
    return fft_module(xp).fftshift(full)


def _centred_grid(n: int, xp: Any) -> tuple[Any, Any]:
    c = xp.arange(n, dtype=xp.float32) - n // 2
    return c[:, None], c[None, :]  # (dy, dx) in Fourier pixels


def subtract_background(amplitude: Any, pixel_size: float, resmin: float) -> Any:
    """CTFFIND's background removal from a centred amplitude spectrum (box, box).

    Normalise by the spread in the fitting range and clip the central cross (detector and edge
    artefacts), subtract a box convolution as wide as sqrt(2) x the resmin ring's radius (the
    cross excluded; inside that radius the spectrum is left as is, so it becomes 0), then clip
    values above the maximum away from the centre and the edges.
    """
    xp = array_module(amplitude)
    n = amplitude.shape[0]
    dy, dx = _centred_grid(n, xp)
    r = xp.sqrt(dy * dy + dx * dx)
    r_min = n * pixel_size / resmin
    amp = amplitude.astype(xp.float32)
    ring = (r >= r_min) & (r <= n / 2) & (xp.abs(dx) > 12) & (xp.abs(dy) > 12)
    vals = amp[ring] if bool(ring.any()) else amp.ravel()
    mean, sigma = float(vals.mean()), float(vals.std())
    if not sigma > 0:
        raise ValueError("the spectrum is flat (blank image?)")
    amp = amp / sigma
    cross = (xp.abs(dx) <= 0) | (xp.abs(dy) <= 0)
    amp = xp.where(cross, xp.minimum(amp, mean / sigma + 10.0), amp)
    size = int(n * pixel_size / resmin * math.sqrt(2.0))
    size += 1 - size % 2
    keep = ~((xp.abs(dx) <= 1) | (xp.abs(dy) <= 1))
    weights = keep.astype(xp.float32)
    nd = ndimage_module(xp)
    num = nd.uniform_filter(amp * weights, size=size, mode="wrap")
    den = nd.uniform_filter(weights, size=size, mode="wrap")
    smooth = xp.where(r > r_min, num / xp.maximum(den, 1e-6), amp)
    out = amp - smooth
    inner = (r > 3) & (xp.abs(dx) < n // 2 - 3) & (xp.abs(dy) < n // 2 - 3)
    return xp.minimum(out, out[inner].max()).astype(xp.float32)


# ----------------------------------------------------------------------------------------------
# Scoring many candidate CTFs at once


class _Scorer:
    """Normalised cross-correlation of one spectrum (a set of pixels or 1D bins) with |CTF| for
    batches of candidates; chi for all samples and candidates is one matrix product."""

    def __init__(self, values: Any, k2: Any, cos2: Any, sin2: Any, optics: Optics, dast: float) -> None:
        xp = array_module(values)
        self.xp = xp
        v = values.astype(xp.float32)
        v = v - v.mean()
        norm = float(xp.sqrt((v * v).sum()))
        self.values = v / norm if norm > 0 else v
        self.n = int(values.size)
        self.features = xp.stack([k2, k2 * cos2, k2 * sin2, k2 * k2, xp.ones_like(k2)], axis=1).astype(xp.float32)
        self.lam = electron_wavelength(optics.voltage)
        self.cs = optics.cs * 1e7
        self.beta = math.asin(optics.amplitude_contrast)
        self.dast = dast

    def coefficients(self, du: Any, dv: Any, angle: Any, phase: Any) -> Any:
        """(5, C) coefficients of chi + asin(Q0) for defocus U, V (Å), angle and phase (degrees)."""
        xp = self.xp
        du, dv = xp.asarray(du, dtype=xp.float64), xp.asarray(dv, dtype=xp.float64)
        a2 = xp.deg2rad(2.0 * xp.asarray(angle, dtype=xp.float64))
        m, h = 0.5 * (du + dv), 0.5 * (du - dv)
        pl = math.pi * self.lam
        cs_term = xp.full_like(m, -0.5 * math.pi * self.cs * self.lam**3)
        ph = xp.deg2rad(xp.asarray(phase, dtype=xp.float64)) + self.beta
        return xp.stack([pl * m, pl * h * xp.cos(a2), pl * h * xp.sin(a2), cs_term, ph + 0 * m]).astype(xp.float32)

    def scores(self, du: Any, dv: Any, angle: Any, phase: Any, penalise: bool = True) -> Any:
        """Score of each candidate: CC(spectrum, |CTF|) minus CTFFIND's astigmatism penalty."""
        xp = self.xp
        du, dv, angle, phase = (xp.asarray(a, dtype=xp.float64).ravel() for a in xp.broadcast_arrays(
            xp.asarray(du, dtype=xp.float64), xp.asarray(dv, dtype=xp.float64),
            xp.asarray(angle, dtype=xp.float64), xp.asarray(phase, dtype=xp.float64)))
        coef = self.coefficients(du, dv, angle, phase)
        out = xp.empty(coef.shape[1], dtype=xp.float32)
        step = max(1, _CHUNK // max(self.n, 1))
        for s in range(0, coef.shape[1], step):  # chunks bound the (pixels x candidates) block
            c = xp.abs(xp.sin(self.features @ coef[:, s: s + step]))
            s1 = self.values @ c
            s2 = c.sum(axis=0)
            s3 = (c * c).sum(axis=0)
            out[s: s + step] = s1 / xp.sqrt(xp.maximum(s3 - s2 * s2 / self.n, 1e-20))
        if penalise and self.dast > 0:
            out = out - (0.5 * (du - dv) ** 2 / self.dast**2 / self.n).astype(xp.float32)
        return out


def _fit_pixels(spectrum: Any, pixel_size: float, search: CtfSearch) -> tuple[Any, Any, Any, Any, Any]:
    """Values, k^2 (1/Å^2), cos 2theta, sin 2theta and radius bin of the half-plane pixels in the
    fitting ring (central cross excluded)."""
    xp = array_module(spectrum)
    n = spectrum.shape[0]
    dy, dx = _centred_grid(n, xp)
    r = xp.sqrt(dy * dy + dx * dx)
    r_min = n * pixel_size / search.resmin
    r_max = min(n * pixel_size / search.resmax, n / 2 - 1)
    half = (dx > 0) | ((dx == 0) & (dy > 0))
    mask = (r >= r_min) & (r <= r_max) & half & (xp.abs(dx) > 1) & (xp.abs(dy) > 1)
    if int(mask.sum()) < 50:
        raise ValueError(f"too few Fourier pixels between {search.resmin} and {search.resmax} Å")
    dyb, dxb = xp.broadcast_to(dy, r.shape)[mask], xp.broadcast_to(dx, r.shape)[mask]
    rr = r[mask]
    k2 = (rr / (n * pixel_size)) ** 2
    theta2 = 2.0 * xp.arctan2(dyb, dxb)
    return spectrum[mask], k2, xp.cos(theta2), xp.sin(theta2), xp.rint(rr).astype(xp.int64)


def _phases(search: CtfSearch) -> np.ndarray:
    if not search.fit_phase:
        return np.zeros(1)
    return np.arange(search.phase_min, search.phase_max + 1e-6, search.phase_step)


def _search_1d(values: Any, rbin: Any, n: int, pixel_size: float, optics: Optics,
               search: CtfSearch) -> tuple[float, float]:
    """Best (defocus, phase) from the rotational average: exhaustive, then at a tenth of the step."""
    xp = array_module(values)
    counts = xp.bincount(rbin, minlength=n)
    sums = xp.bincount(rbin, weights=values.astype(xp.float64), minlength=n)
    used = xp.nonzero(counts > 0)[0]
    avg = (sums[used] / counts[used]).astype(xp.float32)
    k2 = (used.astype(xp.float32) / (n * pixel_size)) ** 2
    zero = xp.zeros_like(k2)
    scorer = _Scorer(avg, k2, zero, zero, optics, 0.0)
    phases = _phases(search)
    dfs = np.arange(search.dfmin, search.dfmax + 1e-6, search.dfstep)
    d, p = np.meshgrid(dfs, phases, indexing="ij")
    sc = to_numpy(scorer.scores(d.ravel(), d.ravel(), 0.0, p.ravel()))
    best = int(np.argmax(sc))
    df0, ph0 = float(d.ravel()[best]), float(p.ravel()[best])
    fine = np.arange(df0 - search.dfstep, df0 + search.dfstep + 1e-6, search.dfstep / 10)
    fine = fine[fine > 0]
    fp = np.arange(ph0 - search.phase_step, ph0 + search.phase_step + 1e-6, search.phase_step / 5) \
        if search.fit_phase else np.zeros(1)
    d, p = np.meshgrid(fine, fp, indexing="ij")
    sc = to_numpy(scorer.scores(d.ravel(), d.ravel(), 0.0, p.ravel()))
    best = int(np.argmax(sc))
    return float(d.ravel()[best]), float(p.ravel()[best])


def _search_2d(scorer: _Scorer, df0: float, ph0: float, search: CtfSearch) -> np.ndarray:
    """Coarse 2D grid (mean defocus x astigmatism x angle [x phase]) then a batched pattern search;
    returns (U, V, angle, phase)."""
    base = search.dast if search.dast > 0 else 100.0
    astig = np.concatenate([[0.0], base * 2.0 ** np.arange(-1, 5)])
    angles = np.arange(0.0, 180.0, 15.0)
    means = df0 + search.dfstep * np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    phases = ph0 + search.phase_step * np.array([-1.0, 0.0, 1.0]) if search.fit_phase else np.array([ph0])
    m, a, t, p = (g.ravel() for g in np.meshgrid(means, astig, angles, phases, indexing="ij"))
    keep = (a > 0) | (t == 0)  # the angle means nothing without astigmatism
    m, a, t, p = m[keep], a[keep], t[keep], p[keep]
    sc = to_numpy(scorer.scores(m + a / 2, m - a / 2, t, p))
    b = int(np.argmax(sc))
    params = np.array([m[b] + a[b] / 2, m[b] - a[b] / 2, t[b], p[b]])
    best = float(sc[b])
    dims = 4 if search.fit_phase else 3
    steps = np.array([search.dfstep / 4, search.dfstep / 4, 10.0, search.phase_step / 2])[:dims]
    offsets = np.stack(np.meshgrid(*([np.array([-1.0, 0.0, 1.0])] * dims), indexing="ij"), -1).reshape(-1, dims)
    for _ in range(60):  # each pass scores all 3^dims neighbours at once
        cand = params[None, :dims] + offsets * steps
        ph = cand[:, 3] if dims == 4 else np.full(len(cand), params[3])
        sc = to_numpy(scorer.scores(cand[:, 0], cand[:, 1], cand[:, 2], ph))
        b = int(np.argmax(sc))
        if sc[b] > best + 1e-7:
            best = float(sc[b])
            params[:dims] = cand[b]
        else:
            steps = steps / 2
            if steps[0] < 0.5 and steps[2] < 0.05:
                break
    return params


def ring_significance(scorer: _Scorer, u: float, v: float, angle: float, phase: float,
                      search: CtfSearch) -> float:
    """How far the fit stands out from chance: the best score over defoci dfmin..dfmax (step dfstep,
    no astigmatism, the fitted phase) as a robust z-score (median, 1.4826 MAD) among them.  Leaving
    the fitted astigmatism out keeps noise from fitting itself: pure noise gave 2.2-3.8 (30 simulated
    micrographs), faint real Thon rings more.  CTFFIND has no such test: on noise its fit resolution
    is random (4-15 Å in our measurements), so a blank micrograph could pass a resolution cut."""
    dfs = np.arange(search.dfmin, search.dfmax + 1e-6, search.dfstep)
    sc = to_numpy(scorer.scores(dfs, dfs, 0.0, phase, penalise=False)).astype(np.float64)
    med = float(np.median(sc))
    spread = 1.4826 * float(np.median(np.abs(sc - med)))
    return (float(sc.max()) - med) / spread if spread > 0 else 0.0


def _canonical(u: float, v: float, angle: float, phase: float) -> tuple[float, float, float, float]:
    """U >= V, angle in [0, 180), phase in [0, 180) (|CTF| cannot tell phi from phi + 180)."""
    if u < v:
        u, v, angle = v, u, angle + 90.0
    return u, v, angle % 180.0, phase % 180.0


# ----------------------------------------------------------------------------------------------
# Fit resolution (CTFFIND's "Thon rings with good fit up to")


def _equiphase_bins(n: int, pixel_size: float, u: float, v: float, angle: float, optics: Optics,
                    xp: Any) -> tuple[Any, int]:
    """For every pixel of the centred (n, n) spectrum, the 1D bin (Fourier pixels at the mean
    defocus) with the same CTF phase; -1 on the central cross."""
    dy, dx = _centred_grid(n, xp)
    k2 = (dy * dy + dx * dx) / (n * pixel_size) ** 2
    theta = xp.arctan2(dy, dx)
    lam = electron_wavelength(optics.voltage)
    cs = optics.cs * 1e7
    m, h = 0.5 * (u + v), 0.5 * (u - v)
    chi = math.pi * lam * k2 * (m + h * xp.cos(2 * (theta - math.radians(angle)))) \
        - 0.5 * math.pi * cs * lam**3 * k2 * k2
    a, b = 0.5 * math.pi * cs * lam**3, math.pi * lam * m
    if a > 0:
        disc = xp.maximum(b * b - 4 * a * chi, 0.0)
        keq2 = (b - xp.sqrt(disc)) / (2 * a)
    else:
        keq2 = chi / b
    nbins = int(n / 2 * math.sqrt(2.0)) + 1
    rbin = xp.rint(xp.sqrt(xp.maximum(keq2, 0.0)) * n * pixel_size).astype(xp.int64)
    rbin = xp.where((xp.abs(dx) <= 1) | (xp.abs(dy) <= 1) | (rbin >= nbins), -1, rbin)
    return rbin, nbins


def _renormalise(avg: np.ndarray, quarter: np.ndarray) -> np.ndarray:
    """CTFFIND's Renormalize1DSpectrumForFRC: in each zero-to-peak interval of the fit (``quarter``
    labels them), replace the values by their rank, shaped like |CTF| (sin(pi/2 (rank + 1/2) / L)
    for an interval of L bins), so that only the positions of the rings count, not their decay.
    Every interval of L bins then holds the same values, which keeps noise uncorrelated with the fit."""
    order = np.lexsort((avg, quarter))
    q_sorted = quarter[order]
    start = np.searchsorted(q_sorted, q_sorted, side="left")
    end = np.searchsorted(q_sorted, q_sorted, side="right")
    out = np.empty_like(avg, dtype=np.float64)
    out[order] = np.sin(0.5 * np.pi * (np.arange(avg.size) - start + 0.5) / (end - start))
    return out


def _windows(n: int, half_width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of a window of 2 w + 1 bins around each bin, shifted inside at the ends."""
    w = np.minimum(half_width, (n - 1) // 2)
    lo = np.clip(np.arange(n) - w, 0, None)
    hi = lo + 2 * w + 1
    lo = np.where(hi > n, n - 2 * w - 1, lo)
    return lo, np.minimum(hi, n)


def _window_sum(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    return c[hi] - c[lo]


def _windowed_correlation(a: np.ndarray, b: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Pearson correlation of a and b in a window of 2 w + 1 bins around each bin (prefix sums)."""
    lo, hi = _windows(a.size, half_width)
    cnt = (hi - lo).astype(np.float64)
    sa, sb = _window_sum(a, lo, hi), _window_sum(b, lo, hi)
    cov = _window_sum(a * b, lo, hi) - sa * sb / cnt
    va = _window_sum(a * a, lo, hi) - sa * sa / cnt
    vb = _window_sum(b * b, lo, hi) - sb * sb / cnt
    ok = (va > 1e-12) & (vb > 1e-12)
    return np.where(ok, cov / np.sqrt(np.where(ok, va * vb, 1.0)), 0.0)


def _last_good_bin(frc: np.ndarray, first: int) -> int:
    """CTFFIND 4.1.14's rule: scanning outwards from ``first``, stop at the first bin below 0.5
    after more than 3 bins above 0.66, or below 0.1 after more than 3 bins above 0.1."""
    f = frc[first:]
    if f.size == 0:
        return max(1, frc.size - 1)
    above_low = np.concatenate([[0], np.cumsum(f > 0.1)[:-1]])
    above_high = np.concatenate([[0], np.cumsum(f > 0.66)[:-1]])
    stop = ((above_low > 3) & (f < 0.1)) | ((above_high > 3) & (f < 0.5))
    if not (f > 0.5).any():
        return 1
    if stop.any():
        return first + int(np.argmax(stop))
    return frc.size - 1


def fit_resolution(spectrum: Any, pixel_size: float, u: float, v: float, angle: float, phase: float,
                   optics: Optics, first_fit_bin: int = 0) -> dict[str, Any]:
    """1D equi-phase profile, fit, renormalised profile, windowed correlation and the last bin with
    a good fit (see the module docstring); bins below ``first_fit_bin`` (resmin) take no part.
    Arrays are NumPy."""
    xp = array_module(spectrum)
    n = spectrum.shape[0]
    rbin, nbins = _equiphase_bins(n, pixel_size, u, v, angle, optics, xp)
    sel = rbin >= 0
    counts = to_numpy(xp.bincount(rbin[sel], minlength=nbins))[:nbins]
    sums = to_numpy(xp.bincount(rbin[sel], weights=spectrum[sel].astype(xp.float64), minlength=nbins))[:nbins]
    avg = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    k = np.arange(nbins) / (n * pixel_size)
    lam = electron_wavelength(optics.voltage)
    chi = math.pi * lam * 0.5 * (u + v) * k**2 - 0.5 * math.pi * optics.cs * 1e7 * lam**3 * k**4 \
        + math.radians(phase) + math.asin(optics.amplitude_contrast)
    fit = np.abs(np.sin(chi))
    # ring width (bins between |CTF| peaks) at each bin; the open last ring takes the previous width
    peaks = np.floor(chi / math.pi + 0.5).astype(np.int64)
    ring = np.concatenate([[0], np.cumsum(np.diff(peaks) != 0)])
    widths = np.bincount(ring)
    if widths.size > 1:
        widths[-1] = widths[-2]
    width = widths[ring]
    f0 = int(min(max(first_fit_bin, 1), nbins - 8))
    # remove what varies slower than the rings (residual background), then rank ring by ring
    lo, hi = _windows(nbins - f0, (width[f0:] + 1) // 2)
    detrended = avg[f0:] - _window_sum(avg[f0:], lo, hi) / (hi - lo)
    renorm = np.zeros(nbins)
    renorm[f0:] = _renormalise(detrended, np.floor(chi[f0:] / (math.pi / 2)).astype(np.int64))
    frc = np.zeros(nbins)
    half_width = np.maximum(nbins // 40, (1.5 * (width[f0:] + 1)).astype(int))
    frc[f0:] = _windowed_correlation(renorm[f0:], fit[f0:], half_width)
    last = _last_good_bin(frc, max(int(0.1 * nbins), f0))
    return {"frequency": k, "profile": avg, "renormalised": renorm, "fit": fit, "frc": frc,
            "last_good_bin": last, "max_resolution": float(n * pixel_size / max(last, 1))}


# ----------------------------------------------------------------------------------------------
# The whole fit


def fit_ctf(spectrum: Any, pixel_size: float, optics: Optics, search: CtfSearch) -> CtfFit:
    """Fit defocus U/V/angle (and phase) to a background-subtracted centred amplitude spectrum."""
    search.check()
    n = spectrum.shape[0]
    values, k2, cos2, sin2, rbin = _fit_pixels(spectrum, pixel_size, search)
    df0, ph0 = _search_1d(values, rbin, n, pixel_size, optics, search)
    scorer = _Scorer(values, k2, cos2, sin2, optics, search.dast)
    u, v, ang, ph = (float(x) for x in _search_2d(scorer, df0, ph0, search))
    u, v, ang, ph = _canonical(u, v, ang, ph)
    score = float(to_numpy(scorer.scores(u, v, ang, ph))[0])
    z = ring_significance(scorer, u, v, ang, ph, search)
    r_min = n * pixel_size / search.resmin
    res = fit_resolution(spectrum, pixel_size, u, v, ang, ph, optics, math.ceil(r_min))
    if z < MIN_SIGNIFICANCE:  # no Thon rings to speak of: CTFFIND's "no good fit" value (bin 1)
        res["last_good_bin"], res["max_resolution"] = 1, float(n * pixel_size)
    return CtfFit(u, v, ang, ph if search.fit_phase else 0.0, score, res["max_resolution"], z, pixel_size, n,
                  to_numpy(spectrum).astype(np.float32), res["frequency"], res["profile"], res["renormalised"],
                  res["fit"], res["frc"], math.ceil(r_min), res["last_good_bin"])


def estimate_ctf(micrograph: Any, pixel_size: float, optics: Optics, search: CtfSearch, box: int = 512,
                 given_spectrum: Any = None) -> CtfFit:
    """CTF of one micrograph (``(ny, nx)`` array, any xp) or of a given centred amplitude spectrum
    (RELION's ``*_PS.mrc``, whose own pixel size is then ``pixel_size``)."""
    if given_spectrum is not None:
        amp, px = given_spectrum, pixel_size
    else:
        xp = array_module(micrograph)
        if not bool(xp.isfinite(micrograph).all()):
            raise ValueError("the micrograph contains NaN or infinite values")
        if float(micrograph.std()) == 0.0:
            raise ValueError("the micrograph is blank (constant)")
        img, px = bin_to_pixel_size(micrograph, pixel_size)
        box = min(box, (min(img.shape) // 2) * 2)
        amp = amplitude_spectrum(img, box)
    spec = subtract_background(amp, px, search.resmin)
    return fit_ctf(spec, px, optics, search)


def diagnostic_image(fit: CtfFit, optics: Optics, resmin: float) -> np.ndarray:
    """CTFFIND-style diagnostic (box, box), centred: the right half is the background-subtracted
    spectrum, the left half the fitted |CTF| beyond resmin, both on the spectrum's display scale
    (mean - 1 sigma .. mean + 2 sigma of the fitting ring)."""
    n, px = fit.box, fit.pixel_size
    dy, dx = _centred_grid(n, np)
    r = np.sqrt(dy * dy + dx * dx)
    r_min = n * px / resmin
    ring = (r >= r_min) & (r <= n / 2)
    spec = fit.spectrum
    mean, sigma = float(spec[ring].mean()), float(spec[ring].std()) or 1.0
    lo, hi = mean - sigma, mean + 2 * sigma
    out = np.clip(spec, lo, hi)
    k2 = r * r / (n * px) ** 2
    theta = np.arctan2(dy, dx)
    lam = electron_wavelength(optics.voltage)
    m, h = 0.5 * (fit.defocus_u + fit.defocus_v), 0.5 * (fit.defocus_u - fit.defocus_v)
    chi = math.pi * lam * k2 * (m + h * np.cos(2 * (theta - math.radians(fit.defocus_angle)))) \
        - 0.5 * math.pi * optics.cs * 1e7 * lam**3 * k2 * k2 + math.radians(fit.phase_shift) \
        + math.asin(optics.amplitude_contrast)
    model = lo + (hi - lo) * np.abs(np.sin(chi))
    left = np.broadcast_to(dx < 0, out.shape)
    out = np.where(left & (r >= r_min), model, out)
    out = np.where(r < r_min, mean, out)
    return out.astype(np.float32)
