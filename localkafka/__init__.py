"""A real Apache Kafka (KRaft) for development, tests and the demo, without Docker: one broker,
or a replicated cluster of combined broker+controller nodes (``SVD_BROKER_NODES``).

The broker jars come from Maven Central through Maven and are cached in the project's ``.kafka/``
folder, so only the first start needs the network.
"""

from localkafka.broker import LocalBroker
from localkafka.cluster import LocalCluster, local_kafka
from localkafka.errors import BrokerError
from localkafka.settings import BrokerSettings, TopicSettings
from localkafka.topics import ensure_topics, partition_leaders

__all__ = [
    "BrokerError",
    "BrokerSettings",
    "LocalBroker",
    "LocalCluster",
    "TopicSettings",
    "ensure_topics",
    "local_kafka",
    "partition_leaders",
]
