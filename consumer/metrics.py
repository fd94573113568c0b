"""The service's Prometheus metrics, in its own registry, updated in the parent process only.

Pool workers never touch these: the parent records what they did from the lifecycle hooks
(admitted, computed, answered, worker started or exited). This module is the one list of the
service's metric names: the Grafana dashboard and the tests check their queries against it
(``exposed_names``). docs/operations.md says what each one means.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
_BYTES_BUCKETS = tuple(float(4**i) for i in range(4, 15))  # 256 B .. 256 MiB


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("svd_requests_received", "Requests read from Kafka", registry=r)
        self.succeeded = Counter(
            "svd_requests_succeeded", "Requests answered with factors", registry=r
        )
        self.failed = Counter(
            "svd_requests_failed", "Requests answered with an error", ["code"], registry=r
        )
        self.retried = Counter(
            "svd_requests_retried", "Pool attempts repeated after a crash", registry=r
        )
        self.dead_lettered = Counter("svd_dead_letters", "Records written to the DLQ", registry=r)
        self.dead_letters_truncated = Counter(
            "svd_dead_letters_truncated",
            "Dead letters written cut down: the original did not fit the dead-letter topic",
            registry=r,
        )
        self.stored_requests = Counter(
            "svd_stored_requests",
            "Requests answered whose matrix was read from the object store",
            registry=r,
        )
        self.stored_results = Counter(
            "svd_stored_results",
            "Results whose factors were written to the object store",
            registry=r,
        )
        self.store_deletes = Counter(
            "svd_store_deletes",
            "Answered requests' objects deleted from the store, or that could not be",
            ["outcome"],
            registry=r,
        )
        self.dead_letters_refused = Counter(
            "svd_dead_letters_refused",
            "Dead letters the broker refused even cut down (the offset moved on without one)",
            registry=r,
        )
        self.unreadable = Counter(
            "svd_unreadable_records",
            "Offsets skipped because their record could not be read (codec, checksum)",
            registry=r,
        )
        self.unexpected_failures = Counter(
            "svd_unexpected_failures",
            "Attempts at a request that ended in an unexpected exception (a bug)",
            registry=r,
        )
        self.expired = Counter("svd_requests_expired", "Requests past their deadline", registry=r)
        self.publish_retries = Counter(
            "svd_publish_retries", "Answer publishes retried", registry=r
        )
        self.latency = Histogram(
            "svd_end_to_end_seconds",
            "Request created to answer acknowledged",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "svd_queue_wait_seconds",
            "Request created to compute start",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "svd_compute_seconds", "Time inside the worker", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.payload = Histogram(
            "svd_request_bytes", "Size of request values", buckets=_BYTES_BUCKETS, registry=r
        )
        self.inflight_requests = Gauge(
            "svd_inflight_requests", "Admitted, not yet answered", registry=r
        )
        self.inflight_bytes = Gauge(
            "svd_inflight_bytes", "Budget bytes held by in-flight requests", registry=r
        )
        self.inflight_requests_limit = Gauge(
            "svd_inflight_requests_limit", "In-flight request limit", registry=r
        )
        self.inflight_bytes_limit = Gauge(
            "svd_inflight_bytes_limit", "In-flight byte budget", registry=r
        )
        self.workers_alive = Gauge("svd_pool_workers_alive", "Pool processes alive", registry=r)
        self.workers_busy = Gauge(
            "svd_pool_workers_busy", "Pool processes running a task", registry=r
        )
        self.pool_size = Gauge("svd_pool_size", "Configured pool size", registry=r)
        self.paused_partitions = Gauge(
            "svd_paused_partitions", "Partitions paused by backpressure", registry=r
        )
        self.assigned_partitions = Gauge(
            "svd_assigned_partitions", "Partitions owned by this member", registry=r
        )
        # Lag, read by consumer/lag.py every lag_interval_s for the partitions this member owns.
        self.lag = Gauge(
            "svd_consumer_lag_messages",
            "High watermark minus committed offset, per owned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "svd_consumer_lag_seconds",
            "Estimated compute seconds to clear this member's lag: "
            "lag messages x recent mean compute seconds / pool size",
            registry=r,
        )
        self.ready = Gauge("svd_ready", "1 when /readyz answers 200", registry=r)
        # The cluster as this member sees it (consumer/broker_events.py, consumer/rebalance.py).
        self.broker_connection_losses = Counter(
            "svd_broker_connection_losses",
            "Outages of a broker: connection lost or refused until it answered again, per node "
            "id (or bootstrap host:port)",
            ["node"],
            registry=r,
        )
        self.brokers_unreachable = Gauge(
            "svd_brokers_unreachable",
            "Brokers lost and not answering again yet",
            registry=r,
        )
        self.partition_leader_changes = Counter(
            "svd_partition_leader_changes",
            "Partitions of the service's topics that got a new leader (moved, or elected)",
            ["topic"],
            registry=r,
        )
        self.partitions_without_leader = Gauge(
            "svd_partitions_without_leader",
            "Partitions of the service's topics with no leader in the metadata",
            registry=r,
        )
        self.group_coordinator_changes = Counter(
            "svd_group_coordinator_changes",
            "Times the consumer group's coordinator was lost or moved to another broker",
            registry=r,
        )
        self.member_drops = Counter(
            "svd_group_member_drops",
            "Times the group coordinator no longer knew this member (session expired, or its "
            "group_instance_id taken by another process) and it rejoined",
            registry=r,
        )
        self.rebalances = Counter(
            "svd_rebalances",
            "Rebalance callbacks: partitions assigned to, or revoked from, this member",
            ["kind"],
            registry=r,
        )
        for kind in ("assigned", "revoked"):
            self.rebalances.labels(kind=kind)


# Sample suffixes each metric type adds to its family name in the text exposition.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exposed_names(registry: Collector) -> set[str]:
    """Every series name the registry can expose, including labelled metrics with no child yet.

    Scraping alone would miss those (``svd_requests_failed_total`` appears only after the first
    failure); the dashboard test needs the full list.
    """
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
