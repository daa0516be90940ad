"""Laplacian-of-Gaussian particle picking, as RELION's ``relion_autopick --LoG``.

RELION's recipe (autopicker.cpp, ``autoPickLoGOneMicrograph``), batched:

1. The micrograph is normalised (zero mean, unit standard deviation, pixels beyond 8 sigma set to the
   mean), negated unless the particles are white (``invert``), padded to a square with unit Gaussian
   noise, Fourier transformed and windowed to the working size whose Nyquist frequency is
   ``maxres`` (RELION's ``--shrink 0 --lowpass LoG_maxres``), with RELION's choice of an FFT-friendly
   size.
2. Scale-normalised LoG filters, r^2 / s^2 exp(-r^2 / 2 s^2) with s = N * angpix / (2 d) Fourier
   pixels, for diameters d from min/5 ... min, (min+max)/2, max ... 5 max are applied as ONE stack of
   FFTs; each pixel keeps its best response (the figure of merit, FOM) and the diameter giving it.
3. Pixels whose best diameter lies outside [min, max] are zeroed (too-small or too-large blobs), as
   are pixels within half the minimum diameter of the edges.  The threshold is mean + adjust * std
   of the FOMs of the in-range pixels; an upper limit mean + upper * std rejects (without removing
   their suppression) overly strong blobs such as ice or aggregates.
4. Peaks are taken greedily from the strongest down; each removes its neighbours within
   (its diameter + min diameter) / 2 * neighbour%.  The greedy order is reproduced exactly, but in
   vectorised rounds: every pixel that is the strongest within the largest suppression radius is a
   pick of the greedy algorithm, so all of them are taken at once, their discs removed, and repeat.

Everything runs on the array module of the input (NumPy or CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, fft_module, ndimage_module
from .fourier import crop_half

_LARGEST_ACCEPTABLE_PRIME = 43  # RELION's LARGEST_ACCEPTABLE_PRIME for FFT sizes


@dataclass(frozen=True)
class LoGParams:
    """LoG picking parameters with RELION's meanings (diameters in Å)."""

    diam_min: float
    diam_max: float
    adjust_threshold: float = 0.0  # --LoG_adjust_threshold: stddevs above the mean FOM
    upper_threshold: float = 999.0  # --LoG_upper_threshold: stddevs above the mean FOM
    maxres: float = 20.0  # --LoG_maxres (RELION's --lowpass with --shrink 0); <= 0: full size
    invert: bool = False  # --LoG_invert: particles are white on a dark background
    neighbour: float = 100.0  # --LoG_neighbour: exclusion radius in percent
    max_search: float = 5.0  # --Log_max_search: scan diameters from min/5 to 5*max
    outlier_zscore: float = 8.0  # --outlier_removal_zscore
    skip_side: int = 0  # --skip_side: extra edge pixels to leave out

    def check(self) -> None:
        """Raise ValueError for parameters RELION would refuse."""
        if self.diam_min <= 0 or self.diam_max <= 0:
            raise ValueError("give --LoG_diam_min and --LoG_diam_max (in Å, both > 0)")
        if self.diam_max < self.diam_min:
            raise ValueError(f"--LoG_diam_max {self.diam_max:g} is smaller than --LoG_diam_min {self.diam_min:g}")
        if self.max_search < 1:
            raise ValueError("--Log_max_search must be at least 1")
        if self.neighbour <= 0:
            raise ValueError("--LoG_neighbour must be positive (percent)")


@dataclass
class LoGPicks:
    """Picks of one micrograph (coordinates in micrograph pixels, 0-based as RELION) and diagnostics."""

    x: np.ndarray
    y: np.ndarray
    fom: np.ndarray
    diameter: np.ndarray  # Å, the best LoG diameter of each pick
    threshold: float
    upper_limit: float
    work_image: np.ndarray  # the low-passed, down-scaled (square, padded) micrograph in its own contrast
    scale: float  # work pixels per micrograph pixel
    offset: tuple[int, int]  # (x, y) of the micrograph's origin inside the padded square, in micrograph px


def log_diameters(diam_min: float, diam_max: float, max_search: float = 5.0) -> np.ndarray:
    """RELION's list of LoG diameters (Å): min/k for k = max_search..2, min, mid, max, max*k for k = 2..max_search.

    The diameters outside [min, max] let blobs that are too small or too large win their pixels, so
    that those pixels are rejected rather than picked at the wrong size.
    """
    ks = range(int(max_search), 1, -1)
    low = [float(np.floor(diam_min / k + 0.5)) for k in ks]
    high = [float(np.floor(diam_max * k + 0.5)) for k in range(2, int(max_search) + 1)]
    return np.array(low + [diam_min, (diam_min + diam_max) / 2.0, diam_max] + high, dtype=np.float64)


def _largest_prime(n: int) -> int:
    i, p = 2, n
    while i * i <= p:
        if p % i:
            i += 1
        else:
            p //= i
    return p


def _fft_prime(n: int) -> int:
    return max(_largest_prime(n), _largest_prime(n // 2 + 1))


def good_fourier_size(requested: int, limit: int) -> int:
    """RELION's ``getGoodFourierDims``: the even size nearest ``requested`` whose FFTs have small primes."""
    if _fft_prime(requested) <= _LARGEST_ACCEPTABLE_PRIME:
        return requested
    up = requested
    while _fft_prime(up) >= _LARGEST_ACCEPTABLE_PRIME and up <= limit + 2:
        up += 2
    down = requested
    while _fft_prime(down) >= _LARGEST_ACCEPTABLE_PRIME and down > 2:
        down -= 2
    if (up - requested) > (requested - down) or up > limit:
        return down
    return up


def work_size(size: int, pixel_size: float, maxres: float) -> int:
    """The even working size of a ``size``-px square micrograph low-passed to ``maxres`` Å (RELION's rule)."""
    if maxres <= 0:
        return size - size % 2
    requested = 2 * int(np.floor(size * pixel_size / maxres + 0.5))
    requested = max(2, min(requested, size - size % 2))
    ws = good_fourier_size(requested, size)
    return max(2, ws - ws % 2)


def log_filters(work: int, size: int, pixel_size: float, diameters: np.ndarray, xp: Any) -> Any:
    """Scale-normalised LoG filters (S, work, work/2+1) on the windowed half transform of a ``size`` grid.

    RELION's ``LoGFilterMap``: r^2 exp(-r^2 / 2 s^2) / s^2 with r in Fourier pixels of the original
    grid and s = size * pixel_size / (2 d); the peak gain 2/e is the same at every scale.
    """
    fy = xp.arange(work, dtype=xp.float32)
    fy = xp.where(fy > work // 2, fy - work, fy)
    fx = xp.arange(work // 2 + 1, dtype=xp.float32)
    r2 = fy[:, None] ** 2 + fx[None, :] ** 2
    isig2 = xp.asarray((0.5 * size * pixel_size / np.asarray(diameters)) ** 2, dtype=xp.float32)[:, None, None]
    return (r2[None] / isig2 * xp.exp(-0.5 * r2[None] / isig2)).astype(xp.float32)


def best_over_scales(ft: Any, work: int, size: int, pixel_size: float, diameters: np.ndarray
                     ) -> tuple[Any, Any]:
    """Best LoG response over ``diameters`` and the diameter giving it, per pixel of the ``work`` grid.

    ``ft`` is the windowed half transform (work, work/2+1) of the ``size`` micrograph.  All scales go
    through one batched inverse FFT (in chunks only when memory is short); ties keep the first
    diameter, as RELION's strict ``>`` does.  Values are on RELION's scale.
    """
    from .memory import available_bytes

    xp = array_module(ft)
    fft = fft_module(xp)
    per_scale = work * (work // 2 + 1) * 8 * 2 + work * work * 4 * 2
    chunk = int(max(1, min(len(diameters), 0.25 * available_bytes(xp) // per_scale)))
    gain = np.float32(work * work / (size * size))  # RELION's forward transform divides by the pixel count
    fom = size_map = None
    for s in range(0, len(diameters), chunk):
        d = diameters[s:s + chunk]
        maps = fft.irfft2(ft[None] * log_filters(work, size, pixel_size, d, xp), s=(work, work), axes=(-2, -1))
        maps = maps * gain
        best = xp.max(maps, axis=0).astype(xp.float32)
        which = xp.asarray(d, dtype=xp.float32)[xp.argmax(maps, axis=0)]
        if fom is None:
            fom, size_map = best, which
        else:
            better = best > fom
            fom = xp.where(better, best, fom)
            size_map = xp.where(better, which, size_map)
    return fom, size_map


def _prepare(mic: Any, params: LoGParams, rng: np.random.Generator, xp: Any) -> tuple[Any, tuple[int, int]]:
    """Normalise, remove outliers, flip the contrast to bright particles and pad to a square with noise."""
    ny, nx = mic.shape
    # Statistics accumulated in double precision, the image itself kept in one float32 copy: a 4k
    # micrograph would otherwise spawn a gigabyte of double-precision temporaries.
    flat = mic.reshape(-1)
    avg = float(flat.sum(dtype=xp.float64)) / flat.size
    var = float(xp.einsum("i,i->", flat, flat, dtype=xp.float64)) / flat.size - avg * avg
    std = float(np.sqrt(max(var, 0.0)))
    if not np.isfinite(std) or std <= 1e-6 * max(abs(avg), 1e-30):
        raise ValueError("the micrograph is constant (standard deviation 0): nothing can be picked")
    m = mic.astype(xp.float32, copy=True)
    limit = params.outlier_zscore * std
    m[(m < avg - limit) | (m > avg + limit)] = avg  # outliers beyond 8 sigma become the mean
    m -= np.float32(avg)
    m *= np.float32((1.0 if params.invert else -1.0) / std)  # particles bright from here on
    n = max(nx, ny)
    if nx == ny:
        return m, (0, 0)
    ox, oy = n // 2 - nx // 2, n // 2 - ny // 2
    sq = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    sq[oy:oy + ny, ox:ox + nx] = m
    return sq, (ox, oy)


def _disc_offsets(radius: int) -> np.ndarray:
    """Offsets (K, 2) (di, dj) with di^2 + dj^2 < radius^2: RELION's strict exclusion disc."""
    r = max(int(radius), 1)
    c = np.arange(-r, r + 1)
    di, dj = np.meshgrid(c, c, indexing="ij")
    keep = di * di + dj * dj < r * r
    return np.stack([di[keep], dj[keep]], axis=1)


def greedy_peaks(fom: Any, radius: Any, max_radius: int) -> Any:
    """Flat indices of the peaks RELION's greedy loop takes from ``fom`` (picking only values > 0).

    The loop takes the strongest remaining pixel (the first in scan order on ties) and zeroes the
    pixels at distance < ``radius`` of it (a per-pixel integer map, at most ``max_radius``).  Here it
    runs in rounds: a pixel that outranks every live pixel of the square around it that holds the
    largest exclusion disc is taken by the greedy loop whatever else is taken first, so each round
    takes all such pixels (one separable maximum filter), paints out their discs (one scatter) and
    repeats on what is left; the strongest live pixel qualifies, so every round makes progress.
    Returns the peaks strongest first.
    """
    xp = array_module(fom)
    ndi = ndimage_module(xp)
    h, w = fom.shape
    flat = fom.ravel()
    # Rank by value, the earlier pixel winning ties (RELION's maxIndex keeps the first maximum).
    order = xp.lexsort(xp.stack([-xp.arange(flat.size), flat]))
    rank = xp.empty(flat.size, dtype=xp.int32)
    rank[order] = xp.arange(flat.size, dtype=xp.int32)
    rank = xp.where(flat > 0, rank, -1).reshape(h, w)
    window = 2 * max(int(max_radius), 1) - 1  # the square of half-width R-1 holds every offset with d < R
    offsets = {}
    picked = []
    while bool((rank >= 0).any()):
        best = ndi.maximum_filter(rank, size=window, mode="constant", cval=-1)
        peaks = xp.nonzero(((rank >= 0) & (rank == best)).ravel())[0]
        picked.append(peaks)
        pi, pj = peaks // w, peaks % w
        pr = radius.ravel()[peaks]
        for r in np.unique(_to_host(pr)).tolist():  # at most three radii (min, mid, max diameter)
            if r not in offsets:
                offsets[r] = xp.asarray(_disc_offsets(r))
            sel = pr == r
            off = offsets[r]
            ii = pi[sel][:, None] + off[None, :, 0]
            jj = pj[sel][:, None] + off[None, :, 1]
            ok = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
            rank[ii[ok], jj[ok]] = -1
    if not picked:
        return xp.zeros(0, dtype=xp.int64)
    idx = xp.concatenate(picked)
    return idx[xp.argsort(-flat[idx], kind="stable")]


def _to_host(a: Any) -> np.ndarray:
    from .backend import to_numpy

    return to_numpy(a)


@dataclass
class LoGMap:
    """The thresholded best-FOM map of one micrograph on the working grid, ready for peak finding."""

    fom: Any  # (work, work) FOM, zero where not pickable (edges, wrong size, below threshold)
    diameter: Any  # (work, work) best LoG diameter (Å)
    radius: Any  # (work, work) int exclusion radius (working px) of a pick at each pixel
    max_radius: int
    threshold: float
    upper_limit: float
    work_image: Any
    scale: float
    offset: tuple[int, int]
    size: int  # the padded square micrograph size


def log_fom_map(mic: Any, pixel_size: float, params: LoGParams, seed: int = 1) -> LoGMap:
    """Steps 1-3 of RELION's LoG picker (see module doc): the thresholded best-over-scales FOM map.

    ``seed`` seeds the noise that pads non-square micrographs (RELION uses random_seed + index).
    FOM values are on RELION's scale (its forward FFT divides by the pixel count).
    """
    params.check()
    xp = array_module(mic)
    fft = fft_module(xp)
    ny, nx = mic.shape
    sq, offset = _prepare(xp.asarray(mic), params, np.random.default_rng(seed), xp)
    n = sq.shape[0]
    ws = work_size(n, pixel_size, params.maxres)
    scale = ws / n
    ft = crop_half(fft.rfft2(sq), ws)
    diams = log_diameters(params.diam_min, params.diam_max, params.max_search)
    fom, size = best_over_scales(ft, ws, n, pixel_size, diams)
    work_image = -fft.irfft2(ft, s=(ws, ws)) * np.float32(ws * ws / (n * n))
    if params.invert:
        work_image = -work_image
    # Leave out the sides: half the minimum diameter (plus --skip_side) from the micrograph's edges.
    skip = int(int(max(params.skip_side, 0.5 * params.diam_min / pixel_size)) * scale)
    lo_y, lo_x = int(offset[1] * scale) + skip, int(offset[0] * scale) + skip
    hi_y, hi_x = int((offset[1] + ny) * scale) - 1 - skip, int((offset[0] + nx) * scale) - 1 - skip
    iy = xp.arange(ws)[:, None]
    ix = xp.arange(ws)[None, :]
    inside = (iy >= lo_y) & (iy <= hi_y) & (ix >= lo_x) & (ix <= hi_x)
    fom = xp.where(inside, fom, 0.0)
    # Best diameter outside [min, max]: a blob of the wrong size.  Statistics of the in-range pixels.
    ok = (size >= params.diam_min) & (size <= params.diam_max)
    fom = xp.where(ok, fom, 0.0)
    vals = fom[ok].astype(xp.float64)
    mean = float(vals.mean()) if vals.size else 0.0
    std = float(vals.std()) if vals.size else 0.0
    threshold = mean + params.adjust_threshold * std
    upper = mean + params.upper_threshold * std
    fom = xp.where(fom < threshold, 0.0, fom).astype(xp.float32)
    fudge = params.neighbour / 100.0 / 2.0 / pixel_size
    radius = xp.floor(scale * (size + params.diam_min) * fudge + 0.5).astype(xp.int32)
    max_radius = int(np.floor(scale * (params.diam_max + params.diam_min) * fudge + 0.5))
    return LoGMap(fom, size, radius, max_radius, threshold, upper, work_image, scale, offset, n)


def pick_micrograph(mic: Any, pixel_size: float, params: LoGParams, seed: int = 1) -> LoGPicks:
    """LoG picks of one micrograph (2D array, NumPy or CuPy), exactly RELION's algorithm (see module doc)."""
    m = log_fom_map(mic, pixel_size, params, seed)
    ws = m.fom.shape[0]
    idx = greedy_peaks(m.fom, m.radius, m.max_radius)
    vals = m.fom.ravel()[idx]
    keep = vals < m.upper_limit  # too strong: not recorded, but its neighbours stay suppressed
    idx, vals = idx[keep], vals[keep]
    i, j = idx // ws, idx % ws
    x = (j - ws // 2) / m.scale + m.size // 2 - m.offset[0]
    y = (i - ws // 2) / m.scale + m.size // 2 - m.offset[1]
    return LoGPicks(x=_to_host(x).astype(np.float64), y=_to_host(y).astype(np.float64),
                    fom=_to_host(vals).astype(np.float64),
                    diameter=_to_host(m.diameter.ravel()[idx]).astype(np.float64),
                    threshold=m.threshold, upper_limit=m.upper_limit, work_image=_to_host(m.work_image),
                    scale=m.scale, offset=m.offset)
