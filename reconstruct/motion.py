"""Beam-induced motion correction of movie frames (RELION's own MotionCor2-like algorithm).

Conventions (RELION's): a *shift* is the correction applied to a frame, in pixels of the movie; the
aligned frame is the recorded frame translated by +shift (so a specimen that drifted by +d has
shift -d), and shifts are zero at the first frame used.  Frames are half transforms
(..., ny, nx//2+1) of NumPy's rfft2 layout; every step works on whole stacks (frames, or patches x
frames) with batched FFTs and takes its array module from the data (NumPy or CuPy).

Steps: (1) whole-frame drift by iterative alignment of each frame to the sum of the others,
cross-correlations B-factor weighted and computed on a Fourier-cropped grid, sub-pixel peaks by
quadratic interpolation; (2) the same on a grid of patches of the globally aligned frames; the patch
trajectories are fitted by RELION's third-order polynomial deformation model (18 terms per axis,
shift = sum_{p in 1,x,x2,y,y2,xy} sum_{q=1..3} c_pq p z^q) with robust (Huber-weighted, iteratively
reweighted) least squares and a per-patch offset, so a failed patch or a noisy frame pulls little;
(3) frames are summed in overlapping tiles, each phase-shifted by the model's shift at its centre and
blended with a partition-of-unity window (sinc-exact shifts, no real-space interpolation blur);
(4) Grant & Grigorieff dose weighting normalised as RELION's (weights / sqrt(sum of squares)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, fft_module, ndimage_module
from .fourier import fft_friendly_even

# Grant & Grigorieff (2015) critical exposure: Ne(k) = A k^B + C (e/Å^2, k in 1/Å)
_NE_A, _NE_B, _NE_C = 0.245, -1.665, 2.81
N_POLY = 18  # RELION's ThirdOrderPolynomialModel coefficients per axis


# ----------------------------------------------------------------------------------------- grids
def half_freqs(ny: int, nx: int, xp: Any) -> tuple[Any, Any]:
    """Frequency indices (ky as (ny, 1), kx as (1, nx//2+1)) of a half transform of an ny x nx image."""
    ky = xp.fft.fftfreq(ny, 1.0 / ny).astype(xp.float32)[:, None]
    kx = xp.arange(nx // 2 + 1, dtype=xp.float32)[None, :]
    return ky, kx


def crop_half_rect(ft: Any, ny: int, nx: int) -> Any:
    """Window half transforms (..., NY, NX//2+1) to (..., ny, nx//2+1), keeping frequency indices."""
    xp = array_module(ft)
    big = ft.shape[-2]
    if ny == big and nx // 2 + 1 == ft.shape[-1]:
        return ft
    pos = ny // 2 + 1 if ny < big else ny // 2
    rows = xp.concatenate([xp.arange(0, pos), xp.arange(big - (ny - pos), big)])
    out = ft[..., rows, : nx // 2 + 1]
    if ny < big:  # the cropped grid's Nyquist row is the average of +N/2 and -N/2 (both now at row ny/2)
        out[..., ny // 2, :] = 0.5 * (ft[..., ny // 2, : nx // 2 + 1] + ft[..., big - ny // 2, : nx // 2 + 1])
    return out


def phase_ramp(shifts: Any, ny: int, nx: int, xp: Any) -> Any:
    """exp(-2 pi i (kx sx / nx + ky sy / ny)) for shifts (..., 2) in pixels of the ny x nx image:
    multiplying a half transform by it translates the image by +shift.  Shape (..., ny, nx//2+1)."""
    ky, kx = half_freqs(ny, nx, xp)
    s = xp.asarray(shifts, dtype=xp.float32)
    ex = xp.exp((-2j * math.pi / nx) * (kx * s[..., 0, None, None])).astype(xp.complex64)
    ey = xp.exp((-2j * math.pi / ny) * (ky * s[..., 1, None, None])).astype(xp.complex64)
    return ey * ex


# ------------------------------------------------------------------------------------- alignment
def alignment_scale(bfactor: float) -> float:
    """Fraction of each axis of a frequency grid where the alignment weight exp(-2 B k^2) (B in px^2,
    k in 1/px) is above 1e-8; frequencies beyond it do not change a cross-correlation peak."""
    return min(1.0, math.sqrt(-math.log(1e-8) / (2.0 * max(bfactor, 1e-3))))


@dataclass
class AlignResult:
    """Per-frame correction shifts (..., n, 2) in pixels of the input grid, and whether they converged."""

    shifts: Any
    converged: Any  # bool array over the leading (batch) axes
    iterations: int
    rmsd: list[float]


def _quadratic_peak(cc: Any, iy: Any, ix: Any) -> tuple[Any, Any]:
    """Sub-pixel peak offsets by 1D parabolas through the maximum and its neighbours (periodic)."""
    xp = array_module(cc)
    h, w = cc.shape[-2:]
    flat = cc.reshape(-1, h, w)
    b = xp.arange(flat.shape[0])
    iy, ix = iy.reshape(-1), ix.reshape(-1)
    c0 = flat[b, iy, ix]
    xm, xq = flat[b, iy, (ix - 1) % w], flat[b, iy, (ix + 1) % w]
    ym, yq = flat[b, (iy - 1) % h, ix], flat[b, (iy + 1) % h, ix]

    def vertex(m: Any, p: Any) -> Any:
        den = m + p - 2 * c0
        ok = xp.abs(den) > 1e-30
        return xp.where(ok, -0.5 * (p - m) / xp.where(ok, den, 1.0), 0.0).clip(-1, 1)

    return vertex(ym, yq).reshape(cc.shape[:-2]), vertex(xm, xq).reshape(cc.shape[:-2])


def align_stack(ft: Any, ny: int, nx: int, bfactor: float, max_iter: int = 5, tolerance: float = 0.01,
                search_range: float = 50.0) -> AlignResult:
    """Align frames (the second-last batch axis of ``ft``: (..., n, ny, nx//2+1)) to each other.

    Each iteration correlates every frame with the sum of the other (already shifted) frames, with
    the product weighted by exp(-2 B k^2) (k in 1/px, B = ``bfactor`` in px^2 as RELION's --bfactor)
    on a grid cropped to where that weight is above 1e-8; peaks are searched within
    ``search_range`` px and refined to sub-pixel.  Shifts are re-referenced to frame 0 each
    iteration; iterating stops when the RMS update is below ``tolerance`` px; a problem counts as
    converged when its last update was below 0.5 px (RELION's test).  Leading axes (e.g. patches) are
    independent problems solved together.
    """
    xp = array_module(ft)
    fft = fft_module(xp)
    scale = alignment_scale(bfactor)
    cy = min(ny, fft_friendly_even(max(16, math.ceil(ny * scale))))
    cx = min(nx, fft_friendly_even(max(16, math.ceil(nx * scale))))
    small = crop_half_rect(ft, cy, cx).astype(xp.complex64, copy=True)
    ky, kx = half_freqs(cy, cx, xp)
    weight = xp.exp(-2.0 * bfactor * ((ky / ny) ** 2 + (kx / nx) ** 2)).astype(xp.float32)
    weight[0, 0] = 0.0  # the mean (huge for counts) would swamp the float32 correlation peak
    # Peaks are searched at offsets up to (ry, rx) CC-grid pixels: a window of the (periodic) CC with
    # one more pixel each side for the sub-pixel fit.
    ry = math.floor(min(search_range * cy / ny, cy / 2 - 2))
    rx = math.floor(min(search_range * cx / nx, cx / 2 - 2))
    rows = xp.asarray(np.arange(-ry - 1, ry + 2) % cy)[:, None]
    cols = xp.asarray(np.arange(-rx - 1, rx + 2) % cx)[None, :]
    wx = 2 * rx + 1
    lead = ft.shape[:-2]
    total = xp.zeros(lead + (2,), dtype=xp.float32)
    rmsd: list[float] = []
    converged = xp.zeros(lead[:-1], dtype=bool)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007  # a handful of iterations, each batched over all frames
        prod = small.sum(axis=-3, keepdims=True) - small  # the sum of the other frames
        prod *= xp.conj(small)
        prod *= weight
        win = fft.irfft2(prod, s=(cy, cx))[..., rows, cols]
        del prod
        idx = xp.argmax(win[..., 1:-1, 1:-1].reshape(lead + (-1,)), axis=-1)
        iy, ix = idx // wx + 1, idx % wx + 1
        dy, dx = _quadratic_peak(win, iy, ix)
        step = xp.stack([(ix - 1 - rx + dx) * (nx / cx), (iy - 1 - ry + dy) * (ny / cy)], axis=-1).astype(xp.float32)
        step = step - step[..., :1, :]
        total = total + step
        apply_shifts(small, step, ny, nx)
        r = xp.sqrt((step ** 2).sum(axis=-1).mean(axis=-1))
        converged = r < 0.5  # RELION's criterion for a usable (patch) alignment
        rmsd.append(float(r.max()))
        if bool((r < tolerance).all()):
            break
    return AlignResult(total, converged, n_iter, rmsd)


def apply_shifts(ft: Any, shifts: Any, ny: int, nx: int) -> Any:
    """Translate images by ``shifts`` (..., 2; x, y in pixels of an ny x nx image) in place, through
    their half transforms ``ft`` (..., cy, cx//2+1), which may be a Fourier-cropped window of the
    ny x nx grid.  The ramp is separable, so it is applied as two broadcast factors (one per axis)
    without ever forming it; returns ``ft``."""
    xp = array_module(ft)
    ky, kx = half_freqs(ft.shape[-2], 2 * (ft.shape[-1] - 1), xp)
    s = xp.asarray(shifts, dtype=xp.float32)
    ft *= xp.exp((-2j * math.pi / nx) * (kx * s[..., 0, None, None])).astype(xp.complex64)
    ft *= xp.exp((-2j * math.pi / ny) * (ky * s[..., 1, None, None])).astype(xp.complex64)
    return ft


# -------------------------------------------------------------------------------- local motion
@dataclass
class PatchGrid:
    """Patches of a frame as RELION cuts them: patch_x x patch_y tiles without overlap, even sizes."""

    x0: np.ndarray  # (P,) inclusive start
    y0: np.ndarray
    width: int
    height: int

    @property
    def centres(self) -> np.ndarray:
        """(P, 2) patch centres (x, y) in pixels, RELION's (start + end - 1) / 2."""
        return np.stack([self.x0 + (self.width - 1) / 2.0, self.y0 + (self.height - 1) / 2.0], axis=1)


def patch_grid(ny: int, nx: int, patch_x: int, patch_y: int) -> PatchGrid:
    """The patch_x x patch_y grid of equal, even-sized patches covering an ny x nx frame."""
    w = (nx // patch_x) // 2 * 2
    h = (ny // patch_y) // 2 * 2
    xs = np.arange(patch_x) * (nx // patch_x)
    ys = np.arange(patch_y) * (ny // patch_y)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return PatchGrid(xx.ravel(), yy.ravel(), w, h)


def extract_patches(frames: Any, grid: PatchGrid) -> Any:
    """(n, ny, nx) real frames -> (P, n, h, w) patches, one gather."""
    xp = array_module(frames)
    iy = xp.asarray(grid.y0)[:, None] + xp.arange(grid.height)[None]  # (P, h)
    ix = xp.asarray(grid.x0)[:, None] + xp.arange(grid.width)[None]  # (P, w)
    return xp.moveaxis(frames[:, iy[:, :, None], ix[:, None, :]], 0, 1)


def binned_aligned_frames(ft: Any, shifts: Any, ny: int, nx: int, my: int, mx: int, chunk: int = 16) -> Any:
    """Frames (n, ny, nx//2+1 half transforms) translated by ``shifts`` (n, 2; px of the ny x nx grid),
    as real my x mx images: Fourier cropping low-passes and downsamples in one step, so patch alignment
    works on 1/bin^2 of the pixels and sees the same frequencies as a B-factor-weighted full-size one."""
    xp = array_module(ft)
    fft = fft_module(xp)
    n = ft.shape[0]
    out = xp.empty((n, my, mx), dtype=xp.float32)
    for s in range(0, n, chunk):  # chunks of frames, each batched
        small = crop_half_rect(ft[s:s + chunk], my, mx)
        if (my, mx) == (ny, nx):
            small = small.copy()  # not cropped: a view of the caller's transforms
        apply_shifts(small, shifts[s:s + chunk], ny, nx)
        out[s:s + chunk] = fft.irfft2(small, s=(my, mx)) * np.float32(my * mx / (ny * nx))
    return out


def binned_patch_grid(grid: PatchGrid, ry: float, rx: float, my: int, mx: int) -> PatchGrid:
    """RELION's patch grid of a full-size frame, on a frame resampled by ``ry`` x ``rx`` to my x mx
    (even patch sizes, inside the frame); its centres divided by the ratios are full-size pixels."""
    w = max(2, round(grid.width * rx / 2) * 2)
    h = max(2, round(grid.height * ry / 2) * 2)
    x0 = np.clip(np.round(grid.x0 * rx).astype(int), 0, mx - w)
    y0 = np.clip(np.round(grid.y0 * ry).astype(int), 0, my - h)
    return PatchGrid(x0, y0, w, h)


def patch_binning(ny: int, nx: int, bfactor: float, patch_x: int, patch_y: int) -> tuple[int, int]:
    """Size (my, mx) to resample frames to for patch alignment: FFT-friendly, holding every frequency
    the B-factor weight keeps (:func:`alignment_scale`), at least 16 px per patch, at most the frame."""
    scale = alignment_scale(bfactor)
    my = min(ny, fft_friendly_even(max(16 * patch_y, math.ceil(ny * scale))))
    mx = min(nx, fft_friendly_even(max(16 * patch_x, math.ceil(nx * scale))))
    return my, mx


def group_sizes(n: int, group: int) -> np.ndarray:
    """RELION's frame groups: n // group groups of ``group`` frames, the remainder added one by one to
    the last groups (never the first, where motion is fastest)."""
    n_groups = max(1, n // max(group, 1))
    sizes = np.full(n_groups, n // n_groups if n_groups == 1 else max(group, 1))
    rem = n - int(sizes.sum())
    i = n_groups - 1
    while rem > 0:
        sizes[i] += 1
        rem -= 1
        i = i - 1 if i > 1 else n_groups - 1
    return sizes


def group_frames(stack: Any, group: int, axis: int = -3) -> tuple[Any, np.ndarray]:
    """Sum consecutive frames in RELION's groups (:func:`group_sizes`); returns the grouped stack and
    each group's centre in frame units (0-based)."""
    xp = array_module(stack)
    n = stack.shape[axis]
    if group <= 1:
        return stack, np.arange(n, dtype=float)
    sizes = group_sizes(n, group)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    onehot = xp.asarray((labels[None, :] == np.arange(len(sizes))[:, None]).astype(np.float32))
    moved = xp.moveaxis(stack, axis, -1)
    grouped = xp.moveaxis(moved @ onehot.T.astype(moved.dtype), -1, axis)
    return grouped, starts + (sizes - 1) / 2.0


def poly_terms(x: Any, y: Any, z: Any) -> Any:
    """RELION's ThirdOrderPolynomialModel basis: columns (z, z2, z3) x (1, x, x2, y, y2, xy), (..., 18).

    x, y are positions normalised to [-0.5, 0.5) (pixel / size - 0.5), z the 0-based frame index
    relative to the first frame used.
    """
    xp = array_module(x, y, z)
    x, y, z = xp.broadcast_arrays(xp.asarray(x), xp.asarray(y), xp.asarray(z))
    zs = xp.stack([z, z * z, z * z * z], axis=-1)
    sp = xp.stack([xp.ones_like(x), x, x * x, y, y * y, x * y], axis=-1)
    return (sp[..., :, None] * zs[..., None, :]).reshape(sp.shape[:-1] + (N_POLY,))


@dataclass
class LocalModel:
    """RELION's third-order polynomial deformation (coefficients in px; X then Y, 36 in all)."""

    coeff_x: np.ndarray
    coeff_y: np.ndarray
    rmsd: tuple[float, float]  # fit residual RMS (px) per axis
    observed: np.ndarray  # (P, G, 2) patch shifts relative to each patch's offset
    fitted: np.ndarray  # (P, G, 2)
    z: np.ndarray  # (G,) frame positions of the observations
    centres: np.ndarray  # (P, 2) patch centres in px

    def shift_at(self, x: Any, y: Any, z: Any) -> tuple[Any, Any]:
        """Local correction (px) at normalised positions and frame indices (broadcast)."""
        xp = array_module(x, y, z)
        t = poly_terms(xp.asarray(x, dtype=xp.float64), xp.asarray(y, dtype=xp.float64),
                       xp.asarray(z, dtype=xp.float64))
        return t @ xp.asarray(self.coeff_x), t @ xp.asarray(self.coeff_y)

    def coefficients(self) -> np.ndarray:
        """The 36 coefficients in RELION's rlnMotionModelCoeff order (X 0-17, Y 18-35)."""
        return np.concatenate([self.coeff_x, self.coeff_y])


def fit_local_model(shifts: np.ndarray, z: np.ndarray, centres: np.ndarray, ny: int, nx: int,
                    weights: np.ndarray | None = None, n_irls: int = 8) -> LocalModel:
    """Fit RELION's polynomial model to patch trajectories ``shifts`` (P, G, 2) observed at frames ``z``.

    Each patch also gets a free constant offset (its trajectory is only known up to one), so the
    model is zero at z = 0 everywhere as RELION's.  Huber-weighted IRLS (threshold 1.5 robust
    sigmas) keeps wild patch measurements from bending the field; ``weights`` (P,) may down-weight
    patches whose alignment did not converge.
    """
    p, g = shifts.shape[:2]
    xn = centres[:, 0] / nx - 0.5
    yn = centres[:, 1] / ny - 0.5
    terms = poly_terms(np.repeat(xn, g), np.repeat(yn, g), np.tile(z.astype(float), p))  # (P*G, 18)
    offsets = np.kron(np.eye(p), np.ones((g, 1)))  # (P*G, P)
    a = np.concatenate([terms, offsets], axis=1)
    obs = shifts.reshape(p * g, 2).astype(float)
    base_w = np.repeat(np.ones(p) if weights is None else weights, g).astype(float)
    w = base_w.copy()
    sol = np.zeros((a.shape[1], 2))
    # Column scaling keeps the normal equations well conditioned (z^3 spans 1..n^3).
    norm = np.sqrt((a ** 2).sum(0)) + 1e-12
    an = a / norm
    for _ in range(n_irls):  # a few reweighting rounds on an (n_obs x 18+P) least-squares problem
        sw = np.sqrt(w)[:, None]
        sol, *_ = np.linalg.lstsq(an * sw, obs * sw, rcond=1e-10)
        res = np.linalg.norm(obs - an @ sol, axis=1)
        sigma = 1.4826 * np.median(res) + 1e-6
        k = 1.5 * sigma
        w = base_w * np.minimum(1.0, k / np.maximum(res, 1e-12))
    sol = sol / norm[:, None]
    fit = a @ sol
    off = offsets @ sol[N_POLY:]
    rms = np.sqrt(((obs - fit) ** 2).mean(0))
    return LocalModel(sol[:N_POLY, 0], sol[:N_POLY, 1], (float(rms[0]), float(rms[1])),
                      (obs - off).reshape(p, g, 2), (fit - off).reshape(p, g, 2), z.astype(float), centres)


# ------------------------------------------------------------------------------- dose weighting
def dose_per_frame_equivalent(frame_numbers: np.ndarray, dose_per_frame: float, pre_exposure: float,
                              voltage: float) -> np.ndarray:
    """300-kV-equivalent exposure at the END of each frame (1-based ``frame_numbers``), as RELION:
    200 kV electrons count 1/0.8, 100 kV 1/0.64.  Other voltages are an error (as in RELION)."""
    doses = pre_exposure + dose_per_frame * np.asarray(frame_numbers, dtype=float)
    if abs(voltage - 200) <= 2:
        doses = doses / 0.8
    elif abs(voltage - 100) <= 2:
        doses = doses / 0.64
    elif abs(voltage - 300) > 2:
        raise ValueError(f"dose weighting is defined for 300, 200 or 100 kV only, not {voltage:g} kV")
    return doses


def _critical_exposure(ny: int, nx: int, pixel_size: float, xp: Any) -> Any:
    """Twice Grant & Grigorieff's critical exposure (e/Å^2) on a half grid; infinite at the origin."""
    ky, kx = half_freqs(ny, nx, xp)
    k = xp.sqrt((ky / ny) ** 2 + (kx / nx) ** 2) / pixel_size
    with np.errstate(divide="ignore"):
        ne = 2.0 * (_NE_A * xp.where(k > 0, k, 1.0) ** _NE_B + _NE_C)
    return xp.where(k > 0, ne, xp.inf).astype(xp.float32)


def dose_weights(doses: Any, ny: int, nx: int, pixel_size: float, xp: Any) -> Any:
    """Grant & Grigorieff weights (n, ny, nx//2+1) for exposures ``doses`` (n,), normalised so that the
    squared weights of all frames sum to one at each frequency (RELION's Eq. 9)."""
    return DoseWeights(doses, pixel_size, xp)(slice(None), ny, nx)


class DoseWeights:
    """Dose weights of one movie's frames for any grid, handed out a slice of frames at a time.

    ``weights(frames_slice, ny, nx)`` -> (m, ny, nx//2+1), normalised over ALL frames as
    :func:`dose_weights`; the normaliser is computed once per grid size, so summing a 4k movie in
    chunks never holds (or recomputes) the weights of every frame at once.
    """

    def __init__(self, doses: Any, pixel_size: float, xp: Any):
        self.doses = np.asarray(doses, dtype=float)
        self.pixel_size = pixel_size
        self.xp = xp
        self._shape: tuple[int, int] | None = None  # the grid of the cached (ne, 1 / norm); one at a time
        self._cached: tuple[Any, Any] = (None, None)

    def _grid(self, ny: int, nx: int) -> tuple[Any, Any]:
        if self._shape != (ny, nx):
            xp = self.xp
            ne = _critical_exposure(ny, nx, self.pixel_size, xp)
            norm2 = xp.zeros_like(ne)
            for s in range(0, len(self.doses), 8):  # chunks of frames bound the memory
                d = xp.asarray(self.doses[s:s + 8], dtype=xp.float32)[:, None, None]
                norm2 += xp.exp(-2.0 * d / ne).sum(axis=0)
            self._shape, self._cached = (ny, nx), (ne, 1.0 / xp.sqrt(norm2))
        return self._cached

    def __call__(self, frames: slice, ny: int, nx: int) -> Any:
        xp = self.xp
        ne, inv_norm = self._grid(ny, nx)
        d = xp.asarray(self.doses[frames], dtype=xp.float32)[:, None, None]
        return (xp.exp(-d / ne) * inv_norm).astype(xp.float32)


# ---------------------------------------------------------------------------------------- sums
def sum_global(ft: Any, shifts: Any, ny: int, nx: int, weight_fn: Any = None, chunk: int = 8) -> list[Any]:
    """Real-space sums of frames ``ft`` (n, ny, nx//2+1) translated by ``shifts`` (n, 2): [plain] or,
    with ``weight_fn(frame_slice, ny, nx) -> (m, ny, nx//2+1)`` (dose weights), [plain, weighted].
    Frames go in chunks to bound memory."""
    xp = array_module(ft)
    accs = [xp.zeros(ft.shape[-2:], dtype=xp.complex64) for _ in range(2 if weight_fn else 1)]
    for s in range(0, ft.shape[0], chunk):  # chunks of frames, each batched
        part = apply_shifts(ft[s:s + chunk].copy(), shifts[s:s + chunk], ny, nx)
        accs[0] += part.sum(axis=0)
        if weight_fn is not None:
            accs[1] += (part * weight_fn(slice(s, s + chunk), ny, nx)).sum(axis=0)
    return [fft_module(xp).irfft2(a, s=(ny, nx)).astype(xp.float32) for a in accs]


@dataclass
class TileLayout:
    """Overlapping square tiles for summing with a smooth shift field; see :func:`sum_tiles`."""

    stride: int
    ramp: int
    guard: int
    ty: int
    tx: int

    @property
    def size(self) -> int:
        """Tile edge (px) including the guard bands."""
        return self.stride + self.ramp + 2 * self.guard


def tile_layout(ny: int, nx: int, max_shift: float, target: int = 256) -> TileLayout:
    """Tiles of about ``target`` px; the guard band covers the largest local shift plus 8 px."""
    stride = max(32, min(target, max(ny, nx)))
    ramp = max(8, stride // 8) // 2 * 2
    guard = math.ceil(max_shift) + 8
    return TileLayout(stride, ramp, guard, -(-ny // stride), -(-nx // stride))


def _window_1d(layout: TileLayout, xp: Any) -> Any:
    """Per-axis blending window over a tile: 0 in the guards, sin^2/cos^2 ramps, 1 inside.
    Neighbouring tiles' windows (offset by the stride) sum to one."""
    t = xp.arange(layout.size, dtype=xp.float32) - layout.guard
    r, s = layout.ramp, layout.stride
    up = xp.sin(0.5 * math.pi * xp.clip((t + 0.5) / r, 0, 1)) ** 2
    down = xp.cos(0.5 * math.pi * xp.clip((t - s + 0.5) / r, 0, 1)) ** 2
    return (up * down).astype(xp.float32)


def tile_centres(layout: TileLayout) -> tuple[np.ndarray, np.ndarray]:
    """Centres (y of each tile row, x of each tile column) in frame pixels: tile i owns [i S, (i+1) S)."""
    s = layout.stride
    return np.arange(layout.ty) * s + s / 2.0 - 0.5, np.arange(layout.tx) * s + s / 2.0 - 0.5


def _place_clamped(dst: Any, src: Any, oy: int, ox: int) -> None:
    """Write ``src`` into ``dst`` so that dst[y + oy, x + ox] = src[y, x], filling the rest of ``dst``
    with the nearest edge pixel of ``src`` (edge padding and an integer translation in one copy)."""
    hh, ww = dst.shape
    h, w = src.shape
    ys, ye = min(max(oy, 0), hh - 1), max(min(oy + h, hh), 1)
    xs, xe = min(max(ox, 0), ww - 1), max(min(ox + w, ww), 1)
    dst[ys:ye, xs:xe] = src[ys - oy:ye - oy, xs - ox:xe - ox]
    dst[ys:ye, :xs] = dst[ys:ye, xs:xs + 1]
    dst[ys:ye, xe:] = dst[ys:ye, xe - 1:xe]
    dst[:ys] = dst[ys:ys + 1]
    dst[ye:] = dst[ye - 1:ye]


def sum_tiles(frames: Any, tile_shifts: Any, layout: TileLayout, weight_fn: Any = None, chunk: int = 4) -> list[Any]:
    """Sum real frames (n, ny, nx), each tile of each frame translated by ``tile_shifts`` (n, ty, tx, 2).

    Tiles are cut with guard bands from an edge-padded frame (copied into one reused buffer),
    phase-shifted (exact sub-pixel shifts), optionally Fourier-weighted (``weight_fn(frame_slice, T, T)
    -> (m, T, T//2+1)``, for dose weighting), summed over frames, transformed back and blended with a
    partition-of-unity window.  The shifts should be the small local ones (frames already globally
    aligned): a tile is not periodic, so its sub-pixel shift rings faintly near its borders, which
    the guard band and the blend keep small.  Returns a list of sums: [unweighted] or, with
    ``weight_fn``, [unweighted, weighted].
    """
    xp = array_module(frames)
    fft = fft_module(xp)
    n, ny, nx = frames.shape
    T, S, G, R = layout.size, layout.stride, layout.guard, layout.ramp
    lo = G + R // 2
    hy, hx = layout.ty * S + T, layout.tx * S + T
    tile_shifts = xp.asarray(tile_shifts, dtype=xp.float32)
    sums = [xp.zeros((layout.ty, layout.tx, T, T // 2 + 1), dtype=xp.complex64) for _ in range(2 if weight_fn else 1)]
    buf = xp.empty((min(chunk, n), hy, hx), dtype=xp.float32)  # reused: no page churn per chunk
    st = buf.strides
    for s in range(0, n, chunk):  # chunks of frames; tiles of all frames in a chunk are batched
        m = min(chunk, n - s)
        for f in range(m):  # an edge-padded copy per frame, each vectorised
            _place_clamped(buf[f], frames[s + f], lo, lo)
        view = xp.lib.stride_tricks.as_strided(
            buf, shape=(m, layout.ty, layout.tx, T, T), strides=(st[0], S * st[1], S * st[2], st[1], st[2]))
        ft = apply_shifts(fft.rfft2(view), tile_shifts[s:s + m], T, T)
        sums[0] += ft.sum(axis=0)
        if weight_fn is not None:
            sums[1] += (ft * weight_fn(slice(s, s + m), T, T)[:, None, None]).sum(axis=0)
    win = _window_1d(layout, xp)
    w2 = win[:, None] * win[None, :]
    norm = xp.zeros((hy, hx), dtype=xp.float32)
    for i in range(layout.ty):  # overlap-add of at most a few hundred tiles, each a vectorised block
        for j in range(layout.tx):
            norm[i * S:i * S + T, j * S:j * S + T] += w2
    outs = []
    for acc in sums:
        tiles = fft.irfft2(acc, s=(T, T)) * w2
        out = xp.zeros((hy, hx), dtype=xp.float32)
        for i in range(layout.ty):
            for j in range(layout.tx):
                out[i * S:i * S + T, j * S:j * S + T] += tiles[i, j]
        outs.append((out / xp.maximum(norm, 1e-6))[lo:lo + ny, lo:lo + nx])
    return outs


# ------------------------------------------------------------------------------------- defects
def defect_mask(frames: Any, gain: Any | None, defect_map: Any | None, hot_sigma: float = 6.0,
                detect_hot: bool = True) -> tuple[Any, Any]:
    """Bad pixels: gain zero or non-finite, non-finite in any frame, the user's defect map, and (as
    RELION) hot pixels above mean + 6 sigma of the unaligned sum.  Returns (mask, hot-pixel mask).
    One pass over the frames: a pixel non-finite in any frame has a non-finite sum."""
    xp = array_module(frames)
    total = frames.sum(axis=0)
    bad = ~xp.isfinite(total)
    if gain is not None:
        bad |= (gain == 0) | ~xp.isfinite(gain)
    if defect_map is not None:
        bad |= defect_map
    hot = xp.zeros_like(bad)
    if detect_hot:
        good = total[~bad]
        mean, std = good.mean(), good.std()
        hot = (total > mean + hot_sigma * std) & ~bad
    return bad | hot, hot


def fix_defects(frames: Any, bad: Any, rng: np.random.Generator, radius: int = 2, min_ok: int = 6) -> Any:
    """Replace bad pixels in every frame by a random good neighbour within ``radius`` (keeps the noise
    statistics, as RELION), or by Gaussian noise with the frame's mean and std where fewer than
    ``min_ok`` neighbours are good.  Vectorised over bad pixels x frames; ``frames`` (float32, holding
    every non-finite value inside ``bad``) is repaired in place and returned."""
    xp = array_module(frames)
    n, ny, nx = frames.shape
    by, bx = xp.nonzero(bad)
    if by.size == 0:
        return frames
    frames[:, by, bx] = 0  # no non-finite value is left to spoil the sums below
    good = ~bad
    nd = ndimage_module(xp)
    n_ok = nd.uniform_filter(good.astype(xp.float32), size=2 * radius + 1, mode="constant") * (2 * radius + 1) ** 2
    enough = n_ok[by, bx] > min_ok - 0.5
    offs = np.array([(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                     if (dy, dx) != (0, 0)])
    m = int(by.size)
    choice = xp.zeros((n, m), dtype=xp.float32)
    filled = xp.zeros((n, m), dtype=bool)
    for _ in range(6):  # a few random draws; nearly every bad pixel with enough good neighbours hits one
        k = xp.asarray(rng.integers(0, len(offs), (n, m)))
        oy, ox = xp.asarray(offs[:, 0])[k], xp.asarray(offs[:, 1])[k]
        yy = xp.clip(by[None] + oy, 0, ny - 1)
        xx = xp.clip(bx[None] + ox, 0, nx - 1)
        ok = good[yy, xx] & ~filled
        choice = xp.where(ok, frames[xp.arange(n)[:, None], yy, xx], choice)
        filled |= ok
    cnt = float(good.sum())
    flat = frames.reshape(n, -1)
    mean = flat.sum(axis=1, dtype=xp.float64) / cnt  # bad pixels are zero: sums over the good ones
    power = xp.einsum("ij,ij->i", flat, flat, dtype=xp.float64) / cnt
    std = xp.sqrt(xp.maximum(power - mean * mean, 0.0)).astype(xp.float32)
    mean = mean.astype(xp.float32)
    noise = mean[:, None] + std[:, None] * xp.asarray(rng.standard_normal((n, m)), dtype=xp.float32)
    use = filled & enough[None]
    frames[:, by, bx] = xp.where(use, choice, noise)
    return frames


# -------------------------------------------------------------------------------- power spectrum
def power_spectrum(ft: Any, ny: int, nx: int, pixel_size: float, grouping: int, ps_size: int = 512,
                   target_pixel: float = 1.4) -> tuple[Any, float]:
    """RELION's summed amplitude spectrum for CTF estimation: frames (n, ny, nx//2+1) summed in groups of
    ``grouping``, |F| of each group (FFT normalised by the pixel count) added up, centred, made square,
    cropped to ``target_pixel`` Å (CTFFIND's preferred sampling) when finer, Fourier-resized to
    ``ps_size``.  Returns the image and its pixel size."""
    xp = array_module(ft)
    fft = fft_module(xp)
    n = ft.shape[0]
    g = max(1, grouping)
    amp = xp.zeros(ft.shape[-2:], dtype=xp.float32)
    for s in range(0, n, g):  # RELION's groups: consecutive runs of `grouping` frames, the last shorter
        amp += xp.abs(ft[s:s + g].sum(axis=0))
    amp /= float(ny * nx)
    # Build the full plane from Friedel symmetry: F(-ky, -kx) = conj F(ky, kx).
    neg = amp[(-xp.arange(ny)) % ny][:, 1:(nx + 1) // 2][:, ::-1]
    full = xp.concatenate([amp, neg], axis=1)[:, : nx]
    full = fft.fftshift(full)
    side = min(ny, nx)
    if ny != nx:
        full = _fourier_resize(full, side, side)
    ps_px = pixel_size
    need = side
    if pixel_size < target_pixel:
        need = math.ceil(side * pixel_size / target_pixel)
        need += need % 2
        ps_px = side * pixel_size / need
    c = side // 2
    full = full[c - need // 2:c - need // 2 + need, c - need // 2:c - need // 2 + need]
    out = _fourier_resize(full, ps_size, ps_size)
    return out.astype(xp.float32), float(ps_px)


def _fourier_resize(img: Any, ny: int, nx: int) -> Any:
    """Resample a real image to ny x nx by cropping/padding its transform (values keep their scale)."""
    xp = array_module(img)
    fft = fft_module(xp)
    oy, ox = img.shape
    ft = fft.rfft2(img)
    if ny <= oy and nx <= ox:
        small = crop_half_rect(ft, ny, nx)
    else:
        small = xp.zeros((ny, nx // 2 + 1), dtype=ft.dtype)
        h = min(oy, ny) // 2
        w = min(ox // 2 + 1, nx // 2 + 1)
        small[:h, :w] = ft[:h, :w]
        small[-h:, :w] = ft[-h:, :w]
    return fft.irfft2(small, s=(ny, nx)) * (ny * nx) / (oy * ox)


def bin_image(img: Any, ny: int, nx: int) -> Any:
    """Fourier-crop binning of a real image to ny x nx (mean preserved), as RELION's binNonSquareImage."""
    return _fourier_resize(img, ny, nx).astype(img.dtype)


# ----------------------------------------------------------------------------------- statistics
def accumulated_motion(shifts: np.ndarray, frame_numbers: np.ndarray, dose_per_frame: float,
                       pre_exposure: float, cutoff_dose: float = 4.0) -> tuple[float, float, float]:
    """RELION's rlnAccumMotionTotal/Early/Late: the summed frame-to-frame global shift (movie px, as
    RELION computes it), split at the frame whose exposure reaches ``cutoff_dose`` e/Å^2."""
    if len(shifts) < 2:
        return 0.0, 0.0, 0.0
    d = np.hypot(*np.diff(np.asarray(shifts, dtype=float), axis=0).T)
    cutoff_frame = (cutoff_dose - pre_exposure) / dose_per_frame if dose_per_frame > 0 else np.inf
    early = np.asarray(frame_numbers)[1:] <= cutoff_frame
    return float(d.sum()), float(d[early].sum()), float(d[~early].sum())
