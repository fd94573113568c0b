"""Stored payloads (the claim check, issue #17) in the benchmark: its own object store, one prefix
per run of the service, requests stored the way a producer stores them, and the store's own cost.

``BenchStore`` starts a real S3-compatible store (``localstore``: S3Proxy on a directory of the
benchmark's work directory), stopped with everything else. ``StorePrefix`` is one (size,
variant)'s place in it: the service's ``SVD_STORE_*`` settings, the SDK's ``store=`` settings,
and a ``PayloadStore`` (the same client the service's workers use) for the benchmark's own
uploads, clean-up and the I/O probe.

``probe`` times, in this process and outside every measured window, what a worker does around
one SVD of a size: read the matrix (HEAD, GET, sha256 check) and write the factors (sha256, PUT),
plus sha256 alone over the same bytes. That is the store's part of a request, to set beside the
time the workers did not spend computing.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Children
from localstore import CLIENT_PREFIX, SERVICE_PREFIX, LocalStore, store_env
from objectstore import PayloadStore, StoreSettings
from schemas import codec
from schemas.models import ObjectRef

#: Uploads of the pre-filled requests in flight at once.
PREFILL_UPLOADS = 4


@dataclass(frozen=True)
class StorePrefix:
    """One location of the benchmark's bucket: ``s3://<bucket>/<prefix>``."""

    endpoint: str
    bucket: str
    region: str
    access_key_id: str
    secret_access_key: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _env(self, prefix: str) -> dict[str, str]:
        env = store_env(
            prefix, endpoint=self.endpoint, bucket=self.bucket, region=self.region,
            access_key_id=self.access_key_id, secret_access_key=self.secret_access_key,
        )  # fmt: skip
        env[f"{prefix}URL"] = self.url
        return env

    def service_env(self) -> dict[str, str]:
        """``SVD_STORE_*`` for the consumer: it reads and writes under this prefix only."""
        return self._env(SERVICE_PREFIX)

    def client_settings(self) -> dict[str, Any]:
        """The SDK's ``store=`` settings (``SVD_CLIENT_STORE_*`` fields) for this prefix."""
        env = self._env(CLIENT_PREFIX)
        return {k.removeprefix(CLIENT_PREFIX).lower(): v for k, v in env.items()}

    def payloads(self) -> PayloadStore:
        """A client of this prefix, as the service's workers and the SDK make theirs."""
        env = self._env(SERVICE_PREFIX)
        fields = {k.removeprefix(SERVICE_PREFIX).lower(): v for k, v in env.items()}
        return PayloadStore(StoreSettings.model_validate(fields))

    def objects(self) -> list[str]:
        """Every object's URL under the prefix."""
        return [entry.url for entry in self.payloads().list()]

    def clear(self) -> int:
        """Delete every object under the prefix; how many there were."""
        store = self.payloads()
        urls = [entry.url for entry in store.list()]
        for url in urls:
            store.delete(url)
        return len(urls)


class BenchStore:
    """The benchmark's own object store, started in ``workdir`` and stopped by ``children``."""

    def __init__(self, workdir: Path, children: Children) -> None:
        self._local = LocalStore(workdir=workdir)
        self._children = children
        self.pid = 0
        self.endpoint = ""

    def start(self) -> None:
        self._children.add(self._local.destroy)
        state = self._local.start(die_with_parent=True)
        self.pid, self.endpoint = state.pid, state.endpoint

    def prefix(self, name: str) -> StorePrefix:
        s = self._local.settings
        return StorePrefix(
            endpoint=self.endpoint, bucket=s.bucket, region=s.region,
            access_key_id=s.access_key_id,
            secret_access_key=s.secret_access_key.get_secret_value(),
            prefix=name,
        )  # fmt: skip


async def store_requests(
    prefix: StorePrefix, messages: list[tuple[str, codec.EncodedMessage]]
) -> list[codec.EncodedMessage]:
    """Each binary request's value stored under ``requests/<id>``, as the SDK stores it; the
    version 2 requests that reference them, in order."""
    store = prefix.payloads()
    limit = asyncio.Semaphore(PREFILL_UPLOADS)

    async def one(request_id: str, message: codec.EncodedMessage) -> codec.EncodedMessage:
        async with limit:
            stored = await store.write_async(f"requests/{request_id}", [message.value])
        ref = ObjectRef(url=stored.url, nbytes=stored.nbytes, sha256=stored.sha256)
        return codec.to_stored(message, ref)

    return list(await asyncio.gather(*(one(rid, m) for rid, m in messages)))


async def delete_objects(prefix: StorePrefix, urls: list[str]) -> None:
    store = prefix.payloads()
    limit = asyncio.Semaphore(PREFILL_UPLOADS)

    async def one(url: str) -> None:
        async with limit:
            await store.delete_async(url)

    await asyncio.gather(*(one(url) for url in urls))


def _median_s(runs: list[float]) -> float:
    return float(statistics.median(runs))


def probe(prefix: StorePrefix, read_bytes: int, write_bytes: int) -> dict[str, Any]:
    """What a worker's store calls cost around one SVD, timed here: the matrix read (HEAD, GET,
    sha256 check), the factors written (sha256, PUT), and sha256 alone over each. The median of
    three runs (one above 64 MiB). Objects are deleted again."""
    store = prefix.payloads()
    out: dict[str, Any] = {"read_bytes": read_bytes, "write_bytes": write_bytes}
    for what, nbytes in (("read", read_bytes), ("write", write_bytes)):
        data = bytes(nbytes) if nbytes < (1 << 20) else _noise(nbytes)
        runs = 3 if nbytes <= 64 << 20 else 1
        hashing: list[float] = []
        io: list[float] = []
        for _ in range(runs):
            started = time.perf_counter()
            digest = hashlib.sha256(data).hexdigest()
            hashing.append(time.perf_counter() - started)
            key = f"probe/{uuid.uuid4().hex}"
            if what == "write":
                started = time.perf_counter()
                stored = store.write(key, [data])
                io.append(time.perf_counter() - started)
            else:
                stored = store.write(key, [data])
                started = time.perf_counter()
                store.read(stored.url, nbytes, digest)
                io.append(time.perf_counter() - started)
            store.delete(stored.url)
        out[f"{what}_s"] = _median_s(io)
        out[f"{what}_sha256_s"] = _median_s(hashing)
    return out


def _noise(nbytes: int) -> bytes:
    """Bytes that do not compress or dedupe (a matrix's bytes do not): one random MiB repeated
    with a counter, cheap to make at hundreds of MiB."""
    import numpy as np

    block = np.random.default_rng(nbytes).bytes(1 << 20)
    whole, rest = divmod(nbytes, 1 << 20)
    parts = [i.to_bytes(8, "little") + block[8:] for i in range(whole)]
    parts.append(block[:rest])
    return b"".join(parts)
