"""Sparse matrices and the SVD options through the service's machinery, without a broker:
shared memory (never densified, the record's bytes never written), a real worker pool, the
request's price, and the options reaching the worker."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer import admission, compute, worker
from consumer.dispatch import Dispatcher
from consumer.flow import Budget, InFlight
from consumer.jobs import (
    Answered,
    JobOutcome,
    PreparedJob,
    Record,
    Refused,
    WorkerContext,
    prepare_job,
)
from consumer.metrics import Metrics
from consumer.pool import WorkerPool
from consumer.settings import ConsumerSettings
from consumer.truncated import seed_from
from schemas import SvdRequestMeta, codec
from schemas.errors import ErrorCode
from schemas.limits import DecodeLimits
from schemas.sparse import SparseMatrix
from tests.support.sparse import random_sparse

LIMITS = DecodeLimits()
CONTEXT = WorkerContext(LIMITS, instance_id="test", host=socket.gethostname())


def _reference(matrix: SparseMatrix | np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any]:
    dense = matrix.toarray() if isinstance(matrix, SparseMatrix) else matrix
    return np.linalg.svd(dense.astype(np.float64), compute_uv=False)[:k]


def _request(
    request_id: str, matrix: SparseMatrix | np.ndarray[Any, Any], **options: Any
) -> codec.EncodedMessage:
    spec = matrix.spec() if isinstance(matrix, SparseMatrix) else {
        "shape": list(matrix.shape), "dtype": matrix.dtype.name,
    }  # fmt: skip
    meta = SvdRequestMeta.model_validate(
        {"request_id": request_id, "matrix": spec, "options": options}
    )
    return codec.encode_request(meta, matrix, codec.Encoding.BINARY)


def _consumer_record(message: codec.EncodedMessage) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="svd-requests", partition=0, offset=0, timestamp=0, timestamp_type=0,
        key=message.key, value=message.value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(message.value), headers=tuple(message.headers),
    )  # fmt: skip


def _record(message: codec.EncodedMessage) -> Record:
    """A job's record, with the room its admission reserved for the answer."""
    ticket = admission.price(_consumer_record(message), LIMITS)
    return Record(message.value, message.headers, None, ticket.answer_bytes)


def _cases() -> list[tuple[SparseMatrix | np.ndarray[Any, Any], dict[str, Any], str]]:
    """(matrix, options, the algorithm the result must name)."""
    rng = np.random.default_rng(0)
    return [
        (random_sparse(rng, (40, 30), fmt="coo"), {"k": 3, "quality": True}, "arpack"),
        (rng.standard_normal((20, 10)), {"k": 2}, "dense-topk"),  # dense, in the same block
        (random_sparse(rng, (25, 35), fmt="csc", dtype=np.float32), {"k": 25, "compute_uv": False}, "arpack"),
        (random_sparse(rng, (30, 30), fmt="csr", index_dtype=np.int64), {"k": 4, "algorithm": "lobpcg"}, "lobpcg"),
        (random_sparse(rng, (12, 9), fmt="csr"), {"k": 2, "algorithm": "randomized"}, "randomized"),
    ]  # fmt: skip


def _replies(prepared: PreparedJob, outcome: JobOutcome) -> list[codec.DecodedResult]:
    replies = []
    for index, item in enumerate(outcome.items):
        assert isinstance(item, Answered), item
        with prepared.answer(index, item) as value:
            reply = codec.decode_reply(bytes(value), list(item.headers))
        assert isinstance(reply, codec.DecodedResult)
        replies.append(reply)
    return replies


def test_sparse_items_share_a_block_with_dense_ones_and_the_records_stay_intact() -> None:
    cases = _cases()
    records = [_record(_request(f"r-{i}", m, **o)) for i, (m, o, _) in enumerate(cases)]
    with prepare_job(records, CONTEXT) as prepared:
        block = prepared.block
        before = [bytes(block.view(item.value)) for item in prepared.job.items]
        outcome = worker.run_job(prepared.job)  # the worker's code, in this process
        replies = _replies(prepared, outcome)
        for (matrix, options, algorithm), reply in zip(cases, replies, strict=True):
            np.testing.assert_allclose(
                reply.s, _reference(matrix, options["k"]), rtol=2e-4, atol=1e-5
            )
            assert (reply.u is None) is (options.get("compute_uv") is False)
            assert reply.meta.algorithm == algorithm
        assert replies[0].meta.quality is not None
        assert replies[0].meta.quality.orthogonality_error < 1e-12
        # Sorting and summing the entries happened on copies: the records are as received.
        after = [bytes(block.view(item.value)) for item in prepared.job.items]
        assert after == before == [r.value for r in records]


def test_a_sparse_item_holds_its_arrays_not_the_dense_matrix() -> None:
    matrix = random_sparse(np.random.default_rng(1), (2000, 1500), density=0.001)
    message = _request("thin-1", matrix, k=2)
    with prepare_job([_record(message)], CONTEXT) as prepared:
        (item,) = prepared.job.items
        layouts = prepared.job.block.arrays
        assert layouts[item.value].nbytes == len(message.value)  # the record as it came
        assert layouts[item.answer].nbytes == (2000 * 2 + 2 + 2 * 1500) * 8  # its factors
        assert prepared.job.block.size < 2000 * 1500  # far below the dense matrix's 24 MB
        (outcome,) = worker.run_job(prepared.job).items
        assert isinstance(outcome, Answered)


def _with_options(message: codec.EncodedMessage, options: dict[str, Any]) -> codec.EncodedMessage:
    """``message`` with other options in its svd-meta: what the SDK would have refused."""
    headers = [(n, v) for n, v in message.headers if n != "svd-meta"]
    meta = orjson.loads(dict(message.headers)["svd-meta"])
    headers.append(("svd-meta", orjson.dumps({**meta, "options": options})))
    return codec.EncodedMessage(key=message.key, value=message.value, headers=headers)


@pytest.mark.parametrize(
    ("matrix", "options", "match"),
    [
        (random_sparse(np.random.default_rng(2), (5, 4)), {}, "needs options.k"),
        (random_sparse(np.random.default_rng(2), (5, 4)), {"k": 2, "algorithm": "dense"}, "densify"),
        (np.ones((5, 4)), {"algorithm": "arpack"}, "needs k"),
        (np.ones((5, 4)), {"k": 2, "algorithm": "jacobi"}, "algorithm"),
    ],
)  # fmt: skip
def test_invalid_requests_are_refused_before_any_compute(
    matrix: Any, options: dict[str, Any], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_compute(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("computed")

    monkeypatch.setattr(compute, "svd", must_not_compute)
    message = _with_options(_request("bad-1", matrix, k=2), options)
    with prepare_job([_record(message)], CONTEXT) as prepared:
        (outcome,) = worker.run_job(prepared.job).items
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.INVALID_SCHEMA
    assert match in outcome.message and outcome.request_id == "bad-1" and not outcome.computed


async def test_through_a_real_worker_pool() -> None:
    cases = _cases()
    records = [_record(_request(f"p-{i}", m, **o)) for i, (m, o, _) in enumerate(cases)]
    async with WorkerPool(1, 1) as pool:
        with prepare_job(records, CONTEXT) as prepared:
            outcome = await pool.run(prepared.job, timeout=60)
            for (matrix, options, _), reply in zip(cases, _replies(prepared, outcome), strict=True):
                np.testing.assert_allclose(reply.s, _reference(matrix, options["k"]), rtol=2e-4)


# --- the request's price and its options on the way to the worker -------------------------------


def test_a_sparse_request_is_priced_by_its_arrays_never_dense() -> None:
    # 10000 x 8000 with 4000 entries: 640 MB dense, well under 1 MB as it travels.
    matrix = random_sparse(np.random.default_rng(3), (10_000, 8_000), density=0.00005)
    message = _request("price-1", matrix, k=2)
    assert len(message.value) < 1 << 20
    ticket = admission.price(_consumer_record(message), LIMITS)
    factors = 10_000 * 2 + 2 + 2 * 8_000
    assert ticket.answer_bytes == 8 * factors  # exact, from the svd-meta header
    assert ticket.cost == 2 * len(message.value) + 2 * 8 * factors
    as_float32 = _request("price-1", matrix, k=2, dtype="float32")
    ticket32 = admission.price(_consumer_record(as_float32), LIMITS)
    assert ticket32.answer_bytes == 4 * factors
    assert ticket32.cost == 2 * len(as_float32.value) + 2 * 4 * factors


class InProcessPool:
    """The worker's code run in this process; records every job it was given."""

    size = 1

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    async def run(self, job: Any, timeout: float | None = None) -> Any:
        self.jobs.append(job)
        return worker.run_job(job)


async def test_the_algorithm_and_a_seed_from_the_request_id_reach_the_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []
    real = compute.svd

    def spy(a: Any, **options: Any) -> compute.SvdFactors:
        calls.append(options)
        return real(a, **options)

    monkeypatch.setattr(compute, "svd", spy)
    matrix = random_sparse(np.random.default_rng(4), (30, 20))
    message = _request("price-1", matrix, k=3, algorithm="lobpcg")
    pool = InProcessPool()
    settings = ConsumerSettings()  # batched or not, the job reaches the pool
    metrics = Metrics()
    inflight = InFlight(Budget(max_requests=10, max_bytes=1 << 30))
    dispatcher = Dispatcher(settings, pool, metrics, inflight)  # type: ignore[arg-type]
    try:
        delivery, attempts = await dispatcher.run(
            admission.price(_consumer_record(message), LIMITS)
        )
        try:
            assert isinstance(delivery.outcome, Answered) and delivery.value is not None
            reply = codec.decode_reply(bytes(delivery.value), list(delivery.outcome.headers))
        finally:
            delivery.release()
    finally:
        dispatcher.close()
    assert attempts == 1 and len(pool.jobs) == 1
    (call,) = calls
    assert call["algorithm"] == "lobpcg" and call["seed"] == seed_from("price-1")
    assert isinstance(reply, codec.DecodedResult)
    assert (reply.meta.algorithm, reply.meta.driver) == ("lobpcg", "svds")
    np.testing.assert_allclose(reply.s, _reference(matrix, 3), rtol=1e-7)
    assert reply.meta.timings.queue_wait_ms < 60_000  # since it was dispatched, not the epoch
