"""How large a record each topic the service writes to takes, read from the cluster at start.

The broker refuses a record batch larger than its topic's ``max.message.bytes``. At least once,
a refused dead letter is written again cut down (consumer/handler.py); exactly once, a refused
message aborts its partition's whole transaction, again on every retry, and the partition
stalls. So the service sizes dead letters, and checks answers, against the smaller of
``SVD_MAX_MESSAGE_BYTES`` and what the topic itself takes.

Read once, at start: a topic whose limit is lowered later is caught at least once by the
refusal path, and after a restart in both modes. A cluster that does not let the service
describe topic configs (no DescribeConfigs ACL) leaves ``SVD_MAX_MESSAGE_BYTES`` in charge.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = "max.message.bytes"


async def read_topic_limits(admin: AIOKafkaAdminClient, topics: Iterable[str]) -> dict[str, int]:
    """``{topic: max.message.bytes}`` for the topics the cluster would describe; {} when none.

    ``admin`` comes unstarted (consumer/kafka_clients.py): it lives for this one read.
    """
    names = sorted(set(topics))
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    except KafkaError as exc:
        log.warning(
            "could not read the topics' max.message.bytes (%r); sizing what the service writes "
            "by SVD_MAX_MESSAGE_BYTES alone",
            exc,
        )
        return {}
    finally:
        await admin.close()
    limits: dict[str, int] = {}
    for response in responses:
        for error_code, _message, _type, name, entries in response.resources:
            if error_code != 0:
                log.warning("could not describe topic %s (error %d)", name, error_code)
                continue
            for entry in entries:
                if entry[0] == MAX_MESSAGE_BYTES and entry[1] is not None:
                    limits[name] = int(entry[1])
    return limits
