"""``autoproc run --empiar ID``: settings from the entry, and its movies downloading while they are processed.

Everything that can stop the run (unknown acquisition values, no movies in the listing, too little disk
space) is checked before the first byte is fetched. The download then runs in a background thread,
movies appear in ``Movies/`` in name order and the prep scheme's import picks them up on its next pass;
the run finishes when the download has ended and the schemes have nothing left to do.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .acquisition import RUN_FLAGS, normalise_id, resolve_acquisition
from .empiar import MOVIE_PATTERN, DownloadResult, EmpiarClient, EmpiarError
from .empiar_files import match_pattern
from .shipped_schemes import Settings

log = logging.getLogger("autoproc")


@dataclass
class BackgroundDownload:
    """A download running in a thread; ``finished()`` tells the run loop whether more movies can come."""

    thread: threading.Thread
    gain_ready: threading.Event
    results: list[DownloadResult] = field(default_factory=list)
    error: BaseException | None = None

    def finished(self) -> bool:
        """True once no more movies will arrive."""
        return not self.thread.is_alive()


def start_empiar(project: Path, entry_id: str, overrides: dict[str, Any], base: Settings, max_movies: int | None,
                 workers: int = 4, client: EmpiarClient | None = None) -> tuple[Settings, BackgroundDownload]:
    """Resolve the acquisition (built-in table < entry metadata < ``overrides``), plan and start the download.

    Returns the settings for the schemes and the running download. Raises before downloading when a
    value is missing or the disk is too small.
    """
    eid = normalise_id(entry_id)
    client = client or EmpiarClient()
    try:
        sets, source = client.imagesets(eid)
    except EmpiarError as err:
        log.warning("EMPIAR-%s: no metadata from the archive (%s); the built-in table and flags must do", eid, err)
        sets, source = [], ""
    acq = resolve_acquisition(eid, sets, overrides, metadata_source=source, flags=RUN_FLAGS)
    for name, value, src in acq.table():
        log.info("acquisition %-19s %-24s (%s)", name, value, src)
    pattern = acq.movie_glob or MOVIE_PATTERN
    given = acq.gain_reference or ""
    local = bool(given) and (Path(given).is_absolute() or (project / given).exists())
    gain_remote: str | bool = given if given and not local else False
    files, sums = client.plan(eid, max_movies, acq.movie_dir or "data", pattern, gain_remote or False, workers)
    stream = client.iter_download(files, project, workers, sums, entry_id=eid)  # checks the disk now
    movie_suffixes = sorted({Path(f.name).suffix for f in files if match_pattern(f.name, pattern)})
    gain_local = given if local else ""
    if gain_remote:
        gain_name = Path(str(gain_remote)).name
        # Thermo Fisher's .gain stays as it is: motion correction of EER movies reads it and treats it
        # as multiplicative (RELION's rule), which a conversion to MRC would lose.
        keep = Path(gain_name).suffix.lower() in (".mrc", ".mrcs", ".gain")
        gain_local = f"Movies/{gain_name}" if keep else f"Movies/{Path(gain_name).stem}.mrc"
    st = replace(base, movies="Movies/*" + (movie_suffixes[0] if len(movie_suffixes) == 1 else ""),
                 angpix=float(acq.pixel_size), voltage=float(acq.voltage), cs=float(acq.cs),
                 q0=float(acq.amplitude_contrast), dose_per_frame=float(acq.dose_per_frame),
                 particle_diameter=float(acq.particle_diameter), symmetry=str(acq.symmetry),
                 bin_factor=2 if acq.super_resolution else base.bin_factor, gain=gain_local,
                 gain_rot=int(acq.gain_rot or 0), gain_flip=int(acq.gain_flip or 0))
    dl = BackgroundDownload(threading.Thread(target=lambda: None), threading.Event())

    def consume() -> None:
        try:
            for res in stream:
                dl.results.append(res)
                if gain_remote and res.path is not None and not match_pattern(res.path.name, pattern):
                    _convert_gain(res.path, project / gain_local)
                    dl.gain_ready.set()
        except BaseException as err:  # reported by the run loop; the processed movies are kept
            dl.error = err
            log.error("EMPIAR-%s download stopped: %s", eid, err)
        finally:
            dl.gain_ready.set()

    dl.thread = threading.Thread(target=consume, name=f"empiar-{eid}", daemon=True)
    dl.thread.start()
    if gain_remote:
        dl.gain_ready.wait()
        if not (project / gain_local).exists():
            raise EmpiarError(f"EMPIAR-{eid}: the gain reference {gain_remote} could not be downloaded or read; "
                              "pass --gain with a local MRC gain reference")
    return st, dl


def _convert_gain(src: Path, dst: Path) -> None:
    """The gain as MRC for motion correction (RELION reads no DM4); orientation is applied by the job."""
    from .gain import convert_gain_to_mrc

    if src.suffix.lower() in (".mrc", ".mrcs", ".gain"):
        if src != dst:
            dst.write_bytes(src.read_bytes())
        return
    convert_gain_to_mrc(src, dst)
    log.info("gain reference %s converted to %s", src.name, dst)
