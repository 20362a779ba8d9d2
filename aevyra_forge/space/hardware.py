"""What this host is: GPUs found through `nvidia-smi` / `rocm-smi` on PATH (honouring
CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES), the CPU and memory,
and the accelerator memory in use."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aevyra_forge.core.errors import HardwareError
from aevyra_forge.core.values import Device, GpuInfo, Hardware
from aevyra_forge.space.gpu_catalogue import find_gpu_spec, nvidia_compute_capability
from aevyra_forge.space.host import cpu_cores, host_memory_gib
from aevyra_forge.space.quant import probe_cpu_isa

SMI_TIMEOUT_S = 20.0
MIB_BYTES = 1024 * 1024

NVIDIA_FIELDS = ("index", "name", "memory.total", "compute_cap", "driver_version", "uuid")
# Drivers older than the 510 series do not know `compute_cap` (nvidia-smi exits 2 saying
# the field "is not a valid field to query"); then the catalogue supplies it.
MEMORY_FIELDS = ("index", "uuid", "memory.used")  # the busy check and the release wait
NVIDIA_FIELDS_OLD = tuple(f for f in NVIDIA_FIELDS if f != "compute_cap")
NVIDIA_RC_NO_DRIVER = 9  # "couldn't communicate with the NVIDIA driver"
NVIDIA_RC_NO_DEVICES = 6  # "No devices were found"
ROCM_ARGS = ("--showproductname", "--showmeminfo", "vram", "--showdriverversion",
             "--showuniqueid", "--json")

_HEX_ID = re.compile(r"0x[0-9a-f]+", re.IGNORECASE)
_NOT_AVAILABLE = {"", "n/a", "[n/a]", "[not supported]", "unknown"}


def detect(device: Device, env: Mapping[str, str] | None = None) -> Hardware:
    """Detect the hardware for `device`; raise HardwareError when it is not there."""
    env = os.environ if env is None else env
    if device == "cpu":
        return Hardware(device="cpu", cpu_cores=cpu_cores(), memory_gib=host_memory_gib(),
                        cpu_isa=probe_cpu_isa())
    gpus = _nvidia_gpus(env) if device == "cuda" else _amd_gpus(env)
    if not gpus:
        tool = "nvidia-smi" if device == "cuda" else "rocm-smi"
        found = "it lists none" if gpus is not None else f"{tool} is not on PATH"
        raise HardwareError(
            f"--device {device}: no GPU found ({found}); install the driver and put {tool} "
            "on PATH, or use --device cpu, or --dry-run --gpu NAME to simulate one"
        )
    return Hardware(device=device, gpus=tuple(gpus), cpu_cores=cpu_cores(),
                    memory_gib=host_memory_gib())


def try_detect_gpu(env: Mapping[str, str] | None = None) -> Hardware | None:
    """The first GPU device found, or None (used by --dry-run without --gpu)."""
    for device in ("cuda", "rocm"):
        try:
            return detect(device, env)
        except HardwareError:
            continue
    return None


@dataclass(frozen=True)
class _Answer:
    rc: int
    out: str
    err: str

    def first_line(self) -> str:
        lines = (self.out + "\n" + self.err).strip().splitlines()
        return lines[0].strip() if lines else f"exit code {self.rc}"


def _run(tool: str, args: tuple[str, ...], env: Mapping[str, str]) -> _Answer | None:
    """The tool's answer, or None when it is not on PATH."""
    path = shutil.which(tool, path=env.get("PATH", ""))
    if path is None:
        return None
    try:
        proc = subprocess.run([path, *args], capture_output=True, text=True,
                              timeout=SMI_TIMEOUT_S, env=dict(env), check=False)
    except subprocess.TimeoutExpired:
        raise HardwareError(f"{tool} did not answer within {SMI_TIMEOUT_S:.0f} s; the GPU "
                            "or its driver may be hung: check dmesg, or use --device cpu"
                            ) from None
    except OSError as exc:
        raise HardwareError(f"{tool} could not be run ({exc}); check its install, or use "
                            "--device cpu") from None
    return _Answer(proc.returncode, proc.stdout, proc.stderr)


def memory_used_mib(device: Device, env: Mapping[str, str] | None = None) -> int | None:
    """Accelerator memory in use (MiB) over the GPUs this process may use (on NVIDIA, those
    CUDA_VISIBLE_DEVICES exposes), for the busy-GPU check and for waiting until a torn-down
    server has released it; None when it cannot be read (or on the CPU). On ROCm it is
    the sum over every card."""
    env = os.environ if env is None else env
    try:
        if device == "cuda":
            ans = _run("nvidia-smi", _nvidia_args(MEMORY_FIELDS), env)
            if ans is None or ans.rc != 0:
                return None
            listed = []
            for line in ans.out.splitlines():
                if not line.strip():
                    continue
                index, uuid, used = (p.strip() for p in line.split(","))
                # only the index and the memory matter here; the uuid lets _select
                # follow CUDA_VISIBLE_DEVICES entries given as UUIDs
                listed.append((GpuInfo(index=int(index), name=uuid,
                                       memory_mib=int(float(used))), uuid))
            chosen = _select(listed, env.get("CUDA_VISIBLE_DEVICES"))
            return sum(gpu.memory_mib for gpu, _ in chosen)
        if device == "rocm":
            ans = _run("rocm-smi", ("--showmeminfo", "vram", "--json"), env)
            data = _json_object(ans.out) if ans is not None else None
            if not data:
                return None
            return sum(int(card.get("VRAM Total Used Memory (B)", 0)) // (1024 * 1024)
                       for key, card in data.items() if key.startswith("card"))
    except (HardwareError, ValueError, AttributeError):
        return None
    return None


def _nvidia_gpus(env: Mapping[str, str]) -> list[GpuInfo] | None:
    fields: tuple[str, ...] = NVIDIA_FIELDS
    answer = _run("nvidia-smi", _nvidia_args(fields), env)
    if answer is None:
        return None
    if answer.rc != 0 and "compute_cap" in answer.out + answer.err:
        fields = NVIDIA_FIELDS_OLD
        answer = _run("nvidia-smi", _nvidia_args(fields), env)
        if answer is None:
            return None
    if answer.rc == NVIDIA_RC_NO_DEVICES or "no devices were found" in answer.out.lower():
        return []
    if answer.rc == NVIDIA_RC_NO_DRIVER or "couldn't communicate" in answer.out + answer.err:
        raise HardwareError(
            "nvidia-smi cannot reach the NVIDIA driver (NVIDIA-SMI has failed because it "
            "couldn't communicate with the NVIDIA driver): make sure the driver is installed "
            "and loaded (a kernel update often needs a reboot or DKMS rebuild), or use "
            "--device cpu"
        )
    if answer.rc != 0:
        raise HardwareError(f"nvidia-smi failed (exit code {answer.rc}): "
                            f"{answer.first_line()}; check the NVIDIA driver, or use "
                            "--device cpu")
    listed = [_nvidia_line(line, fields) for line in answer.out.splitlines() if line.strip()]
    return _visible_nvidia(listed, env)


def _nvidia_args(fields: tuple[str, ...]) -> tuple[str, ...]:
    return (f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")


def _nvidia_line(line: str, fields: tuple[str, ...]) -> tuple[GpuInfo, str]:
    parts = [p.strip() for p in line.split(",")]
    tail = len(fields) - 2  # the name sits between the index and the other fields
    if len(parts) < len(fields) or not parts[0].isdigit():
        raise HardwareError(f"nvidia-smi printed an unexpected line: {line.strip()!r}; "
                            "check the NVIDIA driver, or use --device cpu")
    name = ", ".join(parts[1:len(parts) - tail])
    values = dict(zip(fields[2:], parts[len(parts) - tail:], strict=True))
    cc = values.get("compute_cap", "")
    if _missing(cc):
        cc = nvidia_compute_capability(name) or ""
    memory = values["memory.total"]
    try:
        # Unified-memory parts (GB10) report no memory of their own: they use host RAM.
        memory_mib = (int(host_memory_gib() * 1024) if _missing(memory)
                      else int(float(memory)))
    except ValueError:
        raise HardwareError(f"nvidia-smi printed an unexpected line: {line.strip()!r}; "
                            "check the NVIDIA driver, or use --device cpu") from None
    gpu = GpuInfo(index=int(parts[0]), name=name, memory_mib=memory_mib,
                  compute_capability=cc or None,
                  driver=None if _missing(values["driver_version"]) else values["driver_version"])
    return gpu, values["uuid"]


def _visible_nvidia(listed: list[tuple[GpuInfo, str]], env: Mapping[str, str]
                    ) -> list[GpuInfo]:
    raw = env.get("CUDA_VISIBLE_DEVICES")
    chosen = _select(listed, raw)
    if listed and not chosen:
        raise _hidden_error("cuda", "CUDA_VISIBLE_DEVICES", raw, len(listed), "nvidia-smi")
    return [gpu for gpu, _ in chosen]


def _amd_gpus(env: Mapping[str, str]) -> list[GpuInfo] | None:
    answer = _run("rocm-smi", ROCM_ARGS, env)
    if answer is None:
        return None
    # rocm-smi exits 0 even when the amdgpu driver is missing: it then prints nothing on
    # stdout and the reason on stderr, so the output, not the exit code, decides.
    data = _json_object(answer.out)
    if data is None:
        detail = answer.first_line()
        if answer.out.strip():
            detail = f"unreadable output: {detail}"
        raise HardwareError(f"rocm-smi gave no GPU data ({detail}); check that the amdgpu "
                            "driver is loaded (sudo modprobe amdgpu), or use --device cpu")
    system = data.get("system")
    driver = _text(system.get("Driver version")) if isinstance(system, dict) else None
    listed: list[tuple[GpuInfo, str]] = []
    for key, card in data.items():
        if not (key.startswith("card") and key[4:].isdigit() and isinstance(card, dict)):
            continue
        listed.append(_amd_card(int(key[4:]), card, driver))
    listed.sort(key=lambda item: item[0].index)
    return _visible_amd(listed, env)


def _json_object(text: str) -> dict[str, Any] | None:
    # Some rocm-smi versions print warnings around the JSON document.
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _amd_card(index: int, card: dict[str, Any], driver: str | None) -> tuple[GpuInfo, str]:
    name = _amd_name(card)
    spec = find_gpu_spec(name)
    gfx = _text(card.get("GFX Version"))
    if gfx is None or not gfx.startswith("gfx"):
        gfx = spec.compute_capability if spec is not None else None
    total = _text(card.get("VRAM Total Memory (B)"))
    if total is not None and total.isdigit():
        memory_mib = int(total) // MIB_BYTES
    else:
        memory_mib = int(spec.memory_gib * 1024) if spec is not None else 0
    unique = (_text(card.get("Unique ID")) or "").lower().removeprefix("0x")
    gpu = GpuInfo(index=index, name=name, memory_mib=memory_mib, compute_capability=gfx,
                  driver=driver)
    return gpu, f"gpu-{unique}" if unique else ""


def _amd_name(card: dict[str, Any]) -> str:
    """The marketing name; older rocm-smi versions print only PCI ids, which the
    catalogue may still recognise."""
    keys = ("Card Series", "Card series", "Device Name", "Card Model", "Card model")
    values = [v for v in (_text(card.get(k)) for k in keys) if v is not None]
    for value in values:
        if not _HEX_ID.fullmatch(value):
            return value
    for value in values:
        spec = find_gpu_spec(value)
        if spec is not None:
            return spec.name
    return f"AMD GPU {values[0]}" if values else "AMD GPU"


def _visible_amd(listed: list[tuple[GpuInfo, str]], env: Mapping[str, str]
                 ) -> list[GpuInfo]:
    # ROCR_VISIBLE_DEVICES applies first; HIP_VISIBLE_DEVICES (or CUDA_VISIBLE_DEVICES,
    # which HIP also honours) then indexes into what is left.
    chosen = listed
    hip_var = "HIP_VISIBLE_DEVICES" if "HIP_VISIBLE_DEVICES" in env else "CUDA_VISIBLE_DEVICES"
    for var in ("ROCR_VISIBLE_DEVICES", hip_var):
        raw = env.get(var)
        before = len(chosen)
        chosen = _select(chosen, raw)
        if before and not chosen:
            raise _hidden_error("rocm", var, raw, before, "rocm-smi")
    return [gpu for gpu, _ in chosen]


def _select(listed: list[tuple[GpuInfo, str]], raw: str | None
            ) -> list[tuple[GpuInfo, str]]:
    """The GPUs a visibility variable exposes, in its order, renumbered from 0 as the
    runtime numbers them. Entries are indices or UUID prefixes; as in CUDA, the list ends
    at the first entry that names no GPU, and an empty value hides every GPU."""
    if raw is None:
        return listed
    chosen: list[tuple[GpuInfo, str]] = []
    for token in (t.strip().lower() for t in raw.split(",")):
        if token.isdigit():
            match = [item for item in listed if item[0].index == int(token)]
        elif token.startswith("gpu-") and len(token) > len("gpu-"):
            match = [item for item in listed if item[1].lower().startswith(token)]
        else:
            match = []
        if len(match) != 1:  # invalid, unknown, or an ambiguous UUID prefix
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return [(gpu.model_copy(update={"index": i}), uuid)
            for i, (gpu, uuid) in enumerate(chosen)]


def _hidden_error(device: str, var: str, raw: str | None, listed: int, tool: str
                  ) -> HardwareError:
    return HardwareError(
        f"--device {device}: no GPU found: {var}={raw!r} selects none of the {listed} "
        f"GPU(s) {tool} lists; unset {var} or set it to valid indices or UUIDs, "
        "or use --device cpu"
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if _missing(text) else text


def _missing(value: str) -> bool:
    return value.strip().lower() in _NOT_AVAILABLE
