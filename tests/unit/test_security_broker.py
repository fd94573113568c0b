"""The local broker's optional listeners (localkafka.security), without starting a JVM: the
default configuration is untouched, the secure one says what the security tests rely on."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from localkafka.broker import ExtraListener, LocalBroker
from localkafka.security import (
    MTLS,
    SASL,
    SASL_SSL,
    SaslUser,
    make_tls,
    scram_format_args,
    secure_broker,
)

USERS = [SaslUser("alice", "alice-secret"), SaslUser("bob", "bob-secret")]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def properties(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_default_broker_has_only_plaintext_and_controller(tmp_path: Path) -> None:
    broker = LocalBroker(workdir=tmp_path)
    props = properties(broker._write_configs(9092, 9093, {}))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert not any(key.startswith(("ssl.", "listener.name.")) for key in props)
    assert broker.format_args == ()


def test_the_secure_broker_adds_three_listeners(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    broker = secure_broker(tmp_path / "broker", USERS, tls)
    broker.workdir.mkdir()
    ports = {SASL: 1001, SASL_SSL: 1002, MTLS: 1003}
    props = properties(broker._write_configs(9092, 9093, ports))
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:9092,SASL://127.0.0.1:1001,SASL_SSL://127.0.0.1:1002,"
        "MTLS://127.0.0.1:1003,CONTROLLER://127.0.0.1:9093"
    )
    assert props["listener.security.protocol.map"] == (
        "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL"
    )
    # The broker talks to itself and its controller in PLAINTEXT, on loopback.
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["listener.name.mtls.ssl.client.auth"] == "required"
    for listener in ("sasl", "sasl_ssl"):
        assert props[f"listener.name.{listener}.sasl.enabled.mechanisms"] == (
            "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN"
        )
        plain = props[f"listener.name.{listener}.plain.sasl.jaas.config"]
        assert 'user_alice="alice-secret"' in plain and 'user_bob="bob-secret"' in plain
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"


def test_scram_users_are_created_when_the_storage_is_formatted() -> None:
    assert scram_format_args(USERS[:1]) == [
        "--add-scram", "SCRAM-SHA-256=[name=alice,password=alice-secret]",
        "--add-scram", "SCRAM-SHA-512=[name=alice,password=alice-secret]",
    ]  # fmt: skip


def test_no_password_is_on_a_command_line_and_files_holding_one_are_private(
    tmp_path: Path,
) -> None:
    broker = secure_broker(tmp_path / "broker", USERS, make_tls(tmp_path / "tls"))
    broker._make_workdir()
    config = broker._write_configs(9092, 9093, {SASL: 1001, SASL_SSL: 1002, MTLS: 1003})
    libs = tmp_path / "libs"
    format_argv = broker._format_command("/usr/bin/java", libs, config, "cluster-id")
    broker_argv = broker._broker_command("/usr/bin/java", libs, config)
    # /proc/<pid>/cmdline is readable by every local user: the java launcher reads the format
    # tool's arguments from the file instead.
    assert format_argv[-1] == f"@{broker.format_args_file}"
    for argv in (format_argv, broker_argv):
        for user in USERS:
            assert user.password not in "\0".join(argv)
    holding = {
        path
        for path in broker.workdir.rglob("*")
        if all(user.password.encode() in path.read_bytes() for user in USERS)
    }
    assert holding == {config, broker.format_args_file}
    assert mode(broker.workdir) == 0o700
    assert {path: mode(path) for path in holding} == {path: 0o600 for path in holding}
    assert "--add-scram" in broker.format_args_file.read_text()


def test_a_workdir_made_by_an_older_version_becomes_private(tmp_path: Path) -> None:
    broker = secure_broker(tmp_path / "broker", USERS, make_tls(tmp_path / "tls"))
    broker.workdir.mkdir(mode=0o755)
    old = broker.workdir / "server.properties"
    old.write_text("listener.name.sasl.plain.sasl.jaas.config=old secrets\n")
    old.chmod(0o644)
    inode = old.stat().st_ino
    broker._make_workdir()
    config = broker._write_configs(9092, 9093, {SASL: 1001, SASL_SSL: 1002, MTLS: 1003})
    assert config == old
    assert (mode(broker.workdir), mode(config)) == (0o700, 0o600)
    # Replaced, not rewritten in place: whoever opened the old file cannot read the new one.
    assert config.stat().st_ino != inode and "old secrets" not in config.read_text()
    assert sorted(path.name for path in broker.workdir.iterdir()) == [
        "log4j2.properties",
        "server.properties",
    ]


def test_extra_listener_ports_are_kept_across_restarts(tmp_path: Path) -> None:
    broker = LocalBroker(
        workdir=tmp_path, extra_listeners=[ExtraListener("SASL", "SASL_PLAINTEXT")]
    )
    first = broker._extra_ports()
    broker.state_file.write_text(
        json.dumps(
            {"pid": 1, "port": 1, "controller_port": 2, "host": "127.0.0.1", "listeners": first}
        )
    )
    assert broker._extra_ports() == first


@pytest.mark.parametrize("name", ["PLAINTEXT", "controller", "SASL-1", ""])
def test_listener_names_that_would_clash_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="listener name"):
        ExtraListener(name, "SASL_PLAINTEXT")


def test_sasl_users_need_plain_names_and_hide_their_password() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        SaslUser("alice", 'pass"word')  # would break out of the JAAS quotes
    assert "alice-secret" not in repr(USERS[0])


def test_certificates_verify_the_way_the_clients_check_them(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, client_key_password="key-pw")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    broker_chain = x509.load_pem_x509_certificates(tls.broker_keystore.read_bytes())
    broker, client = broker_chain[0], x509.load_pem_x509_certificate(tls.client_cert.read_bytes())
    for cert in (broker, client):
        cert.verify_directly_issued_by(ca)
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The client key is encrypted; Python's ssl loads it with its password.
    context = ssl.create_default_context(cafile=tls.ca_cert)
    context.load_cert_chain(tls.client_cert, tls.client_key, password="key-pw")
    assert mode(tls.client_key) == mode(tls.broker_keystore) == 0o600
