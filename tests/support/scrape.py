"""Read a running consumer's /metrics, /healthz and /readyz the way a scraper or a probe does."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.support.service import ServiceProcess

# What the service logs once its HTTP server is bound (SVD_METRICS_PORT=-1 picks a free port).
METRICS_LINE = r"metrics on http://(?P<host>[0-9.]+):(?P<port>\d+)"


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """One GET over a fresh connection (the server answers one request per connection)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@dataclass(frozen=True)
class Samples:
    """One scrape: {(name, labels): value}."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))

    def __getitem__(self, name: str) -> float:
        value = self.get(name)
        if value is None:
            raise KeyError(f"{name} not exposed (labelled? use get/by)")
        return value

    def by(self, name: str, label: str) -> dict[str, float]:
        """Every series of ``name``, keyed by the value of ``label``."""
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.values.items()
            if sample == name and label in dict(labels)
        }


class Endpoint:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    @classmethod
    def of(cls, service: ServiceProcess, timeout: float = 60.0) -> Endpoint:
        match = service.wait_for_log(METRICS_LINE, timeout)
        return cls(match["host"], int(match["port"]))

    async def scrape(self) -> Samples:
        status, body = await http_get(self.host, self.port, "/metrics")
        assert status == 200, status
        return Samples(
            {
                (sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(body.decode())
                for sample in family.samples
            }
        )

    async def readyz(self) -> tuple[int, dict[str, object]]:
        status, body = await http_get(self.host, self.port, "/readyz")
        return status, orjson.loads(body)

    async def wait_for(
        self, condition: Callable[[Samples], bool], what: str, timeout: float = 60.0
    ) -> Samples:
        """Scrape until ``condition`` holds; fail naming ``what`` with the last scrape's svd_ lines."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            samples = await self.scrape()
            if condition(samples):
                return samples
            if loop.time() > deadline:
                shown = sorted(
                    f"{name}{dict(labels) or ''} {value}"
                    for (name, labels), value in samples.values.items()
                    if re.match(r"svd_(?!.*_(bucket|created)$)", name)
                )
                raise AssertionError(
                    f"{what}: not within {timeout}s; last scrape:\n" + "\n".join(shown)
                )
            await asyncio.sleep(0.1)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status, body = await self.readyz()
            if status == 200:
                return body
            if loop.time() > deadline:
                raise AssertionError(f"/readyz still {status} after {timeout}s: {body}")
            await asyncio.sleep(0.1)
