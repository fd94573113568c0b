"""What can go wrong with a stored payload, each with the wire code it is answered with.

The codes are the contract's (docs/wire-format.md); the classes say which side is at fault, so
a caller decides by type whether to retry: only ``StoreUnavailable`` may pass later.
"""

from __future__ import annotations

from schemas.errors import ContractError, ErrorCode


class StoreError(ContractError):
    """A stored payload could not be used; ``code`` is the error result's."""


class UntrustedLocation(StoreError):
    """A reference outside every store and prefix this process is configured to read: never
    fetched (no server-side request forgery)."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(ErrorCode.UNTRUSTED_REFERENCE, message, request_id=request_id)


class ObjectMissing(StoreError):
    """The referenced object does not exist (never written, deleted, or expired)."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(ErrorCode.OBJECT_NOT_FOUND, message, request_id=request_id)


class ObjectMismatch(StoreError):
    """The object is not what its reference says: another size (truncated, say) or another
    content hash."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(ErrorCode.OBJECT_MISMATCH, message, request_id=request_id)


class StoreUnavailable(StoreError):
    """The store did not answer, or refused us (credentials, permissions): may pass later."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(
            ErrorCode.STORE_UNAVAILABLE, message, request_id=request_id, retryable=True
        )
