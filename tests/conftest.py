"""Shared fixtures: small synthetic maps with known content."""

from __future__ import annotations

import numpy as np
import pytest


def blob_map(n: int, n_atoms: int = 300, spread: float = 0.11, sigma: float = 1.0, seed: int = 0) -> np.ndarray:
    """A pseudo-atomic map: Gaussian 'atoms' scattered around the centre of an n^3 box."""
    rng = np.random.default_rng(seed)
    pts = rng.normal(0.0, spread * n, (n_atoms, 3))
    c = np.arange(n) - n // 2
    vol = np.zeros((n, n, n), np.float32)
    # separable Gaussians: sum_a gz(z) gy(y) gx(x) with one outer product per atom
    g = np.exp(-((c[None, :] - pts[:, :, None]) ** 2) / (2 * sigma * sigma))  # (atoms, 3, n)
    for a in range(n_atoms):
        vol += np.einsum("i,j,k->ijk", g[a, 2], g[a, 1], g[a, 0])
    return vol


@pytest.fixture(scope="session")
def atoms64() -> np.ndarray:
    return blob_map(64)


@pytest.fixture(scope="session")
def atoms32() -> np.ndarray:
    return blob_map(32, n_atoms=120)
