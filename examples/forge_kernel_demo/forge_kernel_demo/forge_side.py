"""The forge side, an `aevyra_forge.kernel_generators` entry point: given what forge knows
about the run (platform, GPU or CPU instruction set, vLLM version, model, workload), it
offers the kernels that fit as candidates. Plain mappings, so this package needs nothing
from aevyra_forge to be installed next to vLLM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from forge_kernel_demo import RAN, SWITCH


def generate(context: Any) -> Iterator[dict[str, Any]]:
    if context.platform != "cpu":
        return  # the demo only has a CPU kernel
    yield {
        "name": "demo_cpu_attn",
        "note": "vLLM's CPU attention behind a plug-in (a stand-in for a generated kernel): "
                "expect no speed change",
        "plugins": ["forge_kernel_demo"],
        "env": {SWITCH: "1"},
        "requires": ["forge-kernel-demo"],
        "proof": RAN,
    }
