"""The local object store (S3Proxy from Maven Central): S3 through obstore with real SigV4, a
wrong secret refused, a killed store back on its port with its objects, a clean stop, the CLI,
and no secret where another local user could read it."""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import obstore
import pytest
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import PermissionDeniedError
from pydantic import SecretStr

from localkafka.broker import is_alive
from localstore import (
    CLIENT_PREFIX,
    SERVICE_PREFIX,
    LocalStore,
    LocalStoreError,
    LocalStoreSettings,
)
from localstore.server import answers_http, s3_store
from tests.conftest import ObjectStoreEndpoint

REPO = Path(__file__).resolve().parents[2]
SECRET = LocalStoreSettings().secret_access_key.get_secret_value()


def _leftovers(marker: Path) -> str:
    """Processes whose command line names ``marker`` (a test's own work directory)."""
    found = subprocess.run(["pgrep", "-af", str(marker)], capture_output=True, text=True)
    return found.stdout.strip()


def test_put_get_list_delete_through_obstore_with_sigv4(
    object_store: ObjectStoreEndpoint, count_store_objects: Callable[[str], int]
) -> None:
    client = object_store.client()
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    obstore.put(client, f"{prefix}/a.bin", payload)
    obstore.put(client, f"{prefix}/nested/b.bin", b"b")
    obstore.put(client, f"{prefix}x/not-under.bin", b"c")  # a longer name is another segment
    try:
        assert bytes(obstore.get(client, f"{prefix}/a.bin").bytes()) == payload
        assert obstore.head(client, f"{prefix}/a.bin")["size"] == len(payload)
        listed = sorted(m["path"] for chunk in obstore.list(client, prefix=prefix) for m in chunk)
        assert listed == [f"{prefix}/a.bin", f"{prefix}/nested/b.bin"]
        assert count_store_objects(prefix) == 2
        obstore.delete(client, f"{prefix}/a.bin")
        with pytest.raises(FileNotFoundError):
            obstore.get(client, f"{prefix}/a.bin")
        assert count_store_objects(prefix) == 1
    finally:
        obstore.delete(client, [f"{prefix}/nested/b.bin", f"{prefix}x/not-under.bin"])
    assert count_store_objects(prefix) == 0
    assert count_store_objects(f"{prefix}x") == 0


def test_a_wrong_secret_is_refused(object_store: ObjectStoreEndpoint) -> None:
    wrong = s3_store(
        endpoint=object_store.endpoint,
        bucket=object_store.bucket,
        region=object_store.region,
        access_key_id=object_store.access_key_id,
        secret_access_key=object_store.secret_access_key + "-wrong",
    )
    key = f"test-{uuid.uuid4().hex[:10]}/refused.bin"
    with pytest.raises(PermissionDeniedError, match="SignatureDoesNotMatch"):
        obstore.put(wrong, key, b"x")
    with pytest.raises(ObstoreError):
        next(iter(obstore.list(wrong, prefix="test-")))
    with pytest.raises(FileNotFoundError):  # and nothing was written
        obstore.head(object_store.client(), key)


def test_the_env_points_both_components_at_the_bucket(object_store: ObjectStoreEndpoint) -> None:
    suffixes = {"URL", "ENDPOINT", "REGION", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "ALLOW_HTTP"}
    assert set(object_store.env) == {SERVICE_PREFIX + s for s in suffixes}
    assert set(object_store.client_env) == {CLIENT_PREFIX + s for s in suffixes}
    for prefix, env in (
        (SERVICE_PREFIX, object_store.env),
        (CLIENT_PREFIX, object_store.client_env),
    ):
        assert env[prefix + "URL"] == f"s3://{object_store.bucket}"
        assert env[prefix + "ENDPOINT"] == object_store.endpoint
        assert env[prefix + "ALLOW_HTTP"] == str(object_store.endpoint.startswith("http:")).lower()


def test_start_is_idempotent_and_stop_leaves_no_java(tmp_path: Path) -> None:
    store = LocalStore(workdir=tmp_path / "s")
    state = store.start(die_with_parent=True)
    try:
        assert store.start() == state
        # A second `up` on the same work directory finds the running store.
        assert LocalStore(workdir=tmp_path / "s").status() == state
        assert answers_http(state.host, state.port)
    finally:
        assert store.stop() is True
    assert not is_alive(state.pid)
    assert store.status() is None
    assert not store.state_file.exists()
    assert not answers_http(state.host, state.port)
    assert _leftovers(tmp_path) == "", "a JVM of the store is still running"
    assert store.stop() is False  # nothing left to stop


def test_a_killed_store_comes_back_on_its_port_with_its_objects(tmp_path: Path) -> None:
    store = LocalStore(workdir=tmp_path / "s")
    first = store.start(die_with_parent=True)
    try:
        obstore.put(store.client(), "kept/object.bin", b"survives a SIGKILL")
        store.kill()
        assert not is_alive(first.pid)
        assert store.status() is None
        # Store down: a client with the old endpoint is refused, not answered.
        down = s3_store(
            endpoint=first.endpoint,
            bucket=store.settings.bucket,
            region=store.settings.region,
            access_key_id=store.settings.access_key_id,
            secret_access_key=SECRET,
            timeout_s=5.0,
        )
        with pytest.raises((ObstoreError, OSError)):
            obstore.get(down, "kept/object.bin")
        again = store.start(die_with_parent=True)
        assert again.pid != first.pid
        assert (again.host, again.port) == (first.host, first.port)
        assert bytes(obstore.get(down, "kept/object.bin").bytes()) == b"survives a SIGKILL"
    finally:
        store.stop()
    assert _leftovers(tmp_path) == ""


def test_the_context_manager_starts_and_stops(tmp_path: Path) -> None:
    with LocalStore(workdir=tmp_path / "s") as store:
        state = store.status()
        assert state is not None
        env = store.env()
        assert env["SVD_STORE_ENDPOINT"] == state.endpoint == store.endpoint
        assert store.env(CLIENT_PREFIX)["SVD_CLIENT_STORE_SECRET_ACCESS_KEY"] == SECRET
    assert not is_alive(state.pid)
    with pytest.raises(LocalStoreError, match="svd-store up"):
        store.env()


def test_no_secret_where_another_user_could_read_it(tmp_path: Path) -> None:
    settings = LocalStoreSettings(secret_access_key=SecretStr("a-secret-of-this-test"))
    assert "a-secret-of-this-test" not in repr(settings)
    store = LocalStore(settings, workdir=tmp_path / "s")
    state = store.start(die_with_parent=True)
    try:
        assert stat.S_IMODE(store.workdir.stat().st_mode) == 0o700
        assert stat.S_IMODE(store.config_file.stat().st_mode) == 0o600
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes()
        assert b"a-secret-of-this-test" not in cmdline
        obstore.put(store.client(), "k", b"v")  # the configured secret is the one it checks
        with pytest.raises(PermissionDeniedError):
            obstore.put(store.client(secret_access_key=SECRET), "k", b"v")
    finally:
        store.stop()
    assert "a-secret-of-this-test" not in store.log_file.read_text(errors="replace")


def test_the_cli_starts_prints_exports_and_stops(tmp_path: Path) -> None:
    env = {**os.environ, "SVD_LOCALSTORE_WORKDIR": str(tmp_path / "s")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localstore.cli", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    try:
        up = cli("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "object store ready at http://127.0.0.1:" in up.stdout
        printed = cli("env")
        assert printed.returncode == 0, printed.stderr
        exports = {}
        for line in printed.stdout.splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                exports[name] = shlex.split(value)[0]
        store = LocalStore(workdir=tmp_path / "s")
        assert exports == {**store.env(SERVICE_PREFIX), **store.env(CLIENT_PREFIX)}
        assert exports["SVD_STORE_URL"] == "s3://svd-payloads"
        assert exports["SVD_CLIENT_STORE_ACCESS_KEY_ID"] == "svd-local"
        assert cli("status").stdout.startswith(store.endpoint)
        down = cli("down")
        assert (down.returncode, down.stdout.strip()) == (0, "object store stopped")
        status = cli("status")
        assert (status.returncode, status.stdout.strip()) == (1, "not running")
        assert cli("env").returncode == 1
    finally:
        LocalStore(workdir=tmp_path / "s").stop()
    assert _leftovers(tmp_path) == ""


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = LocalStore(LocalStoreSettings(port=port), workdir=tmp_path / "s")
        with pytest.raises(LocalStoreError, match=f"port {port} .* is in use"):
            store.start()
    assert store.status() is None


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalStoreError, match="Java is not installed"):
        LocalStore(workdir=tmp_path / "s").start()


def test_missing_maven_without_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    java = Path(os.environ.get("JAVA_HOME", "/usr")) / "bin" / "java"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bindir))
    settings = LocalStoreSettings(home=tmp_path / "empty-cache")
    with pytest.raises(LocalStoreError, match="Maven"):
        LocalStore(settings, workdir=tmp_path / "s").start()
