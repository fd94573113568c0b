"""A broker outage in the service's log and metrics: one WARNING when it goes, one INFO when it
answers again, however many times aiokafka retried in between (consumer/broker_events.py).

A broker of its own (the session broker is shared by every test), stopped and restarted from
the same work directory on the same ports, as in tests/faults/test_broker_restart.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from localkafka import LocalBroker
from schemas import codec
from tests.conftest import fresh_topics
from tests.support.kafka_io import make_request
from tests.support.scrape import Endpoint, Samples
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

LOST = r"WARNING consumer\.broker_events: lost connection to broker 1 \(127\.0\.0\.1:{port}\): "
BACK = (
    r"INFO consumer\.broker_events: broker 1 \(127\.0\.0\.1:{port}\) reachable again after "
    r"(?P<seconds>\d+\.\d) s"
)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_broker_outage_is_one_warning_one_recovery_and_counted(
    own_broker: LocalBroker,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
    guarantee: str,
) -> None:
    # A plain test, with asyncio.run per step: LocalBroker.start must run on the main thread.
    state = own_broker.status()
    assert state is not None
    bootstrap, port = state.bootstrap, state.port
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    topics = fresh_topics(bootstrap)
    rng = np.random.default_rng(61)

    def requests(count: int) -> dict[str, codec.EncodedMessage]:
        return dict(make_request(rng.standard_normal((20, 20))) for _ in range(count))

    async def send_and_collect(batch: dict[str, codec.EncodedMessage]) -> None:
        await send_all(bootstrap, topics.requests, batch.values())
        async with TallyReader(bootstrap, topics, isolation_level=isolation) as reader:
            tally = await reader.collect(set(batch), timeout=180)
        assert set(batch) <= tally.ok()

    def wait_metrics(condition: Callable[[Samples], bool], what: str) -> Samples:
        return asyncio.run(endpoint.wait_for(condition, what, timeout=120))

    def losses(samples: Samples) -> float | None:
        return samples.get("svd_broker_connection_losses_total", node="1")

    service = ServiceProcess(
        bootstrap,
        topics,
        tmp_path / "svc.log",
        group_id=f"g-{topics.requests}",
        pool_size=1,
        max_inflight=8,
        processing_guarantee=guarantee,
        metrics_port=-1,
        lag_interval_s=1,
        ready_broker_window_s=4,
    )
    with service:
        service.wait_ready(timeout=120)
        endpoint = Endpoint.of(service)
        asyncio.run(send_and_collect(requests(5)))
        before = asyncio.run(endpoint.scrape())
        assert before["svd_brokers_unreachable"] == 0
        assert losses(before) is None
        assert before.get("svd_rebalances_total", kind="assigned") == 1

        own_broker.stop()  # SIGTERM: the broker shuts down and closes every connection
        service.wait_for_log(LOST.format(port=port), timeout=60)
        # The outage lasts past many of aiokafka's retries (100 ms apart): the lag read, bounded
        # by half the 4 s ready window, has given up by the time this line appears.
        service.wait_for_log(r"reading partition lag failed", timeout=60)
        during = wait_metrics(
            lambda s: s.get("svd_brokers_unreachable") == 1 and losses(s) == 1,
            "one broker unreachable, one loss counted",
        )
        assert len(re.findall(LOST.format(port=port), service.log())) == 1
        assert service.proc is not None and service.proc.poll() is None, "died with the broker"

        restarted = own_broker.start(die_with_parent=True)
        assert restarted.bootstrap == bootstrap
        back = service.wait_for_log(BACK.format(port=port), timeout=120)
        after = wait_metrics(
            lambda s: s.get("svd_brokers_unreachable") == 0, "the broker reachable again"
        )
        assert losses(after) == 1
        asyncio.run(send_and_collect(requests(5)))  # sent after it: answered
        stopped = service.stop(timeout=120)

    log = service.log()
    events = re.findall(r"(?:WARNING|INFO) consumer\.broker_events: .*", log)
    line = fault_report(
        f"{guarantee}: broker stopped (SIGTERM) until the service's lag read failed, restarted "
        f"on the same port; back after {back['seconds']} s",
        f"losses counted {losses(during):g}; broker event lines: {events}",
    )
    assert stopped == 0, line
    assert len(re.findall(LOST.format(port=port), log)) == 1, line
    assert len(re.findall(BACK.format(port=port), log)) == 1, line
    assert not re.search(r" (?:ERROR|WARNING) aiokafka", log), line  # its retries stay out
    assert "Traceback" not in log, line
