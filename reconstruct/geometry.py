"""RELION's Euler-angle conventions: ZYZ angles (rot, tilt, psi) in degrees <-> rotation matrices.

A = R_z(psi) R_y(tilt) R_z(rot) rotates the coordinate system (RELION's ``Euler_angles2matrix``).
A projection image is the integral along z of the map sampled at A^T (x, y, z); in Fourier space it
is the central slice spanned by the first two rows of A.  All functions are vectorised over a leading
batch axis and work on NumPy or CuPy arrays.
"""

from __future__ import annotations

from typing import Any

from .backend import array_module


def euler_to_matrix(rot: Any, tilt: Any, psi: Any) -> Any:
    """Rotation matrices (..., 3, 3) from RELION Euler angles in degrees (arrays broadcast)."""
    xp = array_module(rot, tilt, psi)
    rot, tilt, psi = (xp.deg2rad(xp.asarray(v, dtype=xp.float64)) for v in (rot, tilt, psi))
    rot, tilt, psi = xp.broadcast_arrays(rot, tilt, psi)
    ca, sa = xp.cos(rot), xp.sin(rot)
    cb, sb = xp.cos(tilt), xp.sin(tilt)
    cg, sg = xp.cos(psi), xp.sin(psi)
    cc, cs = cb * ca, cb * sa
    sc, ss = sb * ca, sb * sa
    a = xp.empty(rot.shape + (3, 3), dtype=xp.float64)
    a[..., 0, 0] = cg * cc - sg * sa
    a[..., 0, 1] = cg * cs + sg * ca
    a[..., 0, 2] = -cg * sb
    a[..., 1, 0] = -sg * cc - cg * sa
    a[..., 1, 1] = -sg * cs + cg * ca
    a[..., 1, 2] = sg * sb
    a[..., 2, 0] = sc
    a[..., 2, 1] = ss
    a[..., 2, 2] = cb
    return a


def matrix_to_euler(a: Any) -> tuple[Any, Any, Any]:
    """RELION Euler angles (rot, tilt, psi) in degrees from rotation matrices (..., 3, 3).

    Tilt is returned in [0, 180]; at the poles (tilt 0 or 180) rot is set to 0 and the whole
    in-plane angle goes to psi, as RELION's ``Euler_matrix2angles`` does.
    """
    xp = array_module(a)
    a = xp.asarray(a, dtype=xp.float64)
    abs_sb = xp.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    regular = abs_sb > 16 * 1.1920929e-07
    tilt = xp.arctan2(abs_sb, a[..., 2, 2])
    psi = xp.arctan2(a[..., 1, 2], -a[..., 0, 2])
    rot = xp.arctan2(a[..., 2, 1], a[..., 2, 0])
    north = a[..., 2, 2] > 0
    pole_psi = xp.where(north, xp.arctan2(-a[..., 1, 0], a[..., 0, 0]), xp.arctan2(a[..., 1, 0], -a[..., 0, 0]))
    psi = xp.where(regular, psi, pole_psi)
    rot = xp.where(regular, rot, 0.0)
    tilt = xp.where(regular, tilt, xp.where(north, 0.0, xp.pi))
    return xp.rad2deg(rot), xp.rad2deg(tilt), xp.rad2deg(psi)


def random_rotations(n: int, rng: Any, xp: Any = None) -> Any:
    """``n`` rotation matrices drawn uniformly from SO(3) (normalised random quaternions)."""
    import numpy as np

    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    m = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        axis=1,
    ).reshape(n, 3, 3)
    return m if xp is None else xp.asarray(m)


def angle_between(a: Any, b: Any) -> Any:
    """Rotation angle in degrees of a^T b for batches of rotation matrices: the pose error."""
    xp = array_module(a, b)
    r = xp.einsum("...ji,...jk->...ik", xp.asarray(a), xp.asarray(b))
    cos = (xp.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    return xp.rad2deg(xp.arccos(xp.clip(cos, -1.0, 1.0)))


def rotation_2d(psi: Any) -> Any:
    """In-plane rotation matrices (..., 2, 2) for angles in degrees, matching RELION's 2D psi."""
    xp = array_module(psi)
    p = xp.deg2rad(xp.asarray(psi, dtype=xp.float64))
    c, s = xp.cos(p), xp.sin(p)
    return xp.stack([xp.stack([c, s], -1), xp.stack([-s, c], -1)], -2)
