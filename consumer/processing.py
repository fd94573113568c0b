"""One request's one pass, in a pool worker: decode, validate, compute, encode.

This is the one place on the service side where the wire contract's rules are applied to a
request (``schemas.codec.decode_request``), so the parent never looks inside a matrix. The
record's value is read where the parent put it in shared memory (a binary matrix is a view of
it, never copied before the compute dtype needs it); the factors are checked once, while being
encoded; the answer is written, encoded for the wire, into the room the parent reserved.

Every outcome is an ``Answered``, a ``Refused`` (the error to answer with) or a ``NeedsRoom``;
only a crash or a hang of the worker itself is left to the parent.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse

from consumer import compute
from consumer.jobs import Answered, Header, NeedsRoom, Refused, WorkerContext
from consumer.truncated import seed_from
from objectstore import PayloadStore, StoreError, UntrustedLocation
from schemas import codec
from schemas.errors import ContractError, ErrorCode, SvdServiceError
from schemas.limits import stores_result
from schemas.models import ITEMSIZE, ObjectRef, SvdRequestMeta, SvdResultMeta
from schemas.sparse import SparseMatrix

# Stacked only up to this size: above it one LAPACK call per matrix costs far more than the
# Python around it, and the stacked call stopped paying (docs/performance.md, #16).
_STACK_MAX_ELEMENTS = 64 * 64


@dataclass(frozen=True, slots=True)
class Item:
    """One record as the worker sees it: views of its value and headers, and its answer's room."""

    value: memoryview
    headers: list[Header]
    out: memoryview
    timestamp_ms: int | None = None
    before_compute: Callable[[], None] | None = None  # test faults
    origin: str = ""  # "topic/partition/offset" of the record


@dataclass(slots=True)
class _Decoded:
    """A request that passed every check and is ready to compute."""

    item: Item
    meta: SvdRequestMeta
    encoding: codec.Encoding
    a: Any  # the matrix in the compute dtype
    created: float  # epoch s
    created_ms: int | None
    store_result: bool = False  # the factors go to the store, the answer references them
    request_object: str | None = None  # the stored request's URL
    started: float = 0.0
    factors: compute.SvdFactors | None = None
    compute_ms: float = 0.0


def answer(
    value: memoryview,
    headers: list[Header],
    out: memoryview,
    *,
    timestamp_ms: int | None,
    context: WorkerContext,
    dispatched_at: float,
    before_compute: Callable[[], None] | None = None,
) -> Answered | Refused | NeedsRoom:
    """The answer to one record; ``before_compute`` runs just before the SVD (test faults)."""
    item = Item(value, headers, out, timestamp_ms, before_compute)
    return answer_all([item], context=context, dispatched_at=dispatched_at)[0]


def answer_all(
    items: Sequence[Item], *, context: WorkerContext, dispatched_at: float
) -> list[Answered | Refused | NeedsRoom]:
    """The answers to the records of one job, in order. Small dense matrices of one shape and
    the same options are decomposed in one stacked LAPACK call (``compute.svd_stack``)."""
    outcomes: list[Answered | Refused | NeedsRoom | _Decoded] = [
        _decode(item, context, dispatched_at) for item in items
    ]
    ready = [o for o in outcomes if isinstance(o, _Decoded)]
    for group in _stackable(ready):
        _compute_stack(group)
    return [o if not isinstance(o, _Decoded) else _finish(o, context) for o in outcomes]


def _decode(
    item: Item, context: WorkerContext, dispatched_at: float
) -> Answered | Refused | NeedsRoom | _Decoded:
    value, headers = item.value, item.headers
    try:
        request = codec.decode_request(value, headers, context.limits)
    except ContractError as err:
        return _refused(err, value, headers, created_at_ms=None, computed=False)
    meta = request.meta
    store_result = _stores_result(meta, context)
    try:
        codec.check_answerable(request, context.limits, factors_stored=store_result)
    except ContractError as err:
        return _refused(err, value, headers, meta=meta, created_at_ms=None, computed=False)
    encoding = request.reply_encoding
    room = codec.STORED_RESULT_ROOM if store_result else codec.result_room(meta, encoding)
    if room > item.out.nbytes:
        return NeedsRoom(room)
    created_ms = meta.created_at_ms if meta.created_at_ms is not None else item.timestamp_ms
    created = created_ms / 1000 if created_ms is not None else dispatched_at
    if meta.deadline_ms is not None and time.time() * 1000 > meta.deadline_ms:
        expired = SvdServiceError(
            ErrorCode.EXPIRED, f"deadline {meta.deadline_ms} ms passed before compute"
        )
        return _refused(
            expired, value, headers, meta=meta, created_at_ms=created_ms, computed=False
        )
    ref = request.stored
    if ref is not None:
        # Read straight into this process's memory, verified, then checked as a binary value.
        try:
            data = _store(context).read(ref.url, ref.nbytes, ref.sha256, meta.request_id)
            request = codec.load_stored_request(request, data, context.limits)
            codec.check_answerable(request, context.limits, factors_stored=store_result)
        except ContractError as err:
            return _refused(err, value, headers, meta=meta, created_at_ms=created_ms,
                            computed=False, again=err.code is ErrorCode.STORE_UNAVAILABLE)  # fmt: skip
    a = _compute_input(request.matrix, meta.compute_dtype)
    return _Decoded(
        item, meta, encoding, a, created, created_ms, store_result=store_result,
        request_object=None if ref is None else ref.url,
    )  # fmt: skip


def _stores_result(meta: SvdRequestMeta, context: WorkerContext) -> bool:
    """The factors go to the store: the request reads version 2, the service has a store, and
    they are larger than the setting says a record should carry."""
    return (
        context.store is not None
        and stores_result(meta.schema_version, context.limits)
        and meta.result_nbytes() > context.store_results_above
    )


_stores: dict[str, PayloadStore] = {}


def _store(context: WorkerContext) -> PayloadStore:
    """This process's client of the configured store, made once (it keeps its connections)."""
    settings = context.store
    if settings is None:
        raise UntrustedLocation(
            "this service has no object store configured: it reads no references"
        )
    key = settings.model_dump_json()
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = PayloadStore(settings)
    return store


def _result_key(meta: SvdRequestMeta, origin: str) -> str:
    # Named by the record and (PayloadStore.write's content_suffix) by the factors' hash:
    # computing the same record again (a retry, a redelivery) writes the same object instead of
    # leaving another behind, and a second computation that came out different in the last bits
    # (another CPU, another BLAS) never replaces the object an earlier answer references.
    tag = hashlib.sha256(meta.request_id.encode()).hexdigest()[:16]
    return f"results/{origin}-{tag}" if origin else f"results/{tag}-{uuid.uuid4().hex}"


def _stackable(ready: list[_Decoded]) -> list[list[_Decoded]]:
    """Groups of two or more requests that one stacked call answers exactly as ``compute.svd``
    would: dense, no k, no pinned iterative algorithm, no test fault, no extreme scale."""
    groups: dict[tuple[Any, ...], list[_Decoded]] = {}
    for d in ready:
        options = d.meta.options
        if (
            isinstance(d.a, np.ndarray)
            and options.k is None
            and options.algorithm in (None, "auto", "dense")
            and d.item.before_compute is None
            and d.a.size <= _STACK_MAX_ELEMENTS
        ):
            key = (d.a.shape, d.a.dtype, options.full_matrices, options.compute_uv)
            groups.setdefault(key, []).append(d)
    return [group for group in groups.values() if len(group) > 1]


def _compute_stack(group: list[_Decoded]) -> None:
    options = group[0].meta.options
    started = time.time()
    stack = np.stack([d.a for d in group])
    # A matrix of extreme scale is computed alone (``compute.svd`` scales it first).
    ordinary = compute.ordinary_scale(np.abs(stack).max(axis=(1, 2)), stack.dtype)
    if not ordinary.all():
        group = [d for d, keep in zip(group, ordinary, strict=True) if keep]
        stack = stack[ordinary]
        if len(group) < 2:
            return
    try:
        stacked = compute.svd_stack(
            stack, full_matrices=options.full_matrices, compute_uv=options.compute_uv
        )
    except np.linalg.LinAlgError:
        return  # each is computed on its own, with the fallback driver if it needs it
    share = (time.time() - started) * 1000 / len(group)
    for d, factors in zip(group, stacked, strict=True):
        d.started, d.factors, d.compute_ms = started, factors, share


def _finish(d: _Decoded, context: WorkerContext) -> Answered | Refused:
    meta, item = d.meta, d.item
    options = meta.options
    try:
        if d.factors is None:
            if item.before_compute is not None:
                item.before_compute()
            d.started = time.time()
            d.factors = compute.svd(
                d.a,
                full_matrices=options.full_matrices,
                compute_uv=options.compute_uv,
                k=options.k,
                algorithm=options.algorithm,
                seed=seed_from(meta.request_id),  # the same request, the same factors
                check_finite=False,  # the decoder did
            )
            d.compute_ms = (time.time() - d.started) * 1000
        factors = d.factors
        quality = None
        if options.quality and factors.u is not None and factors.vt is not None:
            quality = compute.quality(d.a, factors.u, factors.s, factors.vt)
    except Exception as exc:
        err = _compute_error(exc)
        return _refused(err, item.value, item.headers, meta=meta, created_at_ms=d.created_ms,
                        computed=True, again=isinstance(exc, MemoryError))  # fmt: skip
    result = SvdResultMeta.model_validate(
        {
            "schema_version": meta.schema_version,  # answered in the request's own version
            "request_id": meta.request_id,
            "timings": {
                "queue_wait_ms": max(0.0, d.started - d.created) * 1000,
                "compute_ms": d.compute_ms,
                "total_ms": max(0.0, time.time() - d.created) * 1000,
            },
            "worker": {
                "instance_id": context.instance_id,
                "host": context.host,
                "pid": os.getpid(),
            },
            "quality": None
            if quality is None
            else {
                "reconstruction_error": quality.reconstruction,
                "orthogonality_error": quality.orthogonality,
            },
            "algorithm": factors.algorithm,
            "driver": factors.driver,
            "correlation_id": meta.correlation_id,
            "traceparent": meta.traceparent,
        }
    )
    result_object = None
    try:
        if d.store_result:
            size, result_headers, result_object = _write_stored(d, result, factors, context)
        else:
            size, result_headers = codec.write_result(
                result, factors.u, factors.s, factors.vt, d.encoding, item.out
            )
    except StoreError as store_err:
        again = store_err.code is ErrorCode.STORE_UNAVAILABLE
        return _refused(store_err, item.value, item.headers, meta=meta,
                        created_at_ms=d.created_ms, computed=True, again=again)  # fmt: skip
    except ContractError as exc:
        if exc.code is not ErrorCode.NON_FINITE:
            raise
        # The input was finite, so a non-finite factor means the matrix's scale overflows its
        # dtype (entries near the dtype's largest number).
        err = SvdServiceError(ErrorCode.RESULT_OVERFLOW, _overflow(factors))
        return _refused(err, item.value, item.headers, meta=meta, created_at_ms=d.created_ms,
                        computed=True)  # fmt: skip
    return Answered(
        request_id=meta.request_id,
        reply_topic=meta.reply_topic,
        created_at_ms=d.created_ms,
        value_bytes=size,
        headers=tuple(result_headers),
        compute_ms=d.compute_ms,
        queue_wait_ms=max(0.0, d.started - d.created) * 1000,
        request_object=d.request_object,
        result_object=result_object,
    )


def _write_stored(
    d: _Decoded, result: SvdResultMeta, factors: compute.SvdFactors, context: WorkerContext
) -> tuple[int, list[tuple[str, bytes]], str]:
    """The factors written to the store, straight from this process's memory (a copy only where
    they are not little-endian row-major), and the answer that references them."""
    wire = codec.stored_factors(factors.u, factors.s, factors.vt)
    stored = _store(context).write(
        _result_key(d.meta, d.item.origin), [a.data for a in wire.values()], content_suffix=True
    )
    ref = ObjectRef(url=stored.url, nbytes=stored.nbytes, sha256=stored.sha256)
    size, headers = codec.write_stored_result(result, wire, ref, d.item.out)
    return size, headers, stored.url


def _compute_input(matrix: Any, dtype: str) -> Any:
    """The matrix as compute takes it, in the compute dtype: a dense array (a view of the value
    when no cast is needed), or a scipy.sparse matrix over the received arrays."""
    # Wire dtypes are float32 and float64: the item size tells them apart (``dtype.name`` is a
    # Python-level property, a measurable share of a 32x32 request).
    itemsize = ITEMSIZE[dtype]
    if not isinstance(matrix, SparseMatrix):
        return matrix if matrix.dtype.itemsize == itemsize else matrix.astype(dtype)
    data = matrix.data if matrix.data.dtype.itemsize == itemsize else matrix.data.astype(dtype)
    first, second = matrix.index_arrays
    if matrix.format == "coo":
        return scipy.sparse.coo_array((data, (first, second)), shape=matrix.shape)
    kind = scipy.sparse.csr_array if matrix.format == "csr" else scipy.sparse.csc_array
    return kind((data, first, second), shape=matrix.shape)


def _compute_error(exc: Exception) -> SvdServiceError:
    """What a failed compute answers: LAPACK that did not converge is the matrix's; options the
    matrix cannot satisfy are the request's; out of memory may pass later; anything else is ours."""
    if isinstance(exc, np.linalg.LinAlgError):
        return SvdServiceError(ErrorCode.SVD_FAILED, str(exc))
    if isinstance(exc, ValueError | TypeError):
        return SvdServiceError(ErrorCode.INVALID_SCHEMA, str(exc))
    if isinstance(exc, MemoryError):
        return SvdServiceError(ErrorCode.INTERNAL, f"out of memory: {exc}", retryable=True)
    return SvdServiceError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _overflow(factors: compute.SvdFactors) -> str:
    for name, factor in (("s", factors.s), ("u", factors.u), ("vt", factors.vt)):
        if factor is not None and not np.isfinite(factor).all():
            return (
                f"the factors are not finite in {factor.dtype}: factor {name} overflows "
                f"(the largest singular value exceeds {np.finfo(factor.dtype).max:.3g}); "
                "scale the matrix down"
            )
    return "the factors are not finite"


def _refused(
    err: SvdServiceError,
    value: memoryview,
    headers: list[Header],
    *,
    meta: SvdRequestMeta | None = None,
    created_at_ms: int | None,
    computed: bool,
    again: bool = False,
) -> Refused:
    if meta is not None:
        request_id: str | None = meta.request_id
        reply_topic = meta.reply_topic
    else:  # did not decode: its error still goes to whoever the record names, if readable
        readable = [(n, v or b"") for n, v in headers]
        request_id = err.request_id or codec.recover_request_id(value, readable)
        reply_topic = codec.recover_reply_topic(value, readable)
    return Refused(
        code=str(err.code),
        message=err.message,
        retryable=err.retryable,
        request_id=request_id,
        reply_topic=reply_topic,
        created_at_ms=created_at_ms,
        computed=computed,
        again=again,
    )
