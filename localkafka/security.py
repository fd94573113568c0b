"""SASL and TLS listeners for the local broker: throwaway certificates and SASL users.

The security tests start a broker of their own with this module (the session broker stays
PLAINTEXT), and it is the shortest way to try SASL or mutual TLS locally::

    tls = make_tls(workdir / "tls", client_key_password="key-secret")
    broker = secure_broker(workdir / "broker", [SaslUser("alice", "alice-secret")], tls)
    state = broker.start()
    state.bootstrap                     # PLAINTEXT: admin work, topics, inter-broker
    state.bootstrap_for(SASL)           # SASL_PLAINTEXT: SCRAM-SHA-256, SCRAM-SHA-512, PLAIN
    state.bootstrap_for(SASL_SSL)       # SASL_SSL: the same mechanisms over TLS
    state.bootstrap_for(MTLS)           # SSL with ssl.client.auth=required: mutual TLS

SCRAM credentials are written into the metadata log when the storage is formatted
(``kafka-storage format --add-scram``), PLAIN ones into the listener's JAAS config: both exist
before the first client connects, with no admin call to race against. The broker reads its key
and the CA from PEM files (KIP-651), so no Java keystore or ``keytool`` is involved.

Passwords and keys stay readable by their owner only: ``LocalBroker`` keeps its configs in a
0700 work directory as 0600 files and hands ``--add-scram`` to the JVM in a 0600 args file
(deleted once the storage is formatted), never on a command line; private keys here are 0600.

Needs the ``cryptography`` package (the project's ``dev`` extra), imported only by ``make_tls``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localkafka.broker import ExtraListener, LocalBroker, write_private
from localkafka.settings import BrokerSettings, TopicSettings

SASL = "SASL"  # SASL_PLAINTEXT
SASL_SSL = "SASL_SSL"  # SASL over TLS
MTLS = "MTLS"  # SSL, client certificate required

MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")

_SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule"
_PLAIN_LOGIN = "org.apache.kafka.common.security.plain.PlainLoginModule"
# Names and passwords go unquoted into `--add-scram SCRAM-SHA-256=[name=..,password=..]` and
# quoted into a JAAS line; this alphabet needs no escaping in either.
_SAFE = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SaslUser:
    name: str
    password: str

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("password", self.password)):
            if not _SAFE.fullmatch(value):
                raise ValueError(f"SASL user {what}: use letters, digits, '.', '_' or '-' only")

    def __repr__(self) -> str:  # test fixtures end up in assertion messages
        return f"SaslUser(name={self.name!r}, password='***')"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: one CA signs the broker's certificate and the client's."""

    ca_cert: Path  # the client's ssl_cafile and the broker's truststore
    broker_keystore: Path  # the broker's PKCS#8 key, then its certificate and the CA's
    client_cert: Path  # the client's ssl_certfile (CN=<client_name>)
    client_key: Path  # the client's ssl_keyfile, encrypted when client_key_password is set
    client_key_password: str | None


def make_tls(
    directory: Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    client_name: str = "svd-client",
    client_key_password: str | None = None,
    days: int = 30,
) -> TlsFiles:
    """A fresh CA with a broker certificate for ``hosts`` and a client certificate.

    Every call makes a new CA, so a second call gives certificates the first one's
    broker and clients do not trust: what the "untrusted CA" tests need.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kafka-svd-service local test"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        issuer_name, issuer_key = issuer or (name(subject), key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))  # clock skew between us and the JVM
            .not_valid_after(now + dt.timedelta(days=days))
            # Key identifiers: strict verifiers (Python 3.13's default) require them.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def key_usage(*, sign_certs: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=not sign_certs, key_cert_sign=sign_certs,
            crl_sign=sign_certs, encipher_only=False, decipher_only=False,
        )  # fmt: skip

    # P-256 keys: generated in microseconds (RSA takes noticeable time), read by Java and OpenSSL.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue(
        "svd local test CA",
        ca_key,
        None,
        [(x509.BasicConstraints(ca=True, path_length=0), True), (key_usage(sign_certs=True), True)],
    )
    signer = (ca.subject, ca_key)

    broker_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    broker = issue(
        "svd local broker",
        broker_key,
        signer,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage(sign_certs=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName(alt_names), False),
        ],
    )

    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue(
        client_name,
        client_key,
        signer,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage(sign_certs=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ],
    )

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def pkcs8(key: ec.EllipticCurvePrivateKey, password: str | None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password
            else serialization.NoEncryption()
        )
        # Kafka's PEM keystore reads PKCS#8 keys only.
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        broker_keystore=directory / "broker-keystore.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        client_key_password=client_key_password,
    )
    files.ca_cert.write_bytes(pem(ca))
    write_private(files.broker_keystore, pkcs8(broker_key, None) + pem(broker) + pem(ca))
    files.client_cert.write_bytes(pem(client))
    write_private(files.client_key, pkcs8(client_key, client_key_password))
    return files


def secure_listeners() -> list[ExtraListener]:
    return [
        ExtraListener(SASL, "SASL_PLAINTEXT"),
        ExtraListener(SASL_SSL, "SASL_SSL"),
        ExtraListener(MTLS, "SSL"),
    ]


def secure_properties(users: Sequence[SaslUser], tls: TlsFiles) -> dict[str, str]:
    """Broker settings for the listeners of ``secure_listeners``."""
    plain_users = " ".join(f'user_{u.name}="{u.password}"' for u in users)
    props: dict[str, str] = {
        # One keystore and truststore for every TLS listener (PEM files, KIP-651).
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca_cert),
        f"listener.name.{MTLS.lower()}.ssl.client.auth": "required",
    }
    for listener in (SASL, SASL_SSL):
        prefix = f"listener.name.{listener.lower()}"
        props[f"{prefix}.sasl.enabled.mechanisms"] = ",".join(MECHANISMS)
        for mechanism in SCRAM_MECHANISMS:
            # SCRAM credentials live in the cluster metadata (format_args below).
            props[f"{prefix}.{mechanism.lower()}.sasl.jaas.config"] = f"{_SCRAM_LOGIN} required;"
        props[f"{prefix}.plain.sasl.jaas.config"] = f"{_PLAIN_LOGIN} required {plain_users};"
    return props


def scram_format_args(users: Sequence[SaslUser]) -> list[str]:
    """``kafka-storage format`` arguments that create the users' SCRAM credentials.

    They hold the passwords: ``LocalBroker`` passes them in an owner-only args file.
    """
    args: list[str] = []
    for user in users:
        for mechanism in SCRAM_MECHANISMS:
            args += ["--add-scram", f"{mechanism}=[name={user.name},password={user.password}]"]
    return args


def secure_broker(
    workdir: Path,
    users: Sequence[SaslUser],
    tls: TlsFiles,
    *,
    settings: BrokerSettings | None = None,
    topics: TopicSettings | None = None,
) -> LocalBroker:
    """A LocalBroker with the PLAINTEXT listener plus SASL, SASL_SSL and MTLS ones."""
    if not users:
        raise ValueError("a secure broker needs at least one SASL user")
    return LocalBroker(
        settings,
        topics,
        workdir,
        extra_listeners=secure_listeners(),
        extra_properties=secure_properties(users, tls),
        format_args=scram_format_args(users),
    )
