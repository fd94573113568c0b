"""The Celery + Redis peer, as the seed ran it: pickled matrices in, pickled factors out.

The worker is started by ``bench.celery_peer`` with ``BENCH_REDIS_URL`` pointing at a
benchmark-owned redis-server. Each prefork child caps BLAS at one thread (as our workers do),
so the peer gets the same CPU budget and only the transport differs.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_process_init  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits

from consumer import compute

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="pickle",
    result_serializer="pickle",
    accept_content=["pickle"],
    result_accept_content=["pickle"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)

_limits: Any = None


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _one_blas_thread(**_: Any) -> None:
    global _limits
    _limits = threadpool_limits(limits=1)


@app.task(name="bench.svd")  # type: ignore[untyped-decorator]
def svd(matrix: Any) -> tuple[Any, Any, Any]:
    factors = compute.svd(matrix)
    return factors.u, factors.s, factors.vt
