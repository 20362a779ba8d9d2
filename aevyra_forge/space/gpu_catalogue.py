"""A catalogue of GPU datasheet figures, looked up by the names users and vendor tools
spell: the simulator and the knob registry read it, and detection fills in what an old
driver or rocm-smi leaves out."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.values import Device, GpuInfo, Hardware
from aevyra_forge.space.host import cpu_cores, host_memory_gib


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures (dense, no sparsity) for one GPU model."""

    name: str
    aliases: tuple[str, ...]  # lower-case tokens of the names the vendor tools print
    vendor: str  # "nvidia" | "amd"
    memory_gib: float
    bandwidth_gbs: float  # HBM/GDDR bandwidth, GB/s
    bf16_tflops: float  # dense tensor-core TFLOP/s at 16 bits
    compute_capability: str  # "8.0" on NVIDIA, gfx arch on AMD
    fp8: bool  # native FP8 tensor cores
    bf16: bool = True

    def hardware(self, count: int = 1) -> Hardware:
        gpus = tuple(
            GpuInfo(index=i, name=self.name, memory_mib=int(self.memory_gib * 1024),
                    compute_capability=self.compute_capability)
            for i in range(count)
        )
        device: Device = "rocm" if self.vendor == "amd" else "cuda"
        return Hardware(device=device, gpus=gpus, cpu_cores=cpu_cores(),
                        memory_gib=host_memory_gib(), simulated=True)


# Aliases match whole tokens ("a10" is not "a100", "l4" is not "l40s"); the longest
# matching alias wins, so "a100-sxm4-40gb" beats "a100". The hex aliases are PCI device
# ids, which rocm-smi prints as the card series when it has no marketing name.
GPU_CATALOG: tuple[GpuSpec, ...] = (
    GpuSpec("T4", ("t4",), "nvidia", 15.0, 320, 65, "7.5", fp8=False, bf16=False),
    GpuSpec("L4", ("l4",), "nvidia", 22.5, 300, 121, "8.9", fp8=True),
    GpuSpec("A10G", ("a10g", "a10"), "nvidia", 22.5, 600, 70, "8.6", fp8=False),
    GpuSpec("A100-40GB", ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"), "nvidia",
            40.0, 1555, 312, "8.0", fp8=False),
    GpuSpec("A100-80GB", ("a100",), "nvidia", 80.0, 2039, 312, "8.0", fp8=False),
    GpuSpec("H100", ("h100",), "nvidia", 80.0, 3350, 989, "9.0", fp8=True),
    GpuSpec("H200", ("h200",), "nvidia", 141.0, 4800, 989, "9.0", fp8=True),
    GpuSpec("MI300X", ("mi300x", "mi300", "0x74a1", "0x74b5"), "amd", 192.0, 5300, 1307,
            "gfx942", fp8=True),
)

# Compute capabilities of data-centre GPUs outside the catalogue that still run drivers
# too old to report `compute_cap`.
_LEGACY_NVIDIA_CC: tuple[tuple[str, str], ...] = (
    ("v100", "7.0"), ("p100", "6.0"), ("p40", "6.1"), ("a30", "8.0"), ("a40", "8.6"),
)

def _has_token(name: str, alias: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(alias)}(?![a-z0-9])", name) is not None


def find_gpu_spec(name: str) -> GpuSpec | None:
    """The catalogue entry for a GPU name as the user or a vendor tool spells it, if any."""
    low = name.strip().lower()
    for spec in GPU_CATALOG:
        if low == spec.name.lower():
            return spec
    matches = [(len(alias), spec) for spec in GPU_CATALOG for alias in spec.aliases
               if _has_token(low, alias)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def gpu_spec(name: str) -> GpuSpec:
    """The catalogue entry for a GPU name; UsageError (naming the known ones) if none."""
    spec = find_gpu_spec(name)
    if spec is None:
        known = ", ".join(s.name for s in GPU_CATALOG)
        raise UsageError(f"unknown GPU '{name}'; known GPUs: {known}")
    return spec


def nvidia_compute_capability(name: str) -> str | None:
    """The compute capability of an NVIDIA GPU known by name (the catalogue, then older
    data-centre parts), for drivers too old to report `compute_cap`."""
    spec = find_gpu_spec(name)
    if spec is not None and spec.vendor == "nvidia":
        return spec.compute_capability
    low = name.lower()
    return next((cc for token, cc in _LEGACY_NVIDIA_CC if _has_token(low, token)), None)
