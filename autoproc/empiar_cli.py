"""``autoproc empiar``: look at an entry (``info``), download its movies (``download``) and check a gain
reference's orientation (``gain-check``); registered into a CLI by :func:`autoproc.empiar.register`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from reconstruct.files.errors import InputError

from .acquisition import normalise_id
from .empiar import (
    API_BASE,
    FILES_BASE,
    MANIFEST,
    MOVIE_PATTERN,
    DownloadReport,
    EmpiarClient,
    EmpiarEntry,
    EmpiarError,
    imagesets_from_xml,
)
from .empiar_files import human_bytes, match_pattern

log = logging.getLogger("reconstruct")


HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def _client(a: argparse.Namespace) -> EmpiarClient:
    return EmpiarClient(a.api_base, a.files_base, timeout=a.timeout, retries=a.retries)


def _print_entry(entry: EmpiarEntry) -> None:
    print(f"{entry.accession}: {entry.title}")
    bits = [f"released {entry.release_date}" if entry.release_date else "",
            f"data set size {entry.dataset_size}" if entry.dataset_size else "", entry.doi or ""]
    if any(bits):
        print("  " + ", ".join(b for b in bits if b))
    print("imagesets:")
    for i, s in enumerate(entry.imagesets, 1):
        px = s.get("pixel_width")
        print(f"  {i}. {s.get('name', '?')}: {s.get('category', '?')}, {s.get('num_images_or_tilt_series', '?')} "
              f"image(s) x {s.get('frames_per_image', '?')} frame(s), {s.get('image_width', '?')}x"
              f"{s.get('image_height', '?')} px{f', {px} Å/px' if px else ''}, {s.get('data_format', '?')}, in "
              f"{str(s.get('directory', '?')).strip('/')}/")


def _cmd_info(a: argparse.Namespace) -> None:
    from .acquisition import overrides_from_args, resolve_acquisition

    eid = normalise_id(a.id)
    with _client(a) as client:
        imagesets: list[dict[str, Any]] = []
        source = ""
        try:
            entry = client.entry(eid)
            _print_entry(entry)
            imagesets, source = entry.imagesets, f"EMPIAR-{eid} entry JSON"
        except EmpiarError as err:
            print(f"EMPIAR-{eid}: metadata not available from the API ({err})")
            try:
                imagesets, source = imagesets_from_xml(client.xml(eid)), f"EMPIAR-{eid} XML"
                print(f"using the imagesets of {eid}.xml")
            except EmpiarError:
                pass
        acq = resolve_acquisition(eid, imagesets, overrides_from_args(a), metadata_source=source, require=False)
        if a.files:
            subdir = acq.movie_dir or "data"
            pattern = acq.movie_glob or MOVIE_PATTERN
            files = client.list_files(eid, subdir, pattern, exact_sizes=False)
            total = sum(f.best_size or 0 for f in files)
            exact = all(f.size is not None for f in files)
            print(f"files: {len(files)} matching '{pattern}' under {subdir}/, {'' if exact else 'about '}"
                  f"{human_bytes(total)}" + (f" (first {files[0].name}, last {files[-1].name})" if files else ""))
    print("acquisition parameters we would use:")
    for name, value, src in acq.table():
        print(f"  {name:<19} {value:<28} {src}")
    if acq.missing():
        print("missing values must be given with the flags shown before processing this entry")


def _cmd_download(a: argparse.Namespace) -> None:
    from .acquisition import resolve_acquisition

    eid = normalise_id(a.id)
    with _client(a) as client:
        subdir, pattern = a.movie_dir, a.movie_glob
        gain_path: bool | str = bool(a.include_gain)
        if subdir is None or pattern is None or a.include_gain:
            try:
                sets, source = client.imagesets(eid)
            except EmpiarError as err:
                log.warning("EMPIAR-%s: no metadata (%s); using defaults", eid, err)
                sets, source = [], ""
            acq = resolve_acquisition(eid, sets, {"movie_dir": subdir, "movie_glob": pattern},
                                      metadata_source=source, require=False)
            subdir = acq.movie_dir or "data"
            pattern = acq.movie_glob or MOVIE_PATTERN
            if a.include_gain and acq.gain_reference and not Path(acq.gain_reference).is_absolute():
                gain_path = acq.gain_reference
        report = client.download(eid, a.o, a.max_movies, a.download_workers, subdir, pattern, gain_path)
    done = report.done
    print(f"{len(done)} file(s) in {report.movies_dir} ({human_bytes(sum(r.size for r in done))}); "
          f"manifest {report.movies_dir / MANIFEST}")
    for r in report.failed:
        print(f"  not downloaded: {r.message}")
    if a.include_gain:
        _prepare_gain(report, a.check_gain_movies)
    if report.failed and not done:
        raise EmpiarError(f"EMPIAR-{eid}: nothing could be downloaded")


def _prepare_gain(report: DownloadReport, n_check: int) -> None:
    """Convert a downloaded non-MRC gain to MRC (RELION reads no DM) and check its orientation."""
    from .gain import check_gain_files, convert_gain_to_mrc

    movies = [r.path for r in report.done if r.path is not None and match_pattern(r.path.name, MOVIE_PATTERN)]
    gains = [r.path for r in report.done if r.path is not None and r.path not in movies]
    for g in gains:
        target = g
        if g.suffix.lower() not in (".mrc", ".mrcs", ".gain"):  # a .gain is read as it is (EER's rule)
            try:
                target = convert_gain_to_mrc(g, g.with_suffix(".mrc"))
                print(f"gain reference converted for RELION: {target}")
            except InputError as err:
                print(f"gain reference {g} not converted: {err}")
                continue
        if n_check > 0 and movies:
            try:
                res = check_gain_files(target, movies, n_movies=n_check)
                print(res.message())
            except InputError as err:
                print(f"gain orientation not checked: {err}")


def _cmd_gain_check(a: argparse.Namespace) -> None:
    from .gain import check_gain_files

    res = check_gain_files(a.gain, a.movies, (a.gain_rot, a.gain_flip), a.n_movies, a.max_frames)
    print(res.message())
    for o, c in sorted(res.correlation.items()):
        r = res.residual[o]
        print(f"  rot={o[0]} flip={o[1]}: correlation {'n/a' if c is None else f'{c:.3f}'}, "
              f"residual {'n/a' if r is None else f'{r:.3f}'}")


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-base", default=API_BASE, help="EMPIAR API base URL")
    p.add_argument("--files-base", default=FILES_BASE, help="base URL of the EMPIAR file tree (or a mirror)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server per request")
    p.add_argument("--retries", type=int, default=5, help="retries of a dropped or failed request or file")


def register_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``empiar`` (with ``info``, ``download`` and ``gain-check``) to a CLI's subcommands."""
    from .acquisition import add_acquisition_arguments

    p = sub.add_parser("empiar", formatter_class=HELP_FORMAT, help="look at and download EMPIAR entries",
                       description="EMPIAR entries: metadata and acquisition parameters, verified resumable "
                                   "downloads of their movies, and a gain orientation check.")
    esub = p.add_subparsers(dest="empiar_command", required=True, metavar="ACTION")

    s = esub.add_parser("info", formatter_class=HELP_FORMAT, help="title, imagesets, sizes and acquisition",
                        description="Print an entry's title, imagesets and sizes, and the acquisition parameters "
                                    "autoproc would use with where each comes from (built-in table < entry "
                                    "metadata < flags).")
    s.add_argument("id", help="EMPIAR entry, e.g. 10288 or EMPIAR-10288")
    s.add_argument("--files", action="store_true", help="also list the movie files (count and total size)")
    add_acquisition_arguments(s)
    _server_args(s)
    s.set_defaults(func=_cmd_info)

    d = esub.add_parser("download", formatter_class=HELP_FORMAT, help="download an entry's movies into DIR/Movies",
                        description="Download the movies (first N by name) into DIR/Movies/ in parallel, resuming "
                                    "interrupted files, verifying each (size, published checksums if any, opening "
                                    "it) and recording SHA-256 in DIR/Movies/download_manifest.json. Rerun the "
                                    "same command to resume.")
    d.add_argument("id", help="EMPIAR entry, e.g. 10288 or EMPIAR-10288")
    d.add_argument("--o", required=True, help="output directory (files go to DIR/Movies/)")
    d.add_argument("--max-movies", type=int, default=None, help="download only the first N movies by name (None: all)")
    d.add_argument("--download-workers", type=int, default=4, help="parallel downloads")
    d.add_argument("--include-gain", action="store_true",
                   help="also download the gain reference (converted to MRC for RELION, orientation checked)")
    d.add_argument("--check-gain-movies", type=int, default=3,
                   help="with --include-gain: movies used to check the gain orientation (0: no check)")
    d.add_argument("--movie-dir", default=None, help="the entry's folder of movies (None: from the metadata, "
                                                     "else data)")
    d.add_argument("--movie-glob", default=None, help=f"movie name pattern(s) (None: from the metadata, else "
                                                      f"'{MOVIE_PATTERN}')")
    _server_args(d)
    d.set_defaults(func=_cmd_download)

    g = esub.add_parser("gain-check", formatter_class=HELP_FORMAT, help="check a gain reference's orientation",
                        description="Compare all eight rotations/flips of a gain reference with the mean of a few "
                                    "movies and say which fits (RELION's --gain_rot/--gain_flip).")
    g.add_argument("--gain", required=True, help="gain reference (MRC, TIFF, DM3/DM4)")
    g.add_argument("--movies", required=True, help="movie glob, e.g. 'Movies/*.tif'")
    g.add_argument("--gain-rot", type=int, default=0, choices=(0, 1, 2, 3), help="the rotation you would use")
    g.add_argument("--gain-flip", type=int, default=0, choices=(0, 1, 2), help="the flip you would use")
    g.add_argument("--n-movies", type=int, default=3, help="movies to average")
    g.add_argument("--max-frames", type=int, default=None, help="frames per movie to use (None: all)")
    g.set_defaults(func=_cmd_gain_check)
