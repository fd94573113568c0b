"""The local broker tooling: idempotent start, stale state, clear errors, clean stop, and no
password where another local user could read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from localkafka import BrokerError, BrokerSettings, LocalBroker
from localkafka.broker import answers_metadata, is_alive, write_java_args
from localkafka.security import SaslUser, scram_format_args

pytestmark = pytest.mark.kafka


def test_stale_state_file_is_discarded(tmp_path: Path) -> None:
    broker = LocalBroker(workdir=tmp_path)
    tmp_path.mkdir(exist_ok=True)
    # A pid that is certainly not our broker: this test process itself.
    broker.state_file.write_text(
        json.dumps({"pid": os.getpid(), "port": 1, "controller_port": 2, "host": "127.0.0.1"})
    )
    assert broker.status() is None
    assert not broker.state_file.exists()
    assert broker.stop() is False


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="Java is not installed"):
        LocalBroker(workdir=tmp_path / "b").start()


def test_missing_maven_without_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    java = Path(os.environ.get("JAVA_HOME", "/usr")) / "bin" / "java"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bindir))
    settings = BrokerSettings(home=tmp_path / "empty-cache")
    with pytest.raises(BrokerError, match="Maven"):
        LocalBroker(settings, workdir=tmp_path / "b").start()


async def test_existing_broker_is_reused_and_stop_leaves_no_jvm(kafka) -> None:  # type: ignore[no-untyped-def]
    if kafka.local is None:
        pytest.skip("the broker is external; nothing of ours to inspect")
    state = kafka.local.status()
    assert state is not None
    again = LocalBroker(kafka.local.settings, kafka.local.topics, kafka.local.workdir)
    assert (
        again.status() == state
    )  # a second `up` finds the running one instead of starting another
    assert await answers_metadata(state.bootstrap)


def test_start_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = LocalBroker(workdir=tmp_path / "b")
    state = broker.start(die_with_parent=True)
    try:
        assert Path(f"/proc/{state.pid}").exists()
        assert broker.start() == state  # idempotent
    finally:
        assert broker.stop() is True
    assert not is_alive(state.pid)
    assert broker.status() is None


def test_a_restarted_broker_comes_back_on_its_ports(tmp_path: Path) -> None:
    broker = LocalBroker(workdir=tmp_path / "b")
    first = broker.start(die_with_parent=True)
    try:
        broker.stop()
        again = broker.start(die_with_parent=True)
        assert (again.port, again.controller_port) == (first.port, first.controller_port)
    finally:
        broker.stop()


def test_the_java_launcher_reads_an_args_file_back_unchanged(tmp_path: Path) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java")
    value = "a b\\c \\\\d \"e\" 'f' #g @h \\"
    write_java_args(
        tmp_path / "args", [f"-Dsvd.probe={value}", "-XshowSettings:properties", "-version"]
    )
    shown = subprocess.run([java, f"@{tmp_path / 'args'}"], capture_output=True, text=True).stderr
    assert f"    svd.probe = {value}\n" in shown, shown


def test_scram_passwords_reach_the_broker_through_private_files_only(tmp_path: Path) -> None:
    user = SaslUser("carol", "carol-Pa55-word-6170")
    broker = LocalBroker(workdir=tmp_path / "b", format_args=scram_format_args([user]))
    state = broker.start(die_with_parent=True)
    try:
        assert user.password.encode() not in Path(f"/proc/{state.pid}/cmdline").read_bytes()
        assert not broker.format_args_file.exists()  # deleted once the storage was formatted
        assert broker.workdir.stat().st_mode & 0o777 == 0o700
        assert (broker.workdir / "server.properties").stat().st_mode & 0o777 == 0o600
        files = [path.read_bytes() for path in broker.workdir.rglob("*") if path.is_file()]
        # The user exists (formatting read the args file) and the metadata log keeps only a
        # salted hash of the password: no file holds it, the broker's log included.
        assert any(user.name.encode() in data for data in files)
        assert not any(user.password.encode() in data for data in files)
    finally:
        broker.stop()
