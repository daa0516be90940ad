"""A loopback imitation of EMPIAR for the client's tests (no real server is ever contacted).

``FakeEmpiar`` runs ``http.server`` in a thread on 127.0.0.1 with a random port and serves:

- the API: ``/empiar/api/entry/<ID>/`` (``<ID>`` as 10288 or EMPIAR-10288), JSON keyed by ``EMPIAR-<ID>``;
- the file tree: ``/empiar/world_availability/<ID>/`` HTML index pages (nginx-like ``<pre>`` with exact
  sizes, Apache-like tables with 173M-style sizes, or no sizes), ``<ID>.xml`` and ``data/...`` with
  HTTP Range (206/416) and HEAD;

with injectable faults: a connection dropped after N bytes of a file, 503 answers, corrupted bytes (same
size), a short file (fewer bytes than the index says), a listed file that answers 404, a server that ignores
Range, HEAD without Content-Length.  Every request is logged in ``requests``.

``write_dm4`` writes a minimal Gatan DM4 image (with a thumbnail, as DM writes them) following the
format's public description, for the gain-reader tests.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import numpy as np

API = "/empiar/api"
TREE = "/empiar/world_availability"


@dataclass
class Faults:
    """What goes wrong, by file path relative to the entry (``data/x.tif``)."""

    drop_after: dict[str, int] = field(default_factory=dict)  # close the connection after N bytes of the file
    drop_times: int = 1  # how many requests of each such file are dropped
    corrupt: set[str] = field(default_factory=set)  # bytes flipped, size kept
    short: dict[str, int] = field(default_factory=dict)  # serve only N bytes (the index says the full size)
    missing: set[str] = field(default_factory=set)  # listed, but 404
    busy: dict[str, int] = field(default_factory=dict)  # answer 503 to the first N GETs of the file
    ignore_range: bool = False
    head_without_length: bool = False
    index_style: str = "pre"  # "pre": exact sizes; "table": Apache-like 173M sizes; "bare": no sizes


class FakeEmpiar:
    """The server; use as a context manager.  ``files`` maps entry-relative paths to contents."""

    def __init__(self, entry_id: str, files: dict[str, bytes], entry: dict[str, Any] | None = None,
                 xml: str | None = None, faults: Faults | None = None) -> None:
        self.entry_id = entry_id
        self.files = dict(files)
        if xml is not None:
            self.files[f"{entry_id}.xml"] = xml.encode()
        self.entry = entry
        self.faults = faults or Faults()
        self.requests: list[tuple[str, str, str | None]] = []
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- URLs ------------------------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_base(self) -> str:
        return self.root + API

    @property
    def files_base(self) -> str:
        return self.root + TREE

    def count(self, method: str, path_part: str) -> int:
        """Requests of ``method`` whose path contains ``path_part``."""
        return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeEmpiar:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- content ---------------------------------------------------------------------------------------------
    def body(self, rel: str) -> bytes:
        data = self.files[rel]
        if rel in self.faults.corrupt:
            arr = bytearray(data)
            for i in range(len(arr) // 3, len(arr), max(1, len(arr) // 50)):
                arr[i] ^= 0xFF
            data = bytes(arr)
        if rel in self.faults.short:
            data = data[: self.faults.short[rel]]
        return data

    def listing(self, rel_dir: str) -> tuple[list[str], list[str]] | None:
        """(sub-folders, files) directly in ``rel_dir`` ('' for the entry root), None if no such folder."""
        prefix = rel_dir.strip("/") + "/" if rel_dir.strip("/") else ""
        dirs, files = set(), []
        found = prefix == ""
        for path in self.files:
            if not path.startswith(prefix):
                continue
            found = True
            rest = path[len(prefix):]
            if "/" in rest:
                dirs.add(rest.split("/", 1)[0])
            else:
                files.append(rest)
        return (sorted(dirs), sorted(files)) if found else None

    def index_html(self, rel_dir: str, dirs: list[str], files: list[str]) -> str:
        style = self.faults.index_style
        title = f"Index of {TREE}/{self.entry_id}/{rel_dir}"
        prefix = rel_dir.strip("/") + "/" if rel_dir.strip("/") else ""
        if style == "table":
            rows = ['<tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th>'
                    '<th><a href="?C=S;O=A">Size</a></th></tr>',
                    '<tr><td><a href="../">Parent Directory</a></td><td>&nbsp;</td><td align="right"> - </td></tr>']
            for d in dirs:
                rows.append(f'<tr><td><a href="{quote(d)}/">{d}/</a></td><td align="right">2019-03-14 10:12  </td>'
                            '<td align="right">  - </td></tr>')
            for f in files:
                rows.append(f'<tr><td><a href="{quote(f)}">{f}</a></td><td align="right">2019-03-14 10:12  </td>'
                            f'<td align="right">{_human(len(self.files[prefix + f]))}</td></tr>')
            return f"<html><head><title>{title}</title></head><body><h1>{title}</h1><table>{''.join(rows)}" \
                   "</table></body></html>"
        lines = ['<a href="../">../</a>']
        for d in dirs:
            lines.append(f'<a href="{quote(d)}/">{d}/</a>{" " * 20}14-Mar-2019 10:12       -')
        for f in files:
            size = "" if style == "bare" else str(len(self.files[prefix + f]))
            lines.append(f'<a href="{quote(f)}">{f}</a>{" " * 20}14-Mar-2019 10:12  {size:>12}')
        return f"<html><head><title>{title}</title></head><body><h1>{title}</h1><hr><pre>" + "\n".join(lines) + \
               "\n</pre><hr></body></html>"


def _human(n: int) -> str:
    for unit in ("", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n}" if unit == "" else f"{n:.0f}{unit}" if n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeEmpiar
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default request log on stderr."""

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _send(self, code: int, body: bytes, ctype: str, head: bool, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        fake = self.fake
        path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        with fake._lock:
            fake.requests.append(("HEAD" if head else "GET", path, rng))
        m = re.fullmatch(rf"{API}/entry/(?:EMPIAR-)?(\d+)/?", path)
        if m:
            if m.group(1) != fake.entry_id or fake.entry is None:
                return self._send(404, b'{"detail":"Not found."}', "application/json", head)
            body = json.dumps({f"EMPIAR-{fake.entry_id}": fake.entry}).encode()
            return self._send(200, body, "application/json", head)
        prefix = f"{TREE}/{fake.entry_id}/"
        if not (path + "/").startswith(prefix):
            return self._send(404, b"not found", "text/plain", head)
        rel = path[len(prefix):]
        if rel in fake.files:
            return self._file(rel, head, rng)
        listing = fake.listing(rel)
        if listing is None:
            return self._send(404, b"not found", "text/plain", head)
        if not path.endswith("/"):
            self.send_response(301)
            self.send_header("Location", path + "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        html = fake.index_html(rel, *listing).encode()
        return self._send(200, html, "text/html", head)

    def _file(self, rel: str, head: bool, rng: str | None) -> None:
        fake = self.fake
        if rel in fake.faults.missing:
            return self._send(404, b"not found", "text/plain", head)
        if not head:
            with fake._lock:
                busy = fake.faults.busy.get(rel, 0) > 0
                if busy:
                    fake.faults.busy[rel] -= 1
            if busy:
                return self._send(503, b"busy", "text/plain", head)
        data = fake.body(rel)
        total = len(data)
        if head:
            self.send_response(200)
            if not fake.faults.head_without_length:
                self.send_header("Content-Length", str(total))
            self.end_headers()
            return None
        start, code, extra = 0, 200, {"Accept-Ranges": "bytes"}
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not fake.faults.ignore_range:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else total - 1
            if start >= total:
                return self._send(416, b"", "text/plain", head, {"Content-Range": f"bytes */{total}"})
            data = data[start:end + 1]
            code = 206
            extra["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{total}"
        drop = fake.faults.drop_after.get(rel)
        with fake._lock:
            do_drop = drop is not None and start < drop and fake._dropped.get(rel, 0) < fake.faults.drop_times
            if do_drop:
                fake._dropped[rel] = fake._dropped.get(rel, 0) + 1
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if do_drop:
            assert drop is not None
            self.wfile.write(data[: drop - start])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        self.wfile.write(data)
        return None


# ----------------------------------------------------------------------------------------------------------
# a minimal Gatan DM4 writer (tags as in the format's public description: big-endian tag structure,
# little-endian values)

def _dm_name(name: str) -> bytes:
    raw = name.encode("latin-1")
    return struct.pack(">H", len(raw)) + raw


def _dm_data(name: str, info: list[int], payload: bytes) -> bytes:
    body = b"%%%%" + struct.pack(">Q", len(info)) + b"".join(struct.pack(">Q", i) for i in info) + payload
    return b"\x15" + _dm_name(name) + struct.pack(">Q", len(body)) + body


def _dm_group(name: str, entries: list[bytes]) -> bytes:
    body = b"\x00\x00" + struct.pack(">Q", len(entries)) + b"".join(entries)
    return b"\x14" + _dm_name(name) + struct.pack(">Q", len(body)) + body


def _dm_f32(name: str, v: float) -> bytes:
    return _dm_data(name, [6], struct.pack("<f", v))


def _dm_u32(name: str, v: int) -> bytes:
    return _dm_data(name, [5], struct.pack("<I", v))


def _dm_i32(name: str, v: int) -> bytes:
    return _dm_data(name, [3], struct.pack("<i", v))


def _dm_text(name: str, text: str) -> bytes:
    return _dm_data(name, [20, 4, len(text)], text.encode("utf-16-le"))


def _dm_image(data: np.ndarray, data_type: int, elem_code: int, name: str) -> bytes:
    ny, nx = data.shape
    cal = [_dm_f32("Origin", 0.0), _dm_f32("Scale", 1.0), _dm_text("Units", "")]
    return _dm_group("", [
        _dm_group("ImageData", [
            _dm_group("Calibrations", [_dm_group("Brightness", cal),
                                       _dm_group("Dimension", [_dm_group("", cal), _dm_group("", cal)])]),
            _dm_data("Data", [20, elem_code, data.size], np.ascontiguousarray(data).tobytes()),
            _dm_i32("DataType", data_type),
            _dm_group("Dimensions", [_dm_u32("", nx), _dm_u32("", ny)]),
            _dm_u32("PixelDepth", data.dtype.itemsize),
        ]),
        _dm_group("ImageTags", []),
        _dm_text("Name", name),
    ])


def write_dm4(path: str | Path, image: np.ndarray) -> None:
    """Write ``image`` (ny, nx) as a float32 Gatan DM4 file, preceded by an RGBA thumbnail as DM does."""
    img = np.asarray(image, dtype="<f4")
    thumb = np.zeros((4, 4), dtype="<u4")
    root = [
        _dm_group("ImageList", [_dm_image(thumb, 23, 5, "thumbnail"), _dm_image(img, 2, 6, "gain")]),
        _dm_group("Thumbnails", [_dm_group("", [_dm_u32("ImageIndex", 0)])]),
    ]
    body = b"\x01\x00" + struct.pack(">Q", len(root)) + b"".join(root)
    Path(path).write_bytes(struct.pack(">I", 4) + struct.pack(">Q", len(body)) + struct.pack(">I", 1) + body
                           + b"\x00" * 8)
