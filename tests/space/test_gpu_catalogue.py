"""The GPU catalogue: the names users and vendor tools print resolve to the right entry,
never by guessing from part of a token, and an entry describes simulated hardware."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.core.errors import UsageError
from aevyra_forge.space.gpu_catalogue import (
    GPU_CATALOG,
    find_gpu_spec,
    gpu_spec,
    nvidia_compute_capability,
)


@pytest.mark.parametrize(("name", "entry"), [
    ("Tesla T4", "T4"),
    ("T4", "T4"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10G"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
    ("a100", "A100-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100"),
    ("NVIDIA H200", "H200"),
    ("AMD Instinct MI300X", "MI300X"),
    ("AMD Instinct MI300X OAM", "MI300X"),
    ("AMD Instinct MI300X VF", "MI300X"),
    ("Aqua Vanjaram [Instinct MI300X VF]", "MI300X"),
    ("0x74a1", "MI300X"),
    ("mi300x", "MI300X"),
])
def test_gpu_spec_resolves_the_names_the_tools_print(name: str, entry: str) -> None:
    assert gpu_spec(name).name == entry


@pytest.mark.parametrize("name", ["NVIDIA L40S", "NVIDIA GH200 480GB", "AMD Instinct MI250X",
                                  "AMD Instinct MI300A", "NVIDIA GeForce RTX 4090"])
def test_gpu_spec_does_not_guess_from_part_of_a_token(name: str) -> None:
    assert find_gpu_spec(name) is None
    with pytest.raises(UsageError, match="known GPUs: T4, L4"):
        gpu_spec(name)


def test_every_catalogue_name_resolves_to_itself() -> None:
    for spec in GPU_CATALOG:
        assert gpu_spec(spec.name) is spec
        assert gpu_spec(spec.name.lower()) is spec


@given(st.text(max_size=40))
def test_find_gpu_spec_never_raises(text: str) -> None:
    spec = find_gpu_spec(text)
    assert spec is None or spec in GPU_CATALOG


@pytest.mark.parametrize(("name", "cc"), [
    ("NVIDIA H100 80GB HBM3", "9.0"),
    ("Tesla T4", "7.5"),
    ("Tesla V100-SXM2-16GB", "7.0"),  # not in the catalogue: an older data-centre part
    ("NVIDIA A40", "8.6"),
    ("AMD Instinct MI300X", None),  # a gfx arch, not a compute capability
    ("NVIDIA GeForce RTX 4090", None),
])
def test_nvidia_compute_capability_by_name(name: str, cc: str | None) -> None:
    assert nvidia_compute_capability(name) == cc


def test_an_entry_describes_simulated_hardware() -> None:
    hw = gpu_spec("MI300X").hardware(count=2)
    assert hw.simulated and hw.device == "rocm"
    assert [(g.index, g.name, g.memory_mib, g.compute_capability) for g in hw.gpus] == [
        (0, "MI300X", 192 * 1024, "gfx942"), (1, "MI300X", 192 * 1024, "gfx942")]
    assert hw.cpu_cores >= 1
    assert gpu_spec("H100").hardware().device == "cuda"
