"""This host's CPU cores and memory, read from the scheduler affinity and /proc/meminfo."""

from __future__ import annotations

import os

from aevyra_forge.space.host import cpu_cores, host_memory_gib


def test_cores_are_the_ones_this_process_may_run_on() -> None:
    assert cpu_cores() == len(os.sched_getaffinity(0))


def test_memory_is_memtotal_in_gib() -> None:
    with open("/proc/meminfo") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    assert host_memory_gib() == kib / (1024 * 1024)
