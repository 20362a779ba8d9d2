"""The "kernel": vLLM's own CPU attention, subclassed so that its first call in each
process leaves a proof line. A real plug-in would put a generated kernel here."""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from forge_kernel_demo import RAN
from forge_kernel_demo.vllm_side import proof


class DemoCPUAttentionImpl(CPUAttentionBackendImpl):
    _announced = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not DemoCPUAttentionImpl._announced:
            DemoCPUAttentionImpl._announced = True
            proof(RAN)
        return super().forward(*args, **kwargs)


class DemoCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return DemoCPUAttentionImpl
