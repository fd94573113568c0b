"""Read, write and delete payloads in the configured store: S3 (through obstore) or a directory.

Every read names its object by a reference URL, which ``Trust`` checks first: an untrusted URL
is refused without any I/O. A read is bounded by the size the reference declares (a larger
object is refused, not downloaded) and verified against the reference's sha256 before the
caller sees a byte. Writes hash what they write, so the reference they return is what a reader
will verify.

The same object serves sync callers (pool workers, the sync SDK) and asyncio ones (the SDK, the
service's event loop, which only deletes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import GetOptions

from objectstore.errors import ObjectMismatch, ObjectMissing, StoreError, StoreUnavailable
from objectstore.locations import Location, ObjectUrl, file_path
from objectstore.settings import StoreSettings

Buffer = bytes | bytearray | memoryview
# Multipart upload parts: obstore's default of 5 MiB (S3's minimum) cost a 64 MiB upload to the
# local S3Proxy a quarter more time than 16 MiB parts, which come within a few percent of one
# single PUT while keeping parts small enough to retry (the bench's #17 section).
_PART_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What a reference says about an object: where, how long, and its sha256 (hex)."""

    url: str
    nbytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One object found by ``list``: its URL, size and age."""

    url: str
    nbytes: int
    modified_s: float  # epoch seconds


class PayloadStore:
    """The store of one component, built from its ``StoreSettings``."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.trust = settings.trust()
        self.location: Location | None = settings.location if settings.enabled else None
        self._buckets: dict[str, S3Store] = {}

    # -- naming ---------------------------------------------------------------------------------

    def url_for(self, key: str) -> str:
        """The reference URL for ``key`` under this component's own location."""
        if self.location is None:
            raise RuntimeError("no object store is configured")
        return self.location.url(key)

    # -- sync -----------------------------------------------------------------------------------

    def read(self, url: str, nbytes: int, sha256: str, request_id: str | None = None) -> Buffer:
        """The object's bytes, exactly ``nbytes`` long and matching ``sha256``; raises a
        StoreError (UntrustedLocation before any I/O)."""
        location, ref = self.trust.check(url, request_id)
        with _mapped(url, request_id):
            if ref.scheme == "file":
                data = _read_file(file_path(location, ref), nbytes, url, request_id)
            else:
                store = self._bucket(ref.bucket)
                _check_size(obstore.head(store, ref.key)["size"], nbytes, url, request_id)
                data = _exact(obstore.get(store, ref.key, options=_first(nbytes)).bytes())
        _verify(data, nbytes, sha256, url, request_id)
        return data

    def write(
        self, key: str, chunks: Sequence[Buffer], *, content_suffix: bool = False
    ) -> StoredObject:
        """Store ``chunks``, back to back, as ``key`` under this component's location;
        ``content_suffix`` appends the start of their sha256 to the key (``key-<16 hex>``), so
        the same bytes always land on the same object and different bytes never replace it."""
        digest, nbytes = _digest(chunks)
        url = self.url_for(f"{key}-{digest[:16]}" if content_suffix else key)
        _, ref = self.trust.check(url, None)
        with _mapped(url, None):
            if ref.scheme == "file":
                _write_file(Path(ref.key), chunks)
            else:
                obstore.put(
                    self._bucket(ref.bucket), ref.key, _nonempty(chunks), chunk_size=_PART_BYTES
                )
        return StoredObject(url, nbytes, digest)

    def delete(self, url: str) -> None:
        """Delete a trusted object; one already gone is fine."""
        location, ref = self.trust.check(url, None)
        with _mapped(url, None, missing_ok=True):
            if ref.scheme == "file":
                file_path(location, ref).unlink(missing_ok=True)
            else:
                obstore.delete(self._bucket(ref.bucket), ref.key)

    def list(self, prefix: str = "") -> Iterator[StoredEntry]:
        """Every object under this component's location whose key starts with ``prefix``."""
        if self.location is None:
            raise RuntimeError("no object store is configured")
        location = self.location
        with _mapped(str(location), None):
            if location.scheme == "file":
                root = Path(location.prefix)
                for path in sorted(root.rglob("*")):
                    key = path.relative_to(root).as_posix()
                    if (
                        key.startswith(prefix)
                        and path.is_file()
                        and not path.name.startswith(".tmp-")
                    ):
                        stat = path.stat()
                        yield StoredEntry("file://" + str(path), stat.st_size, stat.st_mtime)
                return
            store = self._bucket(location.bucket)
            for batch in obstore.list(store, location.prefix + prefix):
                for meta in batch:
                    yield StoredEntry(
                        f"s3://{location.bucket}/{meta['path']}",
                        meta["size"],
                        meta["last_modified"].timestamp(),
                    )

    # -- async ----------------------------------------------------------------------------------

    async def read_async(
        self, url: str, nbytes: int, sha256: str, request_id: str | None = None
    ) -> Buffer:
        _, ref = self.trust.check(url, request_id)
        if ref.scheme == "file":
            return await asyncio.to_thread(self.read, url, nbytes, sha256, request_id)
        store = self._bucket(ref.bucket)
        with _mapped(url, request_id):
            _check_size((await obstore.head_async(store, ref.key))["size"], nbytes, url, request_id)
            got = await obstore.get_async(store, ref.key, options=_first(nbytes))
            data = _exact(await got.bytes_async())
        # Hashing releases the GIL but takes a while for a large object: off the event loop.
        await asyncio.to_thread(_verify, data, nbytes, sha256, url, request_id)
        return data

    async def write_async(self, key: str, chunks: Sequence[Buffer]) -> StoredObject:
        url = self.url_for(key)
        _, ref = self.trust.check(url, None)
        if ref.scheme == "file":
            return await asyncio.to_thread(self.write, key, chunks)
        digest, nbytes = await asyncio.to_thread(_digest, chunks)
        with _mapped(url, None):
            await obstore.put_async(
                self._bucket(ref.bucket), ref.key, _nonempty(chunks), chunk_size=_PART_BYTES
            )
        return StoredObject(url, nbytes, digest)

    async def delete_async(self, url: str) -> None:
        _, ref = self.trust.check(url, None)
        if ref.scheme == "file":
            await asyncio.to_thread(self.delete, url)
            return
        with _mapped(url, None, missing_ok=True):
            await obstore.delete_async(self._bucket(ref.bucket), ref.key)

    # -- S3 clients -----------------------------------------------------------------------------

    def _bucket(self, bucket: str) -> S3Store:
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets[bucket] = _s3_store(self.settings, bucket)
        return store


def _s3_store(s: StoreSettings, bucket: str) -> S3Store:
    config: dict[str, Any] = {
        "region": s.region,
        "virtual_hosted_style_request": s.virtual_hosted_style,
    }
    if s.endpoint:
        config["endpoint"] = s.endpoint
    if s.access_key_id:
        config["access_key_id"] = s.access_key_id
    if s.secret_access_key:
        config["secret_access_key"] = s.secret_access_key.get_secret_value()
    if s.session_token:
        config["token"] = s.session_token.get_secret_value()
    return S3Store(
        bucket,
        client_options={
            "allow_http": s.allow_http,
            "timeout": timedelta(seconds=s.timeout_s),
            "connect_timeout": timedelta(seconds=s.connect_timeout_s),
        },
        retry_config={
            "max_retries": s.request_retries,
            "retry_timeout": timedelta(seconds=s.timeout_s),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
            },
        },
        **config,
    )


class _mapped:
    """Turns the store client's exceptions into StoreErrors with the reference in the message."""

    def __init__(self, url: str, request_id: str | None, *, missing_ok: bool = False) -> None:
        self.url, self.request_id, self.missing_ok = url, request_id, missing_ok

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if exc is None or isinstance(exc, StoreError) or not isinstance(exc, Exception):
            return False
        url, rid = self.url[:300], self.request_id
        if isinstance(exc, FileNotFoundError):
            if self.missing_ok:
                return True
            raise ObjectMissing(f"{url} does not exist", request_id=rid) from exc
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError | PermissionError):
            raise StoreUnavailable(
                f"the store refused access to {url} (credentials or permissions): {_first_line(exc)}",
                request_id=rid,
            ) from exc
        if isinstance(exc, IsADirectoryError | NotADirectoryError):
            raise ObjectMissing(f"{url} is not an object", request_id=rid) from exc
        raise StoreUnavailable(
            f"the store failed on {url}: {_first_line(exc)}", request_id=rid
        ) from exc


# The client's messages name the endpoint ("Error performing HEAD http://10.0.0.5:9000/..."):
# these messages reach producers in error results, which should not learn internal addresses.
_ENDPOINT_URL = re.compile(r"https?://[^\s/]+")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return _ENDPOINT_URL.sub("<endpoint>", line)[:300]


def _first(nbytes: int) -> GetOptions:
    # Never more than the reference declares, whatever the object grew to since the head.
    return {"range": (0, nbytes)} if nbytes else {}


def _exact(data: Any) -> Buffer:
    return memoryview(data)


# The messages below go back to whoever sent the reference: they say that the object differs,
# never what it holds instead (its real size or hash would let a producer that guessed a key
# reference someone else's object correctly).
def _check_size(actual: int, nbytes: int, url: str, request_id: str | None) -> None:
    if actual != nbytes:
        raise ObjectMismatch(
            f"{url[:300]} is not {nbytes} bytes long, as the reference says", request_id=request_id
        )


def _verify(data: Buffer, nbytes: int, sha256: str, url: str, request_id: str | None) -> None:
    view = memoryview(data)
    _check_size(view.nbytes, nbytes, url, request_id)
    if hashlib.sha256(view).hexdigest() != sha256.lower():
        raise ObjectMismatch(
            f"{url[:300]} does not have the sha256 the reference says", request_id=request_id
        )


def _digest(chunks: Sequence[Buffer]) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        h.update(view)
        total += view.nbytes
    return h.hexdigest(), total


def _nonempty(chunks: Sequence[Buffer]) -> list[memoryview]:
    return [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]


def _read_file(path: Path, nbytes: int, url: str, request_id: str | None) -> Buffer:
    # O_NOFOLLOW on the last component: the path was resolved, so a link now is a swap.
    # O_NONBLOCK: opening a FIFO someone put in the root would otherwise block for ever; only a
    # regular file is read.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ObjectMissing(f"{url[:300]} is not a regular file", request_id=request_id)
        _check_size(info.st_size, nbytes, url, request_id)
        view = np.empty(nbytes, dtype=np.uint8).data
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return view[:got]


def _write_file(path: Path, chunks: Sequence[Buffer]) -> None:
    # Written beside its final name, then renamed: a reader sees the whole object or none.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def object_url(url: str) -> ObjectUrl:
    """Parse without trusting (for tests and tools)."""
    return ObjectUrl.parse(url, None)
