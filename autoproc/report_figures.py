"""The report's figures: small matplotlib PNGs drawn from a job's STAR and MRC files, and the cache that
redraws a figure only when the files it was drawn from change (the report is rewritten after every job)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reconstruct.files.atomic import atomic_path, atomic_write_text

CACHE = "cache.json"


def file_signature(paths: Sequence[Path]) -> list[list[Any]]:
    """What a figure depends on: each source's path, size and modification time (absent files included)."""
    out: list[list[Any]] = []
    for p in paths:
        try:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), -1, -1])
    return out


class FigureCache:
    """PNG figures under ``directory`` (the project's ``report/``), each redrawn only when its sources change.

    Values computed from many files (particle counts per micrograph) are cached the same way, so a
    report rewritten after every job re-reads only what changed.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.entries: dict[str, Any] = json.loads((directory / CACHE).read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.used: set[str] = set()

    def figure(self, name: str, sources: Sequence[Path], draw: Callable[[Path], None]) -> Path:
        """``directory/name`` (a PNG), drawn by ``draw(path)`` unless it exists and its sources are unchanged."""
        out = self.directory / name
        key = f"figure:{name}"
        sig = file_signature(sources)
        self.used.add(key)
        if not (out.exists() and self.entries.get(key) == sig):
            draw(out)
            self.entries[key] = sig
        return out

    def value(self, name: str, sources: Sequence[Path], compute: Callable[[], Any]) -> Any:
        """A JSON-able value computed from ``sources``, recomputed only when they change."""
        key = f"value:{name}"
        sig = file_signature(sources)
        self.used.add(key)
        hit = self.entries.get(key)
        if isinstance(hit, dict) and hit.get("sig") == sig:
            return hit["value"]
        v = compute()
        self.entries[key] = {"sig": sig, "value": v}
        return v

    def save(self) -> None:
        """Write the cache index, forgetting entries this report did not use (and their PNGs)."""
        for key in [k for k in self.entries if k not in self.used]:
            del self.entries[key]
            if key.startswith("figure:"):
                (self.directory / key[len("figure:"):]).unlink(missing_ok=True)
        atomic_write_text(self.directory / CACHE, json.dumps(self.entries))


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path) -> None:
    """Lay out, write atomically as PNG and close a figure."""
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_image(img: np.ndarray, out: Path, lo_pct: float = 1.0, hi_pct: float = 99.5) -> None:
    """Write one 2D image as a grey PNG at its own size, contrast from percentiles (origin at the bottom)."""
    plt = pyplot()
    lo, hi = np.percentile(img, [lo_pct, hi_pct])
    with atomic_path(out) as tmp:
        plt.imsave(tmp, np.asarray(img, np.float32), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                   origin="lower", format="png")


def display_range(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.5) -> tuple[float, float]:
    """Grey levels for imshow from percentiles, never an empty range."""
    lo, hi = (float(v) for v in np.percentile(img, [lo_pct, hi_pct]))
    return lo, hi if hi > lo else lo + 1.0


def bin_and_lowpass(mic: np.ndarray, pixel_size: float, max_size: int = 768, resolution: float = 20.0
                    ) -> tuple[np.ndarray, int]:
    """A micrograph shrunk for display: binned by an integer factor to at most ``max_size`` pixels, then
    low-passed with a Gaussian to ``resolution`` Å. Returns the image and the binning factor."""
    ny, nx = mic.shape
    f = max(1, -(-max(ny, nx) // max_size))
    img = mic[: ny - ny % f, : nx - nx % f].astype(np.float32)
    img = img.reshape(img.shape[0] // f, f, img.shape[1] // f, f).mean(axis=(1, 3))
    px = pixel_size * f if pixel_size > 0 else float(f)
    ky = np.fft.fftfreq(img.shape[0])[:, None] / px
    kx = np.fft.rfftfreq(img.shape[1])[None, :] / px
    sigma = 1.0 / resolution / 2.0  # 1/Å: the filter is 1/e^2 at 1/resolution
    filt = np.exp(-(kx * kx + ky * ky) / (2.0 * sigma * sigma)).astype(np.float32)
    return np.fft.irfft2(np.fft.rfft2(img) * filt, s=img.shape).astype(np.float32), f


def central_views(vol: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The central xy, xz and yz slices of a map (z, y, x) and its projections along z, y and x."""
    n = vol.shape
    slices = [vol[n[0] // 2], vol[:, n[1] // 2], vol[:, :, n[2] // 2]]
    projections = [vol.sum(axis=0), vol.sum(axis=1), vol.sum(axis=2)]
    return slices, projections


def draw_map_views(vol: np.ndarray, out: Path, title: str, projections: bool = True) -> None:
    """Central slices (and, optionally, projections) of a map as one figure."""
    plt = pyplot()
    slices, projs = central_views(vol)
    rows = [("slice", slices)] + ([("projection", projs)] if projections else [])
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.65 * len(rows) + 0.3), dpi=100, squeeze=False)
    for r, (kind, views) in enumerate(rows):
        lo, hi = display_range(np.concatenate([v.ravel() for v in views]), 1.0, 99.9)
        for ax, img, plane in zip(axes[r], views, ("xy (along z)", "xz (along y)", "yz (along x)")):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"central {kind} {plane}" if kind == "slice" else f"{kind} {plane}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save(fig, out)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``run_it9`` before ``run_it10`` and ``job9`` before ``job10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
