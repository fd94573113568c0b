"""Sparse matrices and the SVD options through the service's machinery, without a broker:
shared memory (never densified, inputs never written), a real worker pool, the request's price,
and the options reaching the worker."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord

from consumer import truncated
from consumer.handler import prepare
from consumer.metrics import Metrics
from consumer.pool import WorkerPool
from consumer.settings import ConsumerSettings
from consumer.work import Computer
from consumer.worker import JobItem, SvdTask, prepare_job, run_job
from schemas import SvdRequestMeta, codec
from schemas.limits import DecodeLimits
from schemas.sparse import SparseMatrix
from tests.support.sparse import random_sparse


def _reference(matrix: SparseMatrix | np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any]:
    dense = matrix.toarray() if isinstance(matrix, SparseMatrix) else matrix
    return np.linalg.svd(dense.astype(np.float64), compute_uv=False)[:k]


def _tasks() -> list[SvdTask]:
    rng = np.random.default_rng(0)
    return [
        SvdTask(random_sparse(rng, (40, 30), fmt="coo"), k=3, quality=True),
        SvdTask(rng.standard_normal((20, 10)), k=2),  # dense, in the same block
        SvdTask(random_sparse(rng, (25, 35), fmt="csc", dtype=np.float32), k=25, compute_uv=False),
        SvdTask(random_sparse(rng, (30, 30), fmt="csr", index_dtype=np.int64), k=4, algorithm="lobpcg"),
        SvdTask(random_sparse(rng, (12, 9), fmt="csr"), k=2, algorithm="randomized", seed=5),
    ]  # fmt: skip


def test_sparse_items_share_a_block_with_dense_ones_and_inputs_stay_intact() -> None:
    tasks = _tasks()
    with prepare_job(tasks) as job:
        inputs = {
            region: job.block.array(region).copy()
            for item in job.job.items
            for region in (item.a, *(item.sparse_index or ()))
        }
        outcome = run_job(job.job)  # the worker's code, in this process
        for index, (task, item) in enumerate(zip(tasks, outcome.items, strict=True)):
            out = job.outputs(outcome, index)
            np.testing.assert_allclose(
                out.s, _reference(task.matrix, task.k or 0), rtol=2e-4, atol=1e-5
            )
            assert (out.u is None) is (not task.compute_uv)
            expected = task.algorithm or ("arpack" if index != 1 else "dense-topk")
            assert item.algorithm == expected
        assert outcome.items[0].quality is not None
        assert outcome.items[0].quality.orthogonality < 1e-12
        for region, before in inputs.items():  # sorting and summing happened on copies
            np.testing.assert_array_equal(job.block.array(region), before)


def test_a_sparse_item_holds_its_arrays_not_the_dense_matrix() -> None:
    matrix = random_sparse(np.random.default_rng(1), (2000, 1500), density=0.001)
    with prepare_job([SvdTask(matrix, k=2)]) as job:
        (item,) = job.job.items
        assert item.sparse_format == "csr" and item.sparse_shape == (2000, 1500)
        layouts = job.job.block.arrays
        assert layouts[item.a].shape == (matrix.nnz,)
        assert job.job.block.size < 2000 * 1500  # far below the dense matrix's 24 MB


def test_job_items_stay_plain_values() -> None:
    # What crosses the worker's pipe (tests/unit/test_no_pickle.py): no new types.
    hints = typing.get_type_hints(JobItem)
    for field in dataclasses.fields(JobItem):
        leaves = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        assert leaves <= {int, str, bool, type(None), tuple[int, int]}, field.name


@pytest.mark.parametrize(
    ("task", "match"),
    [
        (SvdTask(random_sparse(np.random.default_rng(2), (5, 4))), "needs k"),
        (SvdTask(random_sparse(np.random.default_rng(2), (5, 4)), k=2, algorithm="dense"), "densify"),
        (SvdTask(np.ones((5, 4)), algorithm="arpack"), "needs k"),
        (SvdTask(np.ones((5, 4)), k=2, algorithm="jacobi"), "unknown algorithm"),
    ],
)  # fmt: skip
def test_invalid_tasks_fail_before_any_shared_memory(task: SvdTask, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_job([task])


async def test_through_a_real_worker_pool() -> None:
    tasks = _tasks()
    async with WorkerPool(1, 1) as pool:
        with prepare_job(tasks) as job:
            outcome = await pool.run(job.job, timeout=60)
            for index, task in enumerate(tasks):
                s = job.outputs(outcome, index).s
                np.testing.assert_allclose(s, _reference(task.matrix, task.k or 0), rtol=2e-4)


# --- the request's price and its options on the way to the worker -------------------------------


def _record(message: codec.EncodedMessage) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="svd-requests", partition=0, offset=0, timestamp=0, timestamp_type=0,
        key=message.key, value=message.value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(message.value), headers=tuple(message.headers),
    )  # fmt: skip


def _sparse_request(matrix: SparseMatrix, **options: Any) -> codec.EncodedMessage:
    meta = SvdRequestMeta(request_id="price-1", options=options, matrix=matrix.spec())
    return codec.encode_request(meta, matrix, codec.Encoding.BINARY)


def test_a_sparse_request_is_priced_by_its_arrays() -> None:
    # 10000 x 8000 with 4000 entries: 640 MB dense, well under 1 MB as it travels.
    matrix = random_sparse(np.random.default_rng(3), (10_000, 8_000), density=0.00005)
    message = _sparse_request(matrix, k=2)
    prepared = prepare(_record(message), DecodeLimits())
    assert prepared.rejection is None
    factors = 10_000 * 2 + 2 + 2 * 8_000
    arrays = matrix.nnz * 8 + matrix.nnz * 4 + 10_001 * 4
    assert prepared.cost == len(message.value) + arrays + 2 * 8 * factors
    as_float32 = prepare(_record(_sparse_request(matrix, k=2, dtype="float32")), DecodeLimits())
    assert as_float32.cost == len(message.value) + arrays - matrix.nnz * 4 + 2 * 4 * factors


class CapturingPool:
    size = 1

    def __init__(self) -> None:
        self.items: list[JobItem] = []

    async def run(self, job: Any, timeout: float | None = None) -> Any:
        self.items.extend(job.items)
        return run_job(job)


async def test_the_algorithm_and_a_seed_from_the_request_id_reach_the_worker() -> None:
    matrix = random_sparse(np.random.default_rng(4), (30, 20))
    prepared = prepare(_record(_sparse_request(matrix, k=3, algorithm="lobpcg")), DecodeLimits())
    pool = CapturingPool()
    settings = ConsumerSettings()  # batched or not, the job reaches the pool
    computer = Computer(settings, pool, Metrics())  # type: ignore[arg-type]
    try:
        message = await computer.compute(prepared, "host")
    finally:
        computer.close()
    (item,) = pool.items
    assert item.algorithm == "lobpcg" and item.seed == truncated.seed_from("price-1")
    reply = codec.decode_reply(message.value, message.headers)
    assert isinstance(reply, codec.DecodedResult)
    assert (reply.meta.algorithm, reply.meta.driver) == ("lobpcg", "svds")
    np.testing.assert_allclose(reply.s, _reference(matrix, 3), rtol=1e-7)
