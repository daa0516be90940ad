"""The HTTP scoring service: same scores as `ranker score`, a 4xx for each kind of bad input, the token
rule, and the command-line client against a live server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import make_class2d_job

from ranker.cli import main as ranker_main
from ranker.job import read_class_job
from ranker.model_store import RankerModel, load_model
from ranker.network import ClassRankerNet, save_checkpoint
from ranker.score import rank_job
from ranker.service import ServiceConfig, create_app
from reconstruct.files import write_map, write_stack

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RankerModel:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("model") / "ranker.pt"
    save_checkpoint(ClassRankerNet(), path, version="test-1", zero_granulometry=True, default_threshold=0.3)
    return load_model(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return make_class2d_job(tmp_path_factory.mktemp("job") / "Class2D", categories=(1, 2, 6, 1))


def _client(model: RankerModel, **cfg) -> TestClient:
    return TestClient(create_app(ServiceConfig(**cfg), model=model))


def _files(job: Path, stack: bytes | None = None, with_stars: bool = True) -> dict:
    files = {"stack": ("run_classes.mrcs", stack if stack is not None else (job / "run_class.mrcs").read_bytes())}
    if with_stars:
        files["model_star"] = ("run_model.star", (job / "run_model.star").read_bytes())
        files["data_star"] = ("run_data.star", (job / "run_data.star").read_bytes())
    return files


def test_scores_equal_ranker_score(model, job):
    client = _client(model)
    r = client.post("/v1/score", files=_files(job), data={"particle_diameter": "100"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["metadata_used"] and body["model"]["version"] == "test-1"
    expected, _ = rank_job(read_class_job(job, project_dir=job), model)
    got = np.array([c["score"] for c in body["classes"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [c["class"] for c in body["classes"]] == [1, 2, 3, 4]
    assert len(body["classes"][0]["features"]) == 24
    # without the STAR files: image-only features, and the answer says so
    r = client.post("/v1/score", files=_files(job, with_stars=False), data={"particle_diameter": "100"})
    assert r.status_code == 200 and not r.json()["metadata_used"] and "image-only" in r.json()["note"]
    assert all(np.isfinite(c["score"]) for c in r.json()["classes"])
    assert client.get("/v1/health").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["version"] == "test-1" and len(info["sha256"]) == 64 and info["default_threshold"] == 0.3
    assert client.get("/openapi.json").status_code == 200


def test_job_context_is_used_when_the_job_is_sent(job):
    """The shipped model re-scores a whole job's classes (STAR files sent) as `ranker score` does; image-only
    uploads get the network's scores and the network's threshold, and the answer says which."""
    shipped = load_model()
    client = _client(shipped)
    body = client.post("/v1/score", files=_files(job), data={"particle_diameter": "100"}).json()
    expected, _ = rank_job(read_class_job(job, project_dir=job), shipped)
    assert body["job_context"] and body["threshold"] == pytest.approx(shipped.threshold)
    np.testing.assert_allclose([c["score"] for c in body["classes"]], expected, atol=1e-5)
    alone, _ = rank_job(read_class_job(job, project_dir=job), shipped.without_context())
    assert not np.allclose(expected, alone)
    body = client.post("/v1/score", files=_files(job, with_stars=False), data={"particle_diameter": "100"}).json()
    assert not body["job_context"] and body["threshold"] == pytest.approx(shipped.threshold_for(False))
    assert "job-context stage is not used" in body["note"]


def test_idle_server_hands_freed_memory_back(model, job):
    """After a second without requests the batcher releases the C heap's free pages once (glibc's
    malloc_trim), so resident memory falls back from its busiest level instead of staying there."""
    with _client(model) as client:
        batcher = client.app.state.batcher
        assert client.post("/v1/score", files=_files(job), data={"particle_diameter": "100"}).status_code == 200
        deadline = time.monotonic() + 5.0
        while batcher.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert batcher.trims == 1 and batcher.batches == 1
        time.sleep(1.5)
        assert batcher.trims == 1  # nothing new to release: no further calls while idle


def _mrc_bytes(data: np.ndarray, volume: bool = False) -> bytes:
    """An MRC file's bytes: a stack (square or not) or a volume."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.mrc"
        if volume:
            write_map(path, data, 2.0)
        elif data.shape[-1] != data.shape[-2]:
            with mrcfile.new(path) as m:
                m.set_data(data.astype(np.float32))
                m.set_image_stack()
        else:
            write_stack(path, data, 2.0)
        return path.read_bytes()


def test_bad_inputs_get_4xx_with_a_reason(model, job, tmp_path):
    client = _client(model, max_classes=10, max_box=128, max_upload_mb=1.0)
    good = (job / "run_class.mrcs").read_bytes()
    nan_bytes = bytearray(_mrc_bytes(np.zeros((2, 32, 32), np.float32)))
    nan_bytes[-4:] = np.float32(np.nan).tobytes()
    cases = {
        "not an MRC": (b"hello, this is not an image" * 100, 400, "stack"),
        "truncated": (good[: len(good) - 1000], 400, "truncated"),
        "a volume": (_mrc_bytes(np.zeros((32, 32, 32), np.float32), volume=True), 400, "volume"),
        "non-square": (_mrc_bytes(np.zeros((2, 32, 40), np.float32)), 400, "square"),
        "too large": (_mrc_bytes(np.zeros((1, 256, 256), np.float32)), 413, "exceed"),
        "too many": (_mrc_bytes(np.zeros((11, 32, 32), np.float32)), 413, "classes"),
        "NaN": (bytes(nan_bytes), 400, "NaN"),
    }
    for name, (data, status, word) in cases.items():
        r = client.post("/v1/score", files={"stack": ("x.mrcs", data)}, data={"pixel_size": "2"})
        assert r.status_code == status, (name, r.status_code, r.text)
        assert word.lower() in r.json()["detail"].lower(), (name, r.json())
    # STAR files that do not match the stack
    files = _files(job, stack=_mrc_bytes(np.zeros((3, 32, 32), np.float32)))
    r = client.post("/v1/score", files=files)
    assert r.status_code == 400 and "3 images" in r.json()["detail"], r.text
    r = client.post("/v1/score", files={**_files(job), "data_star": ("d.star", b"data_\nloop_\n_rlnFoo\n1\n")})
    assert r.status_code == 400, r.text
    r = client.post("/v1/score", files={"stack": ("x.mrcs", good),
                                        "model_star": ("m.star", (job / "run_model.star").read_bytes())})
    assert r.status_code == 400 and "both" in r.json()["detail"]
    r = client.post("/v1/score", files={"stack": ("x.mrcs", good)}, data={"pixel_size": "-1"})
    assert r.status_code == 400
    r = client.post("/v1/score", files={"stack": ("big.mrcs", b"\0" * (2 * 2 ** 20))})
    assert r.status_code == 413
    assert client.post("/v1/score").status_code == 422  # no stack at all
    assert client.get("/v1/health").status_code == 200  # still serving


def test_token_is_required_when_configured(model, job):
    client = _client(model, token=TOKEN)
    assert client.get("/v1/health").status_code == 200
    assert client.get("/v1/model").status_code == 401
    assert client.post("/v1/score", files=_files(job)).status_code == 401
    bad = client.post("/v1/score", files=_files(job), headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    ok = client.post("/v1/score", files=_files(job), headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert ranker_main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2  # no token: refused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_score_remote_against_a_live_server(model, job, tmp_path, capsys):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServiceConfig(token=TOKEN), model=model), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        args = ["score-remote", f"http://127.0.0.1:{port}", str(job / "run_class.mrcs"), "--model-star",
                str(job / "run_model.star"), "--data-star", str(job / "run_data.star"), "--token-file", str(token_file),
                "--particle_diameter", "100"]
        assert ranker_main(args) == 0
        out = capsys.readouterr().out.splitlines()
        expected, _ = rank_job(read_class_job(job, project_dir=job), model)
        got = np.array([float(line.split("\t")[1]) for line in out[2:]])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert ranker_main(args[:3]) == 2  # no token: the server's 401 becomes a clear error
        assert "401" in capsys.readouterr().err
    finally:
        server.should_exit = True
        thread.join(timeout=10)
