"""The compute ceiling: ``procs`` processes, one BLAS thread each, decomposing the same matrices.

Run as ``python -m bench.ceiling ROWS COLS SECONDS PROCS``; prints one JSON object. The
processes run concurrently (as the consumer's workers do), so the figure is cores x the
one-thread rate under the memory-bandwidth contention the service itself would meet. They are
started like the consumer's pool (forkserver, the benchmark's environment, BLAS capped at one
thread with threadpoolctl), run ``consumer.compute.svd`` (the exact function the workers run),
and report which BLAS kernel they use, so a ratio compares like with like.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.synchronize import Barrier
from typing import Any

from threadpoolctl import threadpool_info, threadpool_limits

from bench.workload import Shape, matrices

# Imported before the BLAS cap is set, as the consumer's forkserver preloads it: threadpoolctl
# only caps libraries already loaded, and scipy brings its own OpenBLAS.
from consumer import compute

_barrier: Barrier | None = None
_limits: Any = None


def _init(barrier: Barrier) -> None:
    global _barrier, _limits
    _barrier = barrier
    _limits = threadpool_limits(limits=1)  # held for the process's life, as in consumer.worker


def _run(rows: int, cols: int, seconds: float) -> dict[str, Any]:
    inputs = matrices(Shape(rows, cols))
    compute.svd(inputs[0])  # warm: first-call costs (page faults, LAPACK workspace queries)
    assert _barrier is not None
    _barrier.wait()
    started = time.perf_counter()
    done = 0
    # At least two per process, so a slow size still yields a rate.
    while done < 2 or time.perf_counter() - started < seconds:
        compute.svd(inputs[done % len(inputs)])
        done += 1
    elapsed = time.perf_counter() - started
    blas = [
        {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for info in threadpool_info()
    ]
    return {"done": done, "seconds": elapsed, "rate": done / elapsed, "blas": blas}


def measure(shape: Shape, seconds: float, procs: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("forkserver")
    barrier = ctx.Barrier(procs)
    with ProcessPoolExecutor(
        max_workers=procs, mp_context=ctx, initializer=_init, initargs=(barrier,)
    ) as pool:
        futures = [pool.submit(_run, shape.rows, shape.cols, seconds) for _ in range(procs)]
        workers = [f.result() for f in futures]
    return {
        "rate": sum(w["rate"] for w in workers),
        "procs": procs,
        "per_process_rate": [w["rate"] for w in workers],
        "blas": workers[0]["blas"],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_"))},
    }


def main(argv: list[str]) -> int:
    rows, cols, seconds, procs = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    print(json.dumps(measure(Shape(rows, cols), seconds, procs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
