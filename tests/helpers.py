"""Helpers shared by tests: paths of the shipped test models and small simulated maps."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
ADK_CLOSED = DATA / "1ake_adk_closed.pdb.gz"
ADK_OPEN = DATA / "4ake_adk_open.pdb.gz"
HIV_PROTEASE = DATA / "1hvr.pdb.gz"


@lru_cache(maxsize=8)
def model_map(path: Path, box: int, pixel_size: float) -> np.ndarray:
    """Simulated map of a test model (cached; treat as read-only)."""
    from reconstruct.simulate import atomic_model_map

    return atomic_model_map(path, box, pixel_size)
