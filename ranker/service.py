"""HTTP scoring service for 2D class averages (FastAPI), served by ``ranker serve``.

``POST /v1/score`` takes a multipart upload: ``stack`` (an MRC stack of class averages, modes 0/1/2/6/12),
optionally ``model_star`` and ``data_star`` (the Class2D job's ``_model.star`` and ``_data.star``, for
the metadata features exactly as ``ranker score`` computes them, and then the model's job-context stage
re-scores the classes as ``ranker score`` does) and the form fields ``particle_diameter`` and ``pixel_size``
(Å). ``GET /v1/health`` and ``GET /v1/model`` report liveness and the model's version,
checksum and metrics. Bad input gets a 4xx whose ``detail`` says what was wrong; a token (bearer header)
guards every endpoint but ``/v1/health`` when one is configured. Concurrent requests are gathered into
one network batch (on the GPU when there is one).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from reconstruct.files import InputError, read_map, read_mrc_header

from .features import FEATURE_NAMES
from .inputs import JobInputs, image_only_inputs, job_inputs
from .job import class_job_from_files
from .model_store import RankerModel, load_model
from .score import UNSCORED, in_context, network_features, predict

log = logging.getLogger("ranker.service")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere, e.g. musl or macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system.  Scoring frees everything it allocates, but
    glibc keeps the freed pages of its per-thread arenas mapped, so a server's resident memory would
    stay at its busiest level; the batcher calls this once it has been idle for a second."""
    if _TRIM is not None:
        _TRIM(0)


@dataclass
class ServiceConfig:
    """Limits and security of the service."""

    model_path: str | None = None  # None: the shipped model
    max_upload_mb: float = 256.0
    max_classes: int = 2000
    max_box: int = 1024
    token: str | None = None
    device: str = "cpu"
    batch_window_s: float = 0.005  # how long the batcher waits to gather concurrent requests

    @staticmethod
    def from_env() -> ServiceConfig:
        """The configuration ``ranker serve`` passes to worker processes through the environment."""
        token_file = os.environ.get("RANKER_TOKEN_FILE")
        return ServiceConfig(model_path=os.environ.get("RANKER_MODEL") or None,
                             max_upload_mb=float(os.environ.get("RANKER_MAX_UPLOAD_MB", 256)),
                             max_classes=int(os.environ.get("RANKER_MAX_CLASSES", 2000)),
                             token=read_token(token_file) if token_file else None,
                             device=os.environ.get("RANKER_DEVICE", "cpu"))


def read_token(path: str | Path) -> str:
    """The bearer token in a file (first line, stripped); an empty or missing file is an error."""
    try:
        token = Path(path).read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError) as e:
        raise InputError(path, f"cannot read a token ({e})", "write the token on the file's first line") from e
    if len(token) < 16:
        raise InputError(path, "the token is shorter than 16 characters", "use a long random token")
    return token


class Batcher:
    """Gathers concurrent scoring requests into one forward pass of the network."""

    def __init__(self, model: RankerModel, device: str, window_s: float, idle_s: float = 1.0) -> None:
        self.model, self.device, self.window_s, self.idle_s = model, device, window_s, idle_s
        self.queue: asyncio.Queue[tuple[np.ndarray, np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.trims = 0
        self._dirty = False

    async def run(self) -> None:
        """Worker loop: take one request, wait briefly for more, score them together; after
        ``idle_s`` without requests, hand the freed memory back to the system once."""
        while True:
            try:
                first = await asyncio.wait_for(self.queue.get(), timeout=self.idle_s)
            except asyncio.TimeoutError:
                if self._dirty:
                    await asyncio.to_thread(release_free_memory)
                    self._dirty, self.trims = False, self.trims + 1
                continue
            items = [first]
            await asyncio.sleep(self.window_s)
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            images = np.concatenate([i for i, _, _ in items])
            feats = np.concatenate([f for _, f, _ in items])
            try:
                scores = await asyncio.to_thread(predict, self.model.net, images, feats, 512, self.device)
            except Exception as e:  # the error goes back to each waiting request
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            start = 0
            for im, _, fut in items:
                if not fut.done():
                    fut.set_result(scores[start:start + len(im)])
                start += len(im)
            self._dirty = True

    async def score(self, images: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Scores of one request's classes."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, features, fut))
        return await fut


def _bad(detail: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


async def _save(upload: UploadFile, where: Path, budget: list[int]) -> Path:
    """Copy an upload to disk in chunks, enforcing the request's remaining byte budget."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / (Path(upload.filename or "upload").name.replace(" ", "_") or "upload")
    with open(path, "wb") as f:
        while chunk := await upload.read(1 << 20):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _bad("the upload is larger than the server's limit", 413)
            f.write(chunk)
    return path


def _read_stack(path: Path, cfg: ServiceConfig) -> tuple[np.ndarray, float]:
    try:
        head = read_mrc_header(path)
    except InputError as e:
        raise _bad(f"stack: {e.problem}") from None
    n, ny, nx = head.shape
    if head.is_volume and n > 1:
        raise _bad("stack: this is a 3D volume (MRC space group 1), not a stack of 2D class averages")
    if ny != nx:
        raise _bad(f"stack: images must be square, got {nx} x {ny}")
    if nx > cfg.max_box:
        raise _bad(f"stack: images of {nx} px exceed the limit of {cfg.max_box}", 413)
    if nx < 16:
        raise _bad(f"stack: images of {nx} px are too small (at least 16)")
    if n > cfg.max_classes:
        raise _bad(f"stack: {n} classes exceed the limit of {cfg.max_classes}", 413)
    try:
        data, px = read_map(path)
    except InputError as e:
        raise _bad(f"stack: {e.problem}") from None
    return data.reshape(-1, ny, nx), px


def create_app(cfg: ServiceConfig | None = None, model: RankerModel | None = None) -> FastAPI:
    """The FastAPI application; ``model`` defaults to the configured (or shipped) one."""
    cfg = cfg or ServiceConfig()
    model = model or load_model(cfg.model_path)
    batcher = Batcher(model, cfg.device, cfg.batch_window_s)
    app = FastAPI(title="Class ranker scoring service", version=model.version,
                  description="Scores 2D class averages from 0 (useless) to 1 (best) with the class ranker.")
    limit = int(cfg.max_upload_mb * 2 ** 20)

    @app.middleware("http")
    async def size_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 65536:
            return JSONResponse({"detail": f"the upload is larger than the server's limit of {cfg.max_upload_mb:g} MB"},
                                status_code=413)
        return await call_next(request)

    def authorise(request: Request) -> None:
        if cfg.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), cfg.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness: always 200 while the server runs."""
        return {"status": "ok", "model_version": model.version}

    @app.get("/v1/model", dependencies=[Depends(authorise)])
    async def model_info() -> dict[str, Any]:
        """The model's version, checksum, training metrics and default threshold."""
        return {**model.describe(), "features": list(FEATURE_NAMES), "device": cfg.device}

    @app.post("/v1/score", dependencies=[Depends(authorise)])
    async def score(stack: Annotated[UploadFile, File(description="class averages, MRC stack (.mrcs/.mrc)")],
                    model_star: Annotated[UploadFile | None, File(description="the job's _model.star")] = None,
                    data_star: Annotated[UploadFile | None, File(description="the job's _data.star")] = None,
                    particle_diameter: Annotated[float | None, Form(description="mask diameter (Å)")] = None,
                    pixel_size: Annotated[float | None, Form(description="pixel size (Å) if not in headers")] = None,
                    ) -> dict[str, Any]:
        """Scores of each class average, in stack order, with the features used."""
        if (model_star is None) != (data_star is None):
            raise _bad("send both model_star and data_star, or neither")
        for name, v in (("particle_diameter", particle_diameter), ("pixel_size", pixel_size)):
            if v is not None and not (np.isfinite(v) and 0 < v < 1e5):
                raise _bad(f"{name} must be a positive number of Å")
        budget = [limit]
        with tempfile.TemporaryDirectory(prefix="ranker-") as tmp:
            where = Path(tmp)
            images, header_px = await asyncio.to_thread(_read_stack, await _save(stack, where, budget), cfg)
            inputs, px, used_metadata, diameter = await asyncio.to_thread(
                _prepare, images, header_px, pixel_size, particle_diameter,
                await _save(model_star, where / "m", budget) if model_star is not None else None,
                await _save(data_star, where / "d", budget) if data_star is not None else None)
        feats = network_features(model, inputs.features)
        raw_scores = await batcher.score(inputs.images, feats)
        scores = np.full(len(images), UNSCORED, np.float32)
        # The job-context stage needs the job's class sizes and metadata: image-only uploads get network scores.
        with_context = used_metadata and model.context is not None
        scores[inputs.class_index] = in_context(model, raw_scores, inputs.sizes, feats) if with_context else raw_scores
        by_class = {int(k): i for i, k in enumerate(inputs.class_index)}
        classes = []
        for k in range(len(images)):
            i = by_class.get(k)
            classes.append({"class": k + 1, "score": float(scores[k]), "scored": i is not None,
                            "features": None if i is None else dict(zip(FEATURE_NAMES, map(float, feats[i])))})
        note = ("metadata features from model_star and data_star" if used_metadata else
                "no model_star/data_star: image-only features; the accuracy and resolution features are set to "
                "their mean, and the job-context stage is not used (send both STAR files for the full model)")
        return {"model": {"version": model.version, "sha256": model.sha256}, "metadata_used": used_metadata,
                "note": note, "pixel_size": px, "particle_diameter": diameter,
                "threshold": model.threshold_for(with_context), "job_context": with_context, "classes": classes}

    app.state.batcher = batcher
    app.state.model = model
    return app


def _prepare(images: np.ndarray, header_px: float, pixel_size: float | None, diameter: float | None,
             model_star: Path | None, data_star: Path | None) -> tuple[JobInputs, float, bool, float]:
    """Network inputs for an upload: from the job's STAR files when given, else from the images alone."""
    try:
        if model_star is not None and data_star is not None:
            job = class_job_from_files(model_star, data_star, images, diameter or -1.0)
            return job_inputs(job), job.pixel_size, True, job.diameter
        px = pixel_size or header_px
        if not px > 0:
            raise _bad("the stack's header has no pixel size: send the pixel_size field (Å)")
        d = diameter or 0.9 * images.shape[-1] * px
        return image_only_inputs(images, px, d), px, False, d
    except InputError as e:
        raise _bad(f"{Path(e.path).name if e.path else 'input'}: {e.problem}"
                   + (f" ({e.advice})" if e.advice else "")) from None
    except HTTPException:
        raise
    except Exception as e:  # starfile/pandas raise many types on malformed STAR text
        log.info("rejected an upload: %s: %s", type(e).__name__, e)
        raise _bad(f"cannot use the uploaded files: {type(e).__name__}: {str(e)[:300]}") from None


def app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (``ranker serve --workers N``)."""
    return create_app(ServiceConfig.from_env())
