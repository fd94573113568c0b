"""`svd-broker status` and `svd-broker node` on a running three-node cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localkafka import LocalCluster

pytestmark = [pytest.mark.kafka, pytest.mark.cluster]


def test_status_lists_the_nodes_and_node_pauses_and_resumes_one(
    healthy_cluster: LocalCluster, tmp_path: Path
) -> None:
    # The CLI finds its cluster in <SVD_BROKER_HOME>/cluster: this suite's, and the jar cache.
    home = tmp_path / "home"
    home.mkdir()
    (home / "cluster").symlink_to(healthy_cluster.workdir)
    libs = healthy_cluster.settings.libs_dir
    (home / libs.name).symlink_to(libs)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localkafka.cli", *args],
            env={**os.environ, "SVD_BROKER_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == healthy_cluster.bootstrap
    assert status.stderr.count(": pid ") == 3 and "running" in status.stderr

    paused = cli("node", "2", "pause")
    assert paused.returncode == 0 and paused.stdout.strip().endswith("paused"), paused
    assert "node 2 at" in (s := cli("status").stderr) and s.count("paused") == 1, s
    resumed = cli("node", "2", "resume")
    assert resumed.returncode == 0 and resumed.stdout.strip().endswith("running"), resumed

    missing = cli("node", "7", "kill")
    assert missing.returncode == 2 and "no node 7" in missing.stderr
