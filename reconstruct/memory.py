"""Memory estimates, so that jobs fail early with advice instead of being killed mid-run."""

from __future__ import annotations

import os
from typing import Any


def available_bytes(xp: Any = None) -> int:
    """Free memory on the device ``xp`` computes on (host RAM for NumPy)."""
    if xp is not None and xp.__name__ == "cupy":
        free, _ = xp.cuda.runtime.memGetInfo()
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def backprojector_bytes(box: int, padding: float, ndim: int = 3) -> int:
    """Bytes held by a back-projector (complex64 data + float32 weight grids) plus reconstruction temporaries."""
    from .projector import padded_size

    p = padded_size(box, padding)
    cells = (p + 2) ** (ndim - 1) * (p // 2 + 2)
    return cells * (8 + 4) * 3


def check_fits(needed: int, xp: Any, what: str, advice: str) -> None:
    """Raise MemoryError with ``advice`` when ``needed`` bytes exceed 90% of what is available."""
    have = available_bytes(xp)
    if needed > 0.9 * have:
        raise MemoryError(
            f"{what} needs about {needed / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is available: {advice}"
        )
