"""What the container gives this process, read from its cgroup (v2, or v1):
the CPUs it may use and its memory limit, and the watch memory bound that
follows from them."""

from __future__ import annotations

import math
import os
from pathlib import Path

# Without a container memory limit, what all watch streams of a process may
# buffer (TASKSERVICE_WATCH_MEMORY_MB); with one, this share of it.
DEFAULT_WATCH_MEMORY_MB = 256
WATCH_MEMORY_SHARE = 0.25


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its cgroup's CPU quota (v2 cpu.max, or
    v1 cfs_quota_us / cfs_period_us), rounded up, within the CPUs it may run
    on. A container's quota, not the host's count, is what Cloud Run gives."""
    allowed = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    return max(1, min(allowed, math.ceil(quota))) if quota else allowed


def _cgroup_quota(cgroup: Path) -> float | None:
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def memory_limit_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit: its cgroup's (v2 memory.max, or v1
    memory.limit_in_bytes); None when there is none."""
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        try:
            value = int(raw)
        except ValueError:
            continue
        # cgroup v1 says "no limit" with a number near 2**63.
        return value if value < 2**62 else None
    return None


def default_watch_memory_mb(processes: int, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """TASKSERVICE_WATCH_MEMORY_MB when unset: WATCH_MEMORY_SHARE of the
    container's memory limit, split among its server processes, or
    DEFAULT_WATCH_MEMORY_MB without a limit."""
    limit = memory_limit_bytes(cgroup)
    if limit is None:
        return DEFAULT_WATCH_MEMORY_MB
    return max(1, int(limit * WATCH_MEMORY_SHARE / max(1, processes)) // 2**20)
