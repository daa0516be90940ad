"""Import movies into a project (RELION's Import job, ``relion_import --do_movies``).

Writes ``<odir>/movies.star``: an optics group with the acquisition parameters and one row per movie
matching the pattern, paths relative to the project. Re-running on a grown directory lists the new
movies too (``--continue`` keeps the earlier rows' order), which is how on-the-fly processing sees them.
"""

from __future__ import annotations

import argparse
import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .files.errors import InputError
from .files.star import read_star, write_star

log = logging.getLogger("reconstruct")
MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer")


@dataclass
class ImportOptions:
    """Options of ``reconstruct import`` (RELION's names)."""

    pattern: str  # --i, e.g. "Movies/*.tif", relative to the project
    odir: Path  # --odir
    ofile: str = "movies.star"
    angpix: float = 1.0
    kv: float = 300.0
    cs: float = 2.7
    q0: float = 0.1
    optics_group_name: str = "opticsGroup1"
    mtf: str = ""
    keep_order: bool = False  # --continue: earlier movies keep their rows
    project_dir: Path = Path(".")


def import_movies(opt: ImportOptions) -> Path:
    """Write the movies STAR file for every file matching ``opt.pattern``; returns its path."""
    if Path(opt.pattern).is_absolute() or ".." in Path(opt.pattern).parts:
        raise InputError(opt.pattern, "movie paths must be inside the project (no absolute paths or '..')",
                         "link or copy the movies into the project directory, e.g. Movies/")
    if opt.angpix <= 0:
        raise InputError(None, f"pixel size {opt.angpix} Å is not positive", "pass --angpix")
    root = opt.project_dir
    found = sorted(str(Path(p).relative_to(root)) for p in glob.glob(str(root / opt.pattern))
                   if Path(p).suffix.lower() in MOVIE_SUFFIXES and Path(p).is_file())
    out = opt.odir / opt.ofile
    if opt.keep_order and (root / out).exists():
        earlier = [str(n) for n in read_star(root / out)["movies"]["rlnMicrographMovieName"]]
        found = earlier + [f for f in found if f not in set(earlier)]
    if not found:
        raise InputError(opt.pattern, "no movies match this pattern",
                         f"check the pattern (relative to {root.resolve()}); suffixes: {', '.join(MOVIE_SUFFIXES)}")
    optics = {"rlnOpticsGroupName": opt.optics_group_name, "rlnOpticsGroup": 1,
              "rlnMicrographOriginalPixelSize": opt.angpix, "rlnVoltage": opt.kv,
              "rlnSphericalAberration": opt.cs, "rlnAmplitudeContrast": opt.q0}
    if opt.mtf:
        optics["rlnMtfFileName"] = opt.mtf
    write_star(root / out, {"optics": pd.DataFrame([optics]),
                            "movies": pd.DataFrame({"rlnMicrographMovieName": found, "rlnOpticsGroup": 1})})
    log.info("imported %d movies into %s", len(found), out)
    return root / out


def _cmd_import(a: argparse.Namespace) -> None:
    project = Path(a.project_dir) if a.project_dir else Path(".")
    import_movies(ImportOptions(pattern=a.i, odir=Path(a.odir), ofile=a.ofile, angpix=a.angpix, kv=a.kV, cs=a.Cs,
                                q0=a.Q0, optics_group_name=a.optics_group_name, mtf=a.optics_group_mtf or "",
                                keep_order=a.continue_run, project_dir=project))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``reconstruct import`` to the command line."""
    s = sub.add_parser("import", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="import movies into a project (like relion_import --do_movies)",
                       description="List the movies matching --i (relative to the project directory) with their "
                                   "optics group in ODIR/OFILE, RELION's movies.star. Run again to add new movies.")
    s.add_argument("--i", required=True, help="movie file pattern, e.g. 'Movies/*.tif' (quote it)")
    s.add_argument("--odir", required=True, help="output job directory, e.g. Import/job001/")
    s.add_argument("--ofile", default="movies.star", help="output STAR file name")
    s.add_argument("--do_movies", action="store_true", help="import movies (the only kind here)")
    s.add_argument("--angpix", type=float, required=True, help="pixel size of the movies (Å)")
    s.add_argument("--kV", type=float, default=300.0, help="acceleration voltage (kV)")
    s.add_argument("--Cs", type=float, default=2.7, help="spherical aberration (mm)")
    s.add_argument("--Q0", type=float, default=0.1, help="amplitude contrast")
    s.add_argument("--optics_group_name", default="opticsGroup1", help="name of the optics group")
    s.add_argument("--optics_group_mtf", default=None, help="MTF STAR file of the detector (optional)")
    s.add_argument("--continue", dest="continue_run", action="store_true",
                   help="keep the movies already listed in the output first, in their order")
    s.add_argument("--project_dir", default=None, help="project directory the pattern is relative to (default: cwd)")
    s.set_defaults(func=_cmd_import)
