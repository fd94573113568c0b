"""Model-level rules: options, result shapes, error results, retryability."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from schemas import (
    RETRYABLE_CODES,
    ContractError,
    DeadLetterMeta,
    ErrorCode,
    ErrorResult,
    MatrixSpec,
    SvdOptions,
    SvdRequestMeta,
    SvdServiceError,
)


def meta(rows: int, cols: int, **options: object) -> SvdRequestMeta:
    return SvdRequestMeta(
        request_id="r",
        matrix=MatrixSpec(shape=[rows, cols], dtype="float32"),
        options=SvdOptions.model_validate(options),
    )


@pytest.mark.parametrize(
    ("options", "shapes"),
    [
        ({}, ((5, 3), (3,), (3, 3))),
        ({"full_matrices": True}, ((5, 5), (3,), (3, 3))),
        ({"k": 2}, ((5, 2), (2,), (2, 3))),
        ({"compute_uv": False}, (None, (3,), None)),
        ({"compute_uv": False, "k": 1}, (None, (1,), None)),
    ],
)
def test_result_shapes_follow_the_options(options: dict[str, object], shapes: object) -> None:
    assert tuple(meta(5, 3, **options).result_shapes()) == shapes


def test_result_shapes_match_numpy() -> None:
    a = np.ones((5, 3))
    for full in (False, True):
        u, s, vt = np.linalg.svd(a, full_matrices=full)
        assert meta(5, 3, full_matrices=full).result_shapes() == (u.shape, s.shape, vt.shape)


def test_compute_dtype_defaults_to_the_matrix_dtype() -> None:
    assert meta(2, 2).compute_dtype == "float32"
    assert meta(2, 2, dtype="float64").compute_dtype == "float64"
    assert meta(4, 4, dtype="float64").result_nbytes() == (16 + 4 + 16) * 8


def test_options_are_strict() -> None:
    with pytest.raises(ValidationError):
        SvdOptions.model_validate({"compute_uv": 1})
    with pytest.raises(ValidationError):
        SvdOptions.model_validate({"k": "2"})


def test_models_are_immutable() -> None:
    with pytest.raises(ValidationError):
        SvdOptions().k = 3  # type: ignore[misc]


def test_error_result_from_exception_truncates_and_keeps_retryability() -> None:
    exc = SvdServiceError(ErrorCode.INTERNAL, "x" * 10_000, request_id="r-1")
    result = ErrorResult.from_exception(exc)
    assert result.retryable is True and result.request_id == "r-1"
    assert len(result.message) == 4096 and result.message.endswith("\u2026")
    assert ErrorResult.from_exception(exc, request_id="r-2").request_id == "r-2"


def test_retryable_defaults_come_from_the_code_and_can_be_overridden() -> None:
    assert {ErrorCode.EXPIRED, ErrorCode.INTERNAL, ErrorCode.STORE_UNAVAILABLE} == RETRYABLE_CODES
    assert ContractError(ErrorCode.INVALID_SCHEMA, "m").retryable is False
    assert SvdServiceError(ErrorCode.TIMEOUT, "m", retryable=True).retryable is True
    assert str(ContractError(ErrorCode.NON_FINITE, "nan at 0")) == "NON_FINITE: nan at 0"


def test_dead_letter_reason_is_truncated_not_rejected() -> None:
    dl = DeadLetterMeta(
        code=ErrorCode.INVALID_ENCODING,
        reason="r" * 5000,
        source_topic="svd-requests",
        source_partition=0,
        source_offset=0,
        attempts=1,
        timestamp_ms=0,
    )
    assert len(dl.reason) == 4096


def test_error_codes_are_their_names() -> None:
    # The string is the contract; a rename would break every reader.
    assert all(code.value == code.name for code in ErrorCode)
