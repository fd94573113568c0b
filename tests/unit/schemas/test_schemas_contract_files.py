"""The committed machine-readable contract: JSON Schemas, AsyncAPI, and the documented examples."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator

from schemas import (
    DLQ_HEADERS,
    ContractError,
    DeadLetterMeta,
    DecodedResult,
    Encoding,
    ErrorCode,
    ErrorResult,
    MatrixSpec,
    SvdOptions,
    SvdRequestMeta,
    SvdResultMeta,
    Timings,
    WorkerInfo,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
    topics,
)
from schemas.codec import StoredResult, load_stored_request, load_stored_result
from schemas.export import SCHEMA_DIR, SCHEMAS, render, stale
from tests.unit.schemas.builders import JSON
from tests.unit.schemas.test_schemas_rejections import CASES

ROOT = Path(__file__).resolve().parents[3]
ASYNCAPI = ROOT / "schemas" / "asyncapi.yaml"
WIRE_DOC = ROOT / "docs" / "wire-format.md"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text("utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# --- JSON Schema files


def test_committed_json_schemas_match_the_models() -> None:
    assert stale() == [], "run: python -m schemas.export"


def test_drift_is_detected(tmp_path: Path) -> None:
    for name, text in render().items():
        (tmp_path / name).write_text(text, "utf-8")
    assert stale(tmp_path) == []
    (tmp_path / "svd-request.json").write_text("{}", "utf-8")
    (tmp_path / "leftover.json").write_text("{}", "utf-8")
    assert stale(tmp_path) == ["leftover.json", "svd-request.json"]


def _result_meta() -> SvdResultMeta:
    return SvdResultMeta(
        request_id="r-1",
        timings=Timings(queue_wait_ms=1, compute_ms=2, total_ms=3),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )


@pytest.mark.parametrize("encoding", list(Encoding))
def test_what_the_codec_writes_conforms_to_the_schemas(encoding: Encoding) -> None:
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    meta = SvdRequestMeta(
        request_id="r-1",
        matrix=MatrixSpec.of(a),
        options=SvdOptions(k=1, dtype="float64"),
        deadline_ms=5,
        reply_topic="replies",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    request = encode_request(meta, a, encoding)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    result = encode_result(_result_meta(), u, s, vt, encoding)
    if encoding is Encoding.JSON:
        validator("svd-request.json").validate(orjson.loads(request.value))
        validator("svd-result.json").validate(orjson.loads(result.value))
    else:
        validator("svd-request-meta.json").validate(orjson.loads(dict(request.headers)["svd-meta"]))
        validator("svd-result-meta.json").validate(orjson.loads(dict(result.headers)["svd-meta"]))
    error = encode_error(ContractError(ErrorCode.NON_FINITE, "m"))
    validator("error-result.json").validate(orjson.loads(error.value))
    dead = DeadLetterMeta(
        code=ErrorCode.TIMEOUT,
        reason="r",
        source_topic="svd-requests",
        source_partition=0,
        source_offset=1,
        attempts=0,
        timestamp_ms=2,
    )
    validator("dead-letter-meta.json").validate(dead.model_dump(mode="json"))


# Rejections that a JSON Schema cannot express: they depend on several fields, on the bytes
# rather than the parsed JSON, or on numeric values.
_NOT_EXPRESSIBLE = {
    ErrorCode.INVALID_ENCODING,
    ErrorCode.SHAPE_MISMATCH,
    ErrorCode.NON_FINITE,
    ErrorCode.JSON_TOO_DEEP,
}
_CROSS_FIELD = {
    "k above min(rows, cols)",
    "k with full_matrices",
    "quality without compute_uv",
    "data nested, right length",
    "json nested inside data",
    "k of 1e300",
    "schema-version header 3",
    "schema-version header 3.0",
    "schema-version header of 5000 digits",
    "schema-version header not a number",
    "schema-version header empty",
    "binary without svd-meta",
    "top level not an object",
}


@pytest.mark.parametrize(
    "case",
    [
        name
        for name, ((_, headers), code) in CASES.items()
        if code not in _NOT_EXPRESSIBLE and name not in _CROSS_FIELD
    ],
)
def test_the_schemas_reject_what_the_decoder_rejects(case: str) -> None:
    (value, headers), _ = CASES[case]
    binary = dict(headers).get("content-type") == b"application/vnd.svd.binary"
    instance = orjson.loads(dict(headers)["svd-meta"] if binary else value)
    schema = validator("svd-request-meta.json" if binary else "svd-request.json")
    assert not schema.is_valid(instance)


# --- AsyncAPI


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(document: Any, pointer: str) -> Any:
    for token in filter(None, pointer.split("/")):
        token = unquote(token).replace("~1", "/").replace("~0", "~")
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document


def _load(path: Path) -> Any:
    return (
        yaml.safe_load(path.read_text("utf-8"))
        if path.suffix == ".yaml"
        else json.loads(path.read_text("utf-8"))
    )


def test_asyncapi_describes_the_three_topics() -> None:
    doc = yaml.safe_load(ASYNCAPI.read_text("utf-8"))
    assert doc["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == {topics.REQUESTS, topics.RESULTS, topics.DLQ}
    for message in doc["components"]["messages"].values():
        assert {"headers", "payload", "bindings"} <= message.keys()
        assert "key" in message["bindings"]["kafka"]
    dlq_headers = doc["components"]["messages"]["DeadLetter"]["headers"]
    assert dlq_headers["required"] == list(DLQ_HEADERS.values())
    assert list(dlq_headers["properties"]) == list(DLQ_HEADERS.values())


@pytest.mark.parametrize(
    "path", [ASYNCAPI, *(SCHEMA_DIR / n for n in SCHEMAS)], ids=lambda p: p.name
)
def test_every_ref_resolves(path: Path) -> None:
    document = _load(path)
    refs = _refs(document)
    assert refs or path.name == "dead-letter-meta.json"
    for ref in refs:
        target, _, pointer = ref.partition("#")
        if target:
            file = (path.parent / target).resolve()
            assert file.is_file(), f"{path.name}: {ref} -> missing {file}"
            _resolve(_load(file), pointer)
        else:
            _resolve(document, pointer)


def test_asyncapi_payloads_reference_every_json_schema() -> None:
    targets = {ref.partition("#")[0] for ref in _refs(yaml.safe_load(ASYNCAPI.read_text("utf-8")))}
    assert {f"./jsonschema/{name}" for name in SCHEMAS} - {
        "./jsonschema/dead-letter-meta.json"
    } <= targets


# --- the examples in docs/wire-format.md are real messages


def _examples() -> dict[str, str]:
    text = WIRE_DOC.read_text("utf-8")
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    return dict(found)


def test_documented_json_request_decodes() -> None:
    decoded = decode_request(_examples()["request.json"].encode(), JSON)
    assert decoded.meta.request_id == "demo-0001" and decoded.meta.options.quality
    assert decoded.matrix.tolist() == [[3, 2, 2], [2, 3, -2]]


def test_documented_json_result_decodes_and_is_an_svd_of_the_request() -> None:
    reply = decode_reply(_examples()["result.json"].encode(), JSON)
    assert isinstance(reply, DecodedResult) and reply.u is not None and reply.vt is not None
    a = decode_request(_examples()["request.json"].encode(), JSON).matrix
    assert np.allclose(reply.u @ np.diag(reply.s) @ reply.vt, a)


def test_documented_error_decodes() -> None:
    reply = decode_reply(_examples()["error.json"].encode(), JSON)
    assert isinstance(reply, ErrorResult) and reply.code is ErrorCode.UNKNOWN_OPTION


def _printf_bytes(script: str) -> bytes:
    literal = re.search(r"printf '([^']*)'", script)
    assert literal is not None
    return bytes(int(octal, 8) for octal in re.findall(r"\\([0-7]{3})", literal.group(1)))


def test_documented_binary_request_decodes() -> None:
    examples = _examples()
    value = _printf_bytes(examples["kcat-binary"])
    assert value == bytes.fromhex("0000404000000040000000400000004000004040000000c0")
    headers = [("content-type", b"application/vnd.svd.binary")]
    meta = examples["request-meta.json"].strip().encode()
    decoded = decode_request(value, [*headers, ("svd-meta", meta)])
    assert decoded.matrix.dtype == np.float32 and decoded.matrix.tolist() == [[3, 2, 2], [2, 3, -2]]


def test_documented_binary_result_decodes() -> None:
    meta = _examples()["result-meta.json"].strip().encode()
    headers = [("content-type", b"application/vnd.svd.binary"), ("svd-meta", meta)]
    reply = decode_reply(bytes.fromhex("0000a040ffff3f40"), headers)
    assert isinstance(reply, DecodedResult) and reply.u is None
    assert reply.s.tolist() == [5.0, np.float32(2.9999998)]


def _kcat_producer_args(script: str) -> tuple[list[str], list[tuple[str, bytes]], str]:
    command = next(c for c in script.replace("\\\n", " ").splitlines() if c.startswith("kcat -P"))
    argv = shlex.split(command)
    headers = [tuple(argv[i + 1].split("=", 1)) for i, a in enumerate(argv) if a == "-H"]
    return argv, [(n, v.encode()) for n, v in headers], argv[-1]


def test_documented_kcat_json_command_sends_a_valid_request() -> None:
    script = _examples()["kcat-json"]
    argv, headers, file = _kcat_producer_args(script)
    assert argv[argv.index("-t") + 1] == topics.REQUESTS
    body = re.search(r"<<'EOF'\n(.*?)\nEOF", script, flags=re.S)
    assert body is not None and file == "request.json"
    decoded = decode_request(body.group(1).encode(), headers)
    assert decoded.encoding is Encoding.JSON
    assert argv[argv.index("-k") + 1] == decoded.meta.request_id


def test_documented_kcat_binary_command_sends_a_valid_request() -> None:
    script = _examples()["kcat-binary"]
    argv, headers, _ = _kcat_producer_args(script)
    decoded = decode_request(_printf_bytes(script), headers)
    assert decoded.encoding is Encoding.BINARY
    assert argv[argv.index("-k") + 1] == decoded.meta.request_id == "demo-0002"


# --- stored payloads (schema_version 2): the references section and its walk-through


def _od_float64(text: str) -> bytes:
    """The bytes that `od -A d -t f8` printed: every number after the offset of each line."""
    numbers = [float(n) for line in text.splitlines() for n in line.split()[1:]]
    return np.array(numbers, dtype="<f8").tobytes()


def test_documented_stored_request_references_the_walkthrough_bytes() -> None:
    examples = _examples()
    body = examples["stored-request.json"].encode()
    validator("svd-request.json").validate(orjson.loads(body))
    decoded = decode_request(body, JSON)
    ref = decoded.stored
    assert ref is not None and decoded.matrix is None and decoded.meta.schema_version == 2
    value = _printf_bytes(examples["kcat-stored"])
    assert len(value) == ref.nbytes and hashlib.sha256(value).hexdigest() == ref.sha256
    loaded = load_stored_request(decoded, value)
    assert loaded.matrix.tolist() == [[3, 2, 2], [2, 3, -2]]


def test_documented_kcat_stored_command_sends_the_stored_request() -> None:
    examples = _examples()
    script = examples["kcat-stored"]
    argv, headers, file = _kcat_producer_args(script)
    assert argv[argv.index("-t") + 1] == topics.REQUESTS and file == "request.json"
    assert dict(headers)["svd-schema-version"] == b"2"
    body = re.search(r"<<'EOF'\n(.*?)\nEOF", script, flags=re.S)
    assert body is not None
    assert orjson.loads(body.group(1)) == orjson.loads(examples["stored-request.json"])
    decoded = decode_request(body.group(1).encode(), headers)
    assert decoded.encoding is Encoding.JSON and decoded.stored is not None
    assert argv[argv.index("-k") + 1] == decoded.meta.request_id
    # The object's key is the one the curl upload writes.
    assert decoded.stored.url.removeprefix("s3://") in script


def test_documented_stored_sparse_request_references_the_sparse_bytes() -> None:
    examples = _examples()
    body = examples["stored-sparse-request.json"].strip().encode()
    validator("svd-request.json").validate(orjson.loads(body))
    decoded = decode_request(body, JSON)
    ref = decoded.stored
    assert ref is not None
    value = _printf_bytes(examples["kcat-sparse"])
    assert len(value) == ref.nbytes and hashlib.sha256(value).hexdigest() == ref.sha256
    loaded = load_stored_request(decoded, value)
    assert loaded.matrix is not None and not isinstance(loaded.matrix, np.ndarray)
    dense = loaded.matrix.toarray()
    assert dense.tolist() == [[1, 0, 2, 0], [0, 0, 3, 0], [4, 5, 0, 6]]


def test_documented_stored_result_is_the_svd_in_the_od_output() -> None:
    examples = _examples()
    body = examples["stored-result.json"].encode()
    validator("svd-result-stored.json").validate(orjson.loads(body))
    reply = decode_reply(body, JSON)
    assert isinstance(reply, StoredResult) and reply.meta.schema_version == 2
    data = _od_float64(examples["stored-factors.txt"])
    assert len(data) == reply.ref.nbytes
    assert hashlib.sha256(data).hexdigest() == reply.ref.sha256
    result = load_stored_result(reply, data)
    assert result.u is not None and result.vt is not None
    a = decode_request(examples["request.json"].encode(), JSON).matrix
    assert np.allclose(result.u @ np.diag(result.s) @ result.vt, a)
    # The same factors as the inline JSON result of the same matrix.
    inline = decode_reply(examples["result.json"].encode(), JSON)
    assert isinstance(inline, DecodedResult)
    assert result.s.tolist() == inline.s.tolist()
