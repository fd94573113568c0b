"""``svd-consumer run`` (or ``python -m consumer run``): the SVD service.

Every setting comes from an ``SVD_*`` environment variable; the flags below override the common
ones. SIGTERM or SIGINT drains and stops; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from consumer import allocator, logs
from consumer.settings import ConsumerSettings

log = logging.getLogger("consumer")

_FLAGS: dict[str, tuple[type, str]] = {
    "bootstrap_servers": (str, "Kafka bootstrap servers (SVD_BOOTSTRAP_SERVERS)"),
    "group_id": (str, "consumer group (SVD_GROUP_ID)"),
    "requests_topic": (str, "topic to read requests from"),
    "results_topic": (str, "default topic for results"),
    "dlq_topic": (str, "dead-letter topic"),
    "pool_size": (int, "worker processes (default: CPUs this process may use)"),
    "max_inflight": (int, "in-flight request limit"),
    "max_inflight_bytes": (int, "in-flight byte budget"),
    "task_timeout_s": (float, "per-task time limit, seconds"),
    "drain_timeout_s": (float, "shutdown drain limit, seconds"),
    "max_attempts": (int, "pool attempts per request after worker crashes"),
    "metrics_port": (int, "metrics/health port, 0 to disable"),
    "log_level": (str, "log level"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-consumer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the service")
    for name, (kind, help_text) in _FLAGS.items():
        run.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=help_text)
    sub.add_parser("settings", help="print the effective settings (secrets masked)")
    sweep = sub.add_parser(
        "sweep-store",
        help="delete payload objects older than an age from the store (SVD_STORE_*); for "
        "stores without a lifecycle rule",
    )
    sweep.add_argument("--older-than-s", type=float, required=True, help="age in seconds")
    sweep.add_argument(
        "--prefix", default="", help="only keys under this prefix, e.g. results/ (default: all)"
    )
    sweep.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    return parser


def load_settings(args: argparse.Namespace) -> ConsumerSettings:
    overrides: dict[str, Any] = {k: v for k in _FLAGS if (v := getattr(args, k, None)) is not None}
    return ConsumerSettings(**overrides)


async def serve(settings: ConsumerSettings) -> int:
    from aiokafka.errors import KafkaConnectionError

    from consumer.security import connect_failure_reason
    from consumer.service import SvdService  # imports numpy/scipy/aiokafka: only when running

    service = SvdService(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.run()
    except KafkaConnectionError as exc:  # before RuntimeError: aiokafka's errors derive from it
        # No bootstrap server took us: wrong credentials, certificates or address. Retrying
        # would not fix that and would hammer the broker; say why once and exit.
        reason = await connect_failure_reason(settings.bootstrap_servers, settings.kafka_security())
        log.critical(
            "cannot connect to Kafka at %s over %s: %s; exiting without retrying",
            settings.bootstrap_servers, settings.describe_security(), reason or exc,
        )  # fmt: skip
        return 1
    except RuntimeError as exc:
        log.critical("%s", exc)
        return 1
    return 0


def _sweep(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    from consumer.sweep import sweep
    from objectstore import StoreError

    logs.configure(settings.log_level, json=settings.log_json)
    if not settings.store.enabled:
        print("svd-consumer: no object store configured (SVD_STORE_URL)", file=sys.stderr)
        return 2
    try:
        swept = sweep(
            settings.store, older_than_s=args.older_than_s, prefix=args.prefix,
            dry_run=args.dry_run,
        )  # fmt: skip
    except StoreError as exc:
        print(
            f"svd-consumer: cannot list {settings.store.describe()}: {exc.message}", file=sys.stderr
        )
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{settings.store.describe()}/{args.prefix}: {swept.seen} objects, {verb} "
        f"{swept.deleted}, failed {swept.failed}, kept {swept.kept_bytes} bytes"
    )
    return 1 if swept.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print(f"svd-consumer: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "settings":
        print(settings.model_dump_json(indent=2))
        return 0
    if args.command == "sweep-store":
        return _sweep(settings, args)
    logs.configure(settings.log_level, json=settings.log_json)
    allocator.tune()  # before the first large buffer (consumer/allocator.py)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
