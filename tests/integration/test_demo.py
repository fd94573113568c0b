"""The README's main command runs end to end, verifies its results and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from localkafka.broker import is_alive

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]


def test_demo_verifies_every_answer_and_stops_everything(tmp_path: Path) -> None:
    env = {**os.environ, "SVD_BROKER_WORKDIR": str(tmp_path / "broker"), "SVD_METRICS_PORT": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--count", "40"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RESULT: all verified" in out
    assert re.search(r"SVDs sent 40, verified 40", out)
    assert re.search(r"bad requests sent 7: answered with the expected code 7, dead letters 7", out)
    service_pid = int(re.search(r"consumer service started \(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    assert not is_alive(service_pid)
    state = tmp_path / "broker" / "broker.json"
    assert not state.exists()  # the broker stopped and removed its state file
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == "", "a process of the demo is still running"
