"""What may be tuned here: the knob registry (each knob declares its type, range, gate
and where it lives in a recipe), the per-run knob space, the quantization facts, rendering
a recipe to argv, the installed vLLM's flags, hardware and the GPU catalogue, the model
profile, the playbook, and plug-ins (kernel generators and knobs from entry points)."""

from __future__ import annotations

from aevyra_forge.space.gpu_catalogue import GpuSpec, find_gpu_spec, gpu_spec
from aevyra_forge.space.hardware import detect, memory_used_mib, try_detect_gpu
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import ModelProfile, profile
from aevyra_forge.space.playbook import Playbook, load_playbook, validate
from aevyra_forge.space.plugins import KernelCandidate, KernelContext
from aevyra_forge.space.quant import QuantMethod, has_fp8
from aevyra_forge.space.registry import KNOBS, REGISTRY, Knob, get
from aevyra_forge.space.rendering import render
from aevyra_forge.space.vllm_flags import VllmArgs, introspect

__all__ = [
    "KNOBS", "REGISTRY", "GpuSpec", "KernelCandidate", "KernelContext", "Knob", "KnobSpace",
    "ModelProfile", "Playbook",
    "QuantMethod", "VllmArgs", "detect", "find_gpu_spec", "get", "gpu_spec", "has_fp8",
    "introspect", "load_playbook", "memory_used_mib", "profile", "render",
    "try_detect_gpu", "validate",
]
