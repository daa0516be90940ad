"""Per-particle parameters from a RELION particle table: poses, offsets and CTFs, in batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import get_xp
from .ctf import Optics, ctf_2d
from .files.errors import InputError
from .files.stack import ImageSource
from .files.star import MetadataTable, read_particles
from .geometry import euler_to_matrix

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")


def rotations(table: MetadataTable) -> np.ndarray:
    """Rotation matrices (n, 3, 3) from the table's Euler angles (missing angles count as 0)."""
    if not any(c in table.data.columns for c in POSE_COLUMNS):
        raise InputError(table.path, "the particles have no orientations (rlnAngleRot/Tilt/Psi)",
                         "use the output of a refinement, or pass a STAR file with angles")
    rot, tilt, psi = (table.column(c, default=0.0) for c in POSE_COLUMNS)
    return euler_to_matrix(rot, tilt, psi)


def origins_px(table: MetadataTable, pixel_size: float) -> np.ndarray:
    """Origin offsets (n, 2) in pixels, from rlnOriginX/YAngst (or legacy pixel columns)."""
    if "rlnOriginXAngst" in table.data.columns or "rlnOriginYAngst" in table.data.columns:
        x = table.column("rlnOriginXAngst", default=0.0)
        y = table.column("rlnOriginYAngst", default=0.0)
        return np.stack([x, y], 1) / pixel_size
    x = table.column("rlnOriginX", default=0.0)
    y = table.column("rlnOriginY", default=0.0)
    return np.stack([x, y], 1)


class CtfSource:
    """Computes CTF images for rows of a particle table, one optics group at a time."""

    def __init__(self, table: MetadataTable, box: int, pixel_size: float) -> None:
        missing = [c for c in CTF_COLUMNS if c not in table.data.columns]
        if missing:
            raise InputError(table.path, f"CTF correction needs column(s) {', '.join(missing)}",
                             "run CTF estimation first, or turn CTF correction off")
        self.box, self.pixel_size = box, pixel_size
        self.du = table.column("rlnDefocusU")
        self.dv = table.column("rlnDefocusV")
        self.ang = table.column("rlnDefocusAngle")
        self.bfac = table.column("rlnCtfBfactor", default=0.0)
        self.scale = table.column("rlnCtfScalefactor", default=1.0)
        self.phase = table.column("rlnPhaseShift", default=0.0)
        self.group = table.data["rlnOpticsGroup"].to_numpy(dtype=int)
        self.optics: dict[int, Optics] = {}
        for _, row in table.optics.iterrows():
            for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
                if label not in row:
                    raise InputError(table.path, f"data_optics lacks {label}, needed for the CTF")
            optics = Optics(float(row["rlnVoltage"]), float(row["rlnSphericalAberration"]),
                            float(row["rlnAmplitudeContrast"]))
            if not (optics.voltage > 0 and optics.cs >= 0 and 0 <= optics.amplitude_contrast <= 1):
                raise InputError(table.path, f"optics group {int(row['rlnOpticsGroup'])} has impossible values "
                                 f"(voltage {optics.voltage} kV, Cs {optics.cs} mm, amplitude contrast "
                                 f"{optics.amplitude_contrast})", "voltage > 0, Cs >= 0, 0 <= contrast <= 1")
            self.optics[int(row["rlnOpticsGroup"])] = optics
        premult = dict(zip(table.optics["rlnOpticsGroup"].astype(int),
                           table.optics.get("rlnCtfDataAreCtfPremultiplied", pd.Series(0, index=table.optics.index))))
        flags = {bool(int(v)) for v in premult.values()}
        if len(flags) > 1:
            raise InputError(table.path, "some optics groups are CTF-premultiplied and others are not",
                             "process them separately")
        self.premultiplied = flags.pop() if flags else False

    def __call__(self, rows: Any, xp: Any = np) -> Any:
        """CTF half-transform images (B, N, N/2+1) for table rows ``rows``."""
        rows = np.asarray(rows)
        out = xp.empty((rows.size, self.box, self.box // 2 + 1), dtype=xp.float32)
        groups = self.group[rows]
        for g in np.unique(groups):  # optics groups: a handful
            sel = np.nonzero(groups == g)[0]
            r = rows[sel]
            du, dv, ang, phase, bfac, scale = (xp.asarray(v[r]) for v in
                                               (self.du, self.dv, self.ang, self.phase, self.bfac, self.scale))
            out[xp.asarray(sel)] = ctf_2d(self.box, self.pixel_size, du, dv, ang, self.optics[int(g)],
                                          phase, bfac, scale, xp=xp)
        return out


class ParticleJob:
    """What every job that reads a particle STAR file sets up first (refinement, classification)."""

    xp: Any
    out: Path
    table: MetadataTable
    src: ImageSource
    box: int
    px: float

    def open_particles(self, opt: Any) -> None:
        """The array module (``opt.gpu``), the output directory ``opt.out`` (made), the particle table
        ``opt.star`` and its images (paths relative to ``opt.project_dir``), their box and pixel size."""
        self.xp = get_xp(opt.gpu)
        self.out = Path(opt.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.table = read_particles(opt.star)
        self.src = ImageSource(self.table, opt.project_dir)
        self.box, self.px = self.src.box, self.src.pixel_size
