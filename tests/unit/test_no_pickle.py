"""No pickle on the wire path: bytes from Kafka are never unpickled (docs/security.md).

Two checks. At run time, every way Python and numpy have to unpickle is replaced by a tripwire
and the decoders (the service's, the SDK's, the dead-letter reader) are fed valid messages,
pickles and .npy files dressed as messages, and random bytes. Statically, no module of the wire
path imports a pickling module or calls ``np.load``; the one place that pickles at all is the
process pool's pipe, which carries the pool's own small descriptors between our own processes.
"""

from __future__ import annotations

import _pickle
import ast
import contextlib
import dataclasses
import inspect
import io
import marshal
import multiprocessing.reduction
import pickle
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import jobs, processing, shm
from consumer.admission import price
from objectstore.settings import StoreSettings
from producer_sdk import _wire
from schemas import codec
from schemas.errors import ContractError, ErrorCode
from schemas.limits import DecodeLimits
from schemas.models import (
    DeadLetterMeta,
    ErrorResult,
    MatrixSpec,
    SvdRequestMeta,
    SvdResultMeta,
    Timings,
    WorkerInfo,
)

REPO = Path(__file__).resolve().parents[2]
OUR_CODE = tuple(str(REPO / package) for package in ("schemas", "consumer", "producer_sdk"))

Message = tuple[bytes, list[tuple[str, bytes]]]

# --- the run-time tripwire --------------------------------------------------------------------

UNPICKLERS: list[tuple[Any, str]] = [
    (pickle, "loads"),
    (pickle, "load"),
    (pickle, "Unpickler"),
    (pickle, "_loads"),
    (pickle, "_load"),
    (pickle, "_Unpickler"),
    (_pickle, "loads"),
    (_pickle, "load"),
    (_pickle, "Unpickler"),
    (marshal, "loads"),
    (marshal, "load"),
    (np, "load"),
    (numpy.lib.format, "read_array"),
    (multiprocessing.reduction.ForkingPickler, "loads"),
]

CANARY_RUNS: list[str] = []


def _canary() -> str:
    CANARY_RUNS.append("unpickled")
    return "unpickled"


class Canary:
    """Unpickling this runs ``_canary``: the proof a pickle was executed, not just opened."""

    def __reduce__(self) -> tuple[Callable[[], str], tuple[()]]:
        return _canary, ()


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every unpickler replaced; a call from our packages is recorded and refused."""
    reached: list[str] = []

    def wire(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def tripped(*args: Any, **kwargs: Any) -> Any:
            callers = [frame.filename for frame in inspect.stack()[1:]]
            if any(path.startswith(OUR_CODE) for path in callers):
                reached.append(f"{getattr(owner, '__name__', owner)}.{name}")
                raise AssertionError(f"the wire path reached {name}")
            return original(*args, **kwargs)  # test tooling (hypothesis, pytest) may pickle

        monkeypatch.setattr(owner, name, tripped)

    for owner, name in UNPICKLERS:
        wire(owner, name)
    CANARY_RUNS.clear()
    yield reached
    assert not CANARY_RUNS, "a pickle was executed"


LIMITS = DecodeLimits(max_rows=64, max_cols=64, max_elements=4096)
CONTEXT = jobs.WorkerContext(LIMITS, instance_id="i", host="h")


def decode_everywhere(value: bytes, headers: list[tuple[str, bytes]]) -> None:
    """Every decoder a received record meets. Each may refuse the input, only with ContractError."""
    limits = LIMITS
    try:
        request = codec.decode_request(value, headers, limits)
    except ContractError:
        pass
    else:
        assert request.matrix.dtype.kind == "f"  # never an object array
    try:
        reply = codec.decode_reply(value, headers, limits)
    except ContractError:
        pass
    else:
        if isinstance(reply, codec.DecodedResult):
            arrays = (reply.u, reply.s, reply.vt)
            assert all(a.dtype.kind == "f" for a in arrays if a is not None)
    codec.recover_request_id(value, headers)
    _wire.decode_answer(value, headers, None)
    _wire.decode_answer(value, headers, "req-1")
    with contextlib.suppress(ContractError):
        codec.read_dead_letter(value, headers)
    # The service: priced on the event loop, then answered by a worker from the bytes the
    # parent put in shared memory (the headers packed beside the value).
    record = ConsumerRecord(
        topic="svd-requests", partition=0, offset=0, timestamp=0, timestamp_type=0,
        key=b"req-1", value=value, checksum=None, serialized_key_size=5,
        serialized_value_size=len(value), headers=tuple(headers),
    )  # fmt: skip
    ticket = price(record, limits, test_faults=True)
    received = jobs.unpack_headers(memoryview(jobs.pack_headers(headers)))
    room = ticket.answer_bytes
    for _ in range(2):  # at most once more, with the room the worker asked for
        outcome = processing.answer(
            memoryview(value), received, memoryview(bytearray(room)),
            timestamp_ms=None, context=CONTEXT, dispatched_at=0.0,
        )  # fmt: skip
        if not isinstance(outcome, jobs.NeedsRoom):
            break
        room = outcome.answer_bytes
    assert isinstance(outcome, jobs.Answered | jobs.Refused)


# --- inputs -------------------------------------------------------------------------------------

JSON_CT = ("content-type", b"application/json")


def valid_messages() -> dict[str, Message]:
    """A request and a result in each encoding, an error result, a dead letter."""
    a = np.arange(6.0).reshape(2, 3)
    meta = SvdRequestMeta(request_id="req-1", matrix=MatrixSpec.of(a))
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    result = SvdResultMeta(
        request_id="req-1",
        timings=Timings(queue_wait_ms=0.0, compute_ms=1.0, total_ms=1.0),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )
    messages = [
        *(codec.encode_request(meta, a, encoding) for encoding in codec.Encoding),
        *(codec.encode_result(result, u, s, vt, encoding) for encoding in codec.Encoding),
        codec.encode_error(
            ErrorResult(
                request_id="req-1", code=ErrorCode.INVALID_SCHEMA, message="no", retryable=False
            )
        ),
        codec.encode_dead_letter(
            pickle.dumps(Canary()),  # dead letters keep the original bytes: a pickle, here
            [JSON_CT],
            DeadLetterMeta(
                code=ErrorCode.INVALID_ENCODING,
                reason="bad",
                source_topic="svd-requests",
                source_partition=0,
                source_offset=1,
                attempts=0,
                timestamp_ms=1,
            ),
        ),
    ]
    names = [
        "request-json",
        "request-binary",
        "result-json",
        "result-binary",
        "error",
        "dead-letter",
    ]
    return {name: (m.value, list(m.headers)) for name, m in zip(names, messages, strict=True)}


def hostile_messages() -> list[Message]:
    """Pickles and .npy files, as values and as the svd-meta header, under every content type."""
    pickled = pickle.dumps(Canary(), protocol=pickle.HIGHEST_PROTOCOL)
    pickled_dict = pickle.dumps({"request_id": "req-1", "matrix": Canary()})
    npy = io.BytesIO()
    np.save(npy, np.array([Canary()], dtype=object), allow_pickle=True)
    plain_npy = io.BytesIO()
    np.save(plain_npy, np.arange(6.0).reshape(2, 3))
    payloads = [pickled, pickled_dict, npy.getvalue(), plain_npy.getvalue()]
    content_types = [
        b"application/json",
        b"application/vnd.svd.binary",
        b"application/x-python-pickle",
        b"application/x-npy",
        b"application/octet-stream",
    ]
    out: list[Message] = []
    for payload in payloads:
        for content_type in content_types:
            out.append((payload, [("content-type", content_type)]))
            out.append((b"", [("content-type", content_type), ("svd-meta", payload)]))
            meta = orjson.dumps(
                {"request_id": "req-1", "schema_version": 1,
                 "matrix": {"shape": [1, 1], "dtype": "float64"}}
            )  # fmt: skip
            out.append((payload, [("content-type", content_type), ("svd-meta", meta)]))
    return out


def test_the_tripwire_catches_an_unpickle_from_our_code(tripwire: list[str]) -> None:
    # Calls from test code pass through (hypothesis and pytest may pickle for themselves) ...
    assert pickle.loads(pickle.dumps(3)) == 3  # noqa: S301 (our own bytes)
    assert not tripwire
    # ... calls from a module of ours are refused and recorded.
    our_module = REPO / "schemas" / "probe_for_the_tripwire.py"
    code = compile("import pickle\npickle.loads(b'\\x80\\x04K\\x03.')", str(our_module), "exec")
    with pytest.raises(AssertionError, match="the wire path reached loads"):
        exec(code, {})
    assert tripwire == ["pickle.loads"]
    tripwire.clear()


@pytest.mark.parametrize("message", valid_messages().values(), ids=valid_messages().keys())
def test_valid_messages_decode_without_unpickling(tripwire: list[str], message: Message) -> None:
    decode_everywhere(*message)
    assert tripwire == []


@pytest.mark.parametrize("message", hostile_messages())
def test_pickles_and_npy_files_are_never_unpickled(tripwire: list[str], message: Message) -> None:
    decode_everywhere(*message)
    assert tripwire == []


HEADER_NAMES = st.sampled_from(
    ["content-type", "svd-meta", "svd-schema-version", "svd-dlq-error-code", "x-other"]
)
HEADER_VALUES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"application/json", b"application/vnd.svd.binary", b"1", b"{}"]),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    value=st.one_of(
        st.binary(max_size=512),
        st.sampled_from([m[0] for m in [*valid_messages().values(), *hostile_messages()]]).flatmap(
            lambda v: st.integers(0, len(v)).map(lambda n: v[:n])  # truncations
        ),
    ),
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
)
def test_random_records_are_never_unpickled(
    tripwire: list[str], value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    decode_everywhere(value, headers)
    assert tripwire == []


# --- the static check -----------------------------------------------------------------------------

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                    "jsonpickle", "joblib", "copyreg"}  # fmt: skip

# The contract, the SDK and the whole service: every module that can see bytes received from
# Kafka, and the rest of the service with them (none of it has a reason to unpickle either).
# The one place where objects are pickled at all is the process pool's pipe (see below).
SCANNED = sorted(
    path
    for package in ("schemas", "producer_sdk", "consumer")
    for path in (REPO / package).rglob("*.py")
)
POOL_BOUNDARY = {REPO / "consumer" / "pool.py", REPO / "consumer" / "worker.py"}


def pickle_uses(path: Path) -> list[str]:
    return pickle_uses_in(path.read_text(), str(path.relative_to(REPO)))


def pickle_uses_in(source: str, name: str) -> list[str]:
    """Imports of pickling modules, ``np.load``/``pickle.load(s)`` calls, ``allow_pickle``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLING_MODULES]  # fmt: skip
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLING_MODULES:
                found.append(f"{where} from {node.module} import ...")
            if node.module.startswith("numpy") and any(a.name == "load" for a in node.names):
                found.append(f"{where} from {node.module} import load")
        elif isinstance(node, ast.Attribute) and node.attr in ("load", "loads"):
            if isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy", "pickle"):
                found.append(f"{where} {node.value.id}.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append(f"{where} allow_pickle=")
    return found


def test_the_static_check_finds_what_it_looks_for() -> None:
    source = (
        "import pickle\nimport numpy as np\nfrom dill import loads\nnp.load(f, allow_pickle=True)\n"
    )
    found = pickle_uses_in(source, "probe.py")
    assert found == [
        "probe.py:1 import pickle",
        "probe.py:3 from dill import ...",
        "probe.py:4 np.load",
        "probe.py:4 allow_pickle=",
    ], found


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_on_the_wire_path_can_unpickle(path: Path) -> None:
    assert pickle_uses(path) == []


def multiprocessing_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("multiprocessing")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("multiprocessing"):
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_only_the_pool_pickles_and_only_its_own_descriptors() -> None:
    # multiprocessing pickles whatever crosses a Pipe or a Queue: only the pool may use it (and
    # shm.py its resource tracker, which pickles nothing of ours).
    users = {path: found for path in SCANNED if (found := multiprocessing_imports(path))}
    assert set(users) <= POOL_BOUNDARY | {REPO / "consumer" / "shm.py"}, users
    assert users.get(REPO / "consumer" / "shm.py", set()) <= {"multiprocessing.resource_tracker"}
    # What crosses the pipe to a worker is the pool's own descriptors, built by the parent:
    # shared-memory names, region indexes, the contract's limits, names and numbers. No
    # received byte and no array: the records and the answers travel through shared memory.
    # Both ends are our processes, so nothing unpickled there was ever written by a producer.
    # The store's settings: the service's own configuration, read from its environment.
    plain = {int, float, bool, str, type(None), StoreSettings}
    descriptors = {
        jobs.Job,
        jobs.JobItem,
        jobs.WorkerContext,
        DecodeLimits,
        shm.BlockDescriptor,
        shm.ArrayLayout,
    }
    for cls in descriptors:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            leaves = _leaf_types(hints[field.name])
            assert leaves <= plain | descriptors, f"{cls.__name__}.{field.name}: {leaves}"
    # Back from the worker: outcomes of the same plain values, and the answer's headers the
    # worker built (bytes it encoded, never bytes it received).
    replies = {
        jobs.JobOutcome,
        jobs.JobFailure,
        jobs.Ready,
        jobs.Answered,
        jobs.Refused,
        jobs.NeedsRoom,
    }
    for cls in replies:
        hints = typing.get_type_hints(cls, vars(jobs))
        for field in dataclasses.fields(cls):
            leaves = _leaf_types(hints[field.name])
            assert leaves <= plain | {bytes} | replies, f"{cls.__name__}.{field.name}: {leaves}"


def _leaf_types(hint: Any) -> set[Any]:
    args = typing.get_args(hint)
    if not args:
        return {hint}
    return set().union(*(_leaf_types(a) for a in args if a is not Ellipsis))
