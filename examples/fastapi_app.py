"""A FastAPI service that gets its SVDs computed by the SVD service instead of on its event loop.

    pip install -e '.[examples]'
    SVD_CLIENT_BOOTSTRAP_SERVERS=127.0.0.1:9092 uvicorn examples.fastapi_app:app

    curl -s localhost:8000/health
    curl -s localhost:8000/svd -H 'content-type: application/json' \
         -d '{"matrix": [[3, 0], [0, 4]], "compute_uv": false}'

One AsyncSvdClient per process, opened and closed by the app's lifespan. Parsing the body and
printing the answer as JSON run in a worker thread: they are CPU work on large matrices too.

``SVD_EXAMPLE_MODE=inline`` computes the SVD in the handler instead (numpy on the event loop, as
the service this project replaces did); bench/fastapi_health.py compares the two.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from producer_sdk import (
    AsyncSvdClient,
    ClientClosed,
    SvdComputeError,
    SvdError,
    SvdExpired,
    SvdInvalidRequest,
    SvdTimeout,
)
from producer_sdk._base import BaseSvdClient

# The HTTP status that says the most about each kind of failure.
_STATUS: list[tuple[type[SvdError], int]] = [
    (SvdInvalidRequest, 422),
    (SvdTimeout, 504),
    (SvdExpired, 504),
    (SvdComputeError, 422),
    (ClientClosed, 503),
    (SvdError, 502),
]


def create_app(
    *, mode: str | None = None, client_factory: Callable[[], BaseSvdClient] | None = None
) -> FastAPI:
    """``mode``: "sdk" (default) or "inline"; ``client_factory`` lets tests pass a FakeSvdClient."""
    mode = mode or os.environ.get("SVD_EXAMPLE_MODE", "sdk")
    if mode not in ("sdk", "inline"):
        raise ValueError(f"mode must be 'sdk' or 'inline', got {mode!r}")
    make_client = client_factory or AsyncSvdClient  # settings from SVD_CLIENT_* env vars

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if mode == "inline":
            yield
            return
        async with make_client() as client:
            app.state.svd = client
            yield

    app = FastAPI(title="SVD over Kafka: example", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "mode": mode}

    @app.post("/svd")
    async def svd(request: Request) -> Response:
        body = await request.body()
        try:
            parsed = await asyncio.to_thread(_parse, body)
        except ValueError as exc:
            return JSONResponse({"error": "INVALID_BODY", "message": str(exc)}, status_code=400)
        matrix, options = parsed
        if mode == "inline":
            # The seed problem: CPU-bound numpy on the event loop stalls every other request.
            u, s, vt = _inline_svd(matrix, options)
            rendered = await asyncio.to_thread(_render, None, u, s, vt, None)
            return Response(rendered, media_type="application/json")
        client: BaseSvdClient = request.app.state.svd
        try:
            result = await client.svd(matrix, **options)
        except SvdError as err:
            status = next(code for kind, code in _STATUS if isinstance(err, kind))
            payload = {
                "error": str(err.code),
                "message": err.message,
                "retryable": err.retryable,
                "request_id": err.request_id,
            }
            return JSONResponse(payload, status_code=status)
        rendered = await asyncio.to_thread(
            _render,
            result.request_id,
            result.u,
            result.s,
            result.vt,
            result.meta.timings.model_dump(),
        )
        return Response(rendered, media_type="application/json")

    return app


def _parse(body: bytes) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or "matrix" not in data:
        raise ValueError('the body must be an object with "matrix": [[...], ...]')
    options = {
        name: data[name] for name in ("k", "full_matrices", "compute_uv", "timeout") if name in data
    }
    # Validation of the matrix and the options is the SDK's: its errors carry the service's codes.
    try:
        matrix = np.asarray(data["matrix"])
    except ValueError as exc:
        raise ValueError(f"matrix is not rectangular: {exc}") from None
    return matrix, options


def _render(
    request_id: str | None, u: Any, s: Any, vt: Any, timings: dict[str, float] | None
) -> bytes:
    return orjson.dumps(
        {"request_id": request_id, "u": u, "s": s, "vt": vt, "timings": timings},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def _inline_svd(matrix: np.ndarray[Any, Any], options: dict[str, Any]) -> tuple[Any, Any, Any]:
    k = options.get("k")
    if not options.get("compute_uv", True):
        return None, np.linalg.svd(matrix, compute_uv=False)[:k], None
    u, s, vt = np.linalg.svd(matrix, full_matrices=bool(options.get("full_matrices", False)))
    return (u[:, :k], s[:k], vt[:k]) if k else (u, s, vt)


app = create_app()
