"""The claim check's object store: payloads too large for Kafka travel as references.

``PayloadStore`` reads (bounded, verified), writes (hashed) and deletes objects in S3 or a
directory; ``Trust`` decides which references may be read at all. Used by the service's workers
and event loop and by the SDK; docs/wire-format.md ("References") is the contract.
"""

from objectstore.errors import (
    ObjectMismatch,
    ObjectMissing,
    StoreError,
    StoreUnavailable,
    UntrustedLocation,
)
from objectstore.locations import Location, ObjectUrl, Trust
from objectstore.settings import StoreSettings
from objectstore.stores import PayloadStore, StoredEntry, StoredObject

__all__ = [
    "Location",
    "ObjectMismatch",
    "ObjectMissing",
    "ObjectUrl",
    "PayloadStore",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "StoredEntry",
    "StoredObject",
    "Trust",
    "UntrustedLocation",
]
