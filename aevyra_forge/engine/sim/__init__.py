"""The dry-run performance model of the vLLM V1 engine (SPEC §7): boot-time memory budget,
continuous batching, KV capacity, prefix caching, quantization and CUDA graphs."""

from __future__ import annotations

from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.engine.sim.scheduler import SimServer

__all__ = [
    "SimServer", "SimulatedEngine",
]
