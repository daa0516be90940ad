"""Client of the ranker's HTTP service (``ranker score-remote``)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from reconstruct.files import InputError


def score_remote(url: str, stack: Path, model_star: Path | None = None, data_star: Path | None = None,
                 particle_diameter: float | None = None, pixel_size: float | None = None,
                 token: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """POST a class-average stack (and optionally the job's STAR files) to ``url``/v1/score; the JSON answer."""
    data = {k: str(v) for k, v in (("particle_diameter", particle_diameter), ("pixel_size", pixel_size))
            if v is not None}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with ExitStack() as stack_ctx:
        files = {}
        for field, path in (("stack", stack), ("model_star", model_star), ("data_star", data_star)):
            if path is not None:
                if not path.is_file():
                    raise InputError(path, "file not found")
                files[field] = (path.name, stack_ctx.enter_context(open(path, "rb")))
        try:
            r = httpx.post(url.rstrip("/") + "/v1/score", files=files, data=data, headers=headers, timeout=timeout)
        except httpx.HTTPError as e:
            raise InputError(None, f"cannot reach {url} ({e})", "is `ranker serve` running there?") from e
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise InputError(None, f"the server answered {r.status_code}: {detail}")
    return r.json()
