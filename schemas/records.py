"""The Kafka record as the codec sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

# What a received value may be; decoding never copies it.
Buffer: TypeAlias = bytes | bytearray | memoryview

# What a record costs beyond its key, value and header bytes (batch and record framing, varints),
# rounded up generously: a record sized to a topic's limit must never be refused for a few bytes.
RECORD_OVERHEAD = 512
HEADER_OVERHEAD = 16


def record_size(key: bytes, value: Buffer, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of the bytes a record takes against a topic's max.message.bytes."""
    return (
        RECORD_OVERHEAD
        + len(key)
        + memoryview(value).nbytes
        + sum(len(name.encode()) + len(v) + HEADER_OVERHEAD for name, v in headers)
    )


@dataclass(frozen=True, slots=True)
class EncodedMessage:
    """A Kafka record ready to send."""

    key: bytes
    # The service publishes an answer straight from the shared memory its worker wrote it to.
    value: bytes | memoryview
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return record_size(self.key, self.value, self.headers)
