"""Typed errors: the class follows the code, and every error survives pickling intact."""

from __future__ import annotations

import pickle

import pytest

from producer_sdk.errors import (
    ClientClosed,
    SvdComputeError,
    SvdError,
    SvdExpired,
    SvdInternalError,
    SvdInvalidRequest,
    SvdTimeout,
    service_error,
)
from schemas.errors import RETRYABLE_CODES, ErrorCode


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_service_code_maps_to_a_family(code: ErrorCode) -> None:
    err = service_error(code, "m", request_id="r1", retryable=None)
    families = (SvdInvalidRequest, SvdComputeError, SvdExpired, SvdInternalError)
    assert isinstance(err, families)
    assert err.code is code and err.request_id == "r1"
    assert err.retryable is (code in RETRYABLE_CODES)


def test_the_service_word_on_retryability_wins() -> None:
    err = service_error(ErrorCode.INTERNAL, "m", request_id=None, retryable=False)
    assert err.retryable is False


def test_client_side_errors_carry_codes() -> None:
    timeout = SvdTimeout("slow", request_id="r")
    closed = ClientClosed(request_id="r")
    assert timeout.code is ErrorCode.TIMEOUT and timeout.retryable
    assert closed.code is ErrorCode.INTERNAL and closed.retryable
    assert "r" in str(timeout)


@pytest.mark.parametrize(
    "err",
    [
        SvdTimeout("slow", request_id="r"),
        ClientClosed(request_id="r"),
        SvdInvalidRequest(ErrorCode.NON_FINITE, "nan", request_id="r", retryable=False),
        SvdError(ErrorCode.INTERNAL, "x"),
    ],
)
def test_errors_pickle_with_all_their_fields(err: SvdError) -> None:
    back = pickle.loads(pickle.dumps(err))  # noqa: S301 (our own object, in-process)
    assert type(back) is type(err)
    assert (back.code, back.message, back.request_id, back.retryable) == (
        err.code,
        err.message,
        err.request_id,
        err.retryable,
    )
