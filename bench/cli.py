"""``python -m bench``: the compute ceiling, the service through Kafka, and the two peers.

One run, one broker, the same matrices for every scenario; a table of ratios to the ceiling on
stdout and a JSON report (``--output``, default ``bench/results/<timestamp>.json``). Everything
it starts (broker, consumers, redis-server, Celery) is stopped on every path, Ctrl-C included.
See docs/performance.md.

Where the consumer's own process spends its CPU in the pre-filled scenario (``make profile``):
``python -m bench --profile --sizes 32 --skip quickfix,celery`` prints a top-N table of its
functions by own time and leaves it, with a flame graph, beside the JSON report (bench/profiling.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import hop, profiling, report
from bench.celery_peer import CeleryPeer
from bench.kafka_runs import Variant, run_variant
from bench.procs import REPO, Children, python_module
from bench.workload import DEFAULT_SIZES, QUICK_SIZES, Shape, request_count
from consumer.cpu import available_cpus

SCENARIOS = ("kafka", "quickfix", "celery")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: two sizes, short scenarios")
    p.add_argument(
        "--sizes", help=f"comma-separated, e.g. 32,256,4096x64 (default {','.join(DEFAULT_SIZES)})"
    )
    p.add_argument(
        "--seconds", type=float, help="work per scenario, at the ceiling rate (default 3)"
    )
    p.add_argument("--min-count", type=int, help="fewest requests per scenario (default 16)")
    p.add_argument("--max-count", type=int, help="most requests per scenario (default 4000)")
    p.add_argument("--latency-seconds", type=float, help="length of the half-load run (default 3)")
    p.add_argument("--latency-max", type=int, default=2000, help="most requests in it")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[@TREE][:SVD_X=1,...]",
        help="a consumer configuration to measure (repeatable; default: one, 'service'); "
        "@TREE runs the consumer from another checkout, for before/after in one run",
    )
    p.add_argument(
        "--skip", default="", help=f"comma-separated scenarios to skip: {', '.join(SCENARIOS)}"
    )
    p.add_argument(
        "--cpus", type=int, help="CPUs for the ceiling and the peers (default: our quota)"
    )
    p.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="use this broker instead of starting one (env KAFKA_BOOTSTRAP_SERVERS)",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="auto",
        choices=profiling.KINDS,
        help="profile the consumer's own process in each pre-filled run: py-spy where it can "
        "attach, else cProfile (default auto); tables and flame graphs go beside the report",
    )
    p.add_argument("--profile-top", type=int, default=25, help="rows in each profile table")
    p.add_argument(
        "--profile-native", action="store_true", help="py-spy: C frames too (GC, orjson, numpy)"
    )
    p.add_argument("--output", type=Path, help="JSON report path")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return p  # fmt: skip


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}


def _machine(cpus: int) -> dict[str, Any]:
    import numpy
    import scipy

    return {
        "cpus": cpus,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "loadavg_start": os.getloadavg(),
        "blas_env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_"))},
    }


def _ceiling(shape: Shape, seconds: float, cpus: int) -> dict[str, Any]:
    proc = subprocess.run(
        python_module("bench.ceiling", str(shape.rows), str(shape.cols), str(seconds), str(cpus)),
        cwd=REPO, capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _quickfix(shape: Shape, seconds: float, cpus: int) -> dict[str, Any]:
    proc = subprocess.run(
        python_module("bench.quickfix", str(shape.rows), str(shape.cols), str(seconds), str(cpus)),
        cwd=REPO, capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _guard(what: str, fn: Any, *args: Any) -> dict[str, Any]:
    """A scenario that fails is reported as failed; the others still run."""
    try:
        result: dict[str, Any] = fn(*args)
        return result
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
        print(f"bench: {what} failed: {exc!r}\n{detail}", file=sys.stderr)
        return {"error": repr(exc)}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM stops the run like Ctrl-C: through the finally below, which stops every child.
    signal.signal(signal.SIGTERM, _interrupt)
    # aiokafka warns on every retried produce to a just-created topic (leader not yet known).
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    quick = args.quick
    sizes = [
        Shape.parse(s)
        for s in (
            args.sizes.split(",") if args.sizes else (QUICK_SIZES if quick else DEFAULT_SIZES)
        )
    ]
    seconds = args.seconds or (0.5 if quick else 3.0)
    min_count = args.min_count or (8 if quick else 16)
    max_count = args.max_count or (300 if quick else 4000)
    latency_seconds = args.latency_seconds or (1.0 if quick else 3.0)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - set(SCENARIOS):
        raise SystemExit(f"unknown scenarios to skip: {sorted(unknown)}")
    variants = [Variant.parse(v) for v in args.variant] or [Variant("service")]
    cpus = args.cpus or available_cpus()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or REPO / "bench" / "results" / f"{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "started_at": stamp,
        "git": _git(),
        "machine": _machine(cpus),
        "settings": {
            "seconds": seconds, "min_count": min_count, "max_count": max_count,
            "latency_seconds": latency_seconds, "variants": [v.name for v in variants],
            "skip": sorted(skip), "dtype": "float64", "profile": args.profile,
        },
        "sizes": {},
    }  # fmt: skip
    profiler_kind = ""
    if args.profile and "kafka" not in skip:
        profiler_kind, why = profiling.choose(args.profile)
        _log(f"profiling the consumer's process with {why}")
        result["settings"]["profiler"] = profiler_kind
    profiles_dir = output.with_name(output.stem + "-profile")
    workdir = Path(tempfile.mkdtemp(prefix="svd-bench-"))
    children = Children()
    failed = False
    try:
        bootstrap = args.bootstrap
        broker_pid: int | None = None  # known when we started it: its CPU time is reported
        if bootstrap is None and "kafka" not in skip:
            from localkafka import LocalBroker

            _log("starting a Kafka broker")
            broker = LocalBroker(workdir=workdir / "kafka")
            children.add(broker.destroy)
            state = broker.start(die_with_parent=True)
            bootstrap, broker_pid = state.bootstrap, state.pid
        result["machine"]["kafka"] = bootstrap
        if bootstrap is not None:
            _log("one Kafka hop, the transport floor")
            result["kafka_hop"] = _guard("Kafka hop", lambda: asyncio.run(hop.measure(bootstrap)))
        peer: CeleryPeer | None = None
        if "celery" not in skip:
            peer = CeleryPeer(workdir / "celery", cpus, children)
            try:
                peer.start()
            except Exception as exc:  # the service's figures are still worth having
                print(f"bench: Celery + Redis not measured: {exc!r}", file=sys.stderr)
                result["celery_error"] = repr(exc)
                peer = None
        for shape in sizes:
            size: dict[str, Any] = {"shape": [shape.rows, shape.cols]}
            result["sizes"][shape.label] = size
            _log(f"{shape.label}: ceiling")
            size["ceiling"] = _ceiling(shape, seconds, cpus)
            count = request_count(size["ceiling"]["rate"], seconds, min_count, max_count)
            size["count"] = count
            if "kafka" not in skip:
                size["variants"] = {}
                for variant in variants:
                    _log(f"{shape.label}: service '{variant.name}', {count} requests")
                    profiler = (
                        profiling.make(
                            profiler_kind, profiles_dir / f"{shape.label}-{variant.name}",
                            children, args.profile_top, variant.tree or REPO, args.profile_native,
                        )
                        if profiler_kind else None
                    )  # fmt: skip
                    run = functools.partial(
                        run_variant, bootstrap, shape, variant, count, size["ceiling"]["rate"], latency_seconds,
                        args.latency_max, 2 * cpus, workdir, children, broker_pid, cpus, profiler,
                    )  # fmt: skip
                    size["variants"][variant.name] = _guard(
                        f"{shape.label} {variant.name}", lambda run=run: asyncio.run(run())
                    )
            if "quickfix" not in skip:
                _log(f"{shape.label}: quick fix")
                size["quickfix"] = _guard("quick fix", _quickfix, shape, seconds, cpus)
            if peer is not None:
                _log(f"{shape.label}: Celery + Redis, {count} requests")
                size["celery"] = _guard("Celery", peer.measure, shape, count, 2 * cpus)
            output.write_text(json.dumps(result, indent=2))  # partial results survive a crash
    except BaseException:
        failed = True
        raise
    finally:
        _log("stopping everything the benchmark started")
        children.stop_all()
        result["machine"]["loadavg_end"] = os.getloadavg()
        output.write_text(json.dumps(result, indent=2))
        if args.keep or failed:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.text(result))
    print(f"\nJSON report: {output}")
    for size in result["sizes"].values():
        for variant in size.get("variants", {}).values():
            files = ((variant.get("prefilled") or {}).get("profile") or {}).get("files", {})
            if "table" in files:
                print(f"\n{Path(files['table']).read_text().rstrip()}")
                print("  files: " + ", ".join(sorted(files.values())))
    floor = result.get("kafka_hop", {})
    if floor.get("p50_ms") is not None:
        print(
            f"Kafka floor: one produce->consume hop (8 KB, acks=all) p50 {floor['p50_ms']:.1f} ms, "
            f"p99 {floor['p99_ms']:.1f} ms; every answer makes two, so about "
            f"{2 * floor['p50_ms']:.0f} ms of 'added p50' is the broker round trips."
        )
    first: dict[str, Any] = next(iter(result["sizes"].values()), {})
    blas = first.get("ceiling", {}).get("blas")
    if blas:
        print("BLAS in the ceiling's workers: " + ", ".join(
            f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} thread)" for b in blas))  # fmt: skip
    return 0
