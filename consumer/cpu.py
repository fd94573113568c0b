"""How many CPUs this process may really use.

``os.cpu_count()`` reports the host's CPUs. In a container the useful number is smaller: the
CPU affinity mask (cpusets, ``taskset``) and the CFS bandwidth quota of the cgroup
(``docker --cpus``, Kubernetes CPU limits). Sizing a pool from the host count oversubscribes
the quota, and the kernel then throttles the whole container every period.

Quota rounding: a fractional quota is rounded DOWN (1.5 CPUs -> 1), with a floor of 1. Rounding
up would start more CPU-bound workers than the quota can run at once, which buys throttling,
not throughput; the lost half CPU still serves the event loop and the Kafka client.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC_CGROUP = Path("/proc/self/cgroup")

# Where cgroup v1 mounts the cpu controller, depending on the distribution.
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(
    *,
    cgroup_root: Path = DEFAULT_CGROUP_ROOT,
    proc_cgroup: Path = DEFAULT_PROC_CGROUP,
    affinity: int | None = None,
) -> int:
    """min(affinity mask size, floor(cgroup CPU quota)), at least 1.

    ``cgroup_root``/``proc_cgroup`` are injectable so tests can use fake files; ``affinity``
    overrides the affinity count (None: ask the kernel).
    """
    cpus = _affinity_cpus() if affinity is None else affinity
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def blas_threads_per_worker(cpus: int, workers: int) -> int:
    """BLAS threads each of ``workers`` processes may use without oversubscribing ``cpus``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return max(1, cpus // workers)


def cgroup_cpu_quota(
    cgroup_root: Path = DEFAULT_CGROUP_ROOT, proc_cgroup: Path = DEFAULT_PROC_CGROUP
) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its ancestors.

    None when there is no quota or no readable cgroup files. Both layouts are read: v2
    (``cpu.max`` in the unified hierarchy) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    under the cpu controller's mount). A parent cgroup's quota binds its children too, hence
    the walk up to the root.
    """
    memberships = _memberships(proc_cgroup)
    quotas: list[float] = []
    bases = [(cgroup_root, memberships.get("", "/"))]
    bases += [(cgroup_root / d, memberships.get("cpu", "/")) for d in _V1_CPU_DIRS]
    for base, own_path in bases:
        for directory in _lineage(base, own_path):
            quota = _read_v2(directory)
            if quota is None:
                quota = _read_v1(directory)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max``: ``"<quota> <period>"`` or ``"max <period>"`` (no limit)."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return _ratio(int(fields[0]), period)


def parse_cfs(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1: no limit) and ``cpu.cfs_period_us``."""
    return _ratio(int(quota_us.strip()), int(period_us.strip()))


def _ratio(quota: int, period: int) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    # Not Linux: no affinity API, and no cgroups either; the host count is all there is.
    return os.cpu_count() or 1


def _memberships(proc_cgroup: Path) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; "" is the v2 unified hierarchy."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {}
    result: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            result[""] = path
        for controller in controllers.split(","):
            if controller == "cpu":
                result["cpu"] = path
    return result


def _lineage(base: Path, own_path: str) -> list[Path]:
    """``base/own_path`` and its ancestors up to ``base``, those that exist.

    In a container with its own cgroup namespace ``own_path`` is "/" and only ``base`` is
    read; without one, ``own_path`` names a host path that usually does not exist inside, and
    again ``base`` (the container's cgroup, mounted there) is what counts.
    """
    directory = base.joinpath(*Path(own_path).parts[1:])
    lineage = [directory, *directory.parents]
    return [d for d in lineage if d.is_relative_to(base) and d.is_dir()]


def _read_v2(directory: Path) -> float | None:
    try:
        return parse_cpu_max((directory / "cpu.max").read_text())
    except (OSError, ValueError):
        return None


def _read_v1(directory: Path) -> float | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text()
        period = (directory / "cpu.cfs_period_us").read_text()
        return parse_cfs(quota, period)
    except (OSError, ValueError):
        return None
