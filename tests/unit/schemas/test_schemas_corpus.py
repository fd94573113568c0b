"""The service and the committed JSON Schemas judge one shared corpus of JSON documents
(tests/corpus/json_contract.yaml) as recorded, and agree except where a case says why not."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from schemas import ContractError, ErrorCode, decode_reply, decode_request
from schemas.export import SCHEMA_DIR, SCHEMAS
from schemas.models import ITEMSIZE

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "json_contract.yaml"
JSON = [("content-type", b"application/json")]
BINARY = [("content-type", b"application/vnd.svd.binary")]
# Which decoder reads a document described by each schema file, and whether it is svd-meta.
READERS = {
    "svd-request.json": (decode_request, False),
    "svd-request-meta.json": (decode_request, True),
    "svd-result.json": (decode_reply, False),
    "svd-result-meta.json": (decode_reply, True),
    "error-result.json": (decode_reply, False),
}
# A generated value larger than this is not worth allocating: such a case fails before the
# value is read, or records value_hex.
_MAX_VALUE = 1 << 20


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load(CORPUS.read_text("utf-8"))
    return cases


CASES = _cases()


@cache
def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text("utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def schema_verdict(case: dict[str, Any]) -> str:
    # Python's json module reads NaN and Infinity unless told not to; they are not JSON.
    try:
        instance = json.loads(case["doc"], parse_constant=_not_json)
    except ValueError:
        return "invalid"
    return "valid" if _validator(case["schema"]).is_valid(instance) else "invalid"


def _value_size(doc: str) -> int:
    """Bytes of the value an svd-meta document describes; 0 when it does not say."""
    try:
        meta = json.loads(doc)
        if "factors" in meta:  # a result: arrays at their offsets
            ranges = list(meta["factors"].values())
        elif "format" in meta["matrix"]:  # a sparse request: likewise
            ranges = [v for v in meta["matrix"].values() if isinstance(v, dict)]
        else:
            rows, cols = meta["matrix"]["shape"]
            return int(rows * cols * ITEMSIZE.get(meta["matrix"]["dtype"], 0))
        return int(max((r["offset"] + r["nbytes"] for r in ranges), default=0))
    except (ValueError, TypeError, KeyError, AttributeError):
        return 0


def service_verdict(case: dict[str, Any]) -> str:
    decode, is_meta = READERS[case["schema"]]
    doc = case["doc"].encode()
    if is_meta:
        if "value_hex" in case:
            value = bytes.fromhex(case["value_hex"])
        else:
            size = _value_size(case["doc"])
            value = bytes(size if 0 <= size <= _MAX_VALUE else 0)
        headers = [*BINARY, ("svd-meta", doc)]
    else:
        value, headers = doc, JSON
    try:
        decode(value, headers)
    except ContractError as exc:
        return str(exc.code)
    return "ok"


def test_the_corpus_is_well_formed() -> None:
    assert len(CASES) >= 60
    names = [case["name"] for case in CASES]
    assert len(set(names)) == len(names), "case names are unique"
    codes = {str(code) for code in ErrorCode}
    for case in CASES:
        assert set(case) <= {"name", "schema", "doc", "service", "json_schema", "beyond_schema",
                             "value_hex"}, case["name"]  # fmt: skip
        assert case["schema"] in READERS and case["schema"] in SCHEMAS, case["name"]
        assert isinstance(case["doc"], str), f"{case['name']}: doc is the JSON text, a string"
        assert case["service"] == "ok" or case["service"] in codes, case["name"]
        assert case["json_schema"] in ("valid", "invalid"), case["name"]
    assert set(READERS) == {case["schema"] for case in CASES}, "every schema file is exercised"


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_verdicts_are_as_recorded(case: dict[str, Any]) -> None:
    assert (service_verdict(case), schema_verdict(case)) == (case["service"], case["json_schema"])


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_schema_and_the_service_agree_unless_the_case_says_why(case: dict[str, Any]) -> None:
    agree = (case["json_schema"] == "valid") == (case["service"] == "ok")
    # A reason is given exactly where they differ, so none goes stale.
    assert agree != bool(case.get("beyond_schema")), case["name"]


def test_every_code_a_document_can_earn_is_in_the_corpus() -> None:
    wanted = {
        ErrorCode.INVALID_ENCODING,
        ErrorCode.INVALID_SCHEMA,
        ErrorCode.UNKNOWN_OPTION,
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
        ErrorCode.UNSUPPORTED_DTYPE,
        ErrorCode.INVALID_SHAPE,
        ErrorCode.SHAPE_MISMATCH,
        ErrorCode.NON_FINITE,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.JSON_TOO_DEEP,
        ErrorCode.INVALID_SPARSE,
    }
    assert {str(code) for code in wanted} <= {case["service"] for case in CASES}


def test_generated_values_fit_what_they_describe() -> None:
    # The value sizes are part of the verdicts: keep the helper honest on one of each kind.
    assert _value_size('{"matrix":{"shape":[2,3],"dtype":"float32"}}') == 24
    sparse = (
        '{"matrix":{"format":"coo","data":{"offset":0,"nbytes":8},"row":{"offset":8,"nbytes":4}}}'
    )
    assert _value_size(sparse) == 12
    assert _value_size('{"factors":{"s":{"offset":16,"nbytes":8}}}') == 24
    assert _value_size("not json") == 0
