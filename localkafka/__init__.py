"""A real, single-node Apache Kafka (KRaft) for development, tests and the demo, without Docker.

The broker jars come from Maven Central through Maven and are cached in the project's ``.kafka/``
folder, so only the first start needs the network.
"""

from localkafka.broker import LocalBroker
from localkafka.errors import BrokerError
from localkafka.settings import BrokerSettings, TopicSettings
from localkafka.topics import ensure_topics

__all__ = ["BrokerError", "BrokerSettings", "LocalBroker", "TopicSettings", "ensure_topics"]
