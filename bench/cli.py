"""``python -m bench``: the compute ceiling, the service through Kafka, and the two peers.

One run, one broker, the same matrices for every scenario; a table of ratios to the ceiling on
stdout and a JSON report (``--output``, default ``bench/results/<timestamp>.json``). Everything
it starts (broker, consumers, redis-server, Celery) is stopped on every path, Ctrl-C included.
See docs/performance.md.

Stored payloads (issue #17): sizes whose request or answer cannot travel in a record (2048 and
4096 by default) are measured with the service reading and writing them in the benchmark's own
object store (S3Proxy, started like the broker), with few requests each (``--large-min-count``);
the ``--crossover`` sizes are measured twice, payloads inline and stored, side by side.

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
from bench.celery_peer import CeleryPeer, PeerSkipped
from bench.kafka_runs import Variant, run_variant
from bench.procs import REPO, Children, python_module
from bench.stored import BenchStore, probe
from bench.workload import (
    DEFAULT_CROSSOVER,
    DEFAULT_SIZES,
    QUICK_CROSSOVER,
    QUICK_SIZES,
    Shape,
    all_sizes,
    request_count,
)
from consumer.cpu import available_cpus

SCENARIOS = ("kafka", "quickfix", "celery", "stored")


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
    p.add_argument(
        "--large-min-count",
        type=int,
        help="fewest requests at sizes that need the store (seconds each; default 2 per CPU)",
    )
    p.add_argument(
        "--crossover",
        help="sizes measured with payloads inline and stored, side by side "
        f"(default {','.join(DEFAULT_CROSSOVER)}; 'none' for none)",
    )
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
        "--celery-pubsub-unlimited",
        action="store_true",
        help="start redis-server without its pub/sub output buffer limit, so Celery can return "
        "results over 32 MB (2048x2048 and up); by default those sizes are skipped",
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
    p.add_argument(
        "--profile-workers",
        action="store_true",
        help="py-spy: profile the pool workers' wall time instead (store I/O, sha256, waiting; "
        "implies --profile py-spy)",
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
    except PeerSkipped as exc:
        print(f"bench: {what} skipped: {exc}", file=sys.stderr)
        return {"skipped": str(exc)}
    except Exception as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
        print(f"bench: {what} failed: {exc!r}\n{detail}", file=sys.stderr)
        return {"error": repr(exc)}


def parse_crossover(text: str | None, *, quick: bool, sizes_given: bool) -> list[Shape]:
    """``--crossover``: the sizes measured inline and stored. Default: 256-1024 (256 with
    ``--quick``), none when ``--sizes`` is given (a run of chosen sizes measures those only)."""
    if text is None:
        if sizes_given:
            return []
        text = ",".join(QUICK_CROSSOVER if quick else DEFAULT_CROSSOVER)
    if text.strip().lower() in ("", "none"):
        return []
    return [Shape.parse(part) for part in text.split(",") if part.strip()]


def payload_modes(shape: Shape, crossover: bool, store: bool) -> tuple[list[str], str]:
    """How the service is measured at ``shape``: payloads inline, stored, or both; and why a
    way is left out (printed, and kept in the report)."""
    if shape.needs_store():
        if store:
            return ["stored"], ""
        return [], (
            f"the service is not measured: a {shape.label} request or answer "
            f"({max(shape.nbytes, shape.result_nbytes) / (1 << 20):.1f} MiB) cannot travel in a "
            "record, and there is no object store (see above)"
        )
    if crossover:
        if store:
            return ["inline", "stored"], ""
        return ["inline"], "payloads stored not measured: no object store (see above)"
    return ["inline"], ""


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
    if args.profile_workers:
        if args.profile not in (None, "auto", "py-spy"):
            raise SystemExit("--profile-workers needs py-spy (cProfile sees one process)")
        args.profile = "py-spy"
    quick = args.quick
    sizes = [
        Shape.parse(s)
        for s in (
            args.sizes.split(",") if args.sizes else (QUICK_SIZES if quick else DEFAULT_SIZES)
        )
    ]
    crossover = parse_crossover(args.crossover, quick=quick, sizes_given=bool(args.sizes))
    seconds = args.seconds or (0.5 if quick else 3.0)
    min_count = args.min_count or (8 if quick else 16)
    max_count = args.max_count or (300 if quick else 4000)
    latency_seconds = args.latency_seconds or (1.0 if quick else 3.0)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - set(SCENARIOS):
        raise SystemExit(f"unknown scenarios to skip: {sorted(unknown)}")
    variants = [Variant.parse(v) for v in args.variant] or [Variant("service")]
    cpus = args.cpus or available_cpus()
    large_min_count = args.large_min_count or 2 * cpus
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
            "profile_workers": args.profile_workers,
            "celery_pubsub_unlimited": args.celery_pubsub_unlimited,
            "crossover": [c.label for c in crossover], "large_min_count": large_min_count,
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
        store: BenchStore | None = None
        wants_store = crossover or any(shape.needs_store() for shape in sizes)
        if wants_store and not {"kafka", "stored"} & skip:
            _log("starting an object store (S3Proxy) for stored payloads")
            store = BenchStore(workdir / "store", children)
            try:
                store.start()
            except Exception as exc:  # the inline figures are still worth having
                print(f"bench: stored payloads not measured: {exc!r}", file=sys.stderr)
                result["store_error"] = repr(exc)
                store = None
            else:
                result["machine"]["store"] = store.endpoint
        peer: CeleryPeer | None = None
        if "celery" not in skip:
            peer = CeleryPeer(workdir / "celery", cpus, children, args.celery_pubsub_unlimited)
            try:
                peer.start()
            except Exception as exc:  # the service's figures are still worth having
                print(f"bench: Celery + Redis not measured: {exc!r}", file=sys.stderr)
                result["celery_error"] = repr(exc)
                peer = None
        for shape in all_sizes(sizes, crossover):
            size: dict[str, Any] = {"shape": [shape.rows, shape.cols]}
            result["sizes"][shape.label] = size
            large = shape.needs_store()
            modes, why = payload_modes(shape, shape in crossover, store is not None)
            if why:
                _log(f"{shape.label}: {why}")
                size["payloads_note"] = why
            _log(f"{shape.label}: ceiling")
            size["ceiling"] = _ceiling(shape, seconds, cpus)
            count = request_count(
                size["ceiling"]["rate"], seconds, large_min_count if large else min_count,
                max_count, multiple_of=cpus if large else 1,
            )  # fmt: skip
            # Warm-up requests: one per worker where each takes seconds, else two.
            warmup = cpus if large else 2 * cpus
            size["count"] = count
            if "kafka" not in skip and modes:
                size["variants"] = {}
                for variant in variants:
                    for payloads in modes:
                        key = report.variant_key(variant.name, payloads)
                        _log(f"{shape.label}: service '{key}', {count} requests")
                        profiler = (
                            profiling.make(
                                profiler_kind, profiles_dir / f"{shape.label}-{key.replace('/', '-')}",
                                children, args.profile_top, variant.tree or REPO, args.profile_native,
                                args.profile_workers,
                            )
                            if profiler_kind else None
                        )  # fmt: skip
                        prefix = (
                            store.prefix(f"bench-{shape.label}-{key.replace('/', '-')}")
                            if store is not None and payloads == "stored"
                            else None
                        )
                        run = functools.partial(
                            run_variant, bootstrap, shape, variant, count, size["ceiling"]["rate"],
                            latency_seconds, args.latency_max, warmup, workdir, children,
                            broker_pid, cpus, profiler, payloads=payloads, store=prefix,
                            store_pid=store.pid if store is not None else None, few=large,
                        )  # fmt: skip
                        size["variants"][key] = _guard(
                            f"{shape.label} {key}", lambda run=run: asyncio.run(run())
                        )
                if store is not None and "stored" in modes:
                    _log(f"{shape.label}: the store's part of one request, alone")
                    size["store_probe"] = _guard(
                        "store probe", probe, store.prefix(f"bench-probe-{shape.label}"),
                        shape.nbytes, shape.result_nbytes,
                    )  # fmt: skip
            peers = shape in sizes  # crossover-only sizes: the service alone
            if "quickfix" not in skip and peers:
                _log(f"{shape.label}: quick fix")
                size["quickfix"] = _guard("quick fix", _quickfix, shape, seconds, cpus)
            if peer is not None and peers:
                _log(f"{shape.label}: Celery + Redis, {count} requests")
                size["celery"] = _guard("Celery", peer.measure, shape, count, warmup)
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
    print(report.all_text(result))
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
