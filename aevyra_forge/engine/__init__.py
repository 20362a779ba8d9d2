"""Executing one trial: booting and tearing down vllm serve, failure classification,
benchmarking the live server; engine/sim is the dry-run simulator that answers in its
place."""

from __future__ import annotations

from aevyra_forge.engine.executor import (
    Benchmarker,
    Launcher,
    LocalExecutor,
    QualityProbe,
    Server,
    serving,
)
from aevyra_forge.engine.failures import classify
from aevyra_forge.engine.launcher import VllmLauncher, VllmServer
from aevyra_forge.engine.process import terminate_group
from aevyra_forge.engine.vllm_bench import VllmBenchmarker

__all__ = [
    "Benchmarker", "Launcher", "LocalExecutor", "QualityProbe", "Server",
    "VllmBenchmarker", "VllmLauncher", "VllmServer", "classify", "serving",
    "terminate_group",
]
