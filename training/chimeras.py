"""Chimera proteins for the ranker's corpus: new shapes built from real domains.

Five atomic models cannot teach the ranker what an unseen protein's classes look like: it learns their
shapes.  A chimera is 2-4 contiguous stretches of 60-250 residues cut from the training models (never
from the held-out one), each turned at random and slid along a random direction onto the ones already
placed until it touches them without clashing.  Its local density is real protein (helices, sheets,
loops); its overall shape is new.  ``chimera_<N>`` names one, built the same way every time from N.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from reconstruct.files.errors import InputError
from reconstruct.simulate.density import read_model, structure_map

#: The models chimeras are cut from: the corpus's training proteins (TCR-HLA, 3KPR, is held out).
SOURCES = ("6msm.pdb", "4ake_adk_open.pdb", "1ake_adk_closed.pdb", "1hvr.pdb")
PREFIX = "chimera_"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_CLASH = 3.0  # Å: closest approach of two atoms of different pieces
_MIN_PIECE, _MAX_PIECE = 60, 250  # residues per piece


def is_chimera(name: str) -> bool:
    """Whether ``name`` is a chimera's name (``chimera_<N>``)."""
    return _NAME.match(name) is not None


def chimera_seed(name: str) -> int:
    """The N of ``chimera_<N>``."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a chimera name (chimera_<N>, N = 0, 1, ...)")
    return int(m.group(1))


@functools.lru_cache(maxsize=8)
def _source(path: str) -> list[list[Any]]:
    """The polymer chains of a model, each as its list of residues (chains shorter than a piece dropped)."""
    st = read_model(path)
    chains = [[res for res in ch if res.het_flag != "H"] for ch in st[0]]
    return [c for c in chains if len(c) >= _MIN_PIECE]


def _coordinates(residues: list[Any]) -> np.ndarray:
    return np.array([[a.pos.x, a.pos.y, a.pos.z] for res in residues for a in res], dtype=float)


def _compact_piece(residues: list[Any], rng: np.random.Generator, tries: int = 12) -> tuple[list[Any], np.ndarray]:
    """Of ``tries`` random stretches of the chain, the most globular: the smallest radius of gyration
    relative to a folded domain's of that length (2.2 N^0.38 Å), so pieces are domains, not lone helices."""
    best: tuple[float, list[Any], np.ndarray] | None = None
    for _ in range(tries):
        length = int(rng.integers(_MIN_PIECE, min(_MAX_PIECE, len(residues)) + 1))
        start = int(rng.integers(0, len(residues) - length + 1))
        piece = residues[start:start + length]
        xyz = _coordinates(piece)
        rg = float(np.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=1).mean()))
        score = rg / (2.2 * length**0.38)
        if best is None or score < best[0]:
            best = (score, piece, xyz)
    assert best is not None
    return best[1], best[2]


def _slide_into_contact(placed: np.ndarray, piece: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The shift that puts ``piece`` (centred at 0) on the line from ``placed``'s centre along
    ``direction``, at the first 1 Å step where no atom comes within the clash distance of ``placed``."""
    tree = cKDTree(placed)
    centre = placed.mean(axis=0)
    reach = np.linalg.norm(placed - centre, axis=1).max() + np.linalg.norm(piece, axis=1).max()
    for d in np.arange(0.0, reach + _CLASH + 1.0, 1.0):
        shift = centre + d * direction
        dist, _ = tree.query(piece + shift, distance_upper_bound=_CLASH)
        if np.isinf(dist).all():
            return shift
    return centre + (reach + _CLASH + 1.0) * direction  # beyond every placed atom


def _model_file(models: Path, name: str) -> Path:
    """``models/name``, or its gzipped copy."""
    for path in (models / name, models / f"{name}.gz"):
        if path.exists():
            return path
    raise InputError(models / name, "atomic model for chimeras not found",
                     "set AUTOPROC_MODELS to the directory holding the shared models")


def chimera_structure(seed: int, models: Path, sources: tuple[str, ...] = SOURCES) -> Any:
    """The gemmi Structure of chimera ``seed``, cut from ``sources`` in ``models``: its pieces as chains
    A, B, ... (see the module's text)."""
    import gemmi

    rng = np.random.default_rng([seed, 7919])
    st = gemmi.Structure()
    st.name = f"{PREFIX}{seed}"
    model = gemmi.Model("1")
    placed: np.ndarray | None = None
    for i in range(int(rng.integers(2, 5))):
        chains = _source(str(_model_file(models, sources[int(rng.integers(len(sources)))])))
        residues = chains[int(rng.integers(len(chains)))]
        piece, xyz = _compact_piece(residues, rng)
        rot = Rotation.random(random_state=rng).as_matrix()
        local = (xyz - xyz.mean(axis=0)) @ rot.T
        if placed is None:
            shift = np.zeros(3)
        else:
            direction = rng.normal(size=3)
            shift = _slide_into_contact(placed, local, direction / np.linalg.norm(direction))
        new_xyz = local + shift
        placed = new_xyz if placed is None else np.vstack([placed, new_xyz])
        chain = gemmi.Chain(chr(ord("A") + i))
        k = 0
        for res in piece:
            copy = res.clone()
            for atom in copy:
                atom.pos = gemmi.Position(*new_xyz[k])
                k += 1
            chain.add_residue(copy)
        model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st


def chimera_map(seed: int, box: int, pixel_size: float, models: Path,
                sources: tuple[str, ...] = SOURCES) -> np.ndarray:
    """The density of chimera ``seed`` on a box^3 grid, its centre of mass at voxel N//2."""
    st = chimera_structure(seed, models, sources)
    c = st[0].calculate_center_of_mass()
    return structure_map(st, box, pixel_size, np.array([c.x, c.y, c.z]))


@functools.lru_cache(maxsize=256)
def chimera_radius(seed: int, models: Path, sources: tuple[str, ...] = SOURCES) -> float:
    """Radius (Å) about the centre of mass holding 99% of the chimera's atoms, plus 2 Å for their density."""
    st = chimera_structure(seed, models, sources)
    c = st[0].calculate_center_of_mass()
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for ch in st[0] for res in ch for a in res])
    r = np.linalg.norm(xyz - np.array([c.x, c.y, c.z]), axis=1)
    return float(np.quantile(r, 0.99)) + 2.0


def split_chimeras(names: list[str]) -> tuple[list[str], int]:
    """``names`` as (the other proteins, N) when its chimeras are exactly chimera_0 ... chimera_<N-1>, as
    ``--chimeras N`` makes them, and some other protein remains for ``--proteins``; otherwise every name
    stays in the list and N is 0."""
    seeds = sorted(chimera_seed(n) for n in names if is_chimera(n))
    others = [n for n in names if not is_chimera(n)]
    if seeds != list(range(len(seeds))) or not others:
        return list(names), 0
    return others, len(seeds)
