"""The consumer's one frozen settings object: env vars prefixed ``SVD_`` and CLI flags.

Durations are seconds and sizes are bytes everywhere in the code; conversions to aiokafka's
milliseconds happen in one place (``kafka_*`` properties below).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from objectstore.settings import StoreSettings

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


# A dynamic member that dies is noticed within the session timeout, so it stays short. A static
# member's restart must fit in it (a pod rescheduled, a JVM-free Python start, the pool warmed),
# so it is longer, as in Kafka's own clients since 3.0 (45 s).
DYNAMIC_SESSION_TIMEOUT_S = 10.0
STATIC_SESSION_TIMEOUT_S = 45.0


def _static_membership(data: Any) -> Any:
    """Expand ``{hostname}`` in group_instance_id; a static member's default session is longer."""
    if not isinstance(data, dict) or not data.get("group_instance_id"):
        return data
    data = dict(data)
    data["group_instance_id"] = str(data["group_instance_id"]).replace(
        "{hostname}", socket.gethostname()
    )
    data.setdefault("session_timeout_s", STATIC_SESSION_TIMEOUT_S)
    return data


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ConsumerSettings(BaseSettings):
    # hide_input_in_errors: a validation error would otherwise print every input, passwords too.
    model_config = SettingsConfigDict(
        env_prefix="SVD_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "svd-consumer"
    requests_topic: str = "svd-requests"
    results_topic: str = "svd-results"
    dlq_topic: str = "svd-dlq"
    instance_id: str = Field(default_factory=_default_instance_id)
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=249,
        description=(
            "static membership (KIP-345): a name stable across restarts and unique in the "
            "group, e.g. a StatefulSet pod's; {hostname} stands for the host name. A restart "
            "within session_timeout_s then costs no rebalance"
        ),
    )
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    session_timeout_s: float = Field(
        default=DYNAMIC_SESSION_TIMEOUT_S,
        gt=0,
        description=(
            f"default {DYNAMIC_SESSION_TIMEOUT_S:g}, or {STATIC_SESSION_TIMEOUT_S:g} with "
            "group_instance_id: a static member's partitions wait this long for it to come back"
        ),
    )
    heartbeat_interval_s: float = Field(default=3.0, gt=0)
    fetch_max_bytes: int = Field(default=64 * MIB, ge=MIB)
    max_message_bytes: int = Field(default=64 * MIB, ge=MIB)
    commit_interval_s: float = Field(default=1.0, gt=0)
    producer_batch_bytes: int = Field(
        default=MIB, ge=16384, description="answers batched per partition per produce request"
    )
    producer_linger_s: float = Field(default=0.0, ge=0)
    reply_topic_pattern: str = Field(
        default=r"{results_topic}\..+",
        description=(
            "regex a request's reply_topic must match in full, besides results_topic; "
            "{results_topic} stands for results_topic. Never the requests, dlq or internal "
            "topics, whatever it says (consumer/reply_topics.py)"
        ),
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id_prefix: str | None = Field(
        default=None, description="exactly_once: prefix of the per-partition transactional ids"
    )
    poll_timeout_s: float = Field(default=0.1, gt=0)

    # Security (docs/security.md). Secrets are SecretStr: masked in repr, logs and
    # `svd-consumer settings`; each can come from a file instead (`*_file`: Docker and Kubernetes
    # secrets), read once here.
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

    # Work
    pool_size: int | None = Field(default=None, ge=1, description="default: CPUs we may use")
    blas_threads: int | None = Field(default=None, ge=1, description="default: CPUs // pool")
    # Many: small requests are micro-batched, and batches only fill when requests wait; the byte
    # budget, not this count, is what bounds memory (docs/performance.md).
    max_inflight: int = Field(default=256, ge=1, description="in-flight request limit")
    max_inflight_bytes: int = Field(default=256 * MIB, ge=MIB)
    resume_ratio: float = Field(default=0.5, ge=0.0, lt=1.0)
    # Long enough for the largest matrix the default limits take (8192 x 8192 full, with one
    # BLAS thread per worker: `python -m demo --large 8192` gives the time on this hardware).
    task_timeout_s: float = Field(default=1800.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="pool attempts per request")
    unexpected_attempts: int = Field(
        default=3,
        ge=1,
        description="attempts at a request that fails unexpectedly (a bug) before it is "
        "answered INTERNAL with a dead letter and its offset moves on",
    )
    retry_backoff_s: float = Field(default=0.2, ge=0)
    batch_max_items: int = Field(
        default=64, ge=1, description="small matrices per pool task (1: no micro-batching)"
    )
    batch_item_max_bytes: int = Field(
        default=256 * 1024, ge=0, description="matrices up to this size are micro-batched"
    )
    allocator_trim_interval_s: float = Field(
        # A check reads /proc/self/statm (~10 us), so checking often is cheap; the bound on
        # memory is the allowance plus what is allocated between two checks.
        default=0.02,
        ge=0,
        description="how often heap growth is checked for a trim (0: never)",
    )
    allocator_keep_bytes: int = Field(
        default=64 * MIB,
        ge=0,
        description="growth allowed before the heap is trimmed (0: trim at every check)",
    )
    shm_cache_bytes: int = Field(
        default=64 * MIB, ge=0, description="idle shared memory kept for reuse (0: none)"
    )

    # Input limits, checked before anything is allocated. A matrix this large only fits a
    # record when the topic allows it; through the store (below) it always can.
    max_rows: int = Field(default=16384, ge=1)
    max_cols: int = Field(default=16384, ge=1)
    max_elements: int = Field(default=8192 * 8192, ge=1)
    max_matrix_bytes: int = Field(default=512 * MIB, ge=1)
    max_nnz: int = Field(default=16_777_216, ge=1, description="stored entries of a sparse matrix")

    # The object store of the claim check (SVD_STORE_*: objectstore/settings.py). Without one,
    # every payload travels in its record and references are refused.
    store: StoreSettings = Field(default_factory=StoreSettings)
    store_results_above_bytes: int = Field(
        default=512 * 1024,
        ge=0,
        description="a version 2 request's factors larger than this go to the store",
    )
    max_stored_result_bytes: int = Field(
        default=2 * 1024 * MIB, ge=1, description="U + S + Vt written to the store, at most"
    )
    store_outage_s: float = Field(
        default=300.0,
        ge=0,
        description="how long a request waits for an unreachable store before STORE_UNAVAILABLE",
    )
    delete_request_objects: bool = Field(
        default=True,
        description="delete a stored request's object once its result is acknowledged "
        "(failed requests keep theirs, for their dead letter)",
    )

    # Operations
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(
        default=9400,
        ge=-1,
        le=65535,
        description="/metrics, /healthz, /readyz; 0 disables the server, -1 binds a free port "
        "(the log line 'metrics on http://HOST:PORT' names it)",
    )
    lag_interval_s: float = Field(
        default=5.0, gt=0, description="how often partition lag is read from the broker"
    )
    ready_broker_window_s: float = Field(
        default=20.0,
        gt=0,
        description="/readyz fails once no broker call (lag read, commit) succeeded for this long",
    )
    log_level: str = "INFO"
    log_json: bool = False
    enable_test_faults: bool = Field(
        default=False, description="honour the svd-test-fault header (fault-injection tests only)"
    )

    @model_validator(mode="after")
    def _check(self) -> ConsumerSettings:
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError("heartbeat_interval_s must be below session_timeout_s")
        if self.ready_broker_window_s <= self.lag_interval_s:
            # An idle member talks to the broker only at each lag read: a shorter window flaps.
            raise ValueError("ready_broker_window_s must be above lag_interval_s")
        if self.store_results_above_bytes > self.max_message_bytes - 64 * 1024:
            # Factors kept in the record above that would be refused by the broker.
            raise ValueError(
                "store_results_above_bytes must be below max_message_bytes less 64 KiB"
            )
        try:  # at start, not at the first request that names a reply topic
            re.compile(self.reply_topic_pattern)
        except re.error as exc:
            raise ValueError(f"reply_topic_pattern is not a valid regex: {exc}") from exc
        return self

    # -- security ------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        return _read_secret_files(data)

    @model_validator(mode="before")
    @classmethod
    def _static_membership(cls, data: Any) -> Any:
        return _static_membership(data)

    @model_validator(mode="after")
    def _check_security(self) -> ConsumerSettings:
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
            self.ssl_context()  # unreadable files and a wrong key password fail here, at start
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
        """How this service authenticates, for logs and errors: never a secret."""
        if self.sasl_mechanism:
            how = f"{self.security_protocol} {self.sasl_mechanism} as user {self.sasl_username!r}"
        else:
            how = self.security_protocol
        if self.ssl_certfile:
            how += f" with client certificate {self.ssl_certfile}"
        return how

    # -- aiokafka units ------------------------------------------------------------------------
    def kafka_security(self) -> dict[str, object]:
        """Keyword arguments shared by the consumer, the producer and admin clients."""
        out: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism and self.sasl_password:
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_username
            out["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_context"] = self.ssl_context()
        return out
