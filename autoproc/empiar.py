"""EMPIAR client: entry metadata, file listing from the HTTPS index pages, verified parallel downloads.

EMPIAR serves entry metadata as JSON (``{api_base}/entry/<ID>/``, keyed by ``EMPIAR-<ID>``) and the
files as an HTTPS tree of HTML index pages (``{files_base}/<ID>/``: ``<ID>.xml`` and ``data/...``).
Downloads go through a thread pool into ``DIR/Movies/.partial/NAME.part``, resume with HTTP Range after a
dropped connection, are verified (size against the listing, a published md5/sha1/sha256 manifest when
the entry has one, and by opening the TIFF/MRC/DM header), then renamed into ``DIR/Movies/NAME`` in name
order, so ``Movies/`` always holds a complete prefix of the sorted list and never a half file.  Our own
SHA-256 of each file goes to ``DIR/Movies/download_manifest.json``; a rerun skips what is there.

The network-free pieces (index pages, checksum manifests, file checks) are in :mod:`autoproc.empiar_files`,
the ``autoproc empiar`` subcommands in :mod:`autoproc.empiar_cli` (added to a CLI by :func:`register`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx

from reconstruct.files.atomic import atomic_write_text
from reconstruct.files.errors import InputError

from .acquisition import normalise_id
from .empiar_files import (
    ByteProgress,
    RemoteFile,
    hash_file,
    human_bytes,
    is_checksum_file,
    match_pattern,
    parse_checksums,
    parse_index,
    verify_readable,
)

log = logging.getLogger("reconstruct")

API_BASE = "https://www.ebi.ac.uk/empiar/api"
FILES_BASE = "https://ftp.ebi.ac.uk/empiar/world_availability"
MOVIE_PATTERN = "*.tif,*.tiff,*.mrc,*.mrcs,*.eer"
MANIFEST = "download_manifest.json"
PARTIAL = ".partial"


class EmpiarError(ValueError):
    """EMPIAR could not be reached or answered unusably; the text says what happened and what to do.

    A ValueError so that the command-line tools print it as one line.
    """


@dataclass
class EmpiarEntry:
    """An entry's metadata as the EMPIAR API gives it (``raw``), with the fields we use pulled out."""

    id: str
    title: str
    imagesets: list[dict[str, Any]]
    release_date: str | None = None
    dataset_size: Any = None
    doi: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def accession(self) -> str:
        """'EMPIAR-<ID>'."""
        return f"EMPIAR-{self.id}"


@dataclass
class DownloadResult:
    """One file's outcome: ``status`` is 'downloaded', 'present' (already there and verified),
    'missing' (404) or 'failed' (with ``message``); ``path`` is the final local path when ok."""

    remote: RemoteFile
    status: str
    path: Path | None = None
    sha256: str | None = None
    size: int = 0
    message: str = ""
    checked: str = ""

    @property
    def ok(self) -> bool:
        """True when the file is in place and verified."""
        return self.status in ("downloaded", "present")


@dataclass
class DownloadReport:
    """All outcomes of a download, in name order."""

    movies_dir: Path
    results: list[DownloadResult]

    @property
    def done(self) -> list[DownloadResult]:
        """The files in place."""
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[DownloadResult]:
        """The files that could not be had (404 or failed verification)."""
        return [r for r in self.results if not r.ok]


class _Missing(Exception):
    pass


class _Stopped(Exception):
    pass


class _Corrupt(Exception):
    pass


class _Retry(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------
# the client


class EmpiarClient:
    """Talks to EMPIAR (or a mirror, or the tests' loopback server: both bases can be overridden).

    ``retries`` transient failures (dropped connections, timeouts, HTTP 5xx) are retried per request or
    file with exponential ``backoff`` seconds (1, 2, 4, ... capped at 60).
    """

    def __init__(self, api_base: str = API_BASE, files_base: str = FILES_BASE, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 1.0) -> None:
        self.api_base = api_base.rstrip("/")
        self.files_base = files_base.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 20.0))
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()
        for name in ("httpx", "httpcore"):  # one line per request is noise in a download of thousands of files
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = httpx.Client(timeout=self._timeout, follow_redirects=True,
                             headers={"User-Agent": "cryoem-autoproc (EMPIAR client)"})
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        """Close the HTTP connections."""
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()
        self._local = threading.local()

    def __enter__(self) -> EmpiarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sleep(self, attempt: int) -> None:
        time.sleep(min(60.0, self.backoff * 2**attempt))

    def _request(self, method: str, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """One request with retries on transport errors and 5xx; 404 raises :class:`_Missing`."""
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = self._http().request(method, url, headers=headers)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if r.status_code == 404:
                    raise _Missing(url)
                if r.status_code < 500:
                    return r
                last = f"HTTP {r.status_code}"
            if attempt < self.retries:
                log.debug("%s %s failed (%s); retrying", method, url, last)
                self._sleep(attempt)
        raise EmpiarError(f"{url}: no answer after {self.retries + 1} attempts ({last}); check the network "
                          "connection or try later")

    def _get_text(self, url: str, what: str) -> str:
        try:
            r = self._request("GET", url)
        except _Missing:
            raise EmpiarError(f"{what} not found at {url} (HTTP 404); check the entry number") from None
        if r.status_code != 200:
            raise EmpiarError(f"{what}: HTTP {r.status_code} from {url}")
        return r.text

    def entry_url(self, entry_id: int | str) -> str:
        """The entry's folder in the file tree."""
        return f"{self.files_base}/{normalise_id(entry_id)}/"

    # -- metadata --------------------------------------------------------------------------------------------
    def entry(self, entry_id: int | str) -> EmpiarEntry:
        """The entry's metadata from the API (accepts 10288, '10288' or 'EMPIAR-10288')."""
        eid = normalise_id(entry_id)
        data: Any = None
        for form in (eid, f"EMPIAR-{eid}"):
            try:
                r = self._request("GET", f"{self.api_base}/entry/{form}/")
            except _Missing:
                continue
            if r.status_code == 200:
                try:
                    data = r.json()
                except ValueError:
                    raise EmpiarError(f"EMPIAR-{eid}: the API answered with something that is not JSON") from None
                break
        if data is None:
            raise EmpiarError(f"EMPIAR-{eid} not found at {self.api_base}/entry/{eid}/; check the entry number")
        if isinstance(data, dict) and f"EMPIAR-{eid}" in data:
            data = data[f"EMPIAR-{eid}"]
        elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), dict):
            data = next(iter(data.values()))
        if not isinstance(data, dict):
            raise EmpiarError(f"EMPIAR-{eid}: unexpected API answer (not an entry object)")
        imagesets = [s for s in data.get("imagesets") or [] if isinstance(s, dict)]
        return EmpiarEntry(id=eid, title=str(data.get("title") or ""), imagesets=imagesets,
                           release_date=data.get("release_date"), dataset_size=data.get("dataset_size"),
                           doi=data.get("entry_doi"), raw=data)

    def xml(self, entry_id: int | str) -> str:
        """The entry's deposition XML (``<ID>.xml`` in its folder) as text."""
        eid = normalise_id(entry_id)
        return self._get_text(f"{self.entry_url(eid)}{eid}.xml", f"EMPIAR-{eid} XML")

    def imagesets(self, entry_id: int | str) -> tuple[list[dict[str, Any]], str]:
        """The entry's imagesets and where they came from: the API's JSON, else the entry's XML."""
        eid = normalise_id(entry_id)
        try:
            sets = self.entry(eid).imagesets
            if sets:
                return sets, f"EMPIAR-{eid} entry JSON"
        except EmpiarError as err:
            log.warning("EMPIAR-%s metadata from the API: %s; trying the entry's XML", eid, err)
        return imagesets_from_xml(self.xml(eid)), f"EMPIAR-{eid} XML"

    # -- listing ---------------------------------------------------------------------------------------------
    def walk(self, entry_id: int | str, subdir: str = "data", max_depth: int = 16) -> list[RemoteFile]:
        """Every file below ``subdir`` of the entry, following nested index pages, sorted by path.

        Paths are relative to the entry (``data/x.tif``).  Sizes are what the index pages say.
        """
        eid = normalise_id(entry_id)
        root = self.entry_url(eid)
        sub = subdir.strip("/")
        start = root + (quote(sub) + "/" if sub else "")
        out: list[RemoteFile] = []
        todo = [(start, 0)]
        seen: set[str] = set()
        while todo:
            url, depth = todo.pop()
            if url in seen or depth > max_depth:
                continue
            seen.add(url)
            html = self._get_text(url, f"EMPIAR-{eid} folder '{unquote(url[len(root):]) or '/'}'")
            files, dirs = parse_index(html, url)
            prefix = unquote(url[len(root):])
            out += [RemoteFile(prefix + f.path, f.url, f.size, f.approx_size) for f in files]
            todo += [(d, depth + 1) for d in dirs]
        return sorted(out, key=lambda f: f.path)

    def list_files(self, entry_id: int | str, subdir: str = "data", pattern: str = "*.tif",
                   exact_sizes: bool = True, workers: int = 4) -> list[RemoteFile]:
        """Files below ``subdir`` whose names match ``pattern`` (comma-separated fnmatch patterns, case-
        insensitive), sorted by path; with ``exact_sizes`` a HEAD request fills sizes the index lacks."""
        files = [f for f in self.walk(entry_id, subdir) if match_pattern(f.name, pattern)]
        return self.fill_sizes(files, workers) if exact_sizes else files

    def head_size(self, url: str) -> int | None:
        """The file's size from HEAD Content-Length (or a one-byte Range GET's Content-Range); None if the
        server says neither; :class:`_Missing` on 404."""
        r = self._request("HEAD", url)
        if r.status_code == 200 and r.headers.get("content-length", "").isdigit():
            return int(r.headers["content-length"])
        r = self._request("GET", url, headers={"Range": "bytes=0-0"})
        m = re.match(r"bytes\s+\d+-\d+/(\d+)", r.headers.get("content-range", ""))
        return int(m.group(1)) if m else None

    def fill_sizes(self, files: list[RemoteFile], workers: int = 4) -> list[RemoteFile]:
        """The same files with exact sizes, asking the server (in parallel) for those the index lacked.
        A file the server no longer has keeps size None (its download then reports the 404)."""
        need = [f for f in files if f.size is None]
        if not need:
            return files

        def one(f: RemoteFile) -> RemoteFile:
            try:
                size = self.head_size(f.url)
            except _Missing:
                size = None
            return RemoteFile(f.path, f.url, size, f.approx_size if size is None else size)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            filled = dict(zip([f.path for f in need], ex.map(one, need)))
        return [filled.get(f.path, f) for f in files]

    def published_checksums(self, listing: list[RemoteFile]) -> dict[str, tuple[str, str]]:
        """{file name: (algorithm, digest)} from checksum manifests in ``listing`` (MD5SUMS, *.md5, ...).

        EMPIAR publishes none that we know of; mirrors or future entries may.  An unreadable manifest is
        logged and ignored.
        """
        out: dict[str, tuple[str, str]] = {}
        for f in listing:
            if not is_checksum_file(f.name):
                continue
            try:
                out.update(parse_checksums(self._get_text(f.url, f"checksum manifest {f.path}"), f.name))
            except (EmpiarError, _Missing) as err:
                log.warning("ignoring checksum manifest %s: %s", f.path, err)
        return out

    # -- downloads -------------------------------------------------------------------------------------------
    def _fetch(self, f: RemoteFile, part: Path, stop: threading.Event, progress: ByteProgress | None) -> int:
        """Download ``f`` into ``part``, resuming from what is there; returns the final size.

        Raises _Missing on 404, _Stopped when asked to stop, EmpiarError when retries run out.
        """
        last = ""
        for attempt in range(self.retries + 1):
            offset = part.stat().st_size if part.exists() else 0
            if f.size is not None and offset > f.size:
                part.unlink()
                if progress:
                    progress.update(-offset)
                offset = 0
            if f.size is not None and offset == f.size and offset > 0:
                return offset
            headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, not of a gzip stream
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                with self._http().stream("GET", f.url, headers=headers) as r:
                    if r.status_code == 404:
                        raise _Missing(f.url)
                    if r.status_code == 416:  # nothing past offset: the part is complete or the file shrank
                        total = re.match(r"bytes\s+\*/(\d+)", r.headers.get("content-range", ""))
                        if total and int(total.group(1)) == offset:
                            return offset
                        part.unlink(missing_ok=True)
                        last = "HTTP 416 (range not satisfiable); restarting the file"
                        continue
                    if r.status_code >= 500:
                        raise _Retry(f"HTTP {r.status_code}")
                    if r.status_code not in (200, 206):
                        raise EmpiarError(f"{f.path}: HTTP {r.status_code} from {f.url}")
                    if r.status_code == 200 and offset:  # the server ignored Range: start again
                        if progress:
                            progress.update(-offset)
                        offset = 0
                    with open(part, "ab" if offset else "wb") as fh:
                        for chunk in r.iter_bytes():  # as received: a drop loses nothing already read
                            if stop.is_set():
                                raise _Stopped()
                            fh.write(chunk)
                            if progress:
                                progress.update(len(chunk))
                return part.stat().st_size
            except (httpx.TransportError, _Retry) as err:
                last = f"{type(err).__name__}: {err}"
            if attempt < self.retries:
                log.info("%s: connection problem (%s); resuming from byte %d", f.path, last,
                         part.stat().st_size if part.exists() else 0)
                self._sleep(attempt)
        raise EmpiarError(f"{f.path}: gave up after {self.retries + 1} attempts ({last}); rerun the same "
                          "command later to resume")

    def _fetch_verified(self, f: RemoteFile, part: Path, published: tuple[str, str] | None,
                        stop: threading.Event, progress: ByteProgress | None) -> tuple[str, str]:
        """Download and verify ``f``; a wrong size, checksum or unreadable file is deleted and downloaded
        once more before failing.  Returns (our sha256, what the opening check found)."""
        problem = ""
        for attempt in range(2):
            size = self._fetch(f, part, stop, progress)
            try:
                if f.size is not None and size != f.size:
                    raise _Corrupt(f"size {size} bytes, but the listing says {f.size}")
                algos = ("sha256",) + ((published[0],) if published and published[0] != "sha256" else ())
                digests = hash_file(part, algos)
                if published and digests[published[0]] != published[1]:
                    raise _Corrupt(f"{published[0]} {digests[published[0]]} differs from the published "
                                   f"{published[1]}")
                try:
                    checked = verify_readable(part, f.name)
                except InputError as err:
                    raise _Corrupt(err.problem) from None
                return digests["sha256"], checked
            except _Corrupt as err:
                problem = str(err)
                log.warning("%s: %s; deleting it%s", f.path, problem, " and downloading again" if attempt == 0 else "")
                if progress:
                    progress.update(-size)
                part.unlink(missing_ok=True)
        raise _Corrupt(f"{problem} (downloaded twice); the server's copy or its manifest may be wrong: skipped")

    def iter_download(self, files: list[RemoteFile], out_dir: str | Path, workers: int = 4,
                      checksums: dict[str, tuple[str, str]] | None = None, entry_id: str | None = None,
                      quiet: bool = False, reserve_bytes: int = 64 * 1024**2,
                      fewer_flag: str = "--max-movies") -> Iterator[DownloadResult]:
        """Download ``files`` into ``out_dir/Movies/`` with ``workers`` threads, yielding each outcome in
        the order of ``files`` as soon as that file (and every one before it) is done, so processing can
        start on the first movies while the rest download.

        Files already in place (listed in the manifest with their size) are not fetched again; killed
        downloads resume from their ``.part``.  Free disk space is checked first against the listing's
        sizes (:class:`InputError` saying how much is needed).  A 404 or a file failing verification is
        logged and reported with status 'missing'/'failed'; the others go on.  The checks (names, disk
        space) run when this is called, before the first download starts.
        """
        movies = Path(out_dir) / "Movies"
        names = [f.name for f in files]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(None, f"several remote files are named {', '.join(dupes[:3])}",
                             "they would overwrite each other in Movies/: choose one folder with --movie-dir")
        staging = movies / PARTIAL
        staging.mkdir(parents=True, exist_ok=True)
        manifest = _load_manifest(movies / MANIFEST)
        todo: list[RemoteFile] = []
        ready: dict[str, DownloadResult] = {}
        for f in files:
            done = _already_done(f, movies, manifest)
            if done is not None:
                ready[f.path] = done
            else:
                todo.append(f)
        unknown = [f.path for f in todo if f.best_size is None]
        if unknown:
            log.warning("%d file(s) have no known size (e.g. %s): not verified by size, not in the disk check",
                        len(unknown), unknown[0])
        _check_disk(todo, staging, reserve_bytes, fewer_flag)
        return self._run(files, todo, ready, movies, manifest, workers, checksums or {}, entry_id, quiet)

    def _run(self, files: list[RemoteFile], todo: list[RemoteFile], ready: dict[str, DownloadResult], movies: Path,
             manifest: dict[str, Any], workers: int, checksums: dict[str, tuple[str, str]], entry_id: str | None,
             quiet: bool) -> Iterator[DownloadResult]:
        staging = movies / PARTIAL
        total = sum(f.best_size or 0 for f in todo)
        have = sum((staging / (f.name + ".part")).stat().st_size for f in todo
                   if (staging / (f.name + ".part")).exists())
        progress = ByteProgress(total, f"downloading {len(todo)} file(s)", initial=have, quiet=quiet) if todo else None
        stop = threading.Event()

        def work(f: RemoteFile) -> DownloadResult:
            part = staging / (f.name + ".part")
            try:
                sha, checked = self._fetch_verified(f, part, checksums.get(f.name), stop, progress)
            except _Missing:
                return DownloadResult(f, "missing", message=f"{f.path}: not on the server (HTTP 404); skipped")
            except _Corrupt as err:
                return DownloadResult(f, "failed", message=f"{f.path}: {err}")
            except EmpiarError as err:
                return DownloadResult(f, "failed", message=str(err))
            return DownloadResult(f, "downloaded", path=part, sha256=sha, size=part.stat().st_size, checked=checked)

        ex = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="empiar")
        futures: dict[str, Future[DownloadResult]] = {f.path: ex.submit(work, f) for f in todo}
        try:
            for f in files:
                if f.path in ready:
                    yield ready[f.path]
                    continue
                res = futures[f.path].result()
                if res.status == "downloaded" and res.path is not None:
                    final = movies / f.name
                    os.replace(res.path, final)
                    res.path = final
                    manifest["files"][f.name] = {
                        "remote_path": f.path, "url": f.url, "size": res.size, "sha256": res.sha256,
                        "published": list(checksums[f.name]) if f.name in checksums else None,
                        "checked": res.checked, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    if entry_id:
                        manifest["entry"] = f"EMPIAR-{normalise_id(entry_id)}"
                    atomic_write_text(movies / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                else:
                    log.warning("%s", res.message)
                yield res
        finally:
            stop.set()
            ex.shutdown(wait=True, cancel_futures=True)
            if progress:
                progress.close()

    def download(self, entry_id: int | str, out_dir: str | Path, max_movies: int | None = None, workers: int = 4,
                 subdir: str = "data", pattern: str = MOVIE_PATTERN, include_gain: bool | str = False,
                 on_file: Callable[[DownloadResult], None] | None = None, quiet: bool = False) -> DownloadReport:
        """List, select and download an entry's movies (the first ``max_movies`` by name), plus its gain
        reference with ``include_gain`` (True: found by name; a path: that file), calling ``on_file`` for
        each outcome in order.  See :meth:`iter_download`."""
        files, sums = self.plan(entry_id, max_movies, subdir, pattern, include_gain, workers)
        results = []
        for res in self.iter_download(files, out_dir, workers, sums, entry_id=str(entry_id), quiet=quiet):
            results.append(res)
            if on_file is not None:
                on_file(res)
        report = DownloadReport(Path(out_dir) / "Movies", results)
        if report.failed:
            log.warning("%d of %d file(s) could not be downloaded: %s", len(report.failed), len(results),
                        "; ".join(r.message for r in report.failed))
        return report

    def plan(self, entry_id: int | str, max_movies: int | None = None, subdir: str = "data",
             pattern: str = MOVIE_PATTERN, include_gain: bool | str = False,
             workers: int = 4) -> tuple[list[RemoteFile], dict[str, tuple[str, str]]]:
        """The files to download (gain first, then the first ``max_movies`` movies by name, with exact
        sizes) and the published checksums that apply to them."""
        eid = normalise_id(entry_id)
        listing = self.walk(eid, subdir)
        movies = [f for f in listing if match_pattern(f.name, pattern) and not is_checksum_file(f.name)
                  and not is_gain_name(f.name)]
        if not movies:
            raise EmpiarError(f"EMPIAR-{eid}: no files matching '{pattern}' under {subdir}/; check the folder "
                              "(autoproc empiar info --files) or set the movie pattern")
        movies = sorted(movies, key=lambda f: f.path)
        if max_movies is not None:
            if max_movies < 1:
                raise InputError(None, f"--max-movies {max_movies} takes no movies", "give 1 or more")
            movies = movies[:max_movies]
        gains: list[RemoteFile] = []
        if include_gain:
            gains = _find_gain(listing, movies, include_gain, eid, self, subdir)
        files = self.fill_sizes(gains + movies, workers)
        sums = self.published_checksums(listing)
        return files, {f.name: sums[f.name] for f in files if f.name in sums}


def is_gain_name(name: str) -> bool:
    """True for names that gain references have: *gain*, CountRef*, norm-*, *.dm3/*.dm4, *.gain."""
    return bool(re.search(r"gain|countref|^norm[-_]", name, re.IGNORECASE)) or \
        name.lower().endswith((".dm4", ".dm3", ".gain"))


def _find_gain(listing: list[RemoteFile], movies: list[RemoteFile], include_gain: bool | str, eid: str,
               client: EmpiarClient, subdir: str) -> list[RemoteFile]:
    if isinstance(include_gain, str):
        want = include_gain.strip("/")
        hit = [f for f in listing if f.path == want or f.name == want.rsplit("/", 1)[-1]]
        if not hit:
            url = client.entry_url(eid) + quote(want)
            hit = [RemoteFile(want, url)]
        return hit[:1]
    names = {f.path for f in movies}
    hits = [f for f in listing if f.path not in names and not is_checksum_file(f.name) and is_gain_name(f.name)]
    if not hits:
        log.warning("EMPIAR-%s: no gain reference found under %s/ (looked for *gain*, CountRef*, *.dm4, *.gain)",
                    eid, subdir)
    return hits


def _load_manifest(path: Path) -> dict[str, Any]:
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                return data
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); files already downloaded are verified again", path, err)
    return {"files": {}}


def _already_done(f: RemoteFile, movies: Path, manifest: dict[str, Any]) -> DownloadResult | None:
    """A 'present' result when ``f`` is in place: recorded in the manifest with its size, or (when the
    manifest lost it) of the right size and readable.  None means: download it."""
    final = movies / f.name
    if not final.exists():
        return None
    size = final.stat().st_size
    rec = manifest["files"].get(f.name)
    if rec and rec.get("size") == size and (f.size is None or f.size == size):
        return DownloadResult(f, "present", path=final, sha256=rec.get("sha256"), size=size,
                              checked=rec.get("checked", ""))
    if f.size is not None and f.size == size:
        try:
            checked = verify_readable(final, f.name)
        except InputError:
            return None
        sha = hash_file(final, ("sha256",))["sha256"]
        manifest["files"][f.name] = {"remote_path": f.path, "url": f.url, "size": size, "sha256": sha,
                                     "published": None, "checked": checked,
                                     "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return DownloadResult(f, "present", path=final, sha256=sha, size=size, checked=checked)
    return None


def _check_disk(todo: list[RemoteFile], staging: Path, reserve: int, fewer_flag: str) -> None:
    """Raise :class:`InputError` when the files still to fetch do not fit on the disk."""
    if not todo:
        return
    need = 0
    for f in todo:
        part = staging / (f.name + ".part")
        need += max(0, (f.best_size or 0) - (part.stat().st_size if part.exists() else 0))
    free = shutil.disk_usage(staging).free
    if need + reserve <= free:
        return
    sized = [f.best_size for f in todo if f.best_size]
    each = sum(sized) / len(sized) if sized else 0
    fit = int(max(0, free - reserve) // each) if each else 0
    hint = f"take fewer files with {fewer_flag} {fit} (about {human_bytes(each)} each)" if fit else \
        f"free space (each file is about {human_bytes(each)})"
    raise InputError(staging.parent, f"downloading {len(todo)} file(s) needs {human_bytes(need)} but only "
                     f"{human_bytes(free)} is free", f"free space or download elsewhere, or {hint}")


def imagesets_from_xml(text: str) -> list[dict[str, Any]]:
    """Imagesets from an entry's deposition XML, with the API's snake_case field names (``pixelWidth`` ->
    ``pixel_width``); the element names are matched without regard to case or underscores."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise EmpiarError(f"the entry XML is not well-formed ({err})") from None
    out = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag.replace("_", "").lower() != "imageset":
            continue
        d: dict[str, Any] = {}
        for child in el:
            ctag = child.tag.rsplit("}", 1)[-1]
            key = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", ctag).lower()
            d[key] = "".join(child.itertext()).strip()
        out.append(d)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``autoproc empiar`` (``info``, ``download``, ``gain-check``) to a CLI's subcommands."""
    from .empiar_cli import register_parsers

    register_parsers(sub)
