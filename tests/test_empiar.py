"""The EMPIAR client against a loopback imitation of EMPIAR (tests/empiar_server.py), the acquisition
merge, and the gain reader and orientation check."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from empiar_server import FakeEmpiar, Faults, write_dm4

from autoproc import empiar as em
from autoproc.acquisition import normalise_id, resolve_acquisition
from autoproc.empiar import EmpiarClient, EmpiarError, imagesets_from_xml
from autoproc.empiar_files import parse_checksums, parse_size
from autoproc.gain import (
    check_gain_files,
    check_gain_orientation,
    convert_gain_to_mrc,
    normalise_orientation,
    orient_gain,
    read_gain,
)
from reconstruct.files.errors import InputError

ENTRY = {
    "title": "CB1-Gi complex (loopback imitation)",
    "release_date": "2019-03-14",
    "dataset_size": "476.0 GB",
    "entry_doi": "10.6019/EMPIAR-10288",
    "imagesets": [{
        "name": "Multi-frame micrographs of CB1", "directory": "/data", "category": "micrographs - multiframe",
        "header_format": "TIFF", "data_format": "TIFF", "num_images_or_tilt_series": 5, "frames_per_image": 3,
        "voxel_type": "UNSIGNED BYTE", "pixel_width": 0.87, "pixel_height": 0.87, "details": "",
        "image_width": 32, "image_height": 24}],
}
XML = """<?xml version="1.0"?><entry accessionCode="EMPIAR-10288"><admin><title>CB1</title></admin>
<imageSet><name>movies</name><directory>/data</directory><category>micrographs - multiframe</category>
<dataFormat>TIFF</dataFormat><framesPerImage>3</framesPerImage><pixelWidth>0.87</pixelWidth></imageSet></entry>"""

MOVIES = ["CB1__00004_Feb18_23.29.42.tif", "CB1__00006_Feb18_23.39.55.tif", "CB1__00007_Feb18_23.41.02.tif",
          "CB1__00010_Feb18_23.50.13.tif", "CB1__00012_Feb18_23.58.40.tif"]


def _tiff(seed: int, frames: int = 3, shape: tuple[int, int] = (24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.integers(0, 255, (frames, *shape), dtype=np.uint8), photometric="minisblack")
    return buf.getvalue()


def _mrc(tmp: Path, seed: int) -> bytes:
    p = tmp / f"m{seed}.mrc"
    with mrcfile.new(p, overwrite=True) as m:
        m.set_data(np.random.default_rng(seed).normal(size=(3, 24, 32)).astype(np.float32))
    return p.read_bytes()


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, bytes]:
    files = {f"data/{n}": _tiff(i) for i, n in enumerate(MOVIES)}
    files["data/CountRef_CB1__00000_Feb18_23.26.46.dm4"] = b"\x00\x00\x00\x04" + bytes(60)
    files["data/notes.txt"] = b"not a movie"
    return files


def _client(srv: FakeEmpiar, **kw: object) -> EmpiarClient:
    return EmpiarClient(srv.api_base, srv.files_base, timeout=5.0, backoff=0.01, **kw)  # type: ignore[arg-type]


def test_entry_metadata_and_xml(tree: dict[str, bytes]) -> None:
    with FakeEmpiar("10288", tree, ENTRY, XML) as srv, _client(srv) as c:
        for form in (10288, "10288", "EMPIAR-10288"):
            e = c.entry(form)
            assert e.accession == "EMPIAR-10288" and e.title.startswith("CB1-Gi")
            assert e.imagesets[0]["pixel_width"] == 0.87 and e.imagesets[0]["frames_per_image"] == 3
        assert "<pixelWidth>0.87" in c.xml("EMPIAR-10288")
        sets = imagesets_from_xml(c.xml(10288))
        assert sets[0]["pixel_width"] == "0.87" and sets[0]["frames_per_image"] == "3"
        with pytest.raises(EmpiarError, match="EMPIAR-10999 not found"):
            c.entry(10999)
    assert normalise_id("empiar_010288") == "10288"
    with pytest.raises(InputError, match="not an EMPIAR accession"):
        normalise_id("PDB-1abc")


@pytest.mark.parametrize("style,head_len", [("pre", True), ("table", True), ("bare", False)])
def test_listing_nested_index_pages(tmp_path: Path, style: str, head_len: bool) -> None:
    files = {"data/a.tif": _tiff(1), "data/sub/b.tif": _tiff(2), "data/sub/deeper/c.tiff": _tiff(3, frames=5),
             "data/sub/deeper/c.mrc": _mrc(tmp_path, 4), "data/sub/readme.txt": b"x" * 3000, "10288.xml": b"<a/>"}
    faults = Faults(index_style=style, head_without_length=not head_len)
    with FakeEmpiar("10288", files, ENTRY, faults=faults) as srv, _client(srv) as c:
        got = c.list_files(10288, "data", "*.tif,*.tiff")
        assert [f.path for f in got] == ["data/a.tif", "data/sub/b.tif", "data/sub/deeper/c.tiff"]
        assert [f.size for f in got] == [len(files[f.path]) for f in got]
        every = c.walk("10288", "data")
        assert {f.path for f in every} == {p for p in files if p.startswith("data/")}
        if style == "pre":
            assert srv.count("HEAD", "/data/") == 0  # exact sizes from the index: no HEAD needed
        else:
            assert srv.count("HEAD", "/data/") == 3
    assert parse_size("  2019-03-14 10:12  173M ") == (None, 173 * 1024**2)
    assert parse_size(" 14-Mar-2019 10:12   181203456") == (181203456, 181203456)
    assert parse_size(" 2019-03-14 10:12  - ") == (None, None)


def test_parallel_download_verifies_and_resumes_nothing_twice(tmp_path: Path, tree: dict[str, bytes]) -> None:
    tree = dict(tree)
    tree["data/CB1__00013_Feb19_00.01.00.mrc"] = _mrc(tmp_path, 9)
    tree["data/norm-gatandata-0.mrc"] = _mrc(tmp_path, 10)  # a gain reference: matches *.mrc, is no movie
    out = tmp_path / "proj"
    seen: list[str] = []
    with FakeEmpiar("10288", tree, ENTRY) as srv, _client(srv) as c:
        rep = c.download(10288, out, workers=3, pattern="*.tif,*.mrc", on_file=lambda r: seen.append(r.remote.name),
                         quiet=True)
        assert [r.status for r in rep.results] == ["downloaded"] * 6
        assert seen == sorted(seen) and len(seen) == 6  # in name order, as each became available
        manifest = json.loads((out / "Movies" / em.MANIFEST).read_text())
        for r in rep.results:
            data = tree[r.remote.path]
            assert r.path == out / "Movies" / r.remote.name and r.path.read_bytes() == data
            assert manifest["files"][r.remote.name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert "TIFF, 3 page(s) of 32x24" in manifest["files"][MOVIES[0]]["checked"]
        assert not list((out / "Movies" / em.PARTIAL).iterdir())
        gets = srv.count("GET", "/data/CB1")
        rep2 = c.download("EMPIAR-10288", out, workers=3, pattern="*.tif,*.mrc", quiet=True)
        assert [r.status for r in rep2.results] == ["present"] * 6
        assert srv.count("GET", "/data/CB1") == gets  # nothing fetched again


def test_dropped_connection_and_killed_download_resume(tmp_path: Path, tree: dict[str, bytes]) -> None:
    first, second = f"data/{MOVIES[0]}", f"data/{MOVIES[1]}"
    faults = Faults(drop_after={first: 1500})
    out = tmp_path / "proj"
    # a killed earlier run left the first 1000 bytes of the second movie
    part = out / "Movies" / em.PARTIAL / (MOVIES[1] + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tree[second][:1000])
    with FakeEmpiar("10288", tree, ENTRY, faults=faults) as srv, _client(srv) as c:
        files, _ = c.plan(10288, max_movies=2, pattern="*.tif")
        results = list(c.iter_download(files, out, workers=2, quiet=True))
        assert [r.status for r in results] == ["downloaded", "downloaded"]
        assert (out / "Movies" / MOVIES[0]).read_bytes() == tree[first]
        assert (out / "Movies" / MOVIES[1]).read_bytes() == tree[second]
        ranges = [rng for m, p, rng in srv.requests if m == "GET" and p.endswith(MOVIES[0])]
        assert ranges == [None, "bytes=1500-"]  # dropped at byte 1500, resumed from there
        assert [rng for m, p, rng in srv.requests if m == "GET" and p.endswith(MOVIES[1])] == ["bytes=1000-"]


def test_server_ignoring_range_restarts_the_file(tmp_path: Path, tree: dict[str, bytes]) -> None:
    first = f"data/{MOVIES[0]}"
    with FakeEmpiar("10288", tree, ENTRY, faults=Faults(drop_after={first: 1500}, ignore_range=True)) as srv, \
            _client(srv) as c:
        rep = c.download(10288, tmp_path, max_movies=1, pattern="*.tif", quiet=True)
        assert rep.results[0].status == "downloaded"
        assert (tmp_path / "Movies" / MOVIES[0]).read_bytes() == tree[first]


def test_wrong_checksum_and_size_are_reported(tmp_path: Path, tree: dict[str, bytes]) -> None:
    tree = dict(tree)
    sums = "".join(f"{hashlib.md5(tree[f'data/{n}']).hexdigest()}  {n}\n" for n in MOVIES)
    tree["data/MD5SUMS"] = sums.encode()
    bad, short = f"data/{MOVIES[1]}", f"data/{MOVIES[3]}"
    faults = Faults(corrupt={bad}, short={short: 700})
    with FakeEmpiar("10288", tree, ENTRY, faults=faults) as srv, _client(srv) as c:
        rep = c.download(10288, tmp_path, workers=2, pattern="*.tif", quiet=True)
        status = {r.remote.name: r for r in rep.results}
        assert status[MOVIES[1]].status == "failed"
        assert "md5" in status[MOVIES[1]].message and "differs from the published" in status[MOVIES[1]].message
        assert "downloaded twice" in status[MOVIES[1]].message
        assert status[MOVIES[3]].status == "failed" and "but the listing says" in status[MOVIES[3]].message
        assert srv.count("GET", MOVIES[1]) == 2  # deleted and downloaded once more, then given up
        assert [r.remote.name for r in rep.done] == [MOVIES[0], MOVIES[2], MOVIES[4]]
        assert not (tmp_path / "Movies" / MOVIES[1]).exists() and not (tmp_path / "Movies" / MOVIES[3]).exists()
        manifest = json.loads((tmp_path / "Movies" / em.MANIFEST).read_text())
        assert manifest["files"][MOVIES[0]]["published"][0] == "md5"
    assert parse_checksums("MD5 (x.tif) = " + "a" * 32, "checksums.txt") == {"x.tif": ("md5", "a" * 32)}
    assert parse_checksums("b" * 64 + "\n", "y.tif.sha256") == {"y.tif": ("sha256", "b" * 64)}


def test_404_skips_the_file_and_the_rest_continue(tmp_path: Path, tree: dict[str, bytes]) -> None:
    faults = Faults(missing={f"data/{MOVIES[2]}"}, busy={f"data/{MOVIES[4]}": 2})
    with FakeEmpiar("10288", tree, ENTRY, faults=faults) as srv, _client(srv) as c:
        rep = c.download(10288, tmp_path, workers=2, pattern="*.tif", quiet=True)
        assert [r.status for r in rep.results] == ["downloaded", "downloaded", "missing", "downloaded", "downloaded"]
        assert "HTTP 404" in rep.failed[0].message and MOVIES[2] in rep.failed[0].message
        assert srv.count("GET", MOVIES[4]) == 3  # two 503 answers retried with backoff
        assert (tmp_path / "Movies" / MOVIES[4]).read_bytes() == tree[f"data/{MOVIES[4]}"]


def test_max_movies_takes_the_first_by_name_and_gain(tmp_path: Path, tree: dict[str, bytes]) -> None:
    with FakeEmpiar("10288", tree, ENTRY) as srv, _client(srv) as c:
        files, _ = c.plan(10288, max_movies=2, pattern="*.tif", include_gain=True)
        assert [f.name for f in files] == ["CountRef_CB1__00000_Feb18_23.26.46.dm4", MOVIES[0], MOVIES[1]]
        rep = c.download(10288, tmp_path, max_movies=3, pattern="*.tif", quiet=True)
        assert sorted(p.name for p in (tmp_path / "Movies").glob("*.tif")) == MOVIES[:3]
        assert srv.count("GET", MOVIES[3]) == 0 and len(rep.done) == 3


def test_insufficient_disk_space(tmp_path: Path, tree: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    real = shutil.disk_usage(tmp_path)
    each = len(tree[f"data/{MOVIES[0]}"])
    fake = type(real)(real.total, real.total - 10, 64 * 1024**2 + int(2.5 * each))
    monkeypatch.setattr(em.shutil, "disk_usage", lambda p: fake)
    with FakeEmpiar("10288", tree, ENTRY) as srv, _client(srv) as c:
        with pytest.raises(InputError, match=r"needs .* but only .* is free.*--max-movies 2"):
            c.download(10288, tmp_path, pattern="*.tif", quiet=True)
        assert srv.count("GET", "/data/CB1") == 0  # nothing downloaded


def test_acquisition_merge_order_and_missing_values() -> None:
    acq = resolve_acquisition(10288)
    assert (acq.pixel_size, acq.voltage, acq.cs, acq.symmetry, acq.particle_diameter) == (0.86, 300, 2.7, "C1", 160)
    assert "Table 1" in acq.sources["pixel_size"] and acq.amplitude_contrast == 0.1
    acq = resolve_acquisition("EMPIAR-10288", ENTRY["imagesets"], metadata_source="EMPIAR-10288 entry JSON")
    assert acq.pixel_size == 0.87 and "entry JSON" in acq.sources["pixel_size"]  # metadata beats the table
    assert acq.movie_dir == "data" and acq.movie_glob == "*.tif,*.tiff" and acq.n_frames == 3
    acq = resolve_acquisition(10288, ENTRY["imagesets"], {"pixel_size": 0.9, "symmetry": None})
    assert acq.pixel_size == 0.9 and acq.sources["pixel_size"] == "flag --angpix" and acq.symmetry == "C1"
    with pytest.raises(InputError, match=r"EMPIAR-10028: no value for dose per frame \(--dose-per-frame\)"):
        resolve_acquisition(10028)
    assert resolve_acquisition(10028, overrides={"dose_per_frame": 1.1}).dose_per_frame == 1.1
    with pytest.raises(InputError, match=r"dose per frame \(--dose\).*set --dose VALUE"):  # autoproc run's names
        resolve_acquisition(10028, flags={"dose_per_frame": "--dose"})
    with pytest.raises(InputError) as err:
        resolve_acquisition(99999, ENTRY["imagesets"])
    for flag in ("--kV", "--Cs", "--sym", "--particle-diameter", "--dose-per-frame"):
        assert flag in str(err.value)
    assert "--angpix" not in str(err.value)  # the metadata gave the pixel size
    with pytest.raises(InputError, match="gain flip 3"):
        resolve_acquisition(10288, overrides={"gain_flip": 3})


def test_orient_gain_matches_relion_imageop() -> None:
    a = np.arange(12).reshape(3, 4)
    ny, nx = a.shape
    r90, r270 = np.zeros((nx, ny), int), np.zeros((nx, ny), int)
    for y in range(ny):
        for x in range(nx):
            r90[x, ny - 1 - y] = a[y, x]  # RELION ImageOp::rotate90
            r270[nx - 1 - x, y] = a[y, x]  # ImageOp::rotate270
    assert np.array_equal(orient_gain(a, 1, 0), r90) and np.array_equal(orient_gain(a, 3, 0), r270)
    assert np.array_equal(orient_gain(a, 0, 1), a[::-1]) and np.array_equal(orient_gain(a, 0, 2), a[:, ::-1])
    assert np.array_equal(orient_gain(a, 1, 1), r90[::-1])  # flip after rotation
    for r in range(4):
        assert np.array_equal(orient_gain(a, r, 2), orient_gain(a, *normalise_orientation(r, 2)))


def _synthetic_gain(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = 1 + 0.06 * rng.normal(size=shape)
    g *= 1 + 0.04 * np.sin(np.arange(shape[1]) / 2.3)[None, :]  # column pattern
    g[: shape[0] // 3, : shape[1] // 4] *= 1.05  # an asymmetric patch
    return g.astype(np.float32)


@pytest.mark.parametrize("shape,true", [((48, 64), (0, 1)), ((48, 48), (1, 0)), ((40, 40), (3, 1))])
def test_gain_check_finds_the_orientation(shape: tuple[int, int], true: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    gain = _synthetic_gain(shape, 3)
    flux = 12.0 * (1 + 0.2 * np.linspace(-1, 1, shape[1]))[None, :]  # uneven illumination
    frames = rng.poisson(flux / orient_gain(gain, *true), size=(20, *shape))
    res = check_gain_orientation(gain, frames.mean(0), current=(0, 0))
    assert res.best == true and res.conclusive and res.recommended == true
    assert res.correlation[true] > 0.5 and res.residual[true] < 0.9
    assert f"--gain-rot {true[0]} --gain-flip {true[1]}" in res.message()
    same = check_gain_orientation(gain, frames.mean(0), current=true)
    assert same.recommended is None and "fits best" in same.message()


def test_gain_files_tiff_mrc_dm4_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gain = _synthetic_gain((24, 32), 5)
    rng = np.random.default_rng(1)
    movies = []
    for i in range(2):
        p = tmp_path / f"m{i}.tif"
        tifffile.imwrite(p, rng.poisson(30.0 / gain[::-1], size=(8, 24, 32)).astype(np.uint8),
                         photometric="minisblack")  # needs flip 1
        movies.append(p)
    tifffile.imwrite(tmp_path / "gain.tif", gain)
    assert np.array_equal(read_gain(tmp_path / "gain.tif"), gain)
    convert_gain_to_mrc(tmp_path / "gain.tif", tmp_path / "gain.mrc")
    assert np.array_equal(read_gain(tmp_path / "gain.mrc"), gain)
    res = check_gain_files(tmp_path / "gain.mrc", str(tmp_path / "m*.tif"))
    assert res.recommended == (0, 1)
    write_dm4(tmp_path / "gain.dm4", gain)
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)  # as if rosettasciio were not installed
    with pytest.raises(InputError, match="needs the optional package rosettasciio"):
        read_gain(tmp_path / "gain.dm4")
    monkeypatch.undo()
    pytest.importorskip("rsciio.digitalmicrograph")
    assert np.array_equal(read_gain(tmp_path / "gain.dm4"), gain)  # the image, not the thumbnail before it
    (tmp_path / "bad.dm4").write_bytes(b"\x00\x00\x00\x04" + bytes(30))
    with pytest.raises(InputError, match="not a readable Gatan DM file"):
        read_gain(tmp_path / "bad.dm4")


def test_cli_info_and_download(tmp_path: Path, tree: dict[str, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    from reconstruct.cli import run_command

    parser = argparse.ArgumentParser(prog="autoproc")
    sub = parser.add_subparsers(dest="command", required=True)
    em.register(sub)
    with FakeEmpiar("10288", tree, ENTRY, XML) as srv:
        base = ["--api-base", srv.api_base, "--files-base", srv.files_base, "--retries", "1"]
        assert run_command(parser, ["empiar", "info", "EMPIAR-10288", "--files", *base]) == 0
        text = capsys.readouterr().out
        assert "EMPIAR-10288: CB1-Gi complex" in text and "micrographs - multiframe" in text
        assert "files: 5 matching '*.tif,*.tiff' under data/" in text
        assert "pixel_size" in text and "0.87" in text and "entry JSON" in text and "Table 1" in text
        out = tmp_path / "dl"
        assert run_command(parser, ["empiar", "download", "10288", "--o", str(out), "--max-movies", "2",
                                    "--download-workers", "2", *base]) == 0
        assert sorted(p.name for p in (out / "Movies").glob("*.tif")) == MOVIES[:2]
        assert run_command(parser, ["empiar", "info", "10999", *base]) == 0  # no metadata: table-less, says so
        assert "MISSING" in capsys.readouterr().out
    assert run_command(parser, ["empiar", "gain-check", "--gain", str(tmp_path / "none.mrc"), "--movies", "x"]) == 2


def test_cli_download_with_gain_converts_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reconstruct.cli import run_command

    gain = _synthetic_gain((24, 32), 11)
    rng = np.random.default_rng(2)
    files = {}
    for name in MOVIES[:3]:
        buf = io.BytesIO()
        tifffile.imwrite(buf, rng.poisson(40.0 / gain, size=(10, 24, 32)).astype(np.uint8), photometric="minisblack")
        files[f"data/{name}"] = buf.getvalue()
    write_dm4(tmp_path / "g.dm4", gain)
    files["data/CountRef_CB1__00000_Feb18_23.26.46.dm4"] = (tmp_path / "g.dm4").read_bytes()
    parser = argparse.ArgumentParser(prog="autoproc")
    em.register(parser.add_subparsers(dest="command", required=True))
    with FakeEmpiar("10288", files, ENTRY) as srv:
        out = tmp_path / "dl"
        assert run_command(parser, ["empiar", "download", "10288", "--o", str(out), "--include-gain",
                                    "--api-base", srv.api_base, "--files-base", srv.files_base]) == 0
    text = capsys.readouterr().out
    assert (out / "Movies" / "CountRef_CB1__00000_Feb18_23.26.46.dm4").exists()
    try:
        import rsciio.digitalmicrograph  # noqa: F401
    except ImportError:
        assert "not converted" in text and "rosettasciio" in text
    else:
        assert np.array_equal(read_gain(out / "Movies" / "CountRef_CB1__00000_Feb18_23.26.46.mrc"), gain)
        assert "--gain-rot 0 --gain-flip 0 fits best" in text


def test_run_settings_come_from_the_entry_and_movies_stream_in(tmp_path: Path, tree: dict[str, bytes]) -> None:
    from autoproc.empiar_run import start_empiar
    from autoproc.shipped_schemes import Settings

    tree = {k: v for k, v in tree.items() if not k.endswith(".dm4")}
    (tmp_path / "gain.mrc").write_bytes(_mrc(tmp_path, 5))
    with FakeEmpiar("10288", tree, ENTRY, XML) as srv, _client(srv) as c:
        with pytest.raises(InputError, match="--dose"):  # 10288's dose is built in; 10999 has nothing
            start_empiar(tmp_path / "none", "10999", {}, Settings(), 2, 2, c)
        assert srv.count("GET", "/data/CB1") == 0  # nothing downloaded before the check
        with pytest.raises(EmpiarError, match="gain reference"):  # the built-in gain is not on this server
            start_empiar(tmp_path / "nogain", "10288", {}, Settings(), 1, 2, c)
        st, dl = start_empiar(tmp_path, "EMPIAR-10288", {"particle_diameter": 150.0, "gain_reference": "gain.mrc"},
                              Settings(), 3, 2, c)
        dl.thread.join(30)
    assert st.gain == "gain.mrc"
    assert dl.finished() and dl.error is None
    assert (st.angpix, st.particle_diameter, st.voltage, st.symmetry) == (0.87, 150.0, 300.0, "C1")
    assert st.movies == "Movies/*.tif" and sorted(p.name for p in (tmp_path / "Movies").glob("*.tif")) == MOVIES[:3]
