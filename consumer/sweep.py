"""``svd-consumer sweep-store``: delete old payload objects, for stores without lifecycle rules.

A bucket lifecycle rule is the better tool (docs/operations.md, "Object store"): the store
expires objects itself. Where there is none (a file:// root on NFS, some S3-compatible
servers), run this periodically (a cron job, a Kubernetes CronJob). It lists the service's
store location under a prefix and deletes objects older than the given age. Request objects of
failed requests are what their dead letters reference: keep the age above how long a dead
letter may wait for its replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from objectstore import PayloadStore, StoreError, StoreSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swept:
    seen: int
    deleted: int
    failed: int
    kept_bytes: int


def sweep(
    settings: StoreSettings, *, older_than_s: float, prefix: str = "", dry_run: bool = False
) -> Swept:
    """Delete objects under the store location's ``prefix`` last written over ``older_than_s``
    seconds ago. Raises StoreError when the store cannot be listed."""
    store = PayloadStore(settings)
    cutoff = time.time() - older_than_s
    seen = deleted = failed = kept = 0
    for entry in list(store.list(prefix)):
        seen += 1
        if entry.modified_s >= cutoff:
            kept += entry.nbytes
            continue
        if dry_run:
            log.info("would delete %s (%d bytes)", entry.url, entry.nbytes)
            deleted += 1
            continue
        try:
            store.delete(entry.url)
        except StoreError as exc:
            failed += 1
            log.warning("could not delete %s (%s); the next sweep tries again", entry.url, exc)
            continue
        deleted += 1
    return Swept(seen, deleted, failed, kept)
