from __future__ import annotations

from aevyra_forge.core.errors import ForgeError, MissingExtraError
from aevyra_forge.core.values import SCHEMA_VERSION, ExperimentRecord, GpuInfo, Hardware


def test_hardware_describes_itself() -> None:
    a100 = GpuInfo(index=0, name="NVIDIA A100-SXM4-80GB", memory_mib=81920)
    h100 = GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", memory_mib=81559)
    mixed = Hardware(device="cuda", gpus=(a100, h100))
    assert mixed.mixed and mixed.gpu == a100 and mixed.gpu_count == 2
    assert "A100" in mixed.describe() and "H100" in mixed.describe()
    assert round(mixed.gpu_memory_gib) == 80
    cpu = Hardware(device="cpu", cpu_cores=2, memory_gib=24)
    assert cpu.describe() == "CPU (2 cores, 24 GiB)" and cpu.gpu is None


def test_records_carry_the_schema_version() -> None:
    rec = ExperimentRecord(exp=0, recipe={}, recipe_id="x", parent_id=None, generation=0,
                           layer=1, status="ok", started_at="t", finished_at="t")
    assert rec.schema_version == SCHEMA_VERSION
    assert rec.model_dump()["schema_version"] == SCHEMA_VERSION


def test_missing_extra_names_the_install_command() -> None:
    err = MissingExtraError("openai", "openai", "The OpenAI agent")
    assert isinstance(err, ForgeError) and err.exit_code == 1
    assert "pip install 'aevyra-forge[openai]'" in str(err)


def test_a_measurement_is_healthy_up_to_the_allowed_share_of_failed_requests() -> None:
    from aevyra_forge.core.values import MAX_FAILED_REQUEST_SHARE, BenchMetrics, healthy

    def run(completed: int, failed: int) -> BenchMetrics:
        return BenchMetrics(completed=completed, failed=failed, duration_s=1.0,
                            input_tokens=0, output_tokens=completed, request_throughput=0.0,
                            output_throughput=float(completed), total_token_throughput=0.0)

    assert MAX_FAILED_REQUEST_SHARE == 0.01
    assert healthy([run(99, 1)]) and healthy([run(50, 0), run(49, 1)])
    assert not healthy([run(98, 2)]) and not healthy([run(49, 1)])  # 1 of 50 is 2 %
    assert not healthy([run(0, 0)]) and not healthy([])  # nothing served
