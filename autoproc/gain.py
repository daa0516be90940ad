"""Gain references: reading them (MRC, TIFF, Gatan DM3/DM4), orienting them as RELION does, and
checking the orientation against the movies themselves.

RELION multiplies every movie frame by the gain reference, after rotating it ``--gain_rot`` times 90°
clockwise (as relion_display shows it) and then flipping it (``--gain_flip`` 1: Y, upside down; 2: X,
left-right).  A wrong orientation is a silent error that costs resolution, and EMPIAR entries rarely
state it, so :func:`check_gain_orientation` measures it: the raw movie mean of a counting detector is
proportional to 1/gain pixel by pixel, so of the eight distinct rotations/flips, the right one makes
high-pass filtered ``log(movie mean)`` correlate with high-pass filtered ``-log(gain)`` (and makes the
gain-normalised sum flattest).

RELION cannot read DM files; :func:`convert_gain_to_mrc` writes the gain as MRC, rows in the order
the DM file stores them.  (IMOD's dm2mrc flips Y on conversion, which is why recipes for DM gains
converted with it add ``--gain_flip 1``.)  DM files are read with the optional ``rosettasciio`` package,
imported only when a DM file is met.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reconstruct.backend import array_module, fft_module, to_numpy
from reconstruct.files.errors import InputError
from reconstruct.files.mrc import read_map, write_map

log = logging.getLogger("reconstruct")

# The eight distinct orientations as RELION (rot, flip) with flip in {0, 1}: (rot, 2) is (rot + 2, 1).
ORIENTATIONS: tuple[tuple[int, int], ...] = tuple((r, f) for f in (0, 1) for r in range(4))

_DM_ADVICE = ("install the optional reader with 'pip install rosettasciio', or convert the gain to MRC "
              "(IMOD's dm2mrc flips Y: check the orientation with 'autoproc empiar gain-check')")


def _kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(212)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 212 and head[208:211] == b"MAP":
        return "mrc"
    if head[:4] in (b"\x00\x00\x00\x03", b"\x00\x00\x00\x04"):
        return "dm"
    suffix = path.suffix.lower()
    if suffix in (".mrc", ".mrcs"):
        return "mrc"
    if suffix in (".dm3", ".dm4"):
        return "dm"
    return "unknown"


def read_gain(path: str | Path) -> np.ndarray:
    """The gain reference in ``path`` as float32 (ny, nx), rows in file order (as RELION reads MRC/TIFF).

    The format is recognised from the file's first bytes: MRC, TIFF (first page; EER ``.gain`` files
    are TIFF) or Gatan DM3/DM4 (needs ``rosettasciio``).  Any failure is an :class:`InputError`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "gain reference not found", "check the path, or download it with --include-gain")
    kind = _kind(path)
    if kind == "mrc":
        data, _ = read_map(path, check_finite=False)
    elif kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                data = tf.pages[0].asarray()
        except Exception as err:  # tifffile raises many types for damaged files
            raise InputError(path, f"not a readable TIFF gain reference ({err})", "re-download the file") from None
    elif kind == "dm":
        data = _read_dm(path)
    else:
        raise InputError(path, "unknown gain reference format", "give an MRC, TIFF or Gatan DM3/DM4 file")
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputError(path, f"the gain reference is not one 2D image (shape {data.shape})",
                         "give a single gain image")
    return data


def _read_dm(path: Path) -> np.ndarray:
    try:
        from rsciio.digitalmicrograph import file_reader
    except ImportError:
        raise InputError(path, "reading Gatan DM3/DM4 files needs the optional package rosettasciio",
                         _DM_ADVICE) from None
    try:
        signals = file_reader(str(path), lazy=False)
    except Exception as err:  # the reader raises IOError, KeyError, NotImplementedError... on bad files
        raise InputError(path, f"not a readable Gatan DM file ({type(err).__name__}: {err})",
                         "re-download it, or convert it to MRC with another program") from None
    images = [np.squeeze(np.asarray(s["data"])) for s in signals]
    images = [im for im in images if im.ndim == 2 and im.dtype.names is None]  # not RGB thumbnails
    if not images:
        raise InputError(path, "the DM file holds no 2D image", "give the gain reference image")
    return images[0]


def normalise_orientation(rot: int, flip: int) -> tuple[int, int]:
    """The (rot, flip) with flip in {0, 1} that does the same as RELION's (rot, flip): flip 2 after
    rotation k equals flip 1 after rotation k + 2."""
    if rot not in (0, 1, 2, 3) or flip not in (0, 1, 2):
        raise ValueError(f"gain rotation must be 0..3 and flip 0..2, not {rot}, {flip}")
    return ((rot + 2) % 4, 1) if flip == 2 else (rot, flip)


def orient_gain(gain: Any, rot: int, flip: int) -> Any:
    """``gain`` (ny, nx) as RELION's motion correction uses it with ``--gain_rot rot --gain_flip flip``.

    Matches RELION's ImageOp: rotate90 puts src[y, x] at dest[x, ny-1-y] (clockwise as relion_display
    shows it), then flip 1 reverses the rows (Y) and flip 2 the columns (X).  NumPy or CuPy input.
    """
    xp = array_module(gain)
    if rot not in (0, 1, 2, 3) or flip not in (0, 1, 2):
        raise ValueError(f"gain rotation must be 0..3 and flip 0..2, not {rot}, {flip}")
    out = xp.rot90(gain, k=-rot)
    if flip == 1:
        out = out[::-1, :]
    elif flip == 2:
        out = out[:, ::-1]
    return xp.ascontiguousarray(out)


def convert_gain_to_mrc(src: str | Path, dst: str | Path, rot: int = 0, flip: int = 0) -> Path:
    """Write the gain in ``src`` (any readable format) to MRC ``dst``, oriented by (rot, flip) if given,
    so RELION can use it (RELION reads no DM files).  Returns ``dst``."""
    gain = orient_gain(read_gain(src), rot, flip)
    write_map(dst, gain, 0.0)
    return Path(dst)


def movie_mean(paths: list[str | Path], max_frames: int | None = None) -> np.ndarray:
    """The mean frame over several movies (TIFF or MRC), float64 (ny, nx): the input to the gain check.

    Frames are summed one at a time, so memory stays at one frame whatever the movie size.
    """
    if not paths:
        raise InputError(None, "no movies to compare the gain with", "download or give a few movies first")
    total: np.ndarray | None = None
    count = 0
    for p in paths:
        for frame in _frames(Path(p), max_frames):
            f = np.asarray(frame, dtype=np.float64)
            if total is None:
                total = np.zeros_like(f)
            if f.shape != total.shape:
                raise InputError(p, f"frame size {f.shape} differs from the other movies' {total.shape}",
                                 "check the movies belong to one data set")
            total += f
            count += 1
    if total is None or count == 0:
        raise InputError(None, "the movies hold no frames", "check the movie files")
    return total / count


def _frames(path: Path, max_frames: int | None) -> Any:
    kind = _kind(path) if path.is_file() else "missing"
    if kind == "tiff":
        import tifffile

        with tifffile.TiffFile(path) as tf:
            pages = tf.pages[:max_frames] if max_frames else tf.pages
            for page in pages:
                yield page.asarray()
    elif kind == "mrc":
        import mrcfile

        with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
            for i in range(min(len(data), max_frames or len(data))):
                yield data[i]
    else:
        raise InputError(path, "not a TIFF or MRC movie", "the gain check reads TIFF and MRC movies")


@dataclass
class GainCheck:
    """The fit of each orientation: correlation of high-passed log(movie mean) with high-passed
    -log(gain) (higher is better, None where the shapes do not match) and the residual (std of the
    gain-normalised log mean over std of the raw one; lower is flatter)."""

    correlation: dict[tuple[int, int], float | None]
    residual: dict[tuple[int, int], float | None]
    current: tuple[int, int]
    best: tuple[int, int]
    margin: float

    @property
    def recommended(self) -> tuple[int, int] | None:
        """The orientation to use: the best one when it clearly beats the current one, else None."""
        cur = self.correlation.get(self.current)
        best = self.correlation[self.best]
        if best is None or best < self.margin:
            return None
        if self.best == self.current or (cur is not None and best - cur < self.margin):
            return None
        return self.best

    @property
    def conclusive(self) -> bool:
        """True when the best orientation stands out from every other one."""
        best = self.correlation[self.best]
        others = [c for o, c in self.correlation.items() if o != self.best and c is not None]
        return best is not None and best >= self.margin and all(best - c >= self.margin for c in others)

    def message(self) -> str:
        """One line for the user: whether the current orientation fits and what to set otherwise."""
        b, c = self.correlation[self.best], self.correlation.get(self.current)
        cur = f"--gain-rot {self.current[0]} --gain-flip {self.current[1]}"
        if not self.conclusive and self.recommended is None:
            return (f"gain orientation check inconclusive (best rot={self.best[0]} flip={self.best[1]}: "
                    f"correlation {_fmt(b)}, current {cur}: {_fmt(c)}); use more movies or check by eye")
        if self.recommended is not None:
            r = self.recommended
            return (f"another gain orientation fits better: rot={r[0]} flip={r[1]} (correlation {_fmt(b)}, "
                    f"residual {_fmt(self.residual[r])}) than the current {cur} (correlation {_fmt(c)}); "
                    f"set --gain-rot {r[0]} --gain-flip {r[1]}")
        return (f"gain orientation {cur} fits best (correlation {_fmt(c)}, residual "
                f"{_fmt(self.residual.get(self.current))}; next best {_fmt(self._second())})")

    def _second(self) -> float | None:
        vals = sorted((v for o, v in self.correlation.items() if o != self.best and v is not None), reverse=True)
        return vals[0] if vals else None


def _fmt(v: float | None) -> str:
    return "n/a (shape mismatch)" if v is None else f"{v:.3f}"


def _highpass(img: Any, mask: Any, sigma: float) -> Any:
    """``img`` minus its Gaussian low-pass (``sigma`` px), with masked pixels filled by the mean first."""
    xp = array_module(img)
    fft = fft_module(xp)
    filled = xp.where(mask, img, img[mask].mean()).astype(xp.float32)
    ny, nx = filled.shape
    fy = fft.fftfreq(ny).astype(np.float32)[:, None]
    fx = fft.rfftfreq(nx).astype(np.float32)[None, :]
    kernel = xp.exp(-2.0 * np.pi**2 * sigma**2 * (xp.asarray(fy) ** 2 + xp.asarray(fx) ** 2))
    low = fft.irfft2(fft.rfft2(filled) * kernel, s=(ny, nx))
    out = filled - low
    # robust clip: hot pixels and defects must not decide the correlation
    s = 1.4826 * float(xp.median(xp.abs(out[mask])))
    return xp.clip(out, -6 * s, 6 * s) if s > 0 else out


def check_gain_orientation(gain: Any, mean_frame: Any, current: tuple[int, int] = (0, 0),
                           sigma: float = 4.0) -> GainCheck:
    """Score all eight orientations of ``gain`` against the movies' ``mean_frame`` (see module doc).

    ``current`` is the user's (--gain-rot, --gain-flip).  Orientations whose shape differs from the
    movies' get None; if none fits, an :class:`InputError` says so (e.g. a super-resolution gain with
    binned movies).  Arrays may be NumPy or CuPy.
    """
    xp = array_module(gain, mean_frame)
    g = xp.asarray(gain, dtype=xp.float32)
    m = xp.asarray(mean_frame, dtype=xp.float32)
    shapes = {o: (g.shape if o[0] % 2 == 0 else g.shape[::-1]) for o in ORIENTATIONS}
    if not any(s == m.shape for s in shapes.values()):
        raise InputError(None, f"the gain reference is {g.shape[1]}x{g.shape[0]} px but the movies are "
                               f"{m.shape[1]}x{m.shape[0]} px in every orientation",
                         "use the gain made for these movies (super-resolution gains are twice the size)")
    gmask = g > 0
    mmask = m > 0
    hg = _highpass(-xp.log(xp.where(gmask, g, 1.0)), gmask, sigma)
    hm = _highpass(xp.log(xp.where(mmask, m, 1.0)), mmask, sigma)
    corr: dict[tuple[int, int], float | None] = {}
    resid: dict[tuple[int, int], float | None] = {}
    for o in ORIENTATIONS:
        if shapes[o] != m.shape:
            corr[o] = resid[o] = None
            continue
        go = orient_gain(hg, *o)
        mask = orient_gain(gmask, *o) & mmask
        a = go[mask] - go[mask].mean()
        b = hm[mask] - hm[mask].mean()
        corr[o] = float(xp.sum(a * b) / xp.sqrt(xp.sum(a * a) * xp.sum(b * b) + 1e-30))
        resid[o] = float(xp.std(b - a) / (xp.std(b) + 1e-30))
    best = max((o for o in ORIENTATIONS if corr[o] is not None), key=lambda o: corr[o])  # type: ignore[arg-type]
    n = int(to_numpy(mmask).sum())
    margin = max(0.05, 5.0 / np.sqrt(max(n, 1)))
    cur = normalise_orientation(*current)
    return GainCheck(corr, resid, cur, best, margin)


def check_gain_files(gain_path: str | Path, movies: list[str | Path] | str, current: tuple[int, int] = (0, 0),
                     n_movies: int = 3, max_frames: int | None = None) -> GainCheck:
    """Read a gain reference and the first ``n_movies`` movies (a list or a glob), then check the
    orientation; logs the verdict."""
    paths = sorted(glob.glob(movies)) if isinstance(movies, str) else list(movies)
    paths = paths[:n_movies]
    gain = read_gain(gain_path)
    result = check_gain_orientation(gain, movie_mean(paths, max_frames), current)
    log.info("%s (from %d movie(s))", result.message(), len(paths))
    return result
