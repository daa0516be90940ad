"""Orientation and translation sampling as RELION does it: HEALPix directions, psi steps, offset grids.

HEALPix order N has N_side = 2^N and 12 N_side^2 equal-area directions (about 60/2^N degrees apart);
a direction (theta, phi) is the pose's (tilt, rot).  psi is sampled with RELION's step
360 / (6 * 2^N) in 3D.  Directions are generated in the RING scheme (the set is the same as RELION's
NEST-ordered one; only the order differs).
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import euler_to_matrix
from .symmetry import symmetry_operators


def healpix_nside(order: int) -> int:
    """N_side of a HEALPix order."""
    if order < 0 or order > 10:
        raise ValueError(f"HEALPix order must be between 0 and 10, got {order}")
    return 2**order


def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(tilt, rot) in degrees of the 12 N_side^2 pixel centres of HEALPix ``order`` (RING order)."""
    ns = healpix_nside(order)
    npix = 12 * ns * ns
    ncap = 2 * ns * (ns - 1)
    p = np.arange(npix, dtype=np.int64)
    z = np.empty(npix)
    phi = np.empty(npix)
    north = p < ncap
    i = np.floor((1 + np.sqrt(1 + 2 * p[north])) / 2).astype(np.int64)
    j = p[north] - 2 * i * (i - 1) + 1
    z[north] = 1 - i * i / (3.0 * ns * ns)
    phi[north] = (j - 0.5) * np.pi / (2 * i)
    equ = (p >= ncap) & (p < npix - ncap)
    pe = p[equ] - ncap
    i = pe // (4 * ns) + ns
    j = pe % (4 * ns) + 1
    s = ((i - ns + 1) % 2).astype(float)
    z[equ] = 4.0 / 3.0 - 2.0 * i / (3.0 * ns)
    phi[equ] = (j - s / 2) * np.pi / (2 * ns)
    south = p >= npix - ncap
    ps = npix - p[south]
    i = np.floor((1 + np.sqrt(2 * ps - 1)) / 2).astype(np.int64)
    j = 4 * i + 1 - (ps - 2 * i * (i - 1))
    z[south] = -1 + i * i / (3.0 * ns * ns)
    phi[south] = (j - 0.5) * np.pi / (2 * i)
    return np.rad2deg(np.arccos(np.clip(z, -1, 1))), np.rad2deg(phi)


def angular_step(order: int) -> float:
    """RELION's nominal angular sampling of a HEALPix order: 60 / 2^order degrees."""
    return 60.0 / healpix_nside(order)


def psi_angles(order: int, is_3d: bool = True, psi_step: float | None = None) -> np.ndarray:
    """In-plane angles: RELION's step 360/(6 * 2^order) in 3D (10 degrees in 2D unless given)."""
    step = psi_step or (360.0 / (6 * healpix_nside(order)) if is_3d else 10.0)
    n = max(1, round(360.0 / step))
    return np.arange(n) * (360.0 / n)


def _directions(tilt: np.ndarray, rot: np.ndarray) -> np.ndarray:
    t, r = np.deg2rad(tilt), np.deg2rad(rot)
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], 1)


def asymmetric_unit(tilt: np.ndarray, rot: np.ndarray, symmetry: str) -> np.ndarray:
    """Mask of directions to keep so that no two kept ones are symmetry mates (RELION's reduction).

    Directions are visited in order; one is dropped when a symmetry operator maps it onto a
    direction already kept (to within half the grid spacing).
    """
    ops = symmetry_operators(symmetry)
    n = tilt.size
    if ops.shape[0] == 1:
        return np.ones(n, bool)
    d = _directions(tilt, rot)
    # Beam direction of pose A R^T is R (A^T e_z): rotate the direction vectors by each operator.
    mates = np.einsum("gij,nj->gni", ops, d)  # (G, n, 3)
    spacing = np.sqrt(4 * np.pi / n)
    keep = np.ones(n, bool)
    cos_tol = np.cos(0.5 * spacing)
    for k in range(n):  # greedy over directions (thousands at most), vectorised over mates
        if not keep[k]:
            continue
        dots = mates[1:, k, :] @ d.T  # (G-1, n): images of direction k against all directions
        hit = (dots > cos_tol).any(axis=0)
        hit[: k + 1] = False
        keep &= ~hit
    return keep


def orientations(order: int, symmetry: str = "C1", psi_step: float | None = None,
                 perturb: float = 0.0, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (direction x psi) rotation matrices (M, 3, 3) and their (rot, tilt, psi) angles (M, 3).

    ``perturb`` (a fraction of the angular step, RELION's ``--perturb``) shifts the whole grid by a
    random rotation so that successive iterations sample different points.
    """
    tilt, rot = healpix_directions(order)
    keep = asymmetric_unit(tilt, rot, symmetry)
    tilt, rot = tilt[keep], rot[keep]
    psi = psi_angles(order, True, psi_step)
    t = np.repeat(tilt, psi.size)
    r = np.repeat(rot, psi.size)
    p = np.tile(psi, tilt.size)
    mats = euler_to_matrix(r, t, p)
    if perturb > 0:
        rng = rng or np.random.default_rng()
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        ang = np.deg2rad(perturb * angular_step(order))
        kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rmat = np.eye(3) + np.sin(ang) * kx + (1 - np.cos(ang)) * kx @ kx
        mats = mats @ rmat
    return mats, np.stack([r, t, p], 1)


def translations(offset_range: float, offset_step: float) -> np.ndarray:
    """RELION's in-plane translation grid (pixels): a square grid of ``offset_step`` within a disc."""
    if offset_step <= 0:
        return np.zeros((1, 2))
    n = int(np.floor(offset_range / offset_step))
    g = np.arange(-n, n + 1) * offset_step
    x, y = np.meshgrid(g, g, indexing="xy")
    keep = x * x + y * y <= offset_range * offset_range + 1e-9
    return np.stack([x[keep], y[keep]], 1)


def local_rotations(step: float, radius: float) -> np.ndarray:
    """Small rotations (L, 3, 3) on a cubic grid of rotation vectors: spacing ``step`` degrees,
    within ``radius`` degrees of the identity (which is first).  ``delta @ A`` samples around pose A."""
    n = int(np.floor(radius / step + 1e-9))
    g = np.arange(-n, n + 1) * step
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    v = v[np.linalg.norm(v, axis=1) <= radius + 1e-9]
    v = v[np.argsort(np.linalg.norm(v, axis=1), kind="stable")]
    ang = np.deg2rad(np.linalg.norm(v, axis=1))
    axis = np.divide(v, np.linalg.norm(v, axis=1, keepdims=True), out=np.zeros_like(v),
                     where=np.linalg.norm(v, axis=1, keepdims=True) > 0)
    k = np.zeros((len(v), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k -= np.swapaxes(k, 1, 2)
    s, c = np.sin(ang)[:, None, None], np.cos(ang)[:, None, None]
    return np.eye(3)[None] + s * k + (1 - c) * (k @ k)


def coarse_image_size(coarse_step: float, diameter: float, pixel_size: float, box: int, current_size: int,
                      keepsafe: float = 1.5) -> int:
    """RELION's image size for the coarse pass of adaptive oversampling: up to the frequency where one coarse
    angular step (degrees) moves the edge of a particle of ``diameter`` Å by ``keepsafe`` wavelengths (RELION:
    1.5 in 2D, 1.2 in 3D) -- finer frequencies cannot tell neighbouring coarse poses apart better, and cost the
    most.  Even, and never above the current image size (the oversampled pass uses that)."""
    arc = coarse_step / 360.0 * math.pi * diameter  # Å moved at the particle's edge
    return min(current_size, 2 * math.ceil(pixel_size * box * keepsafe / arc))
