"""``svd-store up|down|status|env``: the local S3-compatible object store of the project.

``eval "$(svd-store env)"`` points the service (``SVD_STORE_*``) and the SDK
(``SVD_CLIENT_STORE_*``) of this shell at the running store.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from localkafka.broker import wait_for_interrupt
from localstore.errors import LocalStoreError
from localstore.server import CLIENT_PREFIX, SERVICE_PREFIX, LocalStore
from localstore.settings import LocalStoreSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svd-store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="fetch the jar if needed, start the store, create the bucket")
    up.add_argument("--port", type=int, default=None, help="HTTP port (default: previous or free)")
    up.add_argument(
        "--foreground", action="store_true", help="stay attached; Ctrl-C stops the store"
    )
    sub.add_parser("down", help="stop the store")
    sub.add_parser("status", help="print the endpoint and bucket, exit 1 if not running")
    sub.add_parser("env", help="print `export` lines for the service and the SDK")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"port": args.port} if getattr(args, "port", None) else {}
    store = LocalStore(LocalStoreSettings(**overrides))
    try:
        if args.command == "up":
            return _up(store, foreground=args.foreground)
        if args.command == "down":
            print("object store stopped" if store.stop() else "no object store was running")
            return 0
        state = store.status()
        if state is None:
            if args.command == "env":
                print("no object store is running: start it with `svd-store up`", file=sys.stderr)
            else:
                print("not running")
            return 1
        if args.command == "env":
            print(_exports(store))
            return 0
        print(f"{state.endpoint} bucket {store.settings.bucket} (pid {state.pid})")
        return 0
    except LocalStoreError as exc:
        print(f"svd-store: {exc}", file=sys.stderr)
        return 2


def _exports(store: LocalStore) -> str:
    lines = []
    for title, prefix in (
        ("the service (svd-consumer)", SERVICE_PREFIX),
        ("the SDK", CLIENT_PREFIX),
    ):
        lines.append(f"# {title}")
        lines.extend(f"export {k}={shlex.quote(v)}" for k, v in store.env(prefix).items())
    return "\n".join(lines)


def _up(store: LocalStore, *, foreground: bool) -> int:
    version = store.settings.s3proxy_version
    print(f"starting S3Proxy {version} in {store.workdir} ...", flush=True)
    state = store.start(die_with_parent=foreground)
    print(
        f"object store ready at {state.endpoint}, bucket {store.settings.bucket} (pid {state.pid}); "
        "`svd-store env` prints its settings",
        flush=True,
    )
    if not foreground:
        print("stop it with `svd-store down`")
        return 0
    wait_for_interrupt("Ctrl-C stops the store")
    store.stop()
    print("object store stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
