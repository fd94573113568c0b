"""The Kafka record as the codec sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

# What a received value may be; decoding never copies it.
Buffer: TypeAlias = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class EncodedMessage:
    """A Kafka record ready to send."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
