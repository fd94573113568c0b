"""Start, probe and stop one KRaft node (broker and controller in one JVM).

Alone, it is the project's single-node broker; given a ``Quorum`` it is one voter of a
``LocalCluster`` (localkafka/cluster.py).

State lives in a work directory: the generated configs, the log directory, ``broker.log`` and
``broker.json`` (pid and ports). Ports chosen on the first start are kept, so a restarted broker
comes back where its clients expect it.

The configs of a secure broker hold passwords (PLAIN users' JAAS lines, SCRAM credentials for
``kafka-storage format``), so the work directory is 0700, every file that can hold a secret is
created 0600, and no secret is ever an argument of a process: ``/proc/<pid>/cmdline`` is
readable by every local user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from localkafka.errors import BrokerError
from localkafka.jars import ensure_jars
from localkafka.settings import MIB, BrokerSettings, TopicSettings

_PR_SET_PDEATHSIG = 1

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


@dataclass(frozen=True)
class ExtraListener:
    """A client listener besides PLAINTEXT, e.g. ``ExtraListener("SCRAM", "SASL_PLAINTEXT")``.

    Its settings go in ``extra_properties`` under ``listener.name.<name in lower case>.``; the
    PLAINTEXT listener stays the inter-broker listener and the one topics are created on.
    """

    name: str
    security_protocol: SecurityProtocol
    port: int = 0  # 0: a free port, kept across restarts like the PLAINTEXT one

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name.upper() in ("PLAINTEXT", "CONTROLLER"):
            raise ValueError(f"listener name {self.name!r}: letters, digits, _; not a built-in")


@dataclass(frozen=True)
class Quorum:
    """This node's place in a cluster of combined broker+controller nodes.

    ``voters`` is the static ``controller.quorum.voters`` list (``1@host:port,...``); every node
    is formatted with the same ``cluster_id``. ``replication`` sizes the internal topics
    (offsets, transaction state), ``min_insync`` their and the cluster's default min ISR.
    """

    node_id: int
    voters: str
    cluster_id: str
    replication: int
    min_insync: int


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    controller_port: int
    host: str
    listeners: dict[str, int] = field(default_factory=dict)  # extra listener name -> port

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def bootstrap_for(self, listener: str) -> str:
        """The address of an extra listener (KeyError when the broker has none of that name)."""
        return f"{self.host}:{self.listeners[listener]}"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def exit_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM to the JVM if its parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/<pid>/stat`` (R, S, T stopped, Z zombie...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0]


def wait_for_interrupt(message: str) -> None:
    """Block until Ctrl-C or SIGTERM (the ``--foreground`` of the local servers' CLIs)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(message, flush=True)
    stop.wait()


def is_alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state != "Z"  # a zombie has already exited


class LocalBroker:
    """One broker in ``workdir``; ``start`` is idempotent and ``stop`` leaves no JVM behind.

    The optional arguments add client listeners (SASL, TLS) for the security tests:
    ``extra_properties`` are written after (and override) the defaults, ``format_args`` are
    appended to ``kafka-storage format`` (e.g. ``--add-scram``), so they apply on the first
    start of a work directory only. ``localkafka.security`` builds all three. Both may hold
    passwords: they reach the JVM through owner-only files, never its command line.
    """

    def __init__(
        self,
        settings: BrokerSettings | None = None,
        topics: TopicSettings | None = None,
        workdir: Path | None = None,
        *,
        extra_listeners: Sequence[ExtraListener] = (),
        extra_properties: Mapping[str, str] | None = None,
        format_args: Sequence[str] = (),
        quorum: Quorum | None = None,
    ) -> None:
        self.settings = settings or BrokerSettings()
        self.quorum = quorum
        self.topics = topics or TopicSettings()
        self.workdir = (
            workdir or self.settings.workdir or self.settings.home / "instance"
        ).resolve()
        names = [listener.name.upper() for listener in extra_listeners]
        if len(set(names)) != len(names):
            raise ValueError(f"listener names must be unique: {names}")
        self.extra_listeners = tuple(extra_listeners)
        self.extra_properties = dict(extra_properties or {})
        self.format_args = tuple(format_args)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.workdir / "broker.json"

    @property
    def ports_file(self) -> Path:
        return self.workdir / "ports.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def format_args_file(self) -> Path:
        """``kafka-storage format``'s arguments, while it runs (they may hold passwords)."""
        return self.workdir / "format.args"

    # -- state ---------------------------------------------------------------------------------
    def _read_state(self) -> BrokerState | None:
        try:
            return BrokerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _owns(self, pid: int) -> bool:
        """True if ``pid`` is a live kafka.Kafka JVM started on this work directory's config."""
        if not is_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"kafka.Kafka" in cmdline and str(self.workdir).encode() in b" ".join(cmdline)

    def status(self) -> BrokerState | None:
        """The running broker's state, or None. A stale state file (dead or foreign pid) is removed."""
        state = self._read_state()
        if state is None:
            return None
        if self._owns(state.pid):
            return state
        self.state_file.unlink(missing_ok=True)
        return None

    # -- start ---------------------------------------------------------------------------------
    def start(self, *, die_with_parent: bool = False) -> BrokerState:
        """Start the broker (or return the one already running) and wait until it answers."""
        running = self.status()
        if running is not None:
            return running
        state = self.launch(die_with_parent=die_with_parent)
        self.wait_ready(state)
        return state

    def launch(self, *, die_with_parent: bool = False) -> BrokerState:
        """Start the JVM without waiting for it to answer: a cluster's nodes answer only once a
        majority of them runs, so ``LocalCluster`` launches them all, then waits for each."""
        running = self.status()
        if running is not None:
            return running
        java = shutil.which("java")
        if java is None:
            raise BrokerError(
                "Java is not installed: install OpenJDK 17+ (apt-get install openjdk-17-jre-headless)"
            )
        libs = ensure_jars(self.settings.libs_dir, self.settings.kafka_version)
        self._make_workdir()
        port, controller_port = self._ports()
        extra_ports = self._extra_ports()
        config = self._write_configs(port, controller_port, extra_ports)
        self._format_storage(java, libs, config)
        cmd = self._broker_command(java, libs, config)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it in order
                preexec_fn=exit_with_parent if die_with_parent else None,
            )
        state = BrokerState(self._proc.pid, port, controller_port, self.settings.host, extra_ports)
        self.state_file.write_text(json.dumps(asdict(state)))
        # Kept after stop() (which removes the state file), so a restart reuses the ports.
        self.ports_file.write_text(json.dumps(asdict(state)))
        return state

    def wait_ready(self, state: BrokerState) -> None:
        """Wait until the node answers a metadata request; stop it if it does not."""
        try:
            self._wait_ready(state)
        except BaseException:
            self.stop()
            raise

    def _previous(self) -> BrokerState | None:
        try:
            return BrokerState(**json.loads(self.ports_file.read_text()))
        except (OSError, ValueError, TypeError):
            return self._read_state()  # a work directory from before ports.json existed

    def _make_workdir(self) -> None:
        """The work directory, private to its owner even when an earlier version made it 0755."""
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.workdir.chmod(0o700)
        except OSError as exc:
            raise BrokerError(f"cannot make {self.workdir} private (mode 0700): {exc}") from None

    def _broker_command(self, java: str, libs: Path, config: Path) -> list[str]:
        # 16 MiB G1 regions: with the default for this heap (1 MiB), every record batch over
        # 512 KiB (a 256x256 request, any larger answer) is a "humongous" allocation, and the
        # broker took half of the two CPUs at 256x256 pre-filled; with 16 MiB, a quarter
        # (`python -m bench`, CPU column; docs/performance.md). Secrets stay in `config`.
        return [
            java, f"-Xms{min(256, self.settings.heap_mb)}m", f"-Xmx{self.settings.heap_mb}m",
            "-XX:+UseG1GC", "-XX:G1HeapRegionSize=16m", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp", f"{libs}/*", "kafka.Kafka", str(config),
        ]  # fmt: skip

    def _ports(self) -> tuple[int, int]:
        previous = self._previous()
        host = self.settings.host
        port = self.settings.port or (previous.port if previous else 0) or free_port(host)
        controller = (
            self.settings.controller_port
            or (previous.controller_port if previous else 0)
            or free_port(host)
        )
        return port, controller

    def _extra_ports(self) -> dict[str, int]:
        previous = self._previous()
        kept = previous.listeners if previous else {}
        return {
            x.name.upper(): x.port or kept.get(x.name.upper()) or free_port(self.settings.host)
            for x in self.extra_listeners
        }

    def _write_configs(
        self, port: int, controller_port: int, extra_ports: Mapping[str, int]
    ) -> Path:
        host = self.settings.host
        max_bytes = self.topics.max_message_bytes
        extra = [
            (x.name.upper(), x.security_protocol, extra_ports[x.name.upper()])
            for x in self.extra_listeners
        ]
        client_listeners = ",".join(
            [f"PLAINTEXT://{host}:{port}", *(f"{name}://{host}:{p}" for name, _, p in extra)]
        )
        protocol_map = ",".join(
            ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT", *(f"{n}:{sp}" for n, sp, _ in extra)]
        )
        quorum = self.quorum or Quorum(1, f"1@{host}:{controller_port}", "", 1, 1)
        replication, min_insync = str(quorum.replication), str(quorum.min_insync)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(quorum.node_id),
            "controller.quorum.voters": quorum.voters,
            "listeners": f"{client_listeners},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": client_listeners,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": protocol_map,
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "default.replication.factor": replication,
            "min.insync.replicas": min_insync,
            "offsets.topic.replication.factor": replication,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": min_insync,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": min_insync,
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(max_bytes),
            "replica.fetch.max.bytes": str(max_bytes),
            "socket.request.max.bytes": str(max(100 * MIB, 2 * max_bytes)),
            "log.retention.hours": "24",
            **self.extra_properties,
        }
        config = self.workdir / "server.properties"
        write_private(config, "".join(f"{k}={_escape(v)}\n" for k, v in props.items()))
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)
        return config

    def _format_storage(self, java: str, libs: Path, config: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = self.quorum.cluster_id if self.quorum else random_cluster_id(java, libs)
        try:
            proc = subprocess.run(
                self._format_command(java, libs, config, cluster_id),
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            # Formatted (the metadata log holds salted hashes now) or failed: either way, done.
            self.format_args_file.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise BrokerError(f"formatting {self.data_dir} failed:\n{proc.stdout}{proc.stderr}")

    def _format_command(self, java: str, libs: Path, config: Path, cluster_id: str) -> list[str]:
        """``kafka-storage format`` with its arguments (``--add-scram`` passwords) in a 0600 file.

        The java launcher (JDK 9+) reads ``@file`` as more arguments; with the main class in the
        file, the ones after it are the tool's own, so the process shows ``java ... @file`` only.
        """
        tool = [
            "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
            "--ignore-formatted", *self.format_args,
        ]  # fmt: skip
        self.format_args_file.unlink(missing_ok=True)  # left by a run that died before cleanup
        write_java_args(self.format_args_file, tool)
        return [java, "-Xmx256m", "-cp", f"{libs}/*", f"@{self.format_args_file}"]

    def _wait_ready(self, state: BrokerState) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(
                    f"the broker exited with code {self._proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if asyncio.run(answers_metadata(state.bootstrap)):
                return
            time.sleep(0.25)
        raise BrokerError(
            f"the broker did not answer a metadata request within {self.settings.start_timeout_s:.0f}s; "
            f"last lines of {self.log_file}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after the timeout). True if one ran."""
        state = self.status()
        pid = state.pid if state else (self._proc.pid if self._proc else None)
        if pid is None or not self._owns(pid):
            self._reap()
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            os.killpg(pid, signal.SIGCONT)  # a paused JVM handles the SIGTERM once resumed
        if not self._wait_gone(pid, self.settings.stop_timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._wait_gone(pid, 10.0)
        self._reap()
        self.state_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the broker, for fault tests: no clean shutdown, state kept for a restart."""
        state = self.status()
        if state is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pid, signal.SIGKILL)
            self._wait_gone(state.pid, 10.0)
        self._reap()

    def pause(self) -> None:
        """SIGSTOP the broker, for fault tests: a hung node that keeps its sockets open."""
        self._signal(signal.SIGSTOP, stopped=True)

    def resume(self) -> None:
        """SIGCONT a paused broker."""
        self._signal(signal.SIGCONT, stopped=False)

    def paused(self) -> bool:
        state = self.status()
        return state is not None and process_state(state.pid) == "T"

    def _signal(self, sig: signal.Signals, *, stopped: bool) -> None:
        """Signal the JVM's process group and wait until the kernel shows it (un)stopped:
        delivery to every thread of a JVM is not instant."""
        state = self.status()
        if state is None:
            raise BrokerError(f"no broker is running in {self.workdir}")
        os.killpg(state.pid, sig)
        deadline = time.monotonic() + 10
        while (process_state(state.pid) == "T") != stopped:
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker (pid {state.pid}) did not take {sig.name} in 10 s")
            time.sleep(0.01)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            # Our own child: wait for it. /proc shows the JVM's leader as a zombie while its
            # other threads still exit, and waitpid cannot reap it until they have.
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
            time.sleep(0.1)
        return False

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def destroy(self) -> None:
        """Stop and delete the work directory (ephemeral brokers of a test session)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def random_cluster_id(java: str, libs: Path) -> str:
    """A new cluster id from ``kafka-storage random-uuid``."""
    base = [java, "-Xmx256m", "-cp", f"{libs}/*", "kafka.tools.StorageTool"]
    lines = (
        subprocess.run([*base, "random-uuid"], capture_output=True, text=True, check=False)
        .stdout.strip()
        .splitlines()
    )
    if not lines:
        raise BrokerError(
            "kafka.tools.StorageTool random-uuid printed nothing; is the jar cache complete?"
        )
    return lines[-1]


def write_private(path: Path, text: str | bytes, *, replace: bool = True) -> None:
    """Write a file only its owner can read (mode 0600 from its creation on).

    ``replace``: write a new file and rename it over ``path``, so an older copy with a wider
    mode is replaced rather than reused; otherwise ``path`` must not exist yet.
    """
    data = text.encode() if isinstance(text, str) else text
    if not replace:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_java_args(path: Path, args: Sequence[str]) -> None:
    """A new 0600 ``@file`` the java launcher reads back as exactly ``args``.

    Each argument is double-quoted, which keeps spaces and ``#`` (a comment outside quotes);
    inside quotes a backslash escapes the next character, and a line break would end the
    argument, so it is written as an escape too.
    """
    lines = []
    for arg in args:
        escaped = arg.replace("\\", "\\\\").replace('"', '\\"')
        lines.append('"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"\n')
    write_private(path, "".join(lines), replace=False)


def _escape(value: str) -> str:
    """A value as a Java properties file reads it back: backslashes are escapes there."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


async def answers_metadata(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request."""
    from aiokafka.client import AIOKafkaClient  # heavy import, only needed here

    host, _, port = bootstrap.rpartition(":")
    try:
        # A plain TCP probe first keeps aiokafka from logging a connection error per attempt.
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        await asyncio.wait_for(client.fetch_all_metadata(), timeout_s)
        return True
    except Exception:  # any failure means "not yet"; the caller owns the deadline
        return False
    finally:
        await client.close()
