"""The consumer's one frozen settings object: env vars prefixed ``SVD_`` and CLI flags.

Durations are seconds and sizes are bytes everywhere in the code; conversions to aiokafka's
milliseconds happen in one place (``kafka_*`` properties below).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ConsumerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SVD_", frozen=True, extra="ignore")

    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "svd-consumer"
    requests_topic: str = "svd-requests"
    results_topic: str = "svd-results"
    dlq_topic: str = "svd-dlq"
    instance_id: str = Field(default_factory=_default_instance_id)
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    session_timeout_s: float = Field(default=10.0, gt=0)
    heartbeat_interval_s: float = Field(default=3.0, gt=0)
    fetch_max_bytes: int = Field(default=64 * MIB, ge=MIB)
    max_message_bytes: int = Field(default=64 * MIB, ge=MIB)
    commit_interval_s: float = Field(default=1.0, gt=0)
    poll_timeout_s: float = Field(default=0.1, gt=0)

    # Security ([security] fills these in; PLAINTEXT by default)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    # Work
    pool_size: int | None = Field(default=None, ge=1, description="default: CPUs we may use")
    blas_threads: int | None = Field(default=None, ge=1, description="default: CPUs // pool")
    max_inflight: int | None = Field(default=None, ge=1, description="default: 4 x pool size")
    max_inflight_bytes: int = Field(default=256 * MIB, ge=MIB)
    resume_ratio: float = Field(default=0.5, ge=0.0, lt=1.0)
    task_timeout_s: float = Field(default=120.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="pool attempts per request")
    retry_backoff_s: float = Field(default=0.2, ge=0)

    # Input limits, checked before anything is allocated
    max_rows: int = Field(default=16384, ge=1)
    max_cols: int = Field(default=16384, ge=1)
    max_elements: int = Field(default=16_777_216, ge=1)
    max_matrix_bytes: int = Field(default=128 * MIB, ge=1)

    # Operations
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535, description="0 disables the server")
    log_level: str = "INFO"
    log_json: bool = False
    enable_test_faults: bool = Field(
        default=False, description="honour the svd-test-fault header (fault-injection tests only)"
    )

    @model_validator(mode="after")
    def _check(self) -> ConsumerSettings:
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError("heartbeat_interval_s must be below session_timeout_s")
        return self

    # -- aiokafka units ------------------------------------------------------------------------
    def kafka_security(self) -> dict[str, object]:
        """Keyword arguments shared by the consumer and the producer."""
        out: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_username
            out["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            out["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return out
