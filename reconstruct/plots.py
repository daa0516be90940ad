"""Plots people look at instead of tables: FSC curves, class galleries, 3D class slices (PNG, via
matplotlib's Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .files.atomic import atomic_path


def plot_fsc(curves: Mapping[str, np.ndarray], box: int, pixel_size: float, out: str | Path,
             thresholds: tuple[float, ...] = (0.143, 0.5), title: str = "Fourier shell correlation") -> Path:
    """Write FSC curves against spatial frequency, with threshold lines and Å tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, curve in curves.items():
        k = np.arange(len(curve)) / (box * pixel_size)
        ax.plot(k, curve, label=label, lw=1.6)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
        ax.text(0.0, t + 0.01, f"{t:g}", color="grey", fontsize=8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    nyquist = 0.5 / pixel_size
    ax.set_xlim(0, nyquist)
    top = ax.twiny()
    top.set_xlim(0, nyquist)
    ticks = np.linspace(0, nyquist, 6)[1:]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1 / t:.1f}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(fontsize=8)
    return _save_png(fig, out)


def plot_class_gallery(refs: np.ndarray, distribution: np.ndarray, out: str | Path, title: str = "2D classes",
                       columns: int = 10, scores: np.ndarray | None = None,
                       selected: np.ndarray | None = None) -> Path:
    """Write class averages (K, N, N) as a grid sorted by class size, each labelled with its number and share.

    With ``scores`` the grid is sorted by score instead and each class shows its score; ``selected``
    classes get a green frame, the others a red one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.asarray(distribution if scores is None else scores), kind="stable")
    k = len(order)
    cols = min(columns, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), order):
        img = refs[c]
        lo, hi = np.percentile(img, [1, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        label = f"{100 * distribution[c]:.1f}%" if scores is None else (
            "n/a" if scores[c] <= -999 else f"{scores[c]:.2f}")
        ax.set_title(f"{c + 1}: {label}", fontsize=7)
        if selected is not None:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if selected[c] else "tab:red")
                spine.set_linewidth(2.5 if selected[c] else 1.0)
    fig.suptitle(title, fontsize=9)
    return _save_png(fig, out)


def plot_class_slices(maps: np.ndarray, distribution: np.ndarray, out: str | Path, title: str = "3D classes"
                      ) -> Path:
    """Write the central xy, xz and yz slices of each 3D class (K, N, N, N), one row per class with its
    share of the particles, largest class first: how an initial model or a 3D classification evolves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.asarray(distribution), kind="stable")
    k, n = len(order), maps.shape[1]
    fig, axes = plt.subplots(k, 3, figsize=(4.2, 1.45 * k + 0.5), dpi=100, squeeze=False)
    for row, c in zip(axes, order):
        vol = maps[c]
        views = (vol[n // 2], vol[:, n // 2], vol[:, :, n // 2])
        lo, hi = np.percentile(vol, [1, 99.9])
        for ax, img, name in zip(row, views, ("xy", "xz", "yz")):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"class {c + 1}: {100 * distribution[c]:.1f}% ({name})", fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save_png(fig, out)


def _save_png(fig: object, out: str | Path) -> Path:
    """Lay out, write atomically as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
