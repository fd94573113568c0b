"""examples/fastapi_app.py, with FakeSvdClient standing in for Kafka and the service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the examples extra is not installed")
httpx = pytest.importorskip("httpx", reason="the examples extra is not installed")

from examples.fastapi_app import create_app  # noqa: E402
from producer_sdk.testing import FakeSvdClient  # noqa: E402


@asynccontextmanager
async def serve(mode: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(mode=mode, client_factory=FakeSvdClient)
    async with app.router.lifespan_context(app):  # what uvicorn runs around the app
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http


@pytest.mark.parametrize("mode", ["sdk", "inline"])
async def test_svd_endpoint_and_health(mode: str) -> None:
    a = np.random.default_rng(5).standard_normal((6, 4))
    async with serve(mode) as http:
        assert (await http.get("/health")).json() == {"status": "ok", "mode": mode}
        response = await http.post("/svd", json={"matrix": a.tolist()})
        assert response.status_code == 200
        body = response.json()
        u, s, vt = (np.array(body[name]) for name in ("u", "s", "vt"))
        np.testing.assert_allclose(u * s @ vt, a, atol=1e-10)
        values = await http.post("/svd", json={"matrix": [[3, 0], [0, 4]], "compute_uv": False})
        assert values.json()["s"] == [4.0, 3.0] and values.json()["u"] is None


async def test_errors_carry_the_service_code_and_a_fitting_status() -> None:
    async with serve("sdk") as http:
        bad = await http.post("/svd", json={"matrix": [[1.0, 2.0]], "k": 5})
        assert bad.status_code == 422 and bad.json()["error"] == "INVALID_SCHEMA"
        assert (await http.post("/svd", content=b"not json")).status_code == 400
        assert (await http.post("/svd", json={"matrix": [[1, 2], [3]]})).status_code == 400
