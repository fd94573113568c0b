"""SvdClient (blocking, thread-safe) over FakeSvdClient: same results and errors, many threads."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from producer_sdk import ClientClosed, ErrorCode, SvdClient, SvdInvalidRequest, SvdTimeout
from producer_sdk.testing import FakeSvdClient


def fake_sync(**overrides: object) -> SvdClient:
    return SvdClient(client_factory=FakeSvdClient, bootstrap_servers="fake:0", **overrides)  # type: ignore[arg-type]


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("-loop")]


def test_nothing_starts_until_first_use_and_close_ends_the_thread() -> None:
    before = len(loop_threads())
    client = fake_sync()
    assert len(loop_threads()) == before  # safe to create at import time in a pre-fork master
    result = client.svd(np.diag([3.0, 2.0]))
    assert result.s.tolist() == [3.0, 2.0]
    assert len(loop_threads()) == before + 1
    client.close()
    assert len(loop_threads()) == before
    with pytest.raises(ClientClosed):
        client.svd(np.eye(2))
    client.close()  # idempotent


def test_many_threads_share_one_client() -> None:
    rng = np.random.default_rng(3)
    mats = [rng.standard_normal((6, 4)) for _ in range(200)]
    with fake_sync() as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client.svd, mats))
        assert client.stats().resolved == 200 and client.stats().pending == 0
    for a, r in zip(mats, results, strict=True):
        assert r.u is not None and r.vt is not None
        np.testing.assert_allclose(r.u * r.s @ r.vt, a, atol=1e-10)


def test_errors_are_the_async_clients_errors() -> None:
    with fake_sync() as client:
        with pytest.raises(SvdInvalidRequest) as caught:
            client.svd(np.array([[np.nan]]))
        assert caught.value.code is ErrorCode.NON_FINITE
        with pytest.raises(SvdInvalidRequest):
            client.submit(np.ones(3))  # rejected before a Future exists


def test_submit_returns_a_future_and_cancelling_it_abandons_the_request() -> None:
    with fake_sync() as client:
        future = client.submit(np.eye(3), k=1)
        assert future.result(10).s.shape == (1,)
        fake = client._client
        assert isinstance(fake, FakeSvdClient)
        fake.pause()
        held = client.submit(np.eye(2), timeout=30)
        assert client.stats().pending == 1
        held.cancel()
        tick = threading.Event()  # never set: wait() is a bounded pause between checks
        deadline = time.monotonic() + 10  # the cancel crosses to the loop thread
        while time.monotonic() < deadline:
            stats = client.stats()
            if stats.pending == 0 and stats.abandoned == 1:
                break
            tick.wait(0.01)
        assert client.stats().pending == 0 and client.stats().abandoned == 1


def test_timeouts_and_close_reach_futures() -> None:
    client = fake_sync()
    client.start()
    fake = client._client
    assert isinstance(fake, FakeSvdClient)
    fake.pause()
    with pytest.raises(SvdTimeout):
        client.svd(np.eye(2), timeout=0.05)
    pending = client.submit(np.eye(2), timeout=30)
    client.close()
    with pytest.raises(ClientClosed):
        pending.result(10)


def test_batch_from_sync_code() -> None:
    with fake_sync() as client:
        results = client.svd_many([np.eye(2) * i for i in range(1, 6)], concurrency=2)
        mixed = client.svd_many([np.eye(2), np.array([[np.inf]])], return_exceptions=True)
    assert [r.s[0] for r in results] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert isinstance(mixed[1], SvdInvalidRequest)


def test_a_client_started_before_a_fork_refuses_to_run_in_the_child() -> None:
    with fake_sync() as client:
        started_in = client._pid
        client._pid = -1  # what the child sees: the starting pid is not its own
        with pytest.raises(RuntimeError, match="fork"):
            client.svd(np.eye(2))
        client._pid = started_in
