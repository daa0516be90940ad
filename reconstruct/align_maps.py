"""Rigid alignment of one map onto another: rotation, translation and handedness.

Maps from an initial model or a refinement are right only up to a rigid motion (and, without a
reference, a mirror), so comparing them needs this first. A global search at a coarse sampling scores
every rotation on a ~15° grid (and its mirror) with the best translation found at once from an FFT
cross-correlation; the best few candidates are then refined locally (rotation vector and shift) at a
finer sampling, and the moving map is resampled onto the reference's grid. Rotations and shifts follow
RELION's xyz convention: aligned(p) = moving(R^T (p - t)), t in Å.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from .fourier import lowpass_filter, resize_fourier
from .fsc import fsc
from .masks import soft_sphere
from .sampling import orientations

log = logging.getLogger(__name__)
MIRROR = np.diag([-1.0, 1.0, 1.0])  # x -> -x: the other hand


@dataclass
class Alignment:
    """The rigid motion that puts the moving map onto the reference."""

    rotation: np.ndarray  # (3, 3), xyz; includes the mirror when ``mirrored``
    shift: np.ndarray  # (3,) Å, xyz
    mirrored: bool
    correlation: float  # real-space CC after alignment (within the mask)
    aligned: np.ndarray  # the moving map on the reference's grid
    fsc: np.ndarray  # FSC of the aligned map against the reference, per shell


def transform_map(volume: np.ndarray, rot: np.ndarray, shift_px: np.ndarray, order: int = 1) -> np.ndarray:
    """A map moved rigidly: out(p) = volume(rot^T (p - shift)), p in xyz pixels about the centre n//2."""
    n = volume.shape[0]
    c = np.full(3, n // 2, float)
    m = rot.T[::-1, ::-1]  # xyz -> zyx index order
    offset = c - m @ (c + shift_px[::-1])
    return ndimage.affine_transform(volume, m, offset=offset, order=order, mode="constant", cval=0.0)


def _rotated_batch(volume: np.ndarray, rots: np.ndarray) -> np.ndarray:
    """volume rotated by each of rots (B, 3, 3) about the centre (trilinear), (B, n, n, n)."""
    n = volume.shape[0]
    g = np.arange(n) - n // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    p = np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float32)  # (3, n^3) xyz
    src = np.einsum("bji,jk->bik", rots.astype(np.float32), p)  # rot^T p
    coords = (src[:, ::-1] + n // 2).transpose(1, 0, 2).reshape(3, -1)  # zyx
    out = ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)
    return out.reshape(len(rots), n, n, n)


def _prepare(volume: np.ndarray, pixel_size: float, size: int, mask: np.ndarray) -> np.ndarray:
    """The map resampled to ``size``, low-passed to 2.5 of its pixels, masked, zero-mean and unit-norm."""
    box = volume.shape[0]
    small = resize_fourier(np.asarray(volume, np.float32), size, ndim=3) if size != box else volume
    px = pixel_size * box / size
    small = lowpass_filter(small.astype(np.float32), px, 2.5 * px, ndim=3) * mask
    small = small - small[mask > 0.5].mean()
    return (small * mask / (np.linalg.norm(small * mask) + 1e-12)).astype(np.float32)


def _global_search(ref: np.ndarray, mov: np.ndarray, rots: np.ndarray, batch: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Best translational CC (and its shift, xyz px) of every rotation of ``mov`` against ``ref``."""
    n = ref.shape[0]
    fref = np.fft.rfftn(ref)
    best = np.empty(len(rots))
    shifts = np.empty((len(rots), 3))
    for s in range(0, len(rots), batch):
        r = _rotated_batch(mov, rots[s:s + batch])
        cc = np.fft.irfftn(fref[None] * np.conj(np.fft.rfftn(r, axes=(1, 2, 3))), s=(n, n, n), axes=(1, 2, 3))
        flat = cc.reshape(len(r), -1)
        k = flat.argmax(axis=1)
        best[s:s + batch] = flat[np.arange(len(r)), k]
        idx = np.stack(np.unravel_index(k, (n, n, n)), 1)  # zyx
        idx = np.where(idx > n // 2, idx - n, idx)
        shifts[s:s + batch] = idx[:, ::-1]
    return best, shifts


def _refine(ref: np.ndarray, mov: np.ndarray, rot0: np.ndarray, shift0: np.ndarray, max_evaluations: int = 400
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Local Powell search of a rotation vector (degrees) and shift (px) from (rot0, shift0)."""
    def transform(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return Rotation.from_rotvec(np.deg2rad(x[:3])).as_matrix() @ rot0, shift0 + x[3:]

    def cost(x: np.ndarray) -> float:
        r, t = transform(x)
        return -float(np.vdot(ref, transform_map(mov, r, t)))

    res = optimize.minimize(cost, np.zeros(6), method="Powell",
                            options={"xtol": 1e-2, "ftol": 1e-6, "maxfev": max_evaluations})
    r, t = transform(res.x)
    return r, t, -float(res.fun)


def align_maps(moving: np.ndarray, reference: np.ndarray, pixel_size: float, allow_mirror: bool = True,
               coarse_size: int = 24, fine_size: int = 64, diameter: float | None = None,
               candidates: int = 4) -> Alignment:
    """Find the rotation, shift and hand that best put ``moving`` onto ``reference`` (same box)."""
    moving = np.asarray(moving, np.float32)
    reference = np.asarray(reference, np.float32)
    if moving.shape != reference.shape or moving.ndim != 3 or len(set(moving.shape)) != 1:
        raise ValueError(f"the maps must be cubes of one size, got {moving.shape} and {reference.shape}")
    box = moving.shape[0]
    radius = (diameter / (2 * pixel_size)) if diameter else 0.45 * box
    coarse = min(coarse_size, box)
    coarse -= coarse % 2
    mask_c = soft_sphere((coarse,) * 3, radius * coarse / box, edge=2)
    ref_c = _prepare(reference, pixel_size, coarse, mask_c)
    rots, _ = orientations(2)
    hands = [(False, np.eye(3))] + ([(True, MIRROR)] if allow_mirror else [])
    hand_maps = {mirrored: transform_map(moving, m, np.zeros(3)) if mirrored else moving for mirrored, m in hands}
    found = []
    for mirrored, m in hands:
        cc, shifts = _global_search(ref_c, _prepare(hand_maps[mirrored], pixel_size, coarse, mask_c), rots)
        for k in np.argsort(-cc)[:candidates]:
            found.append((cc[k], mirrored, rots[k] @ m, shifts[k] * box / coarse))
    found.sort(key=lambda f: -f[0])
    log.info("global search: best CC %.3f (%s hand) of %d rotations per hand", found[0][0],
             "other" if found[0][1] else "same", len(rots))
    # the best candidates refined at the coarse sampling, the winner once more at the fine one
    movs = {h: _prepare(v, pixel_size, coarse, np.ones_like(mask_c)) for h, v in hand_maps.items()}
    best = None
    for _, mirrored, rot, shift in found[: 2 * candidates]:
        m = MIRROR if mirrored else np.eye(3)
        r, t, c = _refine(ref_c, movs[mirrored], rot @ m, shift * coarse / box)
        if best is None or c > best[3]:
            best = (mirrored, r @ m, t * box / coarse, c)
    mirrored, rot, shift_px, _ = best
    fine = min(fine_size, box)
    fine -= fine % 2
    if fine > coarse:
        mask_f = soft_sphere((fine,) * 3, radius * fine / box, edge=3)
        ref_f = _prepare(reference, pixel_size, fine, mask_f)
        m = MIRROR if mirrored else np.eye(3)
        mov_f = _prepare(hand_maps[mirrored], pixel_size, fine, np.ones_like(mask_f))
        r, t, _ = _refine(ref_f, mov_f, rot @ m, shift_px * fine / box, max_evaluations=150)
        rot, shift_px = r @ m, t * box / fine
    aligned = transform_map(moving, rot, shift_px, order=3).astype(np.float32)
    mask = soft_sphere((box,) * 3, radius, edge=3)
    a = (aligned - aligned.mean()) * mask
    b = (reference - reference.mean()) * mask
    cc = float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return Alignment(rot, shift_px * pixel_size, bool(mirrored), cc, aligned, fsc(aligned, reference))
