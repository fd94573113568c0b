"""objectstore: which references are read at all, and that reads are bounded and verified.

The store here is a real directory (file://); the S3 side runs against a real S3-compatible
server in tests/integration/test_stored_payloads.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from objectstore import (
    Location,
    ObjectMismatch,
    ObjectMissing,
    PayloadStore,
    StoreSettings,
    StoreUnavailable,
    Trust,
    UntrustedLocation,
)
from schemas.errors import ErrorCode


def _store(root: Path, **settings: object) -> PayloadStore:
    return PayloadStore(StoreSettings(url=f"file://{root}", **settings))


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://svd-payloads.s3.amazonaws.com/requests/a",
        "s3://other-bucket/requests/a",
        "s3://svd-payloads/elsewhere/a",  # outside the configured prefix
        "s3://svd-payloads/pre/../elsewhere/a",
        "s3://svd-payloads/pre/./a",
        "s3://svd-payloads/pre//a",
        "s3://svd-payloads/pre/a%2F..%2Fb",
        "s3://svd-payloads/pre/a?versionId=1",
        "s3://svd-payloads/pre/a#frag",
        "s3://user:pw@svd-payloads/pre/a",
        "s3://svd-payloads:9000/pre/a",
        "s3://svd-payloads/pre/a b",
        "s3://svd-payloads/pre/\u00e9",
        "s3://svd-payloads/pre/a\\b",
        "s3://svd-payloads/pre/",
        "s3://SVD/pre/a",
        "file:///etc/passwd",
        "file://host/srv/a",
        "ftp://svd-payloads/pre/a",
        "S3://svd-payloads/pre/a",
        "File:///srv/a",
        "svd-payloads/pre/a",
        "",
    ],
)
def test_a_reference_outside_the_trusted_locations_is_refused_before_any_io(url: str) -> None:
    # An endpoint nothing listens on: a fetch would fail with STORE_UNAVAILABLE, not this.
    store = PayloadStore(
        StoreSettings(
            url="s3://svd-payloads/pre",
            endpoint="http://127.0.0.1:9",
            allow_http=True,
            access_key_id="k",
            secret_access_key="s",
        )
    )
    with pytest.raises(UntrustedLocation) as caught:
        store.read(url, 8, "0" * 64, "req-1")
    assert caught.value.code is ErrorCode.UNTRUSTED_REFERENCE
    assert caught.value.request_id == "req-1"


def test_trusted_urls_extend_what_is_read_but_not_where_it_writes() -> None:
    settings = StoreSettings(url="s3://mine/p", trusted_urls="s3://shared/in, s3://other")
    trust = settings.trust()
    assert trust.check("s3://shared/in/a", None)[0] == Location("s3", "shared", "in/")
    assert trust.check("s3://other/any/key", None)[0] == Location("s3", "other", "")
    with pytest.raises(UntrustedLocation):
        trust.check("s3://shared/out/a", None)
    assert PayloadStore(settings).url_for("results/x") == "s3://mine/p/results/x"


@pytest.mark.parametrize("url", ["http://x", "s3://b/../x", "file://h/x", "s3://B"])
def test_a_bad_configured_location_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError, match="store location"):
        StoreSettings(url=url)


def test_the_secret_never_shows(tmp_path: Path) -> None:
    settings = StoreSettings(url="s3://bkt", access_key_id="AKIA", secret_access_key="hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in settings.describe()
    assert "hunter2" not in str(settings.model_dump())


def test_a_file_store_writes_hashed_objects_and_reads_them_back_verified(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a = np.arange(12, dtype="<f8").reshape(3, 4)
    stored = store.write("requests/r1", [a[:1], a[1:]])
    assert stored.url == f"file://{tmp_path}/requests/r1"
    assert stored.nbytes == a.nbytes
    assert stored.sha256 == hashlib.sha256(a.tobytes()).hexdigest()
    data = store.read(stored.url, stored.nbytes, stored.sha256)
    assert bytes(data) == a.tobytes()
    assert [e.url for e in store.list()] == [stored.url]
    store.delete(stored.url)
    store.delete(stored.url)  # gone already: fine
    assert list(store.list()) == []


def test_a_missing_object_is_object_not_found(tmp_path: Path) -> None:
    with pytest.raises(ObjectMissing) as caught:
        _store(tmp_path).read(f"file://{tmp_path}/requests/none", 8, "0" * 64, "r")
    assert caught.value.code is ErrorCode.OBJECT_NOT_FOUND


@pytest.mark.parametrize("change", ["shorter", "longer", "same size, other bytes"])
def test_an_object_that_is_not_what_its_reference_says_is_object_mismatch(
    tmp_path: Path, change: str
) -> None:
    store = _store(tmp_path)
    stored = store.write("requests/r", [b"x" * 64])
    path = tmp_path / "requests" / "r"
    path.write_bytes({"shorter": b"x" * 63, "longer": b"x" * 65}.get(change, b"y" * 64))
    with pytest.raises(ObjectMismatch) as caught:
        store.read(stored.url, stored.nbytes, stored.sha256)
    assert caught.value.code is ErrorCode.OBJECT_MISMATCH


def test_a_symlink_out_of_the_root_is_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.write_bytes(b"s" * 8)
    os.symlink(outside, root / "link")
    digest = hashlib.sha256(b"s" * 8).hexdigest()
    with pytest.raises(UntrustedLocation):
        _store(root).read(f"file://{root}/link", 8, digest)
    # A sibling whose name starts like the root is outside it too.
    sibling = tmp_path / "root-other"
    sibling.mkdir()
    (sibling / "a").write_bytes(b"s" * 8)
    with pytest.raises(UntrustedLocation):
        _store(root).read(f"file://{sibling}/a", 8, digest)


def test_an_unreachable_s3_endpoint_is_store_unavailable_and_retryable() -> None:
    store = PayloadStore(
        StoreSettings(
            url="s3://svd-payloads",
            endpoint="http://127.0.0.1:9",
            allow_http=True,
            access_key_id="k",
            secret_access_key="s",
            request_retries=0,
            connect_timeout_s=1,
        )
    )
    with pytest.raises(StoreUnavailable) as caught:
        store.read("s3://svd-payloads/requests/a", 8, "0" * 64)
    assert caught.value.retryable
    assert caught.value.code is ErrorCode.STORE_UNAVAILABLE
    # The message reaches the producer: it says what failed, not where the endpoint is.
    assert "127.0.0.1:9" not in caught.value.message
    assert "<endpoint>" in caught.value.message


def test_the_async_api_reads_and_writes_the_same_objects(tmp_path: Path) -> None:
    store = _store(tmp_path)

    async def roundtrip() -> bytes:
        stored = await store.write_async("results/r", [b"abc", b"def"])
        data = await store.read_async(stored.url, stored.nbytes, stored.sha256)
        await store.delete_async(stored.url)
        return bytes(data)

    assert asyncio.run(roundtrip()) == b"abcdef"
    assert list(store.list()) == []


def test_trust_without_locations_refuses_everything() -> None:
    with pytest.raises(UntrustedLocation, match="no store configured"):
        Trust(()).check("s3://svd-payloads/a", None)


def test_a_fifo_in_the_root_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ObjectMissing, match="not a regular file"):
        _store(tmp_path).read(f"file://{tmp_path}/pipe", 8, "0" * 64)


def test_a_segment_longer_than_a_file_name_is_refused_not_fetched() -> None:
    store = PayloadStore(StoreSettings(url="s3://svd-payloads"))
    with pytest.raises(UntrustedLocation, match="longer than 255"):
        store.read("s3://svd-payloads/" + "a" * 256, 8, "0" * 64)


def test_content_suffixed_writes_never_replace_other_bytes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = store.write("results/r", [b"abc"], content_suffix=True)
    again = store.write("results/r", [b"abc"], content_suffix=True)
    other = store.write("results/r", [b"abd"], content_suffix=True)
    assert first == again  # the same bytes: the same object, nothing left behind
    assert other.url != first.url
    assert first.url.endswith("results/r-" + first.sha256[:16])
    assert bytes(store.read(first.url, 3, first.sha256)) == b"abc"
