"""Security settings of the consumer (SVD_*) and the SDK (SVD_CLIENT_*): secrets come from env
vars or files, never show up in dumps, reprs, errors or logs; half-configured security is
refused at load; the metrics server stays on loopback unless told otherwise."""

from __future__ import annotations

import ast
import ipaddress
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import errors as kafka_errors
from pydantic import ValidationError
from pydantic_settings import BaseSettings

import consumer.security
import producer_sdk._security
from consumer import cli
from consumer.settings import ConsumerSettings
from localkafka.security import TlsFiles, make_tls
from producer_sdk.settings import ClientSettings

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-Sesame-7431"
KEY_PASSWORD = "key-Sesame-9902"

SettingsClass = type[ConsumerSettings] | type[ClientSettings]
BOTH = pytest.mark.parametrize("cls", [ConsumerSettings, ClientSettings], ids=["consumer", "sdk"])
ENV_PREFIX = {ConsumerSettings: "SVD_", ClientSettings: "SVD_CLIENT_"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"), client_key_password=KEY_PASSWORD)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SVD_"):
            monkeypatch.delenv(name)


def sasl(**overrides: Any) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "alice",
        "sasl_password": PASSWORD,
        **overrides,
    }


def mtls(tls: TlsFiles, **overrides: Any) -> dict[str, Any]:
    return {
        "security_protocol": "SSL",
        "ssl_cafile": tls.ca_cert,
        "ssl_certfile": tls.client_cert,
        "ssl_keyfile": tls.client_key,
        "ssl_key_password": KEY_PASSWORD,
        **overrides,
    }


def visible_forms(settings: BaseSettings) -> str:
    """Everything a settings object shows of itself to logs, dumps and error messages."""
    return "\n".join(
        [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())]
    )


# --- secrets: masked everywhere, from env or files ---------------------------------------------


@BOTH
def test_secrets_are_masked_in_repr_and_dumps(cls: SettingsClass, tls: TlsFiles) -> None:
    settings = cls(**sasl(ssl_cafile=tls.ca_cert))
    assert settings.sasl_password is not None
    assert settings.sasl_password.get_secret_value() == PASSWORD
    assert PASSWORD not in visible_forms(settings)
    assert json.loads(settings.model_dump_json())["sasl_password"] == "**********"
    with_key = cls(**mtls(tls))
    assert KEY_PASSWORD not in visible_forms(with_key)


@BOTH
def test_secrets_come_from_env_vars(cls: SettingsClass, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in sasl(security_protocol="SASL_PLAINTEXT").items():
        monkeypatch.setenv(f"{ENV_PREFIX[cls]}{name.upper()}", value)
    settings = cls()
    assert settings.sasl_password is not None
    assert settings.sasl_password.get_secret_value() == PASSWORD
    assert settings.kafka_security()["sasl_plain_password"] == PASSWORD


@BOTH
def test_secrets_come_from_files(
    cls: SettingsClass, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tls: TlsFiles
) -> None:
    # As Docker and Kubernetes mount them: one file per secret, often with a final newline.
    (tmp_path / "sasl").write_text(PASSWORD + "\n")
    (tmp_path / "key").write_text(KEY_PASSWORD)
    monkeypatch.setenv(f"{ENV_PREFIX[cls]}SASL_PASSWORD_FILE", str(tmp_path / "sasl"))
    monkeypatch.setenv(f"{ENV_PREFIX[cls]}SSL_KEY_PASSWORD_FILE", str(tmp_path / "key"))
    settings = cls(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="alice",
        ssl_cafile=tls.ca_cert,
        ssl_certfile=tls.client_cert,
        ssl_keyfile=tls.client_key,
    )
    assert settings.sasl_password is not None and settings.ssl_key_password is not None
    assert settings.sasl_password.get_secret_value() == PASSWORD
    assert settings.ssl_key_password.get_secret_value() == KEY_PASSWORD
    assert PASSWORD not in visible_forms(settings)
    assert KEY_PASSWORD not in visible_forms(settings)
    # The SDK rebuilds settings from model_dump() when given overrides: that must still load.
    rebuilt = cls(**{**settings.model_dump(), "bootstrap_servers": "elsewhere:9093"})
    assert rebuilt.sasl_password == settings.sasl_password


@BOTH
def test_a_secret_and_its_file_disagreeing_is_refused(cls: SettingsClass, tmp_path: Path) -> None:
    (tmp_path / "sasl").write_text("another-password")
    with pytest.raises(ValidationError, match="sasl_password or sasl_password_file") as info:
        cls(**sasl(sasl_password_file=tmp_path / "sasl"))
    assert PASSWORD not in str(info.value)
    assert "another-password" not in str(info.value)


@BOTH
def test_unreadable_or_empty_secret_files_are_named_without_content(
    cls: SettingsClass, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match=r"sasl_password_file .*missing: cannot read it"):
        cls(**sasl(sasl_password=None, sasl_password_file=tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValidationError, match=r"sasl_password_file .*empty is empty"):
        cls(**sasl(sasl_password=None, sasl_password_file=tmp_path / "empty"))
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + PASSWORD.encode())
    with pytest.raises(ValidationError) as info:
        cls(**sasl(sasl_password=None, sasl_password_file=tmp_path / "binary"))
    assert PASSWORD not in str(info.value)


@BOTH
def test_validation_errors_never_echo_the_input(cls: SettingsClass) -> None:
    # pydantic prints the offending input by default; for a model-level check that is the whole
    # input, passwords included.
    with pytest.raises(ValidationError) as model_level:
        cls(**sasl(sasl_mechanism=None))
    with pytest.raises(ValidationError) as field_level:
        cls(**sasl(sasl_mechanism="GSSAPI"))
    for error in (model_level.value, field_level.value):
        assert PASSWORD not in str(error)
        assert PASSWORD not in repr(error)


def test_svd_consumer_settings_prints_masked_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in sasl(security_protocol="SASL_PLAINTEXT").items():
        monkeypatch.setenv(f"SVD_{name.upper()}", value)
    assert cli.main(["settings"]) == 0
    printed = capsys.readouterr()
    assert PASSWORD not in printed.out + printed.err
    assert json.loads(printed.out)["sasl_password"] == "**********"


def test_svd_consumer_invalid_settings_do_not_print_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in sasl(security_protocol="SASL_PLAINTEXT").items():
        monkeypatch.setenv(f"SVD_{name.upper()}", value)
    monkeypatch.setenv("SVD_HEARTBEAT_INTERVAL_S", "60")  # above the session timeout
    assert cli.main(["settings"]) == 2
    printed = capsys.readouterr()
    assert "heartbeat_interval_s" in printed.err
    assert PASSWORD not in printed.out + printed.err


# --- half-configured security is refused at load -------------------------------------------


@BOTH
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sasl_password": None}, "needs sasl_mechanism, sasl_username and sasl_password"),
        ({"sasl_username": None}, "needs sasl_mechanism, sasl_username and sasl_password"),
        ({"sasl_mechanism": None}, "needs sasl_mechanism, sasl_username and sasl_password"),
        ({"security_protocol": "SSL"}, "sasl_\\* settings are set but security_protocol is SSL"),
        ({"security_protocol": "PLAINTEXT"}, "security_protocol is PLAINTEXT"),
    ],
    ids=["no password", "no user", "no mechanism", "sasl with SSL", "sasl with PLAINTEXT"],
)
def test_incomplete_sasl_is_refused(
    cls: SettingsClass, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        cls(**sasl(**overrides))


@BOTH
def test_tls_files_without_tls_are_refused(cls: SettingsClass, tls: TlsFiles) -> None:
    # Whoever set a CA file believes the connection is encrypted; with PLAINTEXT it would not be.
    with pytest.raises(ValidationError, match="ssl_\\* settings are set but security_protocol"):
        cls(ssl_cafile=tls.ca_cert)
    with pytest.raises(ValidationError, match="ssl_\\* settings are set"):
        cls(**sasl(security_protocol="SASL_PLAINTEXT", ssl_cafile=tls.ca_cert))
    with pytest.raises(ValidationError, match="need ssl_certfile"):
        cls(**mtls(tls, ssl_certfile=None))


@BOTH
def test_missing_tls_files_are_refused(cls: SettingsClass, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="ssl_cafile"):
        cls(security_protocol="SSL", ssl_cafile=tmp_path / "nowhere.pem")


@BOTH
def test_an_encrypted_key_needs_its_password(cls: SettingsClass, tls: TlsFiles) -> None:
    # Without a password OpenSSL would prompt on the terminal: a hung service, not an error.
    with pytest.raises(ValidationError, match="ssl_keyfile is encrypted: set ssl_key_password"):
        cls(**mtls(tls, ssl_key_password=None))
    with pytest.raises(
        ValidationError, match="cannot load ssl_cafile, ssl_certfile or ssl_keyfile"
    ) as info:
        cls(**mtls(tls, ssl_key_password="not-the-key-password"))
    assert "not-the-key-password" not in str(info.value)


@BOTH
def test_kafka_security_arguments(cls: SettingsClass, tls: TlsFiles) -> None:
    assert cls().kafka_security() == {"security_protocol": "PLAINTEXT"}
    scram = cls(**sasl(security_protocol="SASL_PLAINTEXT")).kafka_security()
    assert scram == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": PASSWORD,
    }
    mutual = cls(**mtls(tls)).kafka_security()
    context = mutual["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    # Broker certificates are verified, host names too: no "insecure" switch exists.
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


@BOTH
def test_describe_security_names_the_user_never_the_password(
    cls: SettingsClass, tls: TlsFiles
) -> None:
    described = cls(**sasl(ssl_cafile=tls.ca_cert)).describe_security()
    assert described == "SASL_SSL SCRAM-SHA-512 as user 'alice'"
    assert f"client certificate {tls.client_cert}" in cls(**mtls(tls)).describe_security()


# --- the metrics and health server binds to loopback by default ---------------------------------


def test_metrics_bind_to_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ipaddress.ip_address(ConsumerSettings().metrics_host).is_loopback
    monkeypatch.setenv("SVD_METRICS_HOST", "0.0.0.0")
    assert ConsumerSettings().metrics_host == "0.0.0.0"


def test_the_docker_stack_opens_the_metrics_port_explicitly() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    consumers = [
        service
        for service in compose["services"].values()
        if "SVD_BOOTSTRAP_SERVERS" in (service.get("environment") or {})
    ]
    assert consumers, "no consumer service in docker-compose.yml"
    for service in consumers:
        assert service["environment"].get("SVD_METRICS_HOST") == "0.0.0.0"


# --- connection failures: clear reasons, and PLAIN passwords kept out of aiokafka's logs ---------


@pytest.mark.parametrize(
    "module", [consumer.security, producer_sdk._security], ids=["consumer", "sdk"]
)
@pytest.mark.parametrize(
    ("error", "tls", "expected"),
    [
        (
            kafka_errors.SaslAuthenticationFailed(
                "Authentication failed: Invalid username or password"
            ),
            False,
            "the broker rejected the credentials (Authentication failed: Invalid username",
        ),
        (
            kafka_errors.UnsupportedSaslMechanismError("Enabled mechanisms are: ['PLAIN']"),
            False,
            "the listener does not offer this SASL mechanism",
        ),
        (
            kafka_errors.KafkaConnectionError("Connection at 127.0.0.1:9093 closed"),
            True,
            "requires a client certificate it trusts",
        ),
        (
            kafka_errors.KafkaConnectionError("Connection at 127.0.0.1:9093 closed"),
            False,
            "the listener expects another security_protocol",
        ),
        (ConnectionRefusedError(111, "refused"), False, "nothing listens on 127.0.0.1:9093"),
    ],
    ids=["bad credentials", "mechanism", "tls closed", "plaintext closed", "refused"],
)
def test_connect_errors_are_described(
    module: Any, error: BaseException, tls: bool, expected: str
) -> None:
    assert expected in module.describe_connect_error(error, tls=tls, address="127.0.0.1:9093")


@pytest.mark.parametrize(
    "module", [consumer.security, producer_sdk._security], ids=["consumer", "sdk"]
)
async def test_an_unreachable_broker_is_described(module: Any) -> None:
    from localkafka.broker import free_port

    port = free_port("127.0.0.1")  # closed again at once: nothing listens there
    reason = await module.connect_failure_reason(
        f"127.0.0.1:{port}", {"security_protocol": "PLAINTEXT"}, timeout_s=5
    )
    assert reason == f"nothing listens on 127.0.0.1:{port}"


def test_the_consumer_and_sdk_copies_of_the_diagnosis_agree() -> None:
    # The SDK does not depend on the service, so the code exists twice: it must not drift.
    def body(path: Path) -> str:
        tree = ast.parse(path.read_text())
        tree.body = tree.body[1:]  # the module docstring says which copy it is
        return ast.dump(tree)

    assert body(REPO / "consumer" / "security.py") == body(REPO / "producer_sdk" / "_security.py")


def test_sasl_authenticate_requests_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    from aiokafka.protocol.admin import SaslAuthenticateRequest_v1

    # What aiokafka.conn logs at DEBUG for every request: with PLAIN the bytes are the password.
    request = SaslAuthenticateRequest_v1(b"alice\x00alice\x00" + PASSWORD.encode())
    assert PASSWORD in str(request)
    with caplog.at_level(logging.DEBUG, logger="aiokafka.conn"):
        logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "h", 1, 3, request)
    assert "SaslAuthenticateRequest(<hidden>)" in caplog.text
    assert PASSWORD not in caplog.text
