"""Hardware detection against fake `nvidia-smi` / `rocm-smi` scripts on PATH that replay
recorded real output (tests/data/smi), and the visibility variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import HardwareError
from aevyra_forge.core.values import Hardware
from aevyra_forge.space import hardware
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.hardware import detect, try_detect_gpu
from aevyra_forge.space.quant import probe_cpu_isa

SMI = Path(__file__).parents[1] / "data" / "smi"
A100_UUIDS = [line.split(", ")[-1].strip()
              for line in (SMI / "a100x8" / "any.stdout").read_text().splitlines()]
MI300X_MIB = 206141652992 // (1024 * 1024)


def host(case: str | None, log: Path, **extra: str) -> dict[str, str]:
    """The environment of a host whose vendor tool is the fake in tests/data/smi/<case>;
    `case=None` is a host with neither tool (PATH holds only an empty folder)."""
    path = str(log.parent / "empty") if case is None else (
        f"{SMI / case}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    (log.parent / "empty").mkdir(exist_ok=True)
    env = {"PATH": path, "FAKE_SMI_LOG": str(log)}
    env.update(extra)
    return env


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.log"


# --- NVIDIA -----------------------------------------------------------------------------

def test_t4_single_gpu_with_every_field(log: Path) -> None:
    hw = detect("cuda", host("t4", log))
    assert hw.device == "cuda" and hw.gpu_count == 1 and not hw.simulated
    gpu = hw.gpus[0]
    assert (gpu.index, gpu.name, gpu.memory_mib) == (0, "Tesla T4", 15360)
    assert (gpu.compute_capability, gpu.driver) == ("7.5", "535.104.05")
    assert gpu_spec(gpu.name).name == "T4"
    assert hw.cpu_cores >= 1 and hw.memory_gib > 0
    # one query, asking for every field at once
    assert calls(log) == ["--query-gpu=index,name,memory.total,compute_cap,driver_version,uuid"
                          " --format=csv,noheader,nounits"]


def test_eight_a100s(log: Path) -> None:
    hw = detect("cuda", host("a100x8", log))
    assert hw.gpu_count == 8 and not hw.mixed
    assert [g.index for g in hw.gpus] == list(range(8))
    assert {(g.name, g.memory_mib, g.compute_capability, g.driver) for g in hw.gpus} == {
        ("NVIDIA A100-SXM4-80GB", 81920, "8.0", "535.129.03")}
    assert hw.describe() == "8x NVIDIA A100-SXM4-80GB (80 GiB each)"
    assert gpu_spec(hw.gpus[0].name).name == "A100-80GB"
    assert len(calls(log)) == 1


def test_two_h100s(log: Path) -> None:
    hw = detect("cuda", host("h100x2", log))
    assert hw.gpu_count == 2
    assert all((g.name, g.memory_mib, g.compute_capability) ==
               ("NVIDIA H100 80GB HBM3", 81559, "9.0") for g in hw.gpus)
    assert gpu_spec(hw.gpus[1].name).name == "H100"


def test_mixed_gpus_are_reported_and_the_first_is_primary(log: Path) -> None:
    hw = detect("cuda", host("mixed", log))
    assert hw.mixed and hw.gpu_count == 2
    assert hw.gpu is not None and hw.gpu.name == "NVIDIA A100-SXM4-80GB"
    assert "NVIDIA A100-SXM4-80GB" in hw.describe()
    assert "NVIDIA H100 80GB HBM3" in hw.describe()


def test_cuda_visible_devices_reorders_and_renumbers(log: Path) -> None:
    hw = detect("cuda", host("mixed", log, CUDA_VISIBLE_DEVICES="1,0"))
    assert [(g.index, g.name) for g in hw.gpus] == [
        (0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA A100-SXM4-80GB")]
    assert hw.gpu is not None and hw.gpu.compute_capability == "9.0"


def test_cuda_visible_devices_selects_one_gpu_and_ends_mixing(log: Path) -> None:
    hw = detect("cuda", host("mixed", log, CUDA_VISIBLE_DEVICES="1"))
    assert [g.name for g in hw.gpus] == ["NVIDIA H100 80GB HBM3"] and not hw.mixed


def test_cuda_visible_devices_accepts_uuid_prefixes(log: Path) -> None:
    hw = detect("cuda", host("mixed", log, CUDA_VISIBLE_DEVICES="GPU-5c1e9a37"))
    assert [g.name for g in hw.gpus] == ["NVIDIA H100 80GB HBM3"]
    full = detect("cuda", host("mixed", log,
                               CUDA_VISIBLE_DEVICES="GPU-b0354a1a-37c2-086d-f6fe-953b6fac5c3e"))
    assert [g.name for g in full.gpus] == ["NVIDIA A100-SXM4-80GB"]


def test_cuda_visible_devices_stops_at_the_first_invalid_entry(log: Path) -> None:
    hw = detect("cuda", host("a100x8", log, CUDA_VISIBLE_DEVICES="0,2,-1,1"))
    assert hw.gpu_count == 2
    assert detect("cuda", host("a100x8", log, CUDA_VISIBLE_DEVICES="5,9,1")).gpu_count == 1


@pytest.mark.parametrize("mask", ["", "-1", "8", "GPU-ffffffff", "MIG-0", "junk"])
def test_a_mask_that_hides_every_gpu_is_named_in_the_error(log: Path, mask: str) -> None:
    with pytest.raises(HardwareError) as err:
        detect("cuda", host("a100x8", log, CUDA_VISIBLE_DEVICES=mask))
    message = str(err.value)
    assert "no GPU found" in message and f"CUDA_VISIBLE_DEVICES={mask!r}" in message
    assert "8 GPU(s)" in message and "\n" not in message


TOKENS = st.one_of(
    st.integers(min_value=-1, max_value=9).map(str),
    st.tuples(st.sampled_from(A100_UUIDS), st.integers(min_value=5, max_value=40)).map(
        lambda t: t[0][:t[1]]),
    st.sampled_from(["", "x", "GPU-", "GPU-0000"]),
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(TOKENS, max_size=6))
def test_visible_count_is_the_distinct_gpus_before_the_first_invalid_entry(
        log: Path, tokens: list[str]) -> None:
    expected: list[int] = []
    for token in tokens:
        if token.isdigit() and int(token) < 8:
            gpu = int(token)
        elif token.startswith("GPU-") and len(token) > 4 and any(
                u.startswith(token) for u in A100_UUIDS):
            gpu = next(i for i, u in enumerate(A100_UUIDS) if u.startswith(token))
        else:
            break
        if gpu not in expected:
            expected.append(gpu)
    env = host("a100x8", log, CUDA_VISIBLE_DEVICES=",".join(tokens))
    if not expected:
        with pytest.raises(HardwareError, match="CUDA_VISIBLE_DEVICES"):
            detect("cuda", env)
        return
    hw = detect("cuda", env)
    assert [g.index for g in hw.gpus] == list(range(len(expected)))


def test_driver_failure_says_so(log: Path) -> None:
    with pytest.raises(HardwareError) as err:
        detect("cuda", host("driver_error", log))
    message = str(err.value)
    assert "couldn't communicate with the NVIDIA driver" in message
    assert "--device cpu" in message and "\n" not in message


def test_a_driver_without_devices_lists_none(log: Path) -> None:
    with pytest.raises(HardwareError, match=r"no GPU found \(it lists none\)"):
        detect("cuda", host("no_devices", log))


def test_old_driver_without_compute_cap_falls_back_to_the_catalogue(log: Path) -> None:
    hw = detect("cuda", host("old_driver", log))
    gpu = hw.gpus[0]
    assert (gpu.name, gpu.memory_mib, gpu.driver) == ("Tesla T4", 15360, "470.182.03")
    assert gpu.compute_capability == "7.5"
    first, second = calls(log)
    assert "compute_cap" in first and "compute_cap" not in second
    assert "index,name,memory.total,driver_version,uuid" in second


# --- AMD --------------------------------------------------------------------------------

def test_eight_mi300x_through_rocm_smi(log: Path) -> None:
    hw = detect("rocm", host("mi300x8", log))
    assert hw.device == "rocm" and hw.gpu_count == 8
    assert [g.index for g in hw.gpus] == list(range(8))
    assert {(g.name, g.memory_mib, g.compute_capability, g.driver) for g in hw.gpus} == {
        ("AMD Instinct MI300X OAM", MI300X_MIB, "gfx942", "6.8.5")}
    assert gpu_spec(hw.gpus[0].name).name == "MI300X"
    assert len(calls(log)) == 1


@pytest.mark.parametrize(("extra", "count"), [
    ({"HIP_VISIBLE_DEVICES": "2,3"}, 2),
    ({"ROCR_VISIBLE_DEVICES": "4,5,6", "HIP_VISIBLE_DEVICES": "1"}, 1),
    ({"ROCR_VISIBLE_DEVICES": "GPU-e7a0,GPU-4a3e"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),  # HIP honours it when HIP_VISIBLE_DEVICES is unset
    ({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 1),
])
def test_rocm_visibility_variables(log: Path, extra: dict[str, str], count: int) -> None:
    assert detect("rocm", host("mi300x8", log, **extra)).gpu_count == count


@pytest.mark.parametrize("var", ["HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"])
def test_rocm_empty_mask_hides_every_gpu(log: Path, var: str) -> None:
    with pytest.raises(HardwareError, match=f"{var}=''"):
        detect("rocm", host("mi300x8", log, **{var: ""}))


def test_odd_card_series_still_resolves(log: Path) -> None:
    hw = detect("rocm", host("mi300x_vf", log))
    gpu = hw.gpus[0]
    assert gpu.name == "Aqua Vanjaram [Instinct MI300X VF]"
    assert (gpu.memory_mib, gpu.driver) == (MI300X_MIB, "6.10.5")
    assert gpu.compute_capability == "gfx942"  # from the catalogue: this rocm-smi omits it
    assert gpu_spec(gpu.name).name == "MI300X"


def test_rocm_smi_without_the_amdgpu_driver(log: Path) -> None:
    with pytest.raises(HardwareError) as err:
        detect("rocm", host("rocm_no_driver", log))
    message = str(err.value)
    assert "Driver not initialized" in message and "amdgpu" in message
    assert "--device cpu" in message


# --- nothing there / CPU ----------------------------------------------------------------

@pytest.mark.parametrize(("device", "tool"), [("cuda", "nvidia-smi"), ("rocm", "rocm-smi")])
def test_no_tool_on_path(log: Path, device: str, tool: str) -> None:
    with pytest.raises(HardwareError) as err:
        detect(device, host(None, log))  # type: ignore[arg-type]
    message = str(err.value)
    assert f"--device {device}: no GPU found ({tool} is not on PATH)" in message
    assert "--device cpu" in message


def test_try_detect_gpu_finds_whichever_vendor_is_there(log: Path) -> None:
    assert try_detect_gpu(host(None, log)) is None
    found = try_detect_gpu(host("mi300x8", log))
    assert found is not None and found.device == "rocm"
    assert try_detect_gpu(host("driver_error", log)) is None


def test_cpu_device(log: Path) -> None:
    hw = detect("cpu", host(None, log))
    assert hw == Hardware(device="cpu", cpu_cores=hw.cpu_cores, memory_gib=hw.memory_gib,
                          cpu_isa=probe_cpu_isa())
    assert hw.cpu_cores >= 1 and hw.memory_gib > 0 and hw.gpu is None
    assert hw.describe().startswith("CPU (")
    assert calls(log) == []


def test_memory_used_sums_the_visible_gpus(tmp_path: Path) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\nprintf '0, GPU-aaaa, 1200\\n1, GPU-bbbb, 81000\\n'\n")
    tool.chmod(0o755)
    assert hardware.memory_used_mib("cuda", {"PATH": str(tmp_path)}) == 82200
    only = {"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0"}
    assert hardware.memory_used_mib("cuda", only) == 1200  # GPU 1's tenant is not ours
    by_uuid = {"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "GPU-bbbb"}
    assert hardware.memory_used_mib("cuda", by_uuid) == 81000
    assert hardware.memory_used_mib("cuda", {"PATH": str(tmp_path / "none")}) is None
    assert hardware.memory_used_mib("cpu") is None
