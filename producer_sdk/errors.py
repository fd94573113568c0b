"""Typed errors. Every one carries a stable ``ErrorCode`` from the wire contract.

Errors the service answered with map to a subclass by their code, so callers can catch a family
(``SvdInvalidRequest``) or inspect ``code``. Errors that happen in the client (no answer in time,
the client closed, Kafka refused the request) reuse the closest code; their class says where they
came from.
"""

from __future__ import annotations

from schemas.errors import RETRYABLE_CODES, ErrorCode


class SvdError(Exception):
    """Base of every error the SDK raises about a request."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retryable = code in RETRYABLE_CODES if retryable is None else retryable

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments are lost by Exception's default pickling; errors cross process
        # boundaries in user code (multiprocessing, Celery), so keep them intact.
        return (_rebuild, (type(self), self.code, self.message, self.request_id, self.retryable))


def _rebuild(
    cls: type[SvdError], code: ErrorCode, message: str, request_id: str | None, retryable: bool
) -> SvdError:
    err = cls.__new__(cls)
    SvdError.__init__(err, code, message, request_id=request_id, retryable=retryable)
    return err


# -- answered by the service --------------------------------------------------------------------


class SvdInvalidRequest(SvdError):
    """The service rejected the request's bytes; sending them again fails the same way."""


class SvdComputeError(SvdError):
    """The request was valid but its SVD failed, took too long, or kept crashing its worker."""


class SvdExpired(SvdError):
    """The request's deadline had passed when the service reached it, so it was skipped."""


class SvdInternalError(SvdError):
    """The service failed for reasons of its own."""


_BY_CODE: dict[ErrorCode, type[SvdError]] = {
    ErrorCode.INVALID_ENCODING: SvdInvalidRequest,
    ErrorCode.INVALID_SCHEMA: SvdInvalidRequest,
    ErrorCode.UNKNOWN_OPTION: SvdInvalidRequest,
    ErrorCode.UNSUPPORTED_SCHEMA_VERSION: SvdInvalidRequest,
    ErrorCode.UNSUPPORTED_DTYPE: SvdInvalidRequest,
    ErrorCode.INVALID_SHAPE: SvdInvalidRequest,
    ErrorCode.SHAPE_MISMATCH: SvdInvalidRequest,
    ErrorCode.NON_FINITE: SvdInvalidRequest,
    ErrorCode.LIMIT_EXCEEDED: SvdInvalidRequest,
    ErrorCode.JSON_TOO_DEEP: SvdInvalidRequest,
    ErrorCode.MESSAGE_TOO_LARGE: SvdInvalidRequest,
    ErrorCode.INVALID_SPARSE: SvdInvalidRequest,
    ErrorCode.UNREADABLE_RECORD: SvdInvalidRequest,  # never answered: no request id is left
    # A referenced payload the service would not or could not use: the request names it.
    ErrorCode.UNTRUSTED_REFERENCE: SvdInvalidRequest,
    ErrorCode.OBJECT_NOT_FOUND: SvdInvalidRequest,
    ErrorCode.OBJECT_MISMATCH: SvdInvalidRequest,
    ErrorCode.STORE_UNAVAILABLE: SvdInternalError,
    ErrorCode.SVD_FAILED: SvdComputeError,
    ErrorCode.RESULT_OVERFLOW: SvdComputeError,
    ErrorCode.TIMEOUT: SvdComputeError,
    ErrorCode.WORKER_CRASHED: SvdComputeError,
    ErrorCode.EXPIRED: SvdExpired,
    ErrorCode.INTERNAL: SvdInternalError,
}


def service_error(
    code: ErrorCode, message: str, *, request_id: str | None, retryable: bool | None
) -> SvdError:
    """The typed exception for an error result the service sent."""
    return _BY_CODE.get(code, SvdError)(code, message, request_id=request_id, retryable=retryable)


# -- raised by the client -----------------------------------------------------------------------


class SvdTimeout(SvdError):
    """No answer arrived before the request's timeout. The answer, if it comes, is dropped.

    Retryable: the service may have been busy or down, and the same request may succeed later.
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(ErrorCode.TIMEOUT, message, request_id=request_id, retryable=True)


class ClientClosed(SvdError):
    """The client was closed (or broke) before the request got its answer."""

    def __init__(self, message: str = "the client is closed", *, request_id: str | None = None):
        super().__init__(ErrorCode.INTERNAL, message, request_id=request_id, retryable=True)


class SendFailed(SvdError):
    """Kafka did not accept the request (broker unreachable, or the request is too large)."""


class InvalidReply(SvdError):
    """An answer arrived for this request but breaks the wire contract (a service bug)."""
