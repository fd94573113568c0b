"""The SDK's side of stored payloads, with a real directory as the store: when a matrix is
stored, how stored factors are fetched, verified and deleted, and what it refuses to read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from objectstore import PayloadStore, StoreSettings
from producer_sdk import SvdInvalidRequest, _wire
from producer_sdk.errors import InvalidReply
from producer_sdk.result import SvdResult
from producer_sdk.testing import FakeSvdClient
from schemas import codec
from schemas.errors import ErrorCode
from schemas.models import ObjectRef, SvdResultMeta, Timings, WorkerInfo

RNG = np.random.default_rng(5)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-1])


def _fake(root: Path, **overrides: Any) -> FakeSvdClient:
    return FakeSvdClient(store={"url": f"file://{root}"}, **overrides)


async def test_a_matrix_above_the_threshold_travels_by_reference(tmp_path: Path) -> None:
    a = RNG.standard_normal((300, 300))  # 720 KB: above the 512 KiB default
    async with _fake(tmp_path) as fake:
        r = await fake.svd(a)
        small = await fake.svd(RNG.standard_normal((8, 8)))
    stored, inline = fake.requests
    assert stored.schema_version == 2 and stored.matrix.ref.nbytes == a.nbytes  # type: ignore[attr-defined]
    assert stored.result_encoding == "binary"
    assert inline.schema_version == 2 and not hasattr(inline.matrix, "ref")
    assert np.allclose((r.u * r.s) @ r.vt, a) and small.s.shape == (8,)
    assert _files(tmp_path) == []  # the request's object deleted, the answer inline


async def test_integers_are_sized_as_the_float64_they_become(tmp_path: Path) -> None:
    a = RNG.integers(-5, 5, size=(300, 300), dtype=np.int8)  # 90 KB as int8, 720 KB as float64
    async with _fake(tmp_path) as fake:
        await fake.svd(a)
    assert hasattr(fake.requests[0].matrix, "ref")


async def test_payloads_inline_keeps_everything_in_the_records_in_version_1(
    tmp_path: Path,
) -> None:
    async with _fake(tmp_path, payloads="inline") as fake:
        await fake.svd(RNG.standard_normal((300, 300)))
    assert fake.requests[0].schema_version == 1
    assert _files(tmp_path) == []


async def test_without_a_store_requests_stay_version_1() -> None:
    async with FakeSvdClient() as fake:
        await fake.svd(RNG.standard_normal((300, 300)))
    assert fake.requests[0].schema_version == 1


def _stored_result(store: PayloadStore, a: Any) -> tuple[codec.StoredResult, Any]:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    wire = codec.stored_factors(u, s, vt)
    obj = store.write("results/r1", [w.data for w in wire.values()])
    meta = SvdResultMeta(
        schema_version=2, request_id="r1",
        timings=Timings(queue_wait_ms=0, compute_ms=0, total_ms=0),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )  # fmt: skip
    out = memoryview(bytearray(codec.STORED_RESULT_ROOM))
    ref = ObjectRef(url=obj.url, nbytes=obj.nbytes, sha256=obj.sha256)
    size, headers = codec.write_stored_result(meta, wire, ref, out)
    reply = codec.decode_reply(bytes(out[:size]), headers)
    assert isinstance(reply, codec.StoredResult)
    return reply, obj


async def test_stored_factors_are_fetched_verified_and_deleted(tmp_path: Path) -> None:
    store = PayloadStore(StoreSettings(url=f"file://{tmp_path}"))
    a = RNG.standard_normal((40, 30))
    reply, _ = _stored_result(store, a)
    result = await _wire.fetch_stored(store, reply, delete=True)
    assert isinstance(result, SvdResult)
    assert np.allclose((result.u * result.s) @ result.vt, a)
    assert list(store.list()) == []
    listener_copy, _ = _stored_result(store, a)
    assert isinstance(await _wire.fetch_stored(store, listener_copy, delete=False), SvdResult)
    assert len(list(store.list())) == 1  # a listener leaves it to the requester


async def test_stored_factors_outside_the_clients_store_are_not_read(tmp_path: Path) -> None:
    theirs = PayloadStore(StoreSettings(url=f"file://{tmp_path / 'theirs'}"))
    reply, _ = _stored_result(theirs, RNG.standard_normal((4, 4)))
    mine = PayloadStore(StoreSettings(url=f"file://{tmp_path / 'mine'}"))
    result = await _wire.fetch_stored(mine, reply, delete=True)
    assert isinstance(result, SvdInvalidRequest) and result.code is ErrorCode.UNTRUSTED_REFERENCE
    assert len(list(theirs.list())) == 1  # untouched
    no_store = await _wire.fetch_stored(None, reply, delete=True)
    assert isinstance(no_store, InvalidReply) and no_store.code is ErrorCode.UNTRUSTED_REFERENCE


@pytest.mark.parametrize("damage", ["truncate", "delete"])
async def test_a_damaged_stored_result_is_an_error_not_wrong_factors(
    tmp_path: Path, damage: str
) -> None:
    store = PayloadStore(StoreSettings(url=f"file://{tmp_path}"))
    reply, obj = _stored_result(store, RNG.standard_normal((6, 6)))
    _damage(Path(obj.url.removeprefix("file://")), damage)
    result = await _wire.fetch_stored(store, reply, delete=True)
    expected = ErrorCode.OBJECT_NOT_FOUND if damage == "delete" else ErrorCode.OBJECT_MISMATCH
    assert isinstance(result, SvdInvalidRequest) and result.code is expected
