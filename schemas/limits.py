"""Decode limits: everything an untrusted message could make us allocate is bounded here."""

from __future__ import annotations

from dataclasses import dataclass, fields

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)  # no slots: the service pickles it to its workers with every job
class DecodeLimits:
    max_rows: int = 16_384
    max_cols: int = 16_384
    max_elements: int = 16_777_216
    # Bytes of the decoded input matrix in its wire dtype.
    max_matrix_bytes: int = 128 * MiB
    # Bytes of U + S + Vt in the compute dtype; catches full_matrices on a tall matrix (U is m x m).
    max_result_bytes: int = 256 * MiB
    # Stored entries of a sparse matrix (its matrix bytes are the data and index arrays).
    max_nnz: int = 16_777_216
    # Size of a Kafka record value; the broker's own limit must be at least this for it to matter.
    max_message_bytes: int = 64 * MiB
    # Nesting of JSON objects/arrays; a valid request needs 3.
    max_json_depth: int = 16
    # Fields in one JSON object. No valid message has more than a dozen, and validating millions
    # of unknown fields one error each would cost the service seconds per message.
    max_json_fields: int = 64
    # Objects and arrays in one message besides the bulk arrays of numbers (data, index arrays):
    # a valid one has a few dozen. Walking millions of them cost seconds of CPU per record.
    max_json_containers: int = 1024
    # Object keys in one message, wherever they are: the duplicate-key scan pays for each, and a
    # valid message has a few dozen.
    max_json_keys: int = 4096
    # Size of one header value (svd-meta is the only large one).
    max_header_bytes: int = 64 * KiB
    # Bytes of U + S + Vt when they go to an object store instead of the record (a version 2
    # request, to a service with a store); None: no store, max_result_bytes binds every result.
    max_stored_result_bytes: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_stored_result_bytes":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecodeLimits.{f.name} must be a positive integer, got {value!r}")


def stores_result(schema_version: int, limits: DecodeLimits) -> bool:
    """Whether a request's factors may go to the store: it speaks version 2 (references) and
    the service has a store (``max_stored_result_bytes`` is set)."""
    return limits.max_stored_result_bytes is not None and schema_version >= 2


def result_limit(schema_version: int, limits: DecodeLimits) -> int:
    """The most bytes a request's factors may take: in a store, or in the answer's record."""
    if limits.max_stored_result_bytes is not None and schema_version >= 2:
        return max(limits.max_stored_result_bytes, limits.max_result_bytes)
    return limits.max_result_bytes
