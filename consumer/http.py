"""A small HTTP server on the service's event loop: /metrics, /healthz, /readyz.

Why not prometheus_client's ``start_http_server``: it serves from a thread, and /readyz has to
read the service's state (group membership, pool, broker contact), which lives on the event
loop. Serving from the loop keeps every read of that state, and of the metrics, in the parent
process and on one thread. It also makes /healthz meaningful: if the loop is blocked, /healthz
stops answering, which is exactly what a liveness probe should notice.

- ``GET /metrics``: the registry in the format the scraper asks for (Prometheus text, or
  OpenMetrics when the Accept header prefers it: prometheus_client's own negotiation).
- ``GET /healthz``: 200 while the process and its event loop run.
- ``GET /readyz``: 200 when every readiness check passes, else 503; the JSON body names each
  check (see ``SvdService.readiness`` and docs/operations.md).

Requests are one per connection (``Connection: close``), bounded in size and time: this serves
a scraper and probes, not browsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from http import HTTPStatus

import orjson
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.registry import CollectorRegistry

from consumer.tasks import TaskSet

log = logging.getLogger(__name__)

_MAX_LINE_BYTES = 8192  # per request or header line; anything longer is not a scraper
_READ_TIMEOUT_S = 5.0
_MAX_HEADERS = 64

Readiness = Callable[[], dict[str, bool]]


class MetricsServer:
    def __init__(
        self, registry: CollectorRegistry, readiness: Readiness, *, host: str, port: int
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections = TaskSet()

    async def start(self) -> tuple[str, int]:
        """Bind and serve; return the bound (host, port), which tells port 0 apart."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=_MAX_LINE_BYTES
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Python 3.11's wait_closed does not wait for open connections: end them ourselves so
        # no handler task outlives the loop.
        await self._connections.cancel_all()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.set_name("http connection")  # the server's own name for it says nothing in a log
        self._connections.track(task)
        try:
            try:
                status, headers, body, head_only = await self._respond(reader)
            except (ConnectionError, TimeoutError):
                raise
            except Exception:  # a bug here must not take the connection handler down silently
                log.exception("answering an HTTP request failed")
                status, headers, body, head_only = HTTPStatus.INTERNAL_SERVER_ERROR, [], b"", False
            lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
            lines += [f"{name}: {value}" for name, value in headers]
            lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if not head_only:
                writer.write(body)
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _respond(
        self, reader: asyncio.StreamReader
    ) -> tuple[HTTPStatus, list[tuple[str, str]], bytes, bool]:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                method, path, headers = await _read_head(reader)
        except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            return HTTPStatus.BAD_REQUEST, [], b"bad request\n", False
        if method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, [("Allow", "GET, HEAD")], b"", False
        head_only = method == "HEAD"
        if path == "/metrics":
            try:
                encoder, content_type = choose_encoder(headers.get("accept", ""))
            except (TypeError, ValueError):  # an unparsable version in Accept: the default format
                encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
            return (
                HTTPStatus.OK,
                [("Content-Type", content_type)],
                encoder(self._registry),
                head_only,
            )
        if path == "/healthz":
            return HTTPStatus.OK, [("Content-Type", "text/plain")], b"ok\n", head_only
        if path == "/readyz":
            checks = self._readiness()
            ready = all(checks.values())
            body = orjson.dumps({"ready": ready, "checks": checks}) + b"\n"
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return status, [("Content-Type", "application/json")], body, head_only
        return HTTPStatus.NOT_FOUND, [("Content-Type", "text/plain")], b"not found\n", head_only


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """The method, the path (query dropped) and the lower-cased headers of one request."""
    request_line = (await reader.readuntil(b"\r\n")).decode("latin-1").strip()
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"malformed request line {request_line!r}")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        line = (await reader.readuntil(b"\r\n")).decode("latin-1")
        if line == "\r\n":
            return method, target.split("?", 1)[0], headers
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header {line!r}")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many headers")
