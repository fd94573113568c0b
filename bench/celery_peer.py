"""Celery + Redis, side by side with the service: a redis-server and a Celery worker we own.

``CeleryPeer`` starts redis-server (Debian's package) on a free port in a temporary directory,
with persistence off, and a Celery worker (prefork, concurrency = CPUs) on it. ``measure`` runs
the client in its own process (``python -m bench.celery_peer ROWS COLS COUNT``): it submits
every request, then awaits every result, the way the SDK scenario does.

Where Celery + Redis cannot carry a size, it is skipped with the reason (``PeerSkipped``):
Celery's Redis result backend publishes every result on a pub/sub channel, and Redis closes a
subscriber whose output buffer passes the ``client-output-buffer-limit pubsub`` hard limit (32 MB
by default), and results published meanwhile never reach the client, which waits until its
timeout. A 2048x2048 result (64 MiB of factors) is over it: seen here as four computed results
never arriving for six minutes, with "scheduled to be closed ASAP for overcoming of output
buffer limits" in Redis's log. ``pubsub_unlimited`` (``--celery-pubsub-unlimited``) starts the
benchmark's redis-server without that limit, as an operator moving such results would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import Children, python_module, spawn, stop, wait_for
from bench.workload import Shape, matrices
from localkafka.broker import free_port


class PeerUnavailable(RuntimeError):
    pass


class PeerSkipped(RuntimeError):
    """This size is beyond what the peer can carry (the message says why)."""


def pubsub_hard_limit(config: str) -> int | None:
    """The pub/sub hard limit in bytes from Redis's ``client-output-buffer-limit`` value
    (``normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60``); None when there
    is none (0) or the value does not say."""
    parts = config.split()
    for i, word in enumerate(parts[:-1]):
        if word == "pubsub":
            try:
                hard = int(parts[i + 1])
            except ValueError:
                return None
            return hard or None
    return None


def skip_reason(shape: Shape, limit: int | None) -> str:
    """Why Celery + Redis cannot carry ``shape``'s results, or "" when it can."""
    if limit is None or shape.result_nbytes <= limit:
        return ""
    return (
        f"a {shape.label} result ({shape.result_nbytes / (1 << 20):.1f} MiB pickled) is over "
        f"Redis's pub/sub output buffer hard limit ({limit / (1 << 20):.0f} MiB, "
        "client-output-buffer-limit pubsub): Redis drops the result backend's subscriber and "
        "the client does not get the results (--celery-pubsub-unlimited lifts the limit)"
    )


class CeleryPeer:
    def __init__(
        self, workdir: Path, concurrency: int, children: Children, pubsub_unlimited: bool = False
    ) -> None:
        self.workdir = workdir
        self.concurrency = concurrency
        self.pubsub_unlimited = pubsub_unlimited
        self._children = children
        self.url = ""
        self._worker: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise PeerUnavailable("redis-server is not installed (apt-get install redis-server)")
        try:
            import celery  # type: ignore[import-untyped]  # noqa: F401
            import redis  # noqa: F401
        except ImportError as exc:
            raise PeerUnavailable(f"{exc}; pip install -e '.[bench]'") from exc
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port("127.0.0.1")
        self.url = f"redis://127.0.0.1:{port}/0"
        redis_proc = spawn(
            [
                redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                *(["--client-output-buffer-limit", "pubsub 0 0 0"] if self.pubsub_unlimited else []),
            ],
            log_path=self.workdir / "redis.log",
        )  # fmt: skip
        self._children.add(lambda: stop(redis_proc, 10))
        wait_for(lambda: self._redis_answers(), 30, "redis-server answers PING")
        # C_FORCE_ROOT: Celery refuses pickle as root otherwise (the benchmark may run as root).
        env = {**os.environ, "BENCH_REDIS_URL": self.url, "C_FORCE_ROOT": "1"}
        self._worker = worker = spawn(
            python_module(
                "celery", "-A", "bench.celery_app", "worker", "--pool=prefork",
                f"--concurrency={self.concurrency}", "--loglevel=WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-n", f"bench-{os.getpid()}@%h",
            ),
            log_path=self.workdir / "celery-worker.log",
            env=env,
        )  # fmt: skip
        # Celery's warm shutdown waits for running tasks; SIGTERM is that, then SIGKILL.
        self._children.add(lambda: stop(worker, 30))

    def _redis_answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def pubsub_limit(self) -> int | None:
        import redis

        config = redis.Redis.from_url(self.url, socket_timeout=5).config_get(
            "client-output-buffer-limit"
        )
        return pubsub_hard_limit(str(config.get("client-output-buffer-limit", "")))

    def measure(self, shape: Shape, count: int, warmup: int) -> dict[str, Any]:
        if why := skip_reason(shape, self.pubsub_limit()):
            raise PeerSkipped(why)
        env = {**os.environ, "BENCH_REDIS_URL": self.url}
        out = self.workdir / "client.out"
        with out.open("w") as stdout, (self.workdir / "client.err").open("w") as stderr:
            client = subprocess.Popen(
                python_module(
                    "bench.celery_peer", str(shape.rows), str(shape.cols), str(count), str(warmup)
                ),
                env=env,
                stdout=stdout,
                stderr=stderr,
            )
            try:
                # The client would wait for results forever if the worker died: watch both.
                while client.poll() is None:
                    if self._worker is not None and self._worker.poll() is not None:
                        raise PeerUnavailable(
                            f"the Celery worker exited; see {self.workdir / 'celery-worker.log'}"
                        )
                    time.sleep(0.1)
            finally:
                stop(client, 5)
        if client.returncode != 0:
            err = (self.workdir / "client.err").read_text()[-3000:]
            raise RuntimeError(f"the Celery client failed:\n{err}")
        result: dict[str, Any] = json.loads(out.read_text().strip().splitlines()[-1])
        return result


def _client(shape: Shape, count: int, warmup: int) -> dict[str, Any]:
    from bench.celery_app import app, svd

    inputs = matrices(shape)
    # Waits for the worker to come up, and warms its children (first-call costs).
    for r in [svd.delay(inputs[i % len(inputs)]) for i in range(warmup)]:
        r.get(timeout=300)
    started = time.perf_counter()
    pending = [svd.delay(inputs[i % len(inputs)]) for i in range(count)]
    for r in pending:
        _u, s, _vt = r.get(timeout=1800)
        assert s.shape == (min(shape.rows, shape.cols),)
        r.forget()  # drop the stored result: large factors would pile up in Redis
    elapsed = time.perf_counter() - started
    app.backend.client.flushdb()
    return {"rate": count / elapsed, "done": count, "seconds": elapsed}


def main(argv: list[str]) -> int:
    rows, cols, count, warmup = (int(a) for a in argv[:4])
    print(json.dumps(_client(Shape(rows, cols), count, warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
