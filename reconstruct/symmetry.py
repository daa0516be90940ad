"""Point-group symmetry operators in RELION's orientation conventions.

Groups: Cn, Ci, Cs, Cnv, Cnh, Sn, Dn, Dnv, Dnh, T, Td, Th, O, Oh, I (= I2), I1..I4, In, Inh.
Each group is generated from RELION's generator axes (the axes in ``symmetries.cpp``) and closed
under multiplication, so the operator set equals the one ``relion_refine --print_symmetry_ops``
prints.  Improper groups include mirrors and the inversion as 3x3 matrices with determinant -1.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

import numpy as np

# RELION's generators: ("rot", n, axis) | ("mirror", normal) | ("inversion",)
_ICOS = {
    "I1": [("rot", 2, (1, 0, 0)), ("rot", 5, (0.85065080702670, 0, -0.5257311142635)),
           ("rot", 3, (0.9341723640, 0.3568220765, 0))],
    "I2": [("rot", 2, (0, 0, 1)), ("rot", 5, (0.525731114, 0, 0.850650807)),
           ("rot", 3, (0, 0.356822076, 0.934172364))],
    "I3": [("rot", 2, (-0.5257311143, 0, 0.8506508070)), ("rot", 5, (0, 0, 1)),
           ("rot", 3, (-0.4911234731, 0.3568220765, 0.7946544723))],
    "I4": [("rot", 2, (0.5257311143, 0, 0.8506508070)), ("rot", 5, (0.8944271932, 0, 0.4472135909)),
           ("rot", 3, (0.4911234731, 0.3568220765, 0.7946544723))],
}
_T = [("rot", 3, (0, 0, 1)), ("rot", 2, (0, 0.816496, 0.577350))]
_O = [("rot", 3, (0.5773502, 0.5773502, 0.5773502)), ("rot", 4, (0, 0, 1))]


def _axis_rotation(n: int, axis: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = 2 * math.pi / n
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def _mirror(normal: tuple[float, float, float]) -> np.ndarray:
    nrm = np.asarray(normal, dtype=np.float64)
    nrm = nrm / np.linalg.norm(nrm)
    return np.eye(3) - 2.0 * np.outer(nrm, nrm)


def _generators(name: str) -> list[np.ndarray]:
    g = name.strip().upper()
    m = re.fullmatch(r"(C|D|S|I)(\d+)(V|H)?", g)
    gens: list[tuple] = []
    if g in ("C1", "C0"):
        return []
    if g == "CI":
        return [-np.eye(3)]
    if g == "CS":
        return [_mirror((0, 0, 1))]
    if g in ("T", "TD", "TH"):
        gens = list(_T)
        if g == "TD":
            gens.append(("mirror", (1.4142136, 2.4494897, 0.0)))
        if g == "TH":
            gens.append(("inversion",))
    elif g in ("O", "OH"):
        gens = list(_O)
        if g == "OH":
            gens.append(("mirror", (0, 1, 1)))
    elif g.rstrip("H") in ("I", "I1", "I2", "I3", "I4"):
        base = g.rstrip("H")
        key = "I2" if base == "I" else base
        gens = list(_ICOS[key])
        if g.endswith("H"):
            gens.append(("inversion",))
    elif m:
        kind, n, suffix = m.group(1), int(m.group(2)), m.group(3)
        if kind == "C":
            gens = [("rot", n, (0, 0, 1))]
            if suffix == "V":
                gens.append(("mirror", (0, 1, 0)))
            elif suffix == "H":
                gens.append(("mirror", (0, 0, 1)))
        elif kind == "D":
            gens = [("rot", n, (0, 0, 1)), ("rot", 2, (1, 0, 0))]
            if suffix == "V":
                gens.append(("mirror", (1, 0, 0)))
            elif suffix == "H":
                gens.append(("mirror", (0, 0, 1)))
        elif kind == "S":
            if n % 2:
                raise ValueError(f"symmetry group {name}: Sn needs an even n")
            gens = [("rot", n // 2, (0, 0, 1)), ("inversion",)]
        else:
            raise ValueError(f"unknown symmetry group {name!r}")
    else:
        raise ValueError(
            f"unknown symmetry group {name!r}: use C1, Cn, Ci, Cs, Cnv, Cnh, Sn, Dn, Dnv, Dnh, "
            "T, Td, Th, O, Oh, I, I1-I4 or their h variants"
        )
    out = []
    for gen in gens:
        if gen[0] == "rot":
            out.append(_axis_rotation(gen[1], gen[2]))
        elif gen[0] == "mirror":
            out.append(_mirror(gen[1]))
        else:
            out.append(-np.eye(3))
    return out


def _close(gens: list[np.ndarray], limit: int = 240) -> np.ndarray:
    elems = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                c = g @ a
                if not any(np.allclose(c, e, atol=1e-4) for e in elems):
                    elems.append(c)
                    new.append(c)
                    if len(elems) > limit:
                        raise ValueError("symmetry group did not close: generator axes are inconsistent")
        frontier = new
    return np.stack(elems)


@lru_cache(maxsize=64)
def _operators(name: str) -> np.ndarray:
    return _close(_generators(name))


def symmetry_operators(name: str, xp: Any = np) -> Any:
    """All operators (|G|, 3, 3) of point group ``name``; identity first."""
    return xp.asarray(_operators(name.strip().upper()).copy())


def group_order(name: str) -> int:
    """Number of operators in the group."""
    return int(_operators(name.strip().upper()).shape[0])


def is_proper(name: str) -> bool:
    """True when every operator is a rotation (no mirrors or inversion)."""
    return bool(np.all(np.linalg.det(_operators(name.strip().upper())) > 0))


def symmetrise_map(volume: Any, name: str) -> Any:
    """Average a map over its point group: (1/|G|) sum_g V(R_g x), by real-space interpolation."""
    from .backend import array_module, ndimage_module

    xp = array_module(volume)
    ops = symmetry_operators(name)
    if ops.shape[0] == 1:
        return volume
    ndi = ndimage_module(xp)
    n = volume.shape[0]
    c = n // 2
    z, y, x = xp.meshgrid(*(xp.arange(n, dtype=xp.float32) - c,) * 3, indexing="ij")
    coords = xp.stack([x.ravel(), y.ravel(), z.ravel()])  # (3, n^3) in map (x, y, z) order
    acc = xp.zeros_like(volume, dtype=xp.float32)
    for r in ops:  # |G| interpolations of the whole map: at most 60
        rc = xp.asarray(r, dtype=xp.float32) @ coords
        idx = xp.stack([rc[2], rc[1], rc[0]]) + c
        acc += ndi.map_coordinates(volume, idx, order=1, mode="constant").reshape(volume.shape)
    return acc / ops.shape[0]
