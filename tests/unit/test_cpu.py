"""consumer.cpu: affinity and cgroup quotas, against fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consumer.cpu import (
    available_cpus,
    blas_threads_per_worker,
    cgroup_cpu_quota,
    parse_cfs,
    parse_cpu_max,
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def no_proc(tmp_path: Path) -> Path:
    """A /proc/self/cgroup that does not exist: only the root is read."""
    return tmp_path / "missing-proc-cgroup"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000\n", None),
        ("max\n", None),
        ("150000 100000\n", 1.5),
        ("200000 100000", 2.0),
        ("50000 100000", 0.5),
        ("", None),
    ],
)
def test_parse_cpu_max(text: str, expected: float | None) -> None:
    assert parse_cpu_max(text) == expected


def test_parse_cfs() -> None:
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("250000\n", "100000\n") == 2.5
    assert parse_cfs("100000", "0") is None


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "expected"),
    [
        ("max 100000", 8, 8),  # no quota: the affinity mask decides
        ("150000 100000", 8, 1),  # 1.5 CPUs rounds down
        ("250000 100000", 8, 2),
        ("400000 100000", 2, 2),  # the affinity mask is tighter
        ("20000 100000", 8, 1),  # 0.2 CPUs: floor at 1
    ],
)
def test_cgroup_v2_quota(
    tmp_path: Path, no_proc: Path, cpu_max: str, affinity: int, expected: int
) -> None:
    _write(tmp_path / "cg" / "cpu.max", cpu_max)
    assert available_cpus(cgroup_root=tmp_path / "cg", proc_cgroup=no_proc, affinity=affinity) == (
        expected
    )


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("-1", "100000", 4), ("300000", "100000", 3), ("150000", "100000", 1)],
)
def test_cgroup_v1_quota(
    tmp_path: Path, no_proc: Path, quota: str, period: str, expected: int
) -> None:
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", quota)
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", period)
    assert available_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc, affinity=4) == expected


def test_own_cgroup_and_ancestors_are_read(tmp_path: Path) -> None:
    # The tightest quota on the path from our cgroup to the root binds.
    _write(tmp_path / "kubepods" / "cpu.max", "300000 100000")
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000")
    _write(tmp_path / "kubepods" / "pod1" / "app" / "cpu.max", "max 100000")
    _write(tmp_path / "other" / "cpu.max", "100000 100000")  # a sibling: irrelevant
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods/pod1/app\n")
    assert cgroup_cpu_quota(tmp_path, proc) == 3.0
    assert available_cpus(cgroup_root=tmp_path, proc_cgroup=proc, affinity=16) == 3


def test_v1_membership_from_proc(tmp_path: Path) -> None:
    base = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    _write(base / "cpu.cfs_quota_us", "200000")
    _write(base / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n")
    assert available_cpus(cgroup_root=tmp_path, proc_cgroup=proc, affinity=16) == 2


def test_host_path_missing_inside_container_falls_back_to_root(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "200000 100000")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/system.slice/docker-abc.scope\n")  # not mounted in here
    assert available_cpus(cgroup_root=tmp_path, proc_cgroup=proc, affinity=16) == 2


def test_no_cgroup_files_means_affinity(tmp_path: Path, no_proc: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "nothing", no_proc) is None
    assert available_cpus(cgroup_root=tmp_path / "nothing", proc_cgroup=no_proc, affinity=3) == 3


def test_garbage_files_are_ignored(tmp_path: Path, no_proc: Path) -> None:
    _write(tmp_path / "cpu.max", "what is this")
    assert available_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc, affinity=2) == 2


def test_real_affinity_mask(tmp_path: Path, no_proc: Path) -> None:
    expected = len(os.sched_getaffinity(0))
    assert available_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == expected
    assert 1 <= available_cpus() <= expected  # the machine's real cgroup files, whatever they say


def test_blas_threads_per_worker() -> None:
    assert blas_threads_per_worker(8, 2) == 4
    assert blas_threads_per_worker(8, 3) == 2
    assert blas_threads_per_worker(2, 4) == 1
    with pytest.raises(ValueError):
        blas_threads_per_worker(4, 0)
