"""Stored payloads in tests: a per-test prefix of the session's real store, requests stored as a
producer in any language would store them, and object counts waited on with a deadline."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import obstore

from schemas import codec
from schemas.models import ObjectRef
from tests.support.kafka_io import make_request

if TYPE_CHECKING:
    from tests.conftest import ObjectStoreEndpoint


@dataclass(frozen=True)
class StorePrefix:
    """One test's own location in the session's store: s3://<bucket>/<prefix>/."""

    store: ObjectStoreEndpoint
    prefix: str

    @classmethod
    def new(cls, store: ObjectStoreEndpoint) -> StorePrefix:
        return cls(store, f"t-{uuid.uuid4().hex[:12]}")

    @property
    def url(self) -> str:
        return f"s3://{self.store.bucket}/{self.prefix}"

    @property
    def service_env(self) -> dict[str, str]:
        """SVD_STORE_* for a service process that stores under this prefix."""
        return {**self.store.env, "SVD_STORE_URL": self.url}

    def client_settings(self, **overrides: Any) -> dict[str, Any]:
        """The SDK's ``store=`` settings for this prefix."""
        return {
            "url": self.url,
            "endpoint": self.store.endpoint,
            "region": self.store.region,
            "access_key_id": self.store.access_key_id,
            "secret_access_key": self.store.secret_access_key,
            "allow_http": True,
            **overrides,
        }

    def count(self, under: str = "") -> int:
        return self.store.count(f"{self.prefix}/{under}")

    def keys(self, under: str = "") -> list[str]:
        listed = obstore.list(self.store.client(), prefix=f"{self.prefix}/{under}")
        return sorted(meta["path"] for chunk in listed for meta in chunk)

    def wait_count(self, expected: int, under: str = "", timeout: float = 30.0) -> None:
        """Until exactly ``expected`` objects are under the prefix, or fail with what is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(under) == expected:
                return
            time.sleep(0.1)
        raise AssertionError(
            f"{expected} objects expected under {self.prefix}/{under} after {timeout}s; "
            f"found {self.keys(under)[:10]}"
        )

    def put(self, key: str, data: bytes) -> ObjectRef:
        """Store ``data`` as a producer would (any S3 client), and its reference."""
        obstore.put(self.store.client(), f"{self.prefix}/{key}", data)
        return ObjectRef(
            url=f"{self.url}/{key}", nbytes=len(data), sha256=hashlib.sha256(data).hexdigest()
        )

    def stored_request(
        self, matrix: np.ndarray[Any, Any], *, data: bytes | None = None, **fields: Any
    ) -> tuple[str, codec.EncodedMessage]:
        """A version 2 JSON request referencing ``matrix`` (or ``data`` in its place) stored
        under requests/."""
        request_id, message = make_request(matrix, **fields)
        ref = self.put(f"requests/{request_id}", message.value if data is None else data)
        return request_id, codec.to_stored(message, ref)
