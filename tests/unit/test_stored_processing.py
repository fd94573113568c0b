"""A worker's pass over stored payloads (schema_version 2), with a real directory as the store:
read, verified and checked before computing; large factors written to the store and referenced.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from consumer import processing
from consumer.jobs import Answered, NeedsRoom, Refused, WorkerContext
from objectstore import PayloadStore, StoreSettings
from schemas import codec
from schemas.errors import ErrorCode
from schemas.limits import DecodeLimits
from schemas.models import ObjectRef
from tests.support.kafka_io import make_request
from tests.support.sparse import random_sparse

RNG = np.random.default_rng(17)
STORED_LIMITS = DecodeLimits(max_stored_result_bytes=1 << 30)


@pytest.fixture
def store(tmp_path: Path) -> PayloadStore:
    return PayloadStore(StoreSettings(url=f"file://{tmp_path}"))


def _context(store: PayloadStore, results_above: int = 1 << 20) -> WorkerContext:
    return WorkerContext(
        STORED_LIMITS, "instance-1", "host-1", store=store.settings,
        store_results_above=results_above,
    )  # fmt: skip


def _stored(store: PayloadStore, a: Any, **fields: Any) -> tuple[str, codec.EncodedMessage, str]:
    """The request the SDK sends for ``a``: its binary value in the store, a reference in JSON."""
    request_id, message = make_request(a, **fields)
    obj = store.write(f"requests/{request_id}", [message.value])
    ref = ObjectRef(url=obj.url, nbytes=obj.nbytes, sha256=obj.sha256)
    return request_id, codec.to_stored(message, ref), obj.url


def _answer(
    message: codec.EncodedMessage, context: WorkerContext, room: int = 1 << 22, origin: str = ""
) -> tuple[Answered | Refused | NeedsRoom, memoryview]:
    out = memoryview(bytearray(room))
    item = processing.Item(memoryview(message.value), list(message.headers), out, origin=origin)
    (outcome,) = processing.answer_all([item], context=context, dispatched_at=time.time())
    return outcome, out


def _reply(outcome: Any, out: memoryview) -> Any:
    assert isinstance(outcome, Answered), outcome
    return codec.decode_reply(bytes(out[: outcome.value_bytes]), list(outcome.headers))


def test_a_stored_matrix_is_read_verified_and_answered_in_version_2(store: PayloadStore) -> None:
    a = RNG.standard_normal((40, 30))
    _, message, url = _stored(store, a)
    assert orjson.loads(message.value)["schema_version"] == 2
    outcome, out = _answer(message, _context(store))
    reply = _reply(outcome, out)
    assert isinstance(reply, codec.DecodedResult)  # small factors travel inline
    assert reply.meta.schema_version == 2
    assert np.allclose((reply.u * reply.s) @ reply.vt, a)
    assert isinstance(outcome, Answered)
    assert outcome.request_object == url  # for the parent to delete once committed
    assert outcome.result_object is None


def test_large_factors_go_to_the_store_and_the_answer_references_them(
    store: PayloadStore,
) -> None:
    a = RNG.standard_normal((64, 48)).astype(np.float32)
    request_id, message, _ = _stored(store, a, options={"full_matrices": True})
    outcome, out = _answer(message, _context(store, results_above=1024), origin="svd-requests/3/77")
    assert isinstance(outcome, Answered)
    assert outcome.value_bytes <= codec.STORED_RESULT_ROOM
    reply = _reply(outcome, out)
    assert isinstance(reply, codec.StoredResult)
    expected_key = hashlib.sha256(request_id.encode()).hexdigest()[:16]
    key = f"results/svd-requests/3/77-{expected_key}-{reply.ref.sha256[:16]}"
    assert reply.ref.url == store.url_for(key)
    assert outcome.result_object == reply.ref.url
    data = store.read(reply.ref.url, reply.ref.nbytes, reply.ref.sha256)
    result = codec.load_stored_result(reply, data)
    assert result.u is not None and result.u.shape == (64, 64) and result.u.dtype == np.float32
    assert result.vt is not None and result.vt.shape == (48, 48)
    k = result.s.size
    assert np.allclose((result.u[:, :k] * result.s) @ result.vt[:k], a, atol=1e-4)


def test_computing_the_same_record_again_overwrites_its_stored_result(store: PayloadStore) -> None:
    a = RNG.standard_normal((64, 64))
    _, message, _ = _stored(store, a)
    for _ in range(2):
        outcome, _ = _answer(message, _context(store, results_above=0), origin="t/0/5")
        assert isinstance(outcome, Answered)
    assert sum(1 for e in store.list("results/")) == 1


def test_a_version_1_request_never_gets_a_stored_result(store: PayloadStore) -> None:
    _, message = make_request(RNG.standard_normal((64, 64)), schema_version=1)
    outcome, out = _answer(message, _context(store, results_above=0))
    reply = _reply(outcome, out)
    assert isinstance(reply, codec.DecodedResult)
    assert reply.meta.schema_version == 1
    assert list(store.list()) == []


def test_a_stored_sparse_matrix_is_read_as_its_binary_layout(store: PayloadStore) -> None:
    matrix = random_sparse(RNG, (50, 40), density=0.06, fmt="csr")
    meta = codec.SvdRequestMeta.model_validate(
        {
            "request_id": "sp-1",
            "options": {"k": 3},
            "matrix": matrix.spec().model_dump(exclude_none=True),
        }
    )
    message = codec.encode_request(meta, matrix, codec.Encoding.BINARY)
    obj = store.write("requests/sp-1", [message.value])
    stored = codec.to_stored(message, ObjectRef(url=obj.url, nbytes=obj.nbytes, sha256=obj.sha256))
    outcome, out = _answer(stored, _context(store))
    reply = _reply(outcome, out)
    expected = np.linalg.svd(matrix.toarray(), compute_uv=False)[:3]
    assert np.allclose(reply.s, expected)


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("delete", ErrorCode.OBJECT_NOT_FOUND),
        ("truncate", ErrorCode.OBJECT_MISMATCH),
        ("overwrite", ErrorCode.OBJECT_MISMATCH),
        ("nan", ErrorCode.NON_FINITE),
    ],
)
def test_a_stored_matrix_that_is_not_usable_is_refused_before_compute(
    store: PayloadStore, tmp_path: Path, damage: str, code: ErrorCode
) -> None:
    a = RNG.standard_normal((8, 8))
    if damage == "nan":
        request_id, message = make_request(a)
        a[3, 4] = np.nan
        # A producer that stores NaN: the hash matches, the value check does not.
        obj = store.write(f"requests/{request_id}", [a])
        message = codec.to_stored(
            message, ObjectRef(url=obj.url, nbytes=obj.nbytes, sha256=obj.sha256)
        )
    else:
        request_id, message, url = _stored(store, a)
        path = Path(url.removeprefix("file://"))
        if damage == "delete":
            path.unlink()
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[:-8])
        else:
            path.write_bytes(b"\0" * 8 * 64)
    outcome, _ = _answer(message, _context(store))
    assert isinstance(outcome, Refused)
    assert (outcome.code, outcome.request_id, outcome.computed) == (code, request_id, False)
    assert not outcome.retryable


def test_an_untrusted_reference_is_refused_and_nothing_is_read(
    store: PayloadStore, tmp_path: Path
) -> None:
    secret = tmp_path.parent / "secret.bin"
    secret.write_bytes(b"\0" * 32)
    body = {
        "schema_version": 2,
        "request_id": "evil-1",
        "matrix": {
            "shape": [2, 2],
            "dtype": "float64",
            "ref": {
                "url": f"file://{secret}",
                "nbytes": 32,
                "sha256": hashlib.sha256(b"\0" * 32).hexdigest(),
            },
        },
    }
    message = codec.EncodedMessage(
        b"evil-1", orjson.dumps(body), [("content-type", b"application/json")]
    )
    outcome, _ = _answer(message, _context(store))
    assert isinstance(outcome, Refused)
    assert outcome.code == ErrorCode.UNTRUSTED_REFERENCE
    assert "outside the trusted stores" in outcome.message


def test_a_service_without_a_store_refuses_references(store: PayloadStore) -> None:
    _, message, _ = _stored(store, RNG.standard_normal((4, 4)))
    outcome, _ = _answer(message, WorkerContext(DecodeLimits(), "i", "h"))
    assert isinstance(outcome, Refused)
    assert outcome.code == ErrorCode.UNTRUSTED_REFERENCE


def test_an_unreachable_store_is_refused_as_store_unavailable_to_be_tried_again() -> None:
    settings = StoreSettings(
        url="s3://svd-payloads", endpoint="http://127.0.0.1:9", allow_http=True,
        access_key_id="k", secret_access_key="s", request_retries=0, connect_timeout_s=1,
    )  # fmt: skip
    a = RNG.standard_normal((4, 4))
    request_id, message = make_request(a)
    ref = ObjectRef(
        url=f"s3://svd-payloads/requests/{request_id}",
        nbytes=a.nbytes,
        sha256=hashlib.sha256(message.value).hexdigest(),
    )
    stored = codec.to_stored(message, ref)
    context = WorkerContext(STORED_LIMITS, "i", "h", store=settings, store_results_above=1 << 20)
    outcome, _ = _answer(stored, context)
    assert isinstance(outcome, Refused)
    assert (outcome.code, outcome.again, outcome.retryable) == (
        ErrorCode.STORE_UNAVAILABLE,
        True,
        True,
    )


def test_factors_kept_inline_as_json_are_held_to_the_record_limit_with_a_store(
    store: PayloadStore,
) -> None:
    # With a store the service could take these factors, but they stay under its threshold, so
    # they would travel as JSON text: three times their size, over this record limit.
    limits = DecodeLimits(max_result_bytes=64 * 1024, max_stored_result_bytes=1 << 30)
    context = WorkerContext(limits, "i", "h", store=store.settings, store_results_above=1 << 20)
    _, message = make_request(
        RNG.standard_normal((64, 64)), encoding=codec.Encoding.JSON, options={"full_matrices": True}
    )
    outcome, _ = _answer(message, context)
    assert isinstance(outcome, Refused)
    assert outcome.code == ErrorCode.LIMIT_EXCEEDED and "JSON result" in outcome.message
