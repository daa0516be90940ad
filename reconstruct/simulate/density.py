"""Density maps from atomic models with electron scattering factors (via ``gemmi``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..files.errors import InputError


def read_model(model: str | Path, keep_hydrogens: bool = False, chains: str | None = None) -> Any:
    """A gemmi Structure without waters and ligands (and hydrogens), with a clear error if unreadable.

    ``chains`` (e.g. ``"ABCDE"``) keeps only those chains: one copy of a complex from a crystal's
    asymmetric unit.
    """
    import gemmi

    path = Path(model)
    if not path.exists():
        raise InputError(path, "atomic model not found")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as err:
        raise InputError(path, f"cannot read the atomic model ({err})") from None
    st.setup_entities()
    st.remove_ligands_and_waters()
    if not keep_hydrogens:
        st.remove_hydrogens()
    if chains is not None:
        names = [ch.name for ch in st[0]]
        if not set(chains) & set(names):
            raise InputError(path, f"has none of the chains {chains!r} (it has {''.join(names)})",
                             "name chains that exist in the model")
        for name in names:
            if name not in chains:
                st[0].remove_chain(name)
    return st


def atomic_model_map(model: str | Path, box: int, pixel_size: float, bfactor: float = 0.0,
                     keep_hydrogens: bool = False, chains: str | None = None) -> np.ndarray:
    """Coulomb potential of ``model`` (PDB/mmCIF, optionally gzipped) on an N^3 grid, [z, y, x].

    The model's centre of mass is put at voxel N//2.  Atoms use gemmi's electron scattering
    factors with a blur that keeps the map free of aliasing at this pixel size; ``bfactor`` adds a
    global B-factor (Å^2) on top.  Waters and ligands are removed; ``chains`` keeps only those chains.
    """
    st = read_model(model, keep_hydrogens, chains)
    c = st[0].calculate_center_of_mass()
    return structure_map(st, box, pixel_size, np.array([c.x, c.y, c.z]), bfactor)


def structure_map(st: Any, box: int, pixel_size: float, centre_xyz: np.ndarray,
                  bfactor: float = 0.0) -> np.ndarray:
    """The potential of model 0 of a gemmi Structure with the point ``centre_xyz`` (Å) at voxel N//2."""
    import gemmi

    m = st[0].clone()  # the caller's structure keeps its coordinates
    extent = box * pixel_size
    centre = (box // 2) * pixel_size  # voxel N//2, RELION's centre, for odd boxes too
    cx, cy, cz = (float(v) for v in centre_xyz)
    m.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(centre - cx, centre - cy, centre - cz)))
    cell = gemmi.UnitCell(extent, extent, extent, 90, 90, 90)
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2.0 * pixel_size
    dc.grid.set_unit_cell(cell)
    dc.grid.spacegroup = gemmi.find_spacegroup_by_name("P 1")
    dc.grid.set_size(box, box, box)
    dc.set_refmac_compatible_blur(m)
    dc.blur += bfactor
    dc.grid.fill(0.0)
    dc.add_model_density_to_grid(m)
    dc.grid.symmetrize_sum()
    arr = np.array(dc.grid, copy=True, dtype=np.float32)  # [x, y, z]
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


def morph_maps(model_a: str | Path, model_b: str | Path, n_states: int, box: int,
               pixel_size: float) -> list[np.ndarray]:
    """Maps of ``n_states`` conformations evenly spaced on the straight path from model A to model B.

    The two models (the same protein in two states, e.g. adenylate kinase open and closed) are
    matched atom by atom (chain, residue number, atom name), B is superposed on A by its matched
    C-alpha atoms, and every state is centred on the middle state's centre of mass, so the states
    differ by their motion only: a conformational continuum with known truth.
    """
    import gemmi

    a, b = read_model(model_a), read_model(model_b)

    def atoms(st: Any) -> dict[tuple, Any]:
        out = {}
        for ch in st[0]:
            for res in ch:
                for at in res:
                    out.setdefault((ch.name, res.seqid.num, res.seqid.icode, at.name), at)
        return out

    atoms_a, atoms_b = atoms(a), atoms(b)
    common = [k for k in atoms_a if k in atoms_b]
    ca = [k for k in common if k[3] == "CA"]
    if len(ca) < 3:
        raise InputError(Path(model_b), f"shares only {len(ca)} C-alpha atoms with {model_a}",
                         "morph between two models of the same protein")
    sup = gemmi.superpose_positions([atoms_a[k].pos for k in ca], [atoms_b[k].pos for k in ca])
    pa = np.array([atoms_a[k].pos.tolist() for k in common])
    pb = np.array([sup.transform.apply(atoms_b[k].pos).tolist() for k in common])
    keep = set(common)
    for ch in a[0]:  # model A reduced to the matched atoms carries every state's coordinates
        for res in ch:
            for i in reversed(range(len(res))):
                if (ch.name, res.seqid.num, res.seqid.icode, res[i].name) not in keep:
                    del res[i]
    index = {k: i for i, k in enumerate(common)}
    mid = 0.5 * (pa + pb)
    masses = np.array([atoms_a[k].element.weight for k in common])
    centre = (mid * masses[:, None]).sum(0) / masses.sum()
    maps = []
    for t in np.linspace(0.0, 1.0, n_states):
        pos = (1 - t) * pa + t * pb
        for ch in a[0]:
            for res in ch:
                for at in res:
                    at.pos = gemmi.Position(*pos[index[(ch.name, res.seqid.num, res.seqid.icode, at.name)]])
        maps.append(structure_map(a, box, pixel_size, centre))
    return maps


def particle_radius(volume: np.ndarray, fraction: float = 0.99) -> float:
    """Radius (px) of the sphere about the centre holding ``fraction`` of the positive density."""
    n = volume.shape[0]
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).ravel()
    w = np.clip(volume.ravel(), 0, None)
    order = np.argsort(r)
    cum = np.cumsum(w[order])
    return float(r[order][np.searchsorted(cum, fraction * cum[-1])])
