"""The client's one frozen settings object: env vars prefixed ``SVD_CLIENT_`` or keyword arguments.

Durations are seconds and sizes are bytes; aiokafka's milliseconds appear only in ``client.py``.
"""

from __future__ import annotations

import os
import socket
import ssl
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from objectstore.settings import StoreSettings
from schemas.headers import Encoding

MIB = 1024 * 1024
_SECRETS_FROM_FILES = ("sasl_password", "ssl_key_password")


def _read_secret_files(data: Any) -> Any:
    """``<secret>_file`` -> ``<secret>``; errors name the setting and the path, never content."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in _SECRETS_FROM_FILES:
        path = data.get(f"{name}_file")
        if not path:
            continue
        try:
            secret = Path(path).read_text(encoding="utf-8").rstrip("\r\n")  # `echo` adds one
        except (OSError, UnicodeError) as exc:
            raise ValueError(f"{name}_file {path}: cannot read it ({type(exc).__name__})") from None
        if not secret:
            raise ValueError(f"{name}_file {path} is empty")
        given = data.get(name)
        if isinstance(given, SecretStr):
            given = given.get_secret_value()
        # The same value twice is a settings object rebuilt from its own model_dump().
        if given and given != secret:
            raise ValueError(f"set {name} or {name}_file, not both")
        data[name] = secret
    return data


def _no_key_password() -> str:
    # Without a password callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("ssl_keyfile is encrypted: set ssl_key_password or ssl_key_password_file")


def _default_client_id() -> str:
    # Host and pid say where a request came from in the service's logs; the random part keeps two
    # clients in one process apart.
    return f"svd-sdk-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ClientStoreSettings(StoreSettings):
    """The client's object store (``SVD_CLIENT_STORE_*``): the same fields as the service's."""

    model_config = SettingsConfigDict(
        env_prefix="SVD_CLIENT_STORE_", frozen=True, extra="forbid", hide_input_in_errors=True
    )


class ClientSettings(BaseSettings):
    # hide_input_in_errors: a validation error would otherwise print every input, passwords too.
    model_config = SettingsConfigDict(
        env_prefix="SVD_CLIENT_", frozen=True, extra="forbid", hide_input_in_errors=True
    )

    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    requests_topic: str = "svd-requests"
    results_topic: str = "svd-results"
    reply_topic: str | None = Field(
        default=None,
        description=(
            "topic this client reads its answers from and names in every request's reply_topic; "
            "the service accepts <results_topic>.<suffix> by default (SVD_REPLY_TOPIC_PATTERN); "
            "None: read the shared results_topic (see docs/sdk.md, 'Reply routing')"
        ),
    )
    create_reply_topic: bool = Field(
        default=False, description="create reply_topic at start when it does not exist"
    )
    reply_topic_partitions: int = Field(default=1, ge=1)
    reply_topic_replication: int | None = Field(
        default=None, ge=1, description="None: min(3, brokers in the cluster)"
    )
    client_id: str = Field(default_factory=_default_client_id)
    # A 1024x1024 float64 result is ~16 MB; requests and results up to the topics' 64 MiB fit.
    max_message_bytes: int = Field(default=64 * MIB, ge=MIB)
    fetch_max_bytes: int = Field(default=64 * MIB, ge=MIB)
    start_timeout_s: float = Field(default=30.0, gt=0)
    # How soon partitions added to the answers topic are noticed (and read from their start).
    metadata_max_age_s: float = Field(default=30.0, gt=0)
    linger_s: float = Field(default=0.0, ge=0)
    # aiokafka's default (16 KiB) makes every request over it a batch of its own, and a
    # partition has one batch in flight: a 32x32 request rate then tops out at ~1/round trip.
    batch_bytes: int = Field(default=MIB, ge=16384)

    # Requests
    encoding: Encoding = Encoding.BINARY
    default_timeout_s: float = Field(default=30.0, gt=0)
    max_pending: int = Field(default=1024, ge=1, description="requests awaiting an answer")
    batch_concurrency: int = Field(default=64, ge=1, description="svd_many's default")

    # Bookkeeping of finished request ids: only to tell duplicates and late answers apart from
    # other clients' answers (all are dropped either way), so both bounds are generous but finite.
    seen_ids_max: int = Field(default=100_000, ge=1)
    seen_ids_ttl_s: float = Field(default=600.0, gt=0)

    # Encoding a JSON request or decoding a large reply is CPU work; above this many bytes it runs
    # in a worker thread so the caller's event loop keeps serving.
    offload_bytes: int = Field(default=256 * 1024, ge=0)

    # Stored payloads, the claim check (docs/sdk.md, "Large matrices"). With a store configured
    # and payloads "auto", a matrix above store_above_bytes goes to the store and the request
    # carries its reference (schema_version 2), and the service may answer with stored factors,
    # which are fetched (and deleted) before svd() returns. "inline": everything travels in the
    # records, as without a store. The default keeps records under Kafka's default 1 MB limit.
    store: ClientStoreSettings = Field(default_factory=ClientStoreSettings)
    payloads: Literal["auto", "inline"] = "auto"
    store_above_bytes: int = Field(default=512 * 1024, ge=0)
    delete_fetched_results: bool = Field(
        default=True, description="delete a stored result's object once its factors are read"
    )

    # Security (PLAINTEXT by default; the same names and rules as the consumer's SVD_* settings,
    # docs/security.md). Secrets are SecretStr: masked in repr and dumps; each can come from a
    # file instead (`*_file`: Docker and Kubernetes secrets), read once here.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: FilePath | None = None
    ssl_cafile: FilePath | None = Field(default=None, description="default: the system's CAs")
    ssl_certfile: FilePath | None = Field(default=None, description="client certificate (mTLS)")
    ssl_keyfile: FilePath | None = Field(default=None, description="default: in ssl_certfile")
    ssl_key_password: SecretStr | None = Field(default=None, description="for an encrypted key")
    ssl_key_password_file: FilePath | None = None

    @model_validator(mode="after")
    def _check(self) -> ClientSettings:
        if self.create_reply_topic and self.reply_topic is None:
            raise ValueError("create_reply_topic needs reply_topic")
        if self.reply_topic is not None and self.reply_topic == self.requests_topic:
            raise ValueError("reply_topic must differ from requests_topic")
        return self

    @property
    def stores_payloads(self) -> bool:
        """Requests may reference stored matrices and be answered with stored factors."""
        return self.store.enabled and self.payloads == "auto"

    @property
    def answers_topic(self) -> str:
        """The topic this client reads: its own reply topic, or the shared results topic."""
        return self.reply_topic or self.results_topic

    # -- security ------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        return _read_secret_files(data)

    @model_validator(mode="after")
    def _check_security(self) -> ClientSettings:
        # Settings that would be silently ignored are refused: a CA file with PLAINTEXT reads
        # as "encrypted" to whoever wrote it, and is not.
        sasl = self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username "
                "and sasl_password (or sasl_password_file)"
            )
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ValueError(
                f"sasl_* settings are set but security_protocol is {self.security_protocol}; "
                "use SASL_SSL or SASL_PLAINTEXT"
            )
        ssl_files = (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_key_password)
        if not tls and any(ssl_files):
            raise ValueError(
                f"ssl_* settings are set but security_protocol is {self.security_protocol}; "
                "use SSL or SASL_SSL"
            )
        if (self.ssl_keyfile or self.ssl_key_password) and not self.ssl_certfile:
            raise ValueError("ssl_keyfile and ssl_key_password need ssl_certfile")
        if tls:
            self.ssl_context()  # unreadable files and a wrong key password fail here, at once
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the broker's certificate and host name; presents ours when one is set."""
        from aiokafka.helpers import create_ssl_context

        password = self.ssl_key_password
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=password.get_secret_value() if password else _no_key_password,
            )
        except ssl.SSLError as exc:
            raise ValueError(
                f"cannot load ssl_cafile, ssl_certfile or ssl_keyfile ({exc.reason or exc}); "
                "a wrong ssl_key_password reads as a bad key"
            ) from None
        return context

    def describe_security(self) -> str:
        """How this client authenticates, for logs and errors: never a secret."""
        if self.sasl_mechanism:
            how = f"{self.security_protocol} {self.sasl_mechanism} as user {self.sasl_username!r}"
        else:
            how = self.security_protocol
        if self.ssl_certfile:
            how += f" with client certificate {self.ssl_certfile}"
        return how

    def kafka_security(self) -> dict[str, Any]:
        """Keyword arguments shared by the client's producer, consumer and admin client."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism and self.sasl_password:
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_username
            out["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_context"] = self.ssl_context()
        return out
