"""Stable error codes and the exceptions that carry them.

The codes are part of the wire contract (they appear in error results and dead letters), so a
code is never renamed or reused; docs/wire-format.md lists each one with its retryability.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error code; docs/wire-format.md says when each is used and if it is retryable."""

    # Rejected while decoding a request: the same bytes will always fail the same way.
    INVALID_ENCODING = "INVALID_ENCODING"
    INVALID_SCHEMA = "INVALID_SCHEMA"
    UNKNOWN_OPTION = "UNKNOWN_OPTION"
    UNSUPPORTED_SCHEMA_VERSION = "UNSUPPORTED_SCHEMA_VERSION"
    UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
    INVALID_SHAPE = "INVALID_SHAPE"
    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    NON_FINITE = "NON_FINITE"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    JSON_TOO_DEEP = "JSON_TOO_DEEP"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    # A sparse matrix whose index arrays are malformed (bounds, indptr not monotone, ...).
    INVALID_SPARSE = "INVALID_SPARSE"
    # A record the service could not read from Kafka at all (a batch it cannot decompress, or
    # one whose checksum does not match): nothing of it is left but its offset.
    UNREADABLE_RECORD = "UNREADABLE_RECORD"
    # A stored payload (schema_version 2's references; docs/wire-format.md, "References"): a
    # reference to a place the service does not trust is never fetched; the object is missing,
    # or is not what its reference says (size or sha256); the store could not be reached.
    UNTRUSTED_REFERENCE = "UNTRUSTED_REFERENCE"
    OBJECT_NOT_FOUND = "OBJECT_NOT_FOUND"
    OBJECT_MISMATCH = "OBJECT_MISMATCH"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    # Raised by the service after a request was accepted.
    SVD_FAILED = "SVD_FAILED"
    # The input is finite but its factors are not representable in the dtype (a singular value
    # above the dtype's largest number): scaling the matrix down avoids it.
    RESULT_OVERFLOW = "RESULT_OVERFLOW"
    TIMEOUT = "TIMEOUT"
    EXPIRED = "EXPIRED"
    WORKER_CRASHED = "WORKER_CRASHED"
    INTERNAL = "INTERNAL"


# Retryable means "sending the same request again later may succeed": the failure was about the
# service's state, not the input. TIMEOUT and WORKER_CRASHED are not: the compute time of a given
# matrix is roughly fixed, and the service has already retried a crashing task up to its limit.
RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {ErrorCode.EXPIRED, ErrorCode.INTERNAL, ErrorCode.STORE_UNAVAILABLE}
)


class SvdServiceError(Exception):
    """An error that becomes an error result on the wire."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retryable = code in RETRYABLE_CODES if retryable is None else retryable


class ContractError(SvdServiceError):
    """Input (a request, or a reply for the SDK) that breaks the wire contract."""
