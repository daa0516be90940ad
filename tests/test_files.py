"""RELION file model: round trips, lazy batched reads, and one clear error for each kind of bad input."""

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from reconstruct.files import ImageSource, InputError, read_map, read_particles, write_map, write_stack, write_star
from reconstruct.files.mrc import StackAppender, read_mrc_header
from reconstruct.files.stack import parse_image_name
from reconstruct.files.star import make_optics, read_table


def _project(tmp_path: Path, n: int = 10, box: int = 16, px: float = 2.0, extra: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    write_stack(tmp_path / "Extract" / "a.mrcs", rng.normal(size=(n, box, box)).astype(np.float32), px)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/a.mrcs" for i in range(n)],
        "rlnDefocusU": 10000.0, "rlnDefocusV": 9000.0, "rlnDefocusAngle": 10.0, "rlnOpticsGroup": 1,
        **(extra or {}),
    })
    star = tmp_path / "particles.star"
    write_star(star, {"optics": make_optics(px, box), "particles": parts})
    return star


@pytest.mark.parametrize("dtype,mode", [(np.float32, 2), (np.float16, 12), (np.int16, 1), (np.uint16, 6),
                                        (np.int8, 0)])
def test_mrc_modes_read(tmp_path, dtype, mode):
    data = (np.arange(4 * 8 * 8) % 100).reshape(4, 8, 8).astype(dtype)
    p = tmp_path / f"m{mode}.mrcs"
    with mrcfile.new(p) as m:
        m.set_data(data)
        m.voxel_size = 1.5
    arr, px = read_map(p)
    assert arr.dtype == np.float32 and px == pytest.approx(1.5)
    np.testing.assert_array_equal(arr, data.astype(np.float32))
    assert read_mrc_header(p).mode == mode


def test_write_map_float16_and_header(tmp_path):
    vol = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    write_map(tmp_path / "v.mrc", vol, 1.25, float16=True)
    h = read_mrc_header(tmp_path / "v.mrc")
    assert h.mode == 12 and h.pixel_size == pytest.approx(1.25) and h.is_volume
    back, _ = read_map(tmp_path / "v.mrc")
    np.testing.assert_allclose(back, vol, atol=1e-2)
    assert not list(tmp_path.glob(".*tmp"))


def test_stack_appender_writes_in_batches(tmp_path):
    w = StackAppender(tmp_path / "s.mrcs", 10, 8, 2.0)
    for s in range(0, 10, 4):
        w.write(s, np.full((min(4, 10 - s), 8, 8), s, np.float32))
    w.close()
    arr, px = read_map(tmp_path / "s.mrcs")
    assert arr.shape == (10, 8, 8) and px == pytest.approx(2.0) and arr[9, 0, 0] == 8


def test_star_round_trip_and_lazy_batches(tmp_path, monkeypatch):
    star = _project(tmp_path, n=25)
    monkeypatch.chdir(tmp_path)
    table = read_particles(star)
    assert len(table) == 25 and table.image_pixel_size() == 2.0
    assert table.optics_value("rlnVoltage").tolist() == [300.0] * 25
    with ImageSource(table) as src:
        seen = [rows for rows, _ in src.batches(10)]
        assert [len(r) for r in seen] == [10, 10, 5]
        full, _ = read_map(tmp_path / "Extract" / "a.mrcs")
        np.testing.assert_array_equal(src.read([24, 3]), full[[24, 3]])


def test_paths_resolve_relative_to_star_directory(tmp_path, monkeypatch):
    star = _project(tmp_path)
    monkeypatch.chdir("/")
    with ImageSource(read_particles(star)) as src:
        assert src.read([0]).shape == (1, 16, 16)


def test_parse_image_name_unpadded():
    assert parse_image_name("12@x.mrcs") == (11, "x.mrcs")
    assert parse_image_name("000001@a/b.mrcs") == (0, "a/b.mrcs")
    assert parse_image_name("single.mrc") == (0, "single.mrc")
    with pytest.raises(InputError):
        parse_image_name("0@x.mrcs")


def test_legacy_star_converted(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnVoltage": [200.0], "rlnSphericalAberration": [2.0],
                       "rlnAmplitudeContrast": [0.1], "rlnDetectorPixelSize": [5.0], "rlnMagnification": [50000.0],
                       "rlnOriginX": [2.0], "rlnOriginY": [-1.0]})
    write_star(tmp_path / "old.star", {"": df})
    t = read_particles(tmp_path / "old.star")
    assert t.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.0)
    assert t.data["rlnOriginXAngst"].iloc[0] == pytest.approx(2.0)
    assert t.optics["rlnVoltage"].iloc[0] == 200.0


# ---- bad input: one clear error naming the file --------------------------------------------------

def test_missing_column(tmp_path):
    star = _project(tmp_path)
    with pytest.raises(InputError, match=r"missing column.*rlnAngleRot"):
        read_particles(star, required=("rlnImageName", "rlnAngleRot"))


def test_unknown_optics_group(tmp_path):
    star = _project(tmp_path, extra={"rlnOpticsGroup": 2})
    with pytest.raises(InputError, match=r"optics group\(s\) \[2\]"):
        read_particles(star)


def test_nan_in_star(tmp_path):
    star = _project(tmp_path, n=3, extra={"rlnDefocusU": [1.0, np.nan, 2.0]})
    with pytest.raises(InputError, match="rlnDefocusU has 1 NaN"):
        read_particles(star)


def test_wrong_block(tmp_path):
    write_star(tmp_path / "m.star", {"micrographs": pd.DataFrame({"rlnMicrographName": ["a.mrc"]})})
    with pytest.raises(InputError, match="no data_particles block"):
        read_table(tmp_path / "m.star", "particles")


def test_not_a_star_file(tmp_path):
    (tmp_path / "x.star").write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError, match=r"x.star"):
        read_particles(tmp_path / "x.star")


def test_index_out_of_range(tmp_path, monkeypatch):
    star = _project(tmp_path, n=3)
    t = read_particles(star)
    t.data.loc[2, "rlnImageName"] = "000009@Extract/a.mrcs"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="image number 9 is out of range: the stack holds 3"):
        ImageSource(t)


def test_pixel_size_disagrees(tmp_path, monkeypatch):
    star = _project(tmp_path)
    t = read_particles(star)
    t.optics.loc[0, "rlnImagePixelSize"] = 1.1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"pixel size 2.0000 Å in the MRC header disagrees"):
        ImageSource(t)


def test_truncated_mrc(tmp_path):
    write_stack(tmp_path / "t.mrcs", np.ones((4, 16, 16), np.float32), 1.0)
    raw = (tmp_path / "t.mrcs").read_bytes()
    (tmp_path / "t.mrcs").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_map(tmp_path / "t.mrcs")


def test_corrupt_header(tmp_path):
    (tmp_path / "c.mrc").write_bytes(b"\x07" * 2000)
    with pytest.raises(InputError, match=r"c.mrc"):
        read_map(tmp_path / "c.mrc")


def test_nan_pixels(tmp_path, monkeypatch):
    star = _project(tmp_path, n=4)
    data, _ = read_map(tmp_path / "Extract" / "a.mrcs")
    data[2, 3, 3] = np.nan
    with mrcfile.open(tmp_path / "Extract" / "a.mrcs", "r+") as m:
        m.data[:] = data
    monkeypatch.chdir(tmp_path)
    with ImageSource(read_particles(star)) as src:
        src.read([0, 1])
        with pytest.raises(InputError, match=r"1 particle image.*NaN.*000003@Extract/a.mrcs"):
            src.read([1, 2, 3])
    with pytest.raises(InputError, match="NaN or infinite"):
        read_map(tmp_path / "Extract" / "a.mrcs")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_map(tmp_path / "nope.mrc")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_map(tmp_path / "bad.mrc", np.full((4, 4, 4), np.nan, np.float32), 1.0)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_old_file(tmp_path, monkeypatch):
    write_map(tmp_path / "v.mrc", np.ones((4, 4, 4), np.float32), 1.0)
    import mrcfile as mf

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mf, "new", broken)
    with pytest.raises(OSError, match="No space"):
        write_map(tmp_path / "v.mrc", np.zeros((4, 4, 4), np.float32), 1.0)
    monkeypatch.undo()
    data, _ = read_map(tmp_path / "v.mrc")
    assert data.max() == 1.0 and [p.name for p in tmp_path.iterdir()] == ["v.mrc"]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Outputs are readable as a plain open() would make them (0666 less the umask), not owner-only as a
    temporary file is, and a rewritten file keeps the mode it had; a failed write leaves no temporary file."""
    import os

    from reconstruct.files.atomic import atomic_path

    umask = os.umask(0o022)
    os.umask(umask)
    write_map(tmp_path / "v.mrc", np.ones((4, 4, 4), np.float32), 1.0)
    write_star(tmp_path / "t.star", {"": pd.DataFrame({"rlnClassNumber": [1, 2]})})
    for name in ("v.mrc", "t.star"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(tmp_path / "v.mrc", 0o640)
    write_map(tmp_path / "v.mrc", np.zeros((4, 4, 4), np.float32), 1.0)
    assert (tmp_path / "v.mrc").stat().st_mode & 0o777 == 0o640
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "t.star") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.star", "v.mrc"]


def test_legacy_star_mixed_optics_make_groups(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"], "rlnVoltage": [300.0, 200.0, 300.0],
                       "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
                       "rlnDetectorPixelSize": 5.0, "rlnMagnification": 50000.0})
    write_star(tmp_path / "old.star", {"": df})
    t = read_particles(tmp_path / "old.star")
    assert len(t.optics) == 2 and t.data.rlnOpticsGroup.tolist() == [1, 2, 1]
    assert t.optics_value("rlnVoltage").tolist() == [300.0, 200.0, 300.0]


def test_non_numeric_cell(tmp_path):
    star = _project(tmp_path, n=3, extra={"rlnDefocusU": ["1.0", "abc", "2.0"]})
    with pytest.raises(InputError, match=r"rlnDefocusU row 2 holds 'abc', not a number"):
        read_particles(star)


def test_nan_in_optics(tmp_path):
    star = _project(tmp_path)
    t = read_particles(star)
    t.optics.loc[0, "rlnVoltage"] = np.nan
    write_star(tmp_path / "p2.star", t.to_blocks())
    with pytest.raises(InputError, match="data_optics column rlnVoltage has 1 NaN"):
        read_particles(tmp_path / "p2.star")


def test_impossible_optics(tmp_path):
    from reconstruct.particles import CtfSource

    star = _project(tmp_path)
    t = read_particles(star)
    t.optics.loc[0, "rlnAmplitudeContrast"] = 1.5
    with pytest.raises(InputError, match="impossible values"):
        CtfSource(t, 16, 2.0)


def test_unknown_pixel_size_and_wrong_image_size(tmp_path, monkeypatch):
    star = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    t = read_particles(star)
    t.optics.loc[0, "rlnImageSize"] = 32
    with pytest.raises(InputError, match=r"rlnImageSize \[32\] disagrees with the 16-px images"):
        ImageSource(t)
    t = read_particles(star)
    t.optics = t.optics.drop(columns=["rlnImagePixelSize"])
    with mrcfile.open(tmp_path / "Extract" / "a.mrcs", "r+") as m:
        m.voxel_size = 0.0
    with pytest.raises(InputError, match="the pixel size is unknown"):
        ImageSource(t)
