"""The SVD options through the real service and broker: the automatic choice of algorithm and a
pinned one (the result names it), sparse matrices in JSON and binary (CSR, CSC, COO), values
only, and a malformed sparse matrix answered with its code."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumer.truncated import tolerance
from localkafka import TopicSettings
from schemas import SvdRequestMeta, codec
from schemas.errors import ErrorCode
from schemas.sparse import SparseMatrix
from tests.support.kafka_io import AnswerReader, make_request, produce
from tests.support.service import ServiceProcess
from tests.support.sparse import random_sparse

pytestmark = pytest.mark.kafka


def sparse_request(
    matrix: SparseMatrix, encoding: codec.Encoding, request_id: str | None = None, **options: Any
) -> tuple[str, codec.EncodedMessage]:
    request_id = request_id or uuid.uuid4().hex
    meta = SvdRequestMeta(request_id=request_id, options=options, matrix=matrix.spec())
    return request_id, codec.encode_request(meta, matrix, encoding)


def geometric(shape: tuple[int, int], ratio: float, seed: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    return np.asarray((u * ratio ** np.arange(min(m, n))) @ v.T)


def top_k(dense: np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any]:
    return np.linalg.svd(dense.astype(np.float64), compute_uv=False)[:k]


def check_triplets(dense: np.ndarray[Any, Any], result: codec.DecodedResult, tol: float) -> None:
    assert result.u is not None and result.vt is not None
    u, s, vt = (x.astype(np.float64) for x in (result.u, result.s, result.vt))
    scale = float(s[0])
    assert np.linalg.norm(dense @ vt.T - u * s, axis=0).max() <= tol * scale
    assert np.linalg.norm(dense.T @ u - vt.T * s, axis=0).max() <= tol * scale
    assert np.abs(u.T @ u - np.eye(len(s))).max() <= tol


async def test_algorithms_sparse_matrices_and_values_only_through_the_service(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    rng = np.random.default_rng(21)
    expected: dict[str, dict[str, Any]] = {}  # request id -> what its result must show
    messages = []

    def add(request: tuple[str, codec.EncodedMessage], **want: Any) -> None:
        request_id, message = request
        expected[request_id] = want
        messages.append(message)

    # The automatic choice: ARPACK for k small against a mid-size dense matrix...
    mid = rng.standard_normal((400, 300))
    add(make_request(mid, options={"k": 3}), dense=mid, k=3, algorithm="arpack", driver="svds")
    # ... LAPACK for a small one; values only.
    small = rng.standard_normal((30, 20))
    add(
        make_request(small, options={"k": 4, "compute_uv": False}, encoding=codec.Encoding.JSON),
        dense=small, k=4, algorithm="dense-topk", driver="gesdd", values_only=True,
    )  # fmt: skip
    add(
        make_request(small, options={"compute_uv": False}),
        dense=small, k=20, algorithm="dense", driver="gesdd", values_only=True,
    )  # fmt: skip
    # Pinned algorithms run as asked, in the request's dtype.
    decaying = geometric((200, 150), 0.6, seed=2)
    add(
        make_request(decaying, options={"k": 5, "algorithm": "randomized", "quality": True}),
        dense=decaying, k=5, algorithm="randomized", driver="gesdd", quality=True,
    )  # fmt: skip
    add(
        make_request(mid.astype(np.float32), options={"k": 3, "algorithm": "lobpcg"}),
        dense=mid.astype(np.float32), k=3, algorithm="lobpcg", driver="svds",
    )  # fmt: skip
    # Sparse: CSR in JSON, CSC and COO in binary; unsorted, with repeated entries.
    csr = random_sparse(rng, (300, 200), density=0.02, fmt="csr")
    add(
        sparse_request(csr, codec.Encoding.JSON, k=4, quality=True),
        dense=csr.toarray(), k=4, algorithm="arpack", driver="svds", quality=True,
    )  # fmt: skip
    csc = random_sparse(rng, (120, 160), density=0.05, fmt="csc", dtype=np.float32)
    add(
        sparse_request(csc, codec.Encoding.BINARY, k=2, algorithm="propack"),
        dense=csc.toarray(), k=2, algorithm="propack", driver="svds",
    )  # fmt: skip
    coo = random_sparse(rng, (50, 40), density=0.1, fmt="coo", index_dtype=np.int64)
    add(
        sparse_request(coo, codec.Encoding.BINARY, k=40, compute_uv=False),  # k = min(m, n)
        dense=coo.toarray(), k=40, algorithm="arpack", driver="svds", values_only=True,
    )  # fmt: skip
    # The documented COO example (docs/wire-format.md): its exact answer.
    documented = SparseMatrix(
        "coo",
        (3, 4),
        np.arange(1, 7, dtype=np.float32),
        (np.array([0, 0, 1, 2, 2, 2], np.int32), np.array([0, 2, 2, 0, 1, 3], np.int32)),
    )
    add(
        sparse_request(documented, codec.Encoding.BINARY, "demo-0005", k=2, compute_uv=False),
        dense=documented.toarray(), k=2, algorithm="arpack", driver="svds", values_only=True,
        exact=bytes.fromhex("4d9a0c41e0df6840"),
    )  # fmt: skip
    # A malformed sparse matrix: a column index past the shape.
    bad_id = uuid.uuid4().hex
    bad = SparseMatrix(
        "csr", (2, 3), np.ones(2), (np.array([0, 3], np.int32), np.array([0, 1, 2], np.int32))
    )
    spec = bad.spec()
    meta = SvdRequestMeta(request_id=bad_id, options={"k": 1}, matrix=spec)
    body = b"".join(a.tobytes() for a in bad.arrays().values())
    value, headers = (
        body,
        [
            ("content-type", b"application/vnd.svd.binary"),
            ("svd-meta", meta.model_dump_json(exclude_none=True).encode()),
        ],
    )
    messages.append((bad_id.encode(), value, headers))

    await produce(kafka_bootstrap, topics.requests, messages)
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", pool_size=2):
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect({*expected, bad_id}, timeout=180, dead_letters=1)

    (error,) = answers.errors[bad_id]
    assert error.code is ErrorCode.INVALID_SPARSE and "indices[1] = 3" in error.message
    (dead,) = answers.dead_letters
    assert dead.meta.code is ErrorCode.INVALID_SPARSE and dead.value == value
    assert set(answers.errors) == {bad_id}, answers.errors
    for request_id, want in expected.items():
        (result,) = answers.results[request_id]
        dense, k = want["dense"], want["k"]
        assert (result.meta.algorithm, result.meta.driver) == (want["algorithm"], want["driver"])
        assert result.s.dtype == dense.dtype and result.s.shape == (k,)
        tol = 1e-3 if dense.dtype == np.float32 else 1e-9
        if want["algorithm"] in ("randomized", "lobpcg"):  # verified to their residual tolerance
            tol = 2 * tolerance(dense.dtype)
        np.testing.assert_allclose(result.s, top_k(dense, k), rtol=tol, atol=tol * result.s[0])
        if want.get("values_only"):
            assert result.u is None and result.vt is None
        else:
            check_triplets(dense.astype(np.float64), result, tol)
        if want.get("quality"):
            quality = result.meta.quality
            assert quality is not None and quality.orthogonality_error < tol
            truncation = np.linalg.svd(dense, compute_uv=False)
            eckart_young = np.linalg.norm(truncation[k:]) / np.linalg.norm(truncation)
            assert quality.reconstruction_error == pytest.approx(eckart_young, abs=1e-6)
        if "exact" in want:
            assert result.s.tobytes() == want["exact"]
