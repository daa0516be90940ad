"""EMPIAR's file tree as data: remote files, HTML index pages, checksum manifests, checks of downloaded
files, and byte progress; the pieces of :mod:`autoproc.empiar` that need no network."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin

from reconstruct.files.errors import InputError

log = logging.getLogger("reconstruct")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A file of an entry: ``path`` relative to the entry (``data/x.tif``), its URL and size in bytes
    (``size`` exact, from the index page or HEAD; ``approx_size`` from a human-readable index like 173M)."""

    path: str
    url: str
    size: int | None = None
    approx_size: int | None = None

    @property
    def name(self) -> str:
        """The file name without folders."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def best_size(self) -> int | None:
        """The exact size if known, else the approximate one."""
        return self.size if self.size is not None else self.approx_size


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KB' (powers of 1000, as disks are sold)."""
    if n is None:
        return "unknown size"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------------------------------------
# index pages


class _IndexParser(HTMLParser):
    """Collects (href, text until the next link) from an Apache/nginx-style directory index page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[list[str]] = []
        self._in_a = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append([href, ""])
                self._in_a = True
        elif tag in ("tr", "br") and self.links:
            self.links[-1][1] += "\n"  # a new row ends the previous entry's text
        elif tag in ("td", "th") and self.links:
            self.links[-1][1] += " "

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._in_a = False

    def handle_data(self, data: str) -> None:
        if self.links and not self._in_a:
            self.links[-1][1] += data


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def parse_size(text: str) -> tuple[int | None, int | None]:
    """(exact, approximate) byte size from an index row's text after the link: '181203456' is exact,
    '173M' approximate (Apache's fancy index, powers of 1024); dates, times and '-' are skipped."""
    first_line = text.strip().split("\n", 1)[0]
    for token in reversed(first_line.split()):
        m = _SIZE.match(token)
        if not m:
            continue
        value, unit = m.group(1), m.group(2).upper()
        if not unit and "." not in value:
            return int(value), int(value)
        return None, int(float(value) * _UNITS[unit])
    return None, None


def parse_index(html: str, page_url: str) -> tuple[list[RemoteFile], list[str]]:
    """Files (with URL and size from the page) and sub-folder URLs listed on one index page.

    Only links below the page's own URL count: the parent link, sorting links (``?C=N;O=D``) and links
    elsewhere are ignored.
    """
    parser = _IndexParser()
    parser.feed(html)
    base = page_url if page_url.endswith("/") else page_url + "/"
    files: list[RemoteFile] = []
    dirs: list[str] = []
    seen: set[str] = set()
    for href, text in parser.links:
        if "?" in href or "#" in href:
            continue
        url = urljoin(base, href)
        if not url.startswith(base) or url == base or url in seen:
            continue
        seen.add(url)
        rel = unquote(url[len(base):])
        if url.endswith("/"):
            if "/" not in rel.rstrip("/"):
                dirs.append(url)
            continue
        if "/" in rel:
            continue
        exact, approx = parse_size(text)
        files.append(RemoteFile(path=rel, url=url, size=exact, approx_size=approx))
    return files, dirs


def match_pattern(name: str, pattern: str) -> bool:
    """True when ``name`` matches one of the comma-separated fnmatch ``pattern``s, ignoring case."""
    return any(fnmatch.fnmatch(name.lower(), p.strip().lower()) for p in pattern.split(",") if p.strip())


# ----------------------------------------------------------------------------------------------------------
# checksum manifests published beside the files (none are known on EMPIAR; we use them where they exist)

_SUMS_NAME = re.compile(r"^(?:(md5|sha1|sha256)sums?(?:\.txt)?|checksums?(?:\.(?:txt|md5|sha1|sha256))?)$"
                        r"|\.(md5|sha1|sha256)$", re.IGNORECASE)
_HEX_ALGO = {32: "md5", 40: "sha1", 64: "sha256"}


def is_checksum_file(name: str) -> bool:
    """True for md5/sha1/sha256 manifests: MD5SUMS, sha256sum.txt, checksums.txt, NAME.md5, ..."""
    return bool(_SUMS_NAME.search(name))


def parse_checksums(text: str, manifest_name: str) -> dict[str, tuple[str, str]]:
    """{file name: (algorithm, hex digest)} from a manifest in coreutils (``HEX  [*]NAME``) or BSD
    (``MD5 (NAME) = HEX``) form; a sidecar ``NAME.md5`` holding a bare digest names NAME."""
    out: dict[str, tuple[str, str]] = {}
    low = manifest_name.lower()
    named_algo = next((a for a in ("sha256", "sha1", "md5") if a in low), None)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(MD5|SHA1|SHA256)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)$", line, re.IGNORECASE)
        if m:
            algo, name, digest = m.group(1).lower(), m.group(2), m.group(3)
        else:
            m = re.match(r"^([0-9a-fA-F]{32,64})(?:\s+\*?(.+))?$", line)
            if not m:
                continue
            digest, name = m.group(1), m.group(2)
            if name is None:
                if not re.search(r"\.(md5|sha1|sha256)$", low):
                    continue
                name = manifest_name.rsplit(".", 1)[0]
            algo = named_algo if named_algo and _HEX_ALGO.get(len(digest)) == named_algo else _HEX_ALGO.get(
                len(digest), "")
        if algo in ("md5", "sha1", "sha256"):
            out[name.strip().rsplit("/", 1)[-1]] = (algo, digest.lower())
    return out


# ----------------------------------------------------------------------------------------------------------
# progress in bytes


class ByteProgress:
    """Thread-safe progress in bytes with ETA: a tqdm bar on a terminal, a log line every ~10% otherwise."""

    def __init__(self, total: int, desc: str, initial: int = 0, quiet: bool = False) -> None:
        self.total, self.desc, self.done = max(total, 1), desc, initial
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._initial = initial
        self._next_log = 0.1
        self._bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True)
        self._quiet = quiet

    def update(self, n: int) -> None:
        """Count ``n`` more bytes (negative to undo a restart)."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif not self._quiet and self.done / self.total >= self._next_log:
                el = time.monotonic() - self._start
                rate = (self.done - self._initial) / el if el > 0 else 0.0
                eta = (self.total - self.done) / rate if rate > 0 else float("nan")
                log.info("%s: %s of %s (%.0f%%), %s/s, ETA %.0f s", self.desc, human_bytes(self.done),
                         human_bytes(self.total), 100 * self.done / self.total, human_bytes(rate), eta)
                self._next_log = min(1.0, (int(self.done / self.total * 10) + 1) / 10)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------------------
# verification of a downloaded file by opening it


def verify_readable(path: Path, name: str | None = None) -> str:
    """Open a downloaded file as what its name says (TIFF, MRC, DM) and describe it; raises
    :class:`InputError` when it is damaged.  Other files are not opened (returns '')."""
    suffix = Path(name or path.name).suffix.lower()
    if suffix in (".tif", ".tiff", ".eer", ".gain"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                n = len(tf.pages)
                shape = tf.pages[0].shape
                if suffix != ".eer":
                    tf.pages[-1].asarray()  # decode the last frame: a truncated file fails here
        except Exception as err:  # tifffile raises many types for damaged files
            raise InputError(path, f"not a readable TIFF file ({type(err).__name__}: {err})",
                             "the download is damaged") from None
        return f"TIFF, {n} page(s) of {shape[-1]}x{shape[-2]}"
    if suffix in (".mrc", ".mrcs"):
        from reconstruct.files.mrc import read_mrc_header

        h = read_mrc_header(path)
        return f"MRC mode {h.mode}, {h.shape[0]} section(s) of {h.shape[2]}x{h.shape[1]}"
    if suffix in (".dm3", ".dm4"):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head not in (b"\x00\x00\x00\x03", b"\x00\x00\x00\x04"):
            raise InputError(path, "not a Gatan DM3/DM4 file (bad header)", "the download is damaged")
        return f"Gatan DM{head[3]}"
    return ""


def hash_file(path: Path, algos: tuple[str, ...]) -> dict[str, str]:
    hs = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK * 4):
            for h in hs.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}
