"""This host's CPU cores and memory, as detected hardware and simulated GPUs report them."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    # The cores this process may run on (a container or taskset can narrow them).
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return 0.0
