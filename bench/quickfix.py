"""The seed's quick fix, reproduced: a new ProcessPoolExecutor for every request.

Run as ``python -m bench.quickfix ROWS COLS SECONDS CONCURRENCY``; prints one JSON object.
``CONCURRENCY`` callers (threads, like a web server's concurrent requests) each loop: create an
executor, submit the SVD (the matrix is pickled to the child, the factors pickled back), wait,
shut the executor down. The executor uses Python's default start method and leaves BLAS
threads at their default, as the seed did. It runs in its own process because it forks: the
benchmark's own process has an event loop and threads, which must not be forked.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.workload import Shape, matrices
from consumer import compute


def _svd(matrix: Any) -> compute.SvdFactors:
    return compute.svd(matrix)


def measure(shape: Shape, seconds: float, concurrency: int) -> dict[str, Any]:
    inputs = matrices(shape)
    lock = threading.Lock()
    finished: list[float] = []
    started = time.perf_counter()

    def caller(index: int) -> None:
        i = index
        while time.perf_counter() - started < seconds:
            with ProcessPoolExecutor(max_workers=1) as pool:
                factors = pool.submit(_svd, inputs[i % len(inputs)]).result(timeout=600)
            assert factors.s.shape[0] == min(shape.rows, shape.cols)
            with lock:
                finished.append(time.perf_counter())
            i += concurrency

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(finished) - started
    return {"rate": len(finished) / elapsed, "done": len(finished), "seconds": elapsed}


def main(argv: list[str]) -> int:
    rows, cols, seconds, concurrency = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    print(json.dumps(measure(Shape(rows, cols), seconds, concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
