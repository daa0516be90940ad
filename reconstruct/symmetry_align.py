"""Find a point group's axes in a map refined without symmetry and turn the map into RELION's frame.

An initial model made in C1 has its symmetry axes anywhere. The map is centred on its centre of mass,
then every rotation R of a grid is scored by how well the map, turned by R, agrees with itself under
the group's operators in RELION's convention (sum over g of <M_R, g M_R>, computed at a coarse sampling
as <M, M rotated by R^T g R>); the best is refined locally. For Cn only the axis direction matters, so
the grid is over directions alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from .align_maps import _prepare, _rotated_batch, transform_map
from .masks import soft_sphere
from .sampling import healpix_directions, orientations
from .symmetry import symmetrise_map, symmetry_operators

log = logging.getLogger(__name__)


@dataclass
class SymmetryAlignment:
    """The motion that puts a map into its point group's standard frame."""

    rotation: np.ndarray  # (3, 3) xyz: aligned(p) = centred(R^T p)
    shift: np.ndarray  # (3,) Å applied first: centred(p) = volume(p - shift)
    score: float  # CC between the aligned map and its symmetrised version (1 = perfectly symmetric)
    aligned: np.ndarray


def _centre_of_mass_shift(volume: np.ndarray) -> np.ndarray:
    """Shift (xyz px) that moves the positive density's centre of mass to the box centre."""
    w = np.clip(volume, 0, None)
    if w.sum() <= 0:
        return np.zeros(3)
    com = np.array(ndimage.center_of_mass(w))[::-1]  # xyz
    return volume.shape[0] // 2 - com


def _is_cyclic(group: str) -> bool:
    g = group.strip().upper()
    return g.startswith("C") and g[1:].isdigit()


def _scores(small: np.ndarray, rots: np.ndarray, ops: np.ndarray, batch: int = 256) -> np.ndarray:
    """sum over non-identity g of <M, M rotated by R^T g R> for each R."""
    out = np.zeros(len(rots))
    for g in ops[1:]:
        q = np.einsum("bji,jk,bkl->bil", rots, g, rots)  # R^T g R
        for s in range(0, len(rots), batch):
            r = _rotated_batch(small, q[s:s + batch])
            out[s:s + batch] += np.einsum("bijk,ijk->b", r, small)
    return out / max(len(ops) - 1, 1)


def align_symmetry(volume: np.ndarray, pixel_size: float, group: str, coarse_size: int = 24,
                   diameter: float | None = None) -> SymmetryAlignment:
    """Rotate (and centre) ``volume`` so that ``group``'s axes lie where RELION expects them."""
    volume = np.asarray(volume, np.float32)
    ops = symmetry_operators(group)
    if len(ops) == 1:
        raise ValueError("C1 has no axes to find: give the point group the map should have")
    if np.any(np.linalg.det(ops) < 0):
        raise ValueError(f"{group} has mirrors: a map of a protein has proper symmetry (Cn, Dn, T, O, I)")
    box = volume.shape[0]
    shift_px = _centre_of_mass_shift(volume)
    centred = transform_map(volume, np.eye(3), shift_px, order=3)
    radius = (diameter / (2 * pixel_size)) if diameter else 0.45 * box
    size = min(coarse_size, box)
    size -= size % 2
    small = _prepare(centred, pixel_size, size, soft_sphere((size,) * 3, radius * size / box, edge=2))
    if _is_cyclic(group):
        tilt, rot = healpix_directions(3)
        from .geometry import euler_to_matrix

        rots = euler_to_matrix(rot, tilt, np.zeros_like(rot))
    else:
        rots, _ = orientations(2)
    scores = _scores(small, rots, ops)
    r0 = rots[int(np.argmax(scores))]
    log.info("symmetry search (%s): best score %.3f over %d rotations", group, scores.max(), len(rots))

    def cost(x: np.ndarray) -> float:
        r = Rotation.from_rotvec(np.deg2rad(x)).as_matrix() @ r0
        return -float(_scores(small, r[None], ops)[0])

    res = optimize.minimize(cost, np.zeros(3), method="Powell", options={"xtol": 1e-2, "maxfev": 300})
    rot = Rotation.from_rotvec(np.deg2rad(res.x)).as_matrix() @ r0
    aligned = transform_map(centred, rot, np.zeros(3), order=3).astype(np.float32)
    sym = symmetrise_map(aligned, group)
    mask = soft_sphere((box,) * 3, radius, edge=3)
    a, b = (aligned - aligned.mean()) * mask, (sym - sym.mean()) * mask
    score = float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return SymmetryAlignment(rot, shift_px * pixel_size, score, aligned)
