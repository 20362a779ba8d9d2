"""What this host is: GPUs found through `nvidia-smi` / `rocm-smi` on PATH (honouring
CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES), the CPU, and a catalogue of GPU specs the
simulator and the knob registry use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from aevyra_forge.errors import HardwareError, UsageError
from aevyra_forge.models import Device, GpuInfo, Hardware

SMI_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures (dense, no sparsity) for one GPU model."""

    name: str
    aliases: tuple[str, ...]  # lower-case substrings of the vendor tool's name
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
        return Hardware(device=device, gpus=gpus, cpu_cores=os.cpu_count() or 1,
                        memory_gib=_host_memory_gib(), simulated=True)


GPU_CATALOG: tuple[GpuSpec, ...] = (
    GpuSpec("T4", ("t4",), "nvidia", 15.0, 320, 65, "7.5", fp8=False, bf16=False),
    GpuSpec("L4", ("l4",), "nvidia", 22.5, 300, 121, "8.9", fp8=True),
    GpuSpec("A10G", ("a10g", "a10"), "nvidia", 22.5, 600, 70, "8.6", fp8=False),
    GpuSpec("A100-40GB", ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40"), "nvidia",
            40.0, 1555, 312, "8.0", fp8=False),
    GpuSpec("A100-80GB", ("a100",), "nvidia", 80.0, 2039, 312, "8.0", fp8=False),
    GpuSpec("H100", ("h100",), "nvidia", 80.0, 3350, 989, "9.0", fp8=True),
    GpuSpec("H200", ("h200",), "nvidia", 141.0, 4800, 989, "9.0", fp8=True),
    GpuSpec("MI300X", ("mi300",), "amd", 192.0, 5300, 1307, "gfx942", fp8=True),
)


def gpu_spec(name: str) -> GpuSpec:
    """The catalogue entry for a GPU name as the user or the vendor tool spells it."""
    low = name.lower()
    for spec in GPU_CATALOG:
        if low == spec.name.lower():
            return spec
    for spec in GPU_CATALOG:
        if any(alias in low for alias in spec.aliases):
            return spec
    known = ", ".join(s.name for s in GPU_CATALOG)
    raise UsageError(f"unknown GPU '{name}'; known GPUs: {known}")


def detect(device: Device, env: Mapping[str, str] | None = None) -> Hardware:
    """Detect the hardware for `device`; raise HardwareError when it is not there."""
    env = os.environ if env is None else env
    if device == "cpu":
        return Hardware(device="cpu", cpu_cores=os.cpu_count() or 1,
                        memory_gib=_host_memory_gib())
    gpus = _nvidia_gpus(env) if device == "cuda" else _amd_gpus(env)
    if not gpus:
        tool = "nvidia-smi" if device == "cuda" else "rocm-smi"
        raise HardwareError(
            f"--device {device}: no GPU found ({tool} not on PATH or it lists none); "
            "use --device cpu, or --dry-run --gpu NAME to simulate one"
        )
    return Hardware(device=device, gpus=tuple(gpus), cpu_cores=os.cpu_count() or 1,
                    memory_gib=_host_memory_gib())


def try_detect_gpu(env: Mapping[str, str] | None = None) -> Hardware | None:
    """The first GPU device found, or None (used by --dry-run without --gpu)."""
    for device in ("cuda", "rocm"):
        try:
            return detect(device, env)
        except HardwareError:
            continue
    return None


def _run(tool: str, args: list[str], env: Mapping[str, str]) -> str | None:
    path = shutil.which(tool, path=env.get("PATH"))
    if path is None:
        return None
    try:
        proc = subprocess.run([path, *args], capture_output=True, text=True,
                              timeout=SMI_TIMEOUT_S, env=dict(env), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HardwareError(f"{tool} failed to run ({exc}); check the GPU driver") from None
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        detail = lines[0] if lines else f"exit code {proc.returncode}"
        raise HardwareError(f"{tool} failed: {detail}; check the GPU driver, or use "
                            "--device cpu")
    return proc.stdout


def _visible(env: Mapping[str, str], var: str) -> list[str] | None:
    raw = env.get(var)
    if raw is None:
        return None
    return [v.strip() for v in raw.split(",") if v.strip()]


def _select(gpus: list[GpuInfo], uuids: list[str], visible: list[str] | None
            ) -> list[GpuInfo]:
    if visible is None:
        return gpus
    chosen: list[GpuInfo] = []
    for token in visible:
        if token.isdigit():
            match = [g for g in gpus if g.index == int(token)]
        else:
            match = [g for g, u in zip(gpus, uuids, strict=True) if u.startswith(token)]
        if not match:
            break  # CUDA stops at the first invalid entry
        chosen.extend(match)
    return [g.model_copy(update={"index": i}) for i, g in enumerate(chosen)]


def _nvidia_gpus(env: Mapping[str, str]) -> list[GpuInfo]:
    out = _run("nvidia-smi", [
        "--query-gpu=index,name,memory.total,compute_cap,driver_version,uuid",
        "--format=csv,noheader,nounits"], env)
    if out is None:
        return []
    gpus: list[GpuInfo] = []
    uuids: list[str] = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6 or not parts[0].isdigit():
            raise HardwareError(f"nvidia-smi printed an unexpected line: {line.strip()!r}")
        gpus.append(GpuInfo(index=int(parts[0]), name=parts[1],
                            memory_mib=int(float(parts[2])),
                            compute_capability=parts[3], driver=parts[4]))
        uuids.append(parts[5])
    return _select(gpus, uuids, _visible(env, "CUDA_VISIBLE_DEVICES"))


def _amd_gpus(env: Mapping[str, str]) -> list[GpuInfo]:
    out = _run("rocm-smi", ["--showproductname", "--showmeminfo", "vram",
                            "--showdriverversion", "--json"], env)
    if out is None:
        return []
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        raise HardwareError("rocm-smi printed something that is not JSON; check the "
                            "ROCm install") from None
    driver = str(data.get("system", {}).get("Driver version", "")) or None
    gpus: list[GpuInfo] = []
    uuids: list[str] = []
    for key, card in sorted(data.items()):
        if not key.startswith("card"):
            continue
        name = card.get("Card Series") or card.get("Card series") or card.get(
            "Card model", "AMD GPU")
        total = int(card.get("VRAM Total Memory (B)", 0)) // (1024 * 1024)
        gpus.append(GpuInfo(index=int(key[4:]), name=str(name), memory_mib=total,
                            compute_capability=card.get("GFX Version"), driver=driver))
        uuids.append(str(card.get("Unique ID", "")))
    visible = _visible(env, "HIP_VISIBLE_DEVICES") or _visible(env, "ROCR_VISIBLE_DEVICES")
    return _select(gpus, uuids, visible)


def _host_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return 0.0
