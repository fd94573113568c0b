"""Start, probe and stop one S3Proxy serving a local directory over the S3 API, with SigV4.

State lives in a work directory (0700): ``s3proxy.properties`` (0600: it holds the credential,
which is therefore never an argument of the process, as ``/proc/<pid>/cmdline`` is readable by
every local user), ``data/`` (one directory per bucket), ``store.log`` and ``store.json`` (pid
and port; removed on stop). The port chosen on the first start is kept in ``ports.json``, so a
store started again comes back where its clients expect it, with its objects.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

from localkafka.broker import exit_with_parent, free_port, is_alive, write_private
from localstore.errors import LocalStoreError
from localstore.jar import ensure_jar
from localstore.settings import LocalStoreSettings

log = logging.getLogger(__name__)

SERVICE_PREFIX = "SVD_STORE_"  # objectstore.StoreSettings of the service (svd-consumer)
CLIENT_PREFIX = "SVD_CLIENT_STORE_"  # the SDK's store settings (producer_sdk)


@dataclass(frozen=True)
class StoreState:
    pid: int
    port: int
    host: str

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


def store_env(
    prefix: str,
    *,
    endpoint: str,
    bucket: str,
    region: str,
    access_key_id: str,
    secret_access_key: str,
) -> dict[str, str]:
    """The environment that points a component (``prefix``) at a bucket of an S3 endpoint."""
    return {
        f"{prefix}URL": f"s3://{bucket}",
        f"{prefix}ENDPOINT": endpoint,
        f"{prefix}REGION": region,
        f"{prefix}ACCESS_KEY_ID": access_key_id,
        f"{prefix}SECRET_ACCESS_KEY": secret_access_key,
        f"{prefix}ALLOW_HTTP": "true" if endpoint.startswith("http://") else "false",
    }


def s3_store(
    *,
    endpoint: str,
    bucket: str,
    region: str,
    access_key_id: str,
    secret_access_key: str,
    retries: int = 0,
    timeout_s: float = 30.0,
) -> S3Store:
    """An obstore client for one bucket: path-style requests, SigV4, plain HTTP if the endpoint
    says so. ``retries=0`` by default: a probe or a test wants the first answer, not a backoff."""
    return S3Store(
        bucket,
        endpoint=endpoint,
        region=region,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        virtual_hosted_style_request=False,
        client_options={
            "allow_http": endpoint.startswith("http://"),
            "timeout": timedelta(seconds=timeout_s),
            "connect_timeout": timedelta(seconds=min(timeout_s, 5.0)),
        },
        retry_config={
            "max_retries": retries,
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2.0,
            },
            "retry_timeout": timedelta(seconds=timeout_s),
        },
    )


def answers_http(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when an HTTP server answers on ``host:port``, whatever the status (S3Proxy answers
    an unsigned ``GET /`` with 403 AccessDenied)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def short_error(exc: BaseException) -> str:
    """An obstore error without the Rust debug dump it appends ("Debug source: ...")."""
    return str(exc).split("\n\nDebug source:", 1)[0].strip()


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Jetty binds: connections of an earlier run in TIME_WAIT do not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _escape(value: str) -> str:
    """A value as a Java properties file reads it back: backslashes are escapes there."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class LocalStore:
    """One S3Proxy in ``workdir``; ``start`` is idempotent and ``stop`` leaves no JVM behind.

    ``with LocalStore() as store:`` starts it (or finds it running) and stops it on exit.
    """

    def __init__(
        self, settings: LocalStoreSettings | None = None, workdir: Path | None = None
    ) -> None:
        self.settings = settings or LocalStoreSettings()
        self.workdir = (
            workdir or self.settings.workdir or self.settings.home / "instance"
        ).resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.workdir / "store.json"

    @property
    def ports_file(self) -> Path:
        return self.workdir / "ports.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "store.log"

    @property
    def config_file(self) -> Path:
        return self.workdir / "s3proxy.properties"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def bucket_dir(self) -> Path:
        return self.data_dir / self.settings.bucket

    # -- state ---------------------------------------------------------------------------------
    def _read_state(self, path: Path) -> StoreState | None:
        try:
            return StoreState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _owns(self, pid: int) -> bool:
        """True if ``pid`` is a live S3Proxy JVM started on this work directory's config."""
        if not is_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return self.settings.jar_path.name.encode() in b" ".join(cmdline) and (
            str(self.config_file).encode() in cmdline
        )

    def status(self) -> StoreState | None:
        """The running store's state, or None. A stale state file (dead or foreign pid) is removed."""
        state = self._read_state(self.state_file)
        if state is None:
            return None
        if self._owns(state.pid):
            return state
        self.state_file.unlink(missing_ok=True)
        return None

    def _running(self) -> StoreState:
        state = self.status()
        if state is None:
            raise LocalStoreError(
                f"no object store is running in {self.workdir}: start it with `svd-store up`"
            )
        return state

    @property
    def endpoint(self) -> str:
        """``http://host:port`` of the running store (LocalStoreError when it is not running)."""
        return self._running().endpoint

    def env(self, prefix: str = SERVICE_PREFIX) -> dict[str, str]:
        """The environment pointing a component at this store's bucket: ``SERVICE_PREFIX`` for
        the service, ``CLIENT_PREFIX`` for the SDK. The store must be running."""
        s = self.settings
        return store_env(
            prefix,
            endpoint=self.endpoint,
            bucket=s.bucket,
            region=s.region,
            access_key_id=s.access_key_id,
            secret_access_key=s.secret_access_key.get_secret_value(),
        )

    def client(self, *, secret_access_key: str | None = None, retries: int = 0) -> S3Store:
        """An obstore client for the bucket (another ``secret_access_key`` tests refusals)."""
        return self._client(self._running(), secret_access_key=secret_access_key, retries=retries)

    def _client(
        self, state: StoreState, *, secret_access_key: str | None = None, retries: int = 0
    ) -> S3Store:
        s = self.settings
        return s3_store(
            endpoint=state.endpoint,
            bucket=s.bucket,
            region=s.region,
            access_key_id=s.access_key_id,
            secret_access_key=secret_access_key or s.secret_access_key.get_secret_value(),
            retries=retries,
        )

    # -- start ---------------------------------------------------------------------------------
    def start(self, *, die_with_parent: bool = False) -> StoreState:
        """Start the store (or return the one already running) and wait until it serves the
        bucket to a signed request."""
        running = self.status()
        if running is not None:
            return running
        java = shutil.which("java")
        if java is None:
            raise LocalStoreError(
                "Java is not installed: install OpenJDK 17+ (apt-get install openjdk-17-jre-headless)"
            )
        version = self.settings.s3proxy_version
        if not self.settings.jar_path.is_file():
            log.info("fetching S3Proxy %s with Maven (first start only)", version)
        jar = ensure_jar(self.settings.jar_path, version)
        self._make_workdir()
        port = self._port()
        # The filesystem backend's buckets are directories under its basedir: creating it here,
        # before the JVM starts, needs no request and cannot race the first client.
        self.bucket_dir.mkdir(parents=True, exist_ok=True)
        self._write_config(port)
        cmd = [
            java, f"-Xmx{self.settings.heap_mb}m", "-Djava.awt.headless=true",
            "-jar", str(jar), "--properties", str(self.config_file),
        ]  # fmt: skip
        log.info(
            "starting S3Proxy %s at http://%s:%d, bucket %s, data in %s, log %s",
            version, self.settings.host, port, self.settings.bucket, self.data_dir, self.log_file,
        )  # fmt: skip
        started = time.monotonic()
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it in order
                preexec_fn=exit_with_parent if die_with_parent else None,
            )
        state = StoreState(self._proc.pid, port, self.settings.host)
        self.state_file.write_text(json.dumps(asdict(state)))
        # Kept after stop() (which removes the state file), so a restart reuses the port.
        self.ports_file.write_text(json.dumps({"port": port}))
        try:
            self._wait_ready(state)
        except BaseException:
            self.stop()
            raise
        log.info(
            "object store ready at %s in %.1fs (pid %d)",
            state.endpoint, time.monotonic() - started, state.pid,
        )  # fmt: skip
        return state

    def _make_workdir(self) -> None:
        """The work directory, private to its owner (the config holds the credential)."""
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.workdir.chmod(0o700)
        except OSError as exc:
            raise LocalStoreError(
                f"cannot make {self.workdir} private (mode 0700): {exc}"
            ) from None

    def _port(self) -> int:
        host = self.settings.host
        if self.settings.port:
            port, source = self.settings.port, "SVD_LOCALSTORE_PORT"
        else:
            try:
                port, source = int(json.loads(self.ports_file.read_text())["port"]), "previous"
            except (OSError, ValueError, TypeError, KeyError):
                return free_port(host)
        if not _port_is_free(host, port):
            hint = (
                f"remove {self.ports_file} to pick a free port"
                if source == "previous"
                else "set SVD_LOCALSTORE_PORT to another port, or 0 for a free one"
            )
            raise LocalStoreError(
                f"port {port} on {host} ({source}) is in use by another process: {hint}"
            )
        return port

    def _write_config(self, port: int) -> None:
        s = self.settings
        props = {
            "s3proxy.endpoint": f"http://{s.host}:{port}",
            # SigV2 or SigV4, as clients choose; obstore signs with SigV4.
            "s3proxy.authorization": "aws-v2-or-v4",
            "s3proxy.identity": s.access_key_id,
            "s3proxy.credential": s.secret_access_key.get_secret_value(),
            # obstore >= 0.9 sends x-amz-checksum-sha256 with a multi-object delete (S3 wants an
            # integrity header there); S3Proxy 3.0.0 does not know it and would answer 501.
            "s3proxy.ignore-unknown-headers": "true",
            # filesystem-nio2, not filesystem: S3Proxy 3.0.0 logs the latter as deprecated, and
            # its listings show every directory (a/b for key a/b/c) as an object of 4096 bytes,
            # which a count of objects under a prefix would take for a leak.
            "jclouds.provider": "filesystem-nio2",
            "jclouds.filesystem.basedir": str(self.data_dir),
        }
        write_private(self.config_file, "".join(f"{k}={_escape(v)}\n" for k, v in props.items()))

    def _wait_ready(self, state: StoreState) -> None:
        timeout = self.settings.start_timeout_s
        deadline = time.monotonic() + timeout
        while not answers_http(state.host, state.port):
            if self._proc is not None and self._proc.poll() is not None:
                raise LocalStoreError(
                    f"S3Proxy exited with code {self._proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise LocalStoreError(
                    f"S3Proxy did not answer HTTP on {state.endpoint} within {timeout:.0f}s; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        # One signed request: the credentials are accepted and the bucket is there.
        try:
            next(iter(obstore.list(self._client(state), chunk_size=1)), None)
        except (ObstoreError, OSError) as exc:
            raise LocalStoreError(
                f"S3Proxy answers on {state.endpoint}, but a signed listing of bucket "
                f"{self.settings.bucket} failed: {short_error(exc)}"
            ) from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop the store (SIGTERM, then SIGKILL after the timeout). True if one ran."""
        state = self.status()
        pid = state.pid if state else (self._proc.pid if self._proc else None)
        if pid is None or not self._owns(pid):
            self._reap()
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not self._wait_gone(pid, self.settings.stop_timeout_s):
            log.warning(
                "S3Proxy (pid %d) did not stop within %.0fs: SIGKILL",
                pid, self.settings.stop_timeout_s,
            )  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._wait_gone(pid, 10.0)
        self._reap()
        self.state_file.unlink(missing_ok=True)
        log.info("object store stopped (pid %d)", pid)
        return True

    def kill(self) -> None:
        """SIGKILL the store, for fault tests ("store down"): no clean shutdown; the port and
        the objects are kept, so ``start()`` brings it back where it was."""
        state = self.status()
        if state is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state.pid, signal.SIGKILL)
        if not self._wait_gone(state.pid, 10.0):
            raise LocalStoreError(f"S3Proxy (pid {state.pid}) survived SIGKILL for 10s")
        self._reap()
        log.info("object store killed (pid %d)", state.pid)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            # Our own child: wait for it (waitpid reaps it; /proc would show a zombie).
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            self._proc = None
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def destroy(self) -> None:
        """Stop and delete the work directory (ephemeral stores of a test session)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> LocalStore:
        self.start(die_with_parent=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
