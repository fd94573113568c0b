"""Settings of the local broker and of the project's topics (env prefixes SVD_BROKER_, SVD_TOPICS_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


class BrokerSettings(BaseSettings):
    """Where the jars are cached, where the broker keeps its state, and how it is started."""

    model_config = SettingsConfigDict(env_prefix="SVD_BROKER_", frozen=True)

    kafka_version: str = "4.1.1"
    home: Path = Field(default=REPO_ROOT / ".kafka", description="jar cache and default instance")
    workdir: Path | None = Field(default=None, description="broker state; default: <home>/instance")
    port: int = Field(default=0, ge=0, le=65535, description="client port; 0 picks a free one")
    controller_port: int = Field(default=0, ge=0, le=65535)
    host: str = "127.0.0.1"
    heap_mb: int = Field(default=512, ge=128)
    nodes: int = Field(
        default=1,
        ge=1,
        le=9,
        description="1: one broker; more: a KRaft cluster (localkafka/cluster.py)",
    )
    start_timeout_s: float = Field(default=90.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, gt=0)

    @property
    def libs_dir(self) -> Path:
        return self.home / f"libs-{self.kafka_version}"


class TopicSettings(BaseSettings):
    """The topics the project needs, sized so a 1024x1024 float64 result (~16 MB) fits with room."""

    model_config = SettingsConfigDict(env_prefix="SVD_TOPICS_", frozen=True)

    requests: str = "svd-requests"
    results: str = "svd-results"
    dlq: str = "svd-dlq"
    requests_partitions: int = Field(default=4, ge=1)
    results_partitions: int = Field(default=4, ge=1)
    dlq_partitions: int = Field(default=1, ge=1)
    max_message_bytes: int = Field(default=64 * MIB, ge=MIB)
    # 0: follow the cluster, min(3, brokers) replicas and min.insync.replicas one less (at least
    # 1), so a replicated cluster keeps taking writes with one node down and loses none acked.
    replication_factor: int = Field(default=0, ge=0)
    min_insync_replicas: int = Field(default=0, ge=0)

    def replication_for(self, brokers: int) -> tuple[int, int]:
        """(replication factor, min.insync.replicas) on a cluster of ``brokers`` nodes."""
        replicas = self.replication_factor or min(3, brokers)
        return replicas, self.min_insync_replicas or max(1, replicas - 1)

    def partitions(self) -> dict[str, int]:
        return {
            self.requests: self.requests_partitions,
            self.results: self.results_partitions,
            self.dlq: self.dlq_partitions,
        }
