"""Density maps from atomic models with electron scattering factors (via ``gemmi``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files.errors import InputError


def atomic_model_map(model: str | Path, box: int, pixel_size: float, bfactor: float = 0.0,
                     keep_hydrogens: bool = False) -> np.ndarray:
    """Coulomb potential of ``model`` (PDB/mmCIF, optionally gzipped) on an N^3 grid, [z, y, x].

    The model's centre of mass is put at voxel N//2.  Atoms use gemmi's electron scattering
    factors with a blur that keeps the map free of aliasing at this pixel size; ``bfactor`` adds a
    global B-factor (Å^2) on top.  Waters and ligands are removed.
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
    m = st[0]
    extent = box * pixel_size
    centre = (box // 2) * pixel_size  # voxel N//2, RELION's centre, for odd boxes too
    c = m.calculate_center_of_mass()
    m.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(),
                                            gemmi.Vec3(centre - c.x, centre - c.y, centre - c.z)))
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


def particle_radius(volume: np.ndarray, fraction: float = 0.99) -> float:
    """Radius (px) of the sphere about the centre holding ``fraction`` of the positive density."""
    n = volume.shape[0]
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).ravel()
    w = np.clip(volume.ravel(), 0, None)
    order = np.argsort(r)
    cum = np.cumsum(w[order])
    return float(r[order][np.searchsorted(cum, fraction * cum[-1])])
