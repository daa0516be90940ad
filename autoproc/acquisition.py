"""Acquisition parameters of a movie data set, merged from three sources with their provenance.

Order of precedence (later wins): the built-in table of the twelve data sets of the RELION-4 paper
(Kimanius et al. 2021, Table 1) < the EMPIAR entry's own metadata (JSON imagesets, else the entry XML)
< the user's flags.  Every value remembers where it came from, so ``autoproc empiar info`` can show it,
and a value that no source gives is one clear error naming the flag to set, raised before any download.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field, fields
from typing import Any

from reconstruct.files.errors import InputError

log = logging.getLogger("reconstruct")

PAPER = "built-in table (RELION-4 paper, Table 1)"

# The twelve test data sets of the RELION-4 paper's Table 1: EMPIAR id -> (name, micrographs, super-resolution,
# kV, Cs, phase plate, pixel size Å, symmetry, particle diameter Å).  The pixel size is that of the movies
# (the super-resolution pixel where super-resolution is Yes; relion_it.py then bins motion correction by 2).
_TABLE1: dict[str, tuple[str, int, bool, float, float, bool, float, str, float]] = {
    "10028": ("ribosome", 1082, False, 300, 2.7, False, 1.34, "C1", 320),
    "10059": ("TRPV1", 1200, False, 300, 2.7, False, 1.22, "C4", 150),
    "10089": ("TcdA1", 97, False, 300, 2.7, False, 1.14, "C5", 280),
    "10146": ("apoF", 20, False, 300, 0.01, False, 1.5, "O", 130),
    "10153": ("ribo-VPP", 315, True, 300, 0.01, True, 0.545, "C1", 320),
    "10181": ("aldolase", 659, True, 200, 2.7, False, 0.46, "D2", 180),
    "10194": ("γ-sec", 2922, True, 300, 2.7, False, 0.7, "C1", 150),
    "10204": ("β-gal", 24, False, 200, 1.4, False, 0.885, "D2", 180),
    "10205": ("CMV", 5619, False, 300, 2.7, False, 1.065, "I1", 330),
    "10217": ("GDH", 2491, False, 300, 2.7, False, 0.66, "D3", 150),
    "10288": ("CB1", 2754, False, 300, 2.7, False, 0.86, "C1", 160),
    "10290": ("INX6", 497, False, 300, 2.7, False, 1.23, "C8", 150),
}

# Values that Table 1 does not give but that are known for a data set, each with its own source.
_EXTRA: dict[str, dict[str, tuple[Any, str]]] = {
    # EMPIAR-10204 is RELION's tutorial data set: relion_it.py's defaults are its values.
    "10204": {"dose_per_frame": (1.277, "relion_it.py defaults (the RELION tutorial data, EMPIAR-10204)"),
              "n_frames": (24, "relion_it.py tutorial data (24 frames)")},
    # Third-party records (a published benchmark's settings); the entry metadata or flags override them.
    "10288": {"dose_per_frame": (1.25, "third-party benchmark records (about 1.25 e/Å²/frame; check)"),
              "n_frames": (40, "third-party benchmark records (about 40 frames; check)"),
              "gain_reference": ("data/CountRef_CB1__00000_Feb18_23.26.46.dm4",
                                 "third-party benchmark records (the entry's one DM4 gain reference)")},
}

DEFAULTS: dict[str, tuple[Any, str]] = {
    "amplitude_contrast": (0.1, "RELION default (Q0 0.1)"),
    "super_resolution": (False, "default (not super-resolution)"),
    "phase_plate": (False, "default (no phase plate)"),
    "gain_rot": (0, "default (no gain rotation)"),
    "gain_flip": (0, "default (no gain flip)"),
}

# The user's flag for each value: named in errors and in ``info``.  ``add_acquisition_arguments`` adds them.
FLAGS: dict[str, str] = {
    "pixel_size": "--angpix", "voltage": "--kV", "cs": "--Cs", "amplitude_contrast": "--Q0",
    "symmetry": "--sym", "particle_diameter": "--particle-diameter", "dose_per_frame": "--dose-per-frame",
    "n_frames": "--n-frames", "super_resolution": "--super-resolution", "phase_plate": "--phase-plate",
    "gain_reference": "--gain-ref", "gain_rot": "--gain-rot", "gain_flip": "--gain-flip",
    "movie_dir": "--movie-dir", "movie_glob": "--movie-glob",
}

# ``autoproc run``'s names for the same values: pass as ``flags=`` so its errors name its own flags.
RUN_FLAGS: dict[str, str] = {
    "pixel_size": "--angpix", "voltage": "--kv", "cs": "--cs", "amplitude_contrast": "--q0", "symmetry": "--sym",
    "particle_diameter": "--diameter", "dose_per_frame": "--dose", "gain_reference": "--gain",
    "gain_rot": "--gain_rot", "gain_flip": "--gain_flip", "movie_glob": "--movies",
}

REQUIRED = ("pixel_size", "voltage", "cs", "amplitude_contrast", "symmetry", "particle_diameter", "dose_per_frame")


@dataclass
class Acquisition:
    """What the pipeline must know about the movies: optics (Import), dose and gain (MotionCorr),
    particle size and symmetry (picking, classification, refinement), and where the movies are.

    ``pixel_size`` is the movies' pixel size in Å (the super-resolution pixel for super-resolution
    movies); ``movie_dir`` is the entry's remote folder of movies (e.g. ``data``) and ``movie_glob`` the
    pattern of movie names in it (comma-separated alternatives); ``gain_reference`` is a path in the entry
    (or a local file).  ``sources`` maps each field name to where its value came from.
    """

    pixel_size: float | None = None
    voltage: float | None = None
    cs: float | None = None
    amplitude_contrast: float | None = None
    symmetry: str | None = None
    particle_diameter: float | None = None
    dose_per_frame: float | None = None
    n_frames: int | None = None
    super_resolution: bool | None = None
    phase_plate: bool | None = None
    gain_reference: str | None = None
    gain_rot: int | None = None
    gain_flip: int | None = None
    movie_dir: str | None = None
    movie_glob: str | None = None
    n_micrographs: int | None = None
    name: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=lambda: dict(FLAGS), repr=False)  # named in errors and tables

    def missing(self) -> list[str]:
        """The required fields that no source gave."""
        return [f for f in REQUIRED if getattr(self, f) is None]

    def require(self, what: str = "the acquisition") -> Acquisition:
        """Return self, or raise one :class:`InputError` naming every missing value and its flag."""
        miss = self.missing()
        if miss:
            items = ", ".join(f"{m.replace('_', ' ')} ({self.flags[m]})" for m in miss)
            flags = " ".join(f"{self.flags[m]} VALUE" for m in miss)
            raise InputError(None, f"{what}: no value for {items}",
                             f"neither the built-in table nor the entry's metadata gives it; set {flags}")
        return self

    def table(self) -> list[tuple[str, str, str]]:
        """(field, value, source) rows for display; missing values say which flag sets them."""
        rows = []
        for f in fields(self):
            if f.name in ("sources", "name", "flags"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in REQUIRED:
                continue
            shown = "MISSING" if value is None else str(value)
            src = self.sources.get(f.name, f"set it with {self.flags.get(f.name, '?')}")
            rows.append((f.name, shown, src))
        return rows


def normalise_id(entry_id: int | str) -> str:
    """'10288' for 10288, '10288', 'EMPIAR-10288' or 'empiar_10288'; a clear error otherwise."""
    m = re.fullmatch(r"\s*(?:EMPIAR[-_ ]?)?0*(\d{1,6})\s*", str(entry_id), flags=re.IGNORECASE)
    if not m:
        raise InputError(None, f"'{entry_id}' is not an EMPIAR accession",
                         "give the number, e.g. 10288 or EMPIAR-10288")
    return m.group(1)


def builtin_values(entry_id: int | str) -> dict[str, tuple[Any, str]]:
    """The built-in values of one entry (empty for entries outside the table), each with its source."""
    eid = normalise_id(entry_id)
    out: dict[str, tuple[Any, str]] = {}
    if eid in _TABLE1:
        name, n_mics, sr, kv, cs, pp, px, sym, diam = _TABLE1[eid]
        for key, val in (("name", name), ("n_micrographs", n_mics), ("super_resolution", sr), ("voltage", float(kv)),
                         ("cs", float(cs)), ("phase_plate", pp), ("pixel_size", float(px)), ("symmetry", sym),
                         ("particle_diameter", float(diam))):
            out[key] = (val, PAPER)
    out.update(_EXTRA.get(eid, {}))
    return out


def builtin_entries() -> list[str]:
    """The EMPIAR ids with built-in acquisition parameters."""
    return sorted(_TABLE1)


_FORMAT_GLOBS = (("eer", "*.eer"), ("tif", "*.tif,*.tiff"), ("mrcs", "*.mrcs,*.mrc"), ("mrc", "*.mrc,*.mrcs"))


def _is_movie_set(imageset: dict[str, Any]) -> bool:
    cat = re.sub(r"[^a-z]", "", str(imageset.get("category", "")).lower())
    return "multiframe" in cat or "movie" in cat


def _positive(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x > 0 else None


def movie_imageset(imagesets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The imageset holding the movies: the first 'micrographs - multiframe' one, else the largest."""
    if not imagesets:
        return None
    movies = [s for s in imagesets if _is_movie_set(s)]
    if movies:
        return movies[0]
    return max(imagesets, key=lambda s: _positive(s.get("num_images_or_tilt_series")) or 0)


def metadata_values(imagesets: list[dict[str, Any]], source: str) -> dict[str, tuple[Any, str]]:
    """Acquisition values that an entry's imagesets state (pixel size, frames, folder, file pattern).

    EMPIAR's schema has no voltage, Cs or dose fields, so those come from the table or the user.
    """
    s = movie_imageset(imagesets)
    if s is None:
        return {}
    src = f"{source}, imageset '{s.get('name', '?')}'"
    out: dict[str, tuple[Any, str]] = {}
    px = _positive(s.get("pixel_width"))
    if px is not None:
        out["pixel_size"] = (px, src)
    nf = _positive(s.get("frames_per_image"))
    if nf is not None and nf > 1:
        out["n_frames"] = (int(nf), src)
    directory = str(s.get("directory") or "").strip().strip("/")
    if directory:
        out["movie_dir"] = (directory, src)
    fmt = str(s.get("data_format") or "").lower()
    for key, glob in _FORMAT_GLOBS:
        if key in fmt:
            out["movie_glob"] = (glob, src)
            break
    return out


def merge(layers: list[dict[str, tuple[Any, str]]]) -> Acquisition:
    """Merge layers of (value, source) in order, later layers winning; None values are ignored.

    A later value that disagrees with an earlier one is logged, so a table/metadata conflict is seen.
    """
    acq = Acquisition()
    names = {f.name for f in fields(Acquisition)} - {"sources", "flags"}
    for key, (value, source) in DEFAULTS.items():
        setattr(acq, key, value)
        acq.sources[key] = source
    for layer in layers:
        for key, (value, source) in layer.items():
            if key not in names or value is None:
                continue
            old = getattr(acq, key)
            if old is not None and old != value and acq.sources.get(key) != DEFAULTS.get(key, (None, None))[1]:
                log.info("acquisition %s: %s (%s) overrides %s (%s)", key, value, source, old, acq.sources[key])
            setattr(acq, key, value)
            acq.sources[key] = source
    return acq


def resolve_acquisition(entry_id: int | str | None = None, imagesets: list[dict[str, Any]] | None = None,
                        overrides: dict[str, Any] | None = None, metadata_source: str = "entry metadata",
                        require: bool = True, flags: dict[str, str] | None = None) -> Acquisition:
    """The acquisition of a data set: built-in table < entry metadata (``imagesets``) < ``overrides``.

    ``overrides`` are the user's values by field name (None = not given).  With ``require`` a missing
    required value raises :class:`InputError` naming the flag; call this before downloading anything.
    ``flags`` renames the flags (field name -> flag) for a CLI with its own names, e.g. ``autoproc run``.
    """
    names = {**FLAGS, **(flags or {})}
    layers: list[dict[str, tuple[Any, str]]] = []
    what = "the acquisition parameters"
    if entry_id is not None:
        eid = normalise_id(entry_id)
        what = f"EMPIAR-{eid}"
        layers.append(builtin_values(eid))
    if imagesets:
        layers.append(metadata_values(imagesets, metadata_source))
    if overrides:
        layers.append({k: (v, f"flag {names.get(k, k)}") for k, v in overrides.items() if v is not None})
    acq = merge(layers)
    acq.flags = names
    _check_values(acq)
    return acq.require(what) if require else acq


def _check_values(acq: Acquisition) -> None:
    if acq.gain_rot is not None and acq.gain_rot not in (0, 1, 2, 3):
        raise InputError(None, f"gain rotation {acq.gain_rot} is not one of 0, 1, 2, 3",
                         f"set {acq.flags['gain_rot']} 0..3")
    if acq.gain_flip is not None and acq.gain_flip not in (0, 1, 2):
        raise InputError(None, f"gain flip {acq.gain_flip} is not one of 0, 1, 2", f"set {acq.flags['gain_flip']} 0..2")
    for key in ("pixel_size", "voltage", "particle_diameter", "dose_per_frame"):
        v = getattr(acq, key)
        if v is not None and not v > 0:
            raise InputError(None, f"{key.replace('_', ' ')} must be positive, not {v}", f"check {acq.flags[key]}")


def add_acquisition_arguments(p: argparse.ArgumentParser) -> None:
    """Add the acquisition flags (all default to 'from the table / entry metadata')."""
    g = p.add_argument_group("acquisition (overrides the built-in table and the entry's metadata)")
    g.add_argument("--angpix", type=float, default=None, help="movie pixel size in Å (super-resolution pixel if so)")
    g.add_argument("--kV", type=float, default=None, help="acceleration voltage in kV")
    g.add_argument("--Cs", type=float, default=None, help="spherical aberration in mm")
    g.add_argument("--Q0", type=float, default=None, help="amplitude contrast (RELION's default 0.1)")
    g.add_argument("--sym", default=None, help="point-group symmetry, e.g. C1, D2, O, I1")
    g.add_argument("--particle-diameter", type=float, default=None, help="longest particle diameter in Å")
    g.add_argument("--dose-per-frame", type=float, default=None, help="electron dose per movie frame in e/Å²")
    g.add_argument("--n-frames", type=int, default=None, help="frames per movie (informational)")
    g.add_argument("--super-resolution", action=argparse.BooleanOptionalAction, default=None,
                   help="the movies are super-resolution (pixel size is then the super-resolution pixel)")
    g.add_argument("--phase-plate", action=argparse.BooleanOptionalAction, default=None,
                   help="the data were taken with a phase plate")
    g.add_argument("--gain-ref", default=None, help="gain reference: a path in the entry (e.g. data/x.dm4) or a file")
    g.add_argument("--gain-rot", type=int, default=None, choices=(0, 1, 2, 3),
                   help="RELION's --gain_rot: rotate the gain this many times 90° clockwise (as relion_display shows)")
    g.add_argument("--gain-flip", type=int, default=None, choices=(0, 1, 2),
                   help="RELION's --gain_flip after rotation: 1 flips Y (upside down), 2 flips X (left-right)")
    g.add_argument("--movie-dir", default=None, help="the entry's folder holding the movies (e.g. data)")
    g.add_argument("--movie-glob", default=None, help="movie file pattern(s), comma-separated, e.g. '*.tif,*.tiff'")


def overrides_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """The user's acquisition values from parsed flags (None where not given)."""
    return {"pixel_size": a.angpix, "voltage": a.kV, "cs": a.Cs, "amplitude_contrast": a.Q0, "symmetry": a.sym,
            "particle_diameter": a.particle_diameter, "dose_per_frame": a.dose_per_frame, "n_frames": a.n_frames,
            "super_resolution": a.super_resolution, "phase_plate": a.phase_plate, "gain_reference": a.gain_ref,
            "gain_rot": a.gain_rot, "gain_flip": a.gain_flip, "movie_dir": a.movie_dir, "movie_glob": a.movie_glob}
