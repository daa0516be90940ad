"""Rigid map alignment: a rotated, shifted (and mirrored) noisy copy of a map is put back."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ADK_OPEN, model_map
from scipy.spatial.transform import Rotation

from reconstruct.align_maps import MIRROR, align_maps, transform_map
from reconstruct.cli import main as reconstruct_main
from reconstruct.files import read_map, write_map
from reconstruct.fsc import resolution_at
from reconstruct.symmetry import symmetrise_map, symmetry_operators
from reconstruct.symmetry_align import align_symmetry


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    d = a @ b.T
    return float(np.degrees(np.arccos(np.clip((np.trace(d) - 1) / 2, -1, 1))))


@pytest.mark.parametrize("mirror", [False, True])
def test_recovers_rotation_shift_and_hand(mirror):
    ref = model_map(ADK_OPEN, 40, 2.0)
    rot = Rotation.from_euler("zyz", [123, 64, -37], degrees=True).as_matrix()
    m = rot @ MIRROR if mirror else rot
    shift = np.array([2.5, -1.5, 3.0])
    rng = np.random.default_rng(1)
    moving = transform_map(ref, m, shift, order=3) + rng.normal(0, 0.1 * ref.std(), ref.shape)
    res = align_maps(moving, ref, 2.0)
    assert res.mirrored == mirror
    assert _angle(res.rotation, np.linalg.inv(m)) < 2.0
    # the aligned map matches the reference to near Nyquist (noise only)
    assert resolution_at(res.fsc, 40, 2.0, 0.5).angstrom < 3 * 2.0
    assert res.correlation > 0.95


def test_align_maps_command(tmp_path, capsys):
    ref = model_map(ADK_OPEN, 40, 2.0)
    rot = Rotation.from_euler("zyz", [10, 100, 50], degrees=True).as_matrix()
    write_map(tmp_path / "ref.mrc", ref, 2.0)
    write_map(tmp_path / "mov.mrc", transform_map(ref, rot, np.array([1.0, 0.0, -2.0]), order=3), 2.0)
    assert reconstruct_main(["align-maps", str(tmp_path / "mov.mrc"), str(tmp_path / "ref.mrc"),
                             "--o", str(tmp_path / "aligned.mrc"), "--plot", str(tmp_path / "fsc.png")]) == 0
    out = capsys.readouterr().out
    assert "FSC after alignment = 0.5" in out and "other hand" not in out
    aligned, px = read_map(tmp_path / "aligned.mrc")
    assert px == pytest.approx(2.0) and aligned.shape == ref.shape
    assert np.corrcoef(aligned.ravel(), ref.ravel())[0, 1] > 0.97
    write_map(tmp_path / "small.mrc", ref[:32, :32, :32], 2.0)
    assert reconstruct_main(["align-maps", str(tmp_path / "small.mrc"), str(tmp_path / "ref.mrc"),
                             "--o", str(tmp_path / "x.mrc")]) == 2


def _symmetric_assembly(group: str) -> np.ndarray:
    """A point-group assembly of an off-centre adenylate kinase, in RELION's frame for ``group``."""
    mono = transform_map(model_map(ADK_OPEN, 40, 3.0), np.eye(3), np.array([6.0, 3.0, 1.5]), order=3)
    return symmetrise_map(mono, group)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["C4", "D2"])
def test_symmetry_alignment_recovers_a_known_rotation(group, tmp_path, capsys):
    """The assembly turned by a known rotation and shifted is put back into the group's frame within 2°
    (up to the frame's own ambiguity: the group, any turn about a Cn axis, the axis order of D2)."""
    sym_map = _symmetric_assembly(group)
    r0 = Rotation.from_euler("zyz", [30, 50, 80], degrees=True).as_matrix()
    write_map(tmp_path / "c1.mrc", transform_map(sym_map, r0, np.array([2.0, -1.0, 1.0]), order=3), 3.0)
    assert reconstruct_main(["align-symmetry", "--i", str(tmp_path / "c1.mrc"), "--sym", group,
                             "--o", str(tmp_path / "aligned.mrc")]) == 0
    assert f"{group} axes found" in capsys.readouterr().out
    vol, _ = read_map(tmp_path / "c1.mrc")
    res = align_symmetry(vol, 3.0, group)
    p = res.rotation @ r0  # identity up to the frame's ambiguity
    if group.startswith("C"):
        err = np.degrees(np.arccos(np.clip(abs((p.T @ [0, 0, 1])[2]), -1, 1)))  # either sense of the axis
    else:
        err = min(_angle(p, g) for g in symmetry_operators("O"))  # D2's normaliser permutes its axes
    assert err < 2.0, err
    assert res.score > 0.95
