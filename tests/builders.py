"""Small value builders shared by several test modules: a bench pass, an experiment
record with sensible defaults, and a recipe that sets something in every section."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from aevyra_forge.core.recipe import KernelSettings, QuantSettings, Recipe
from aevyra_forge.core.values import BenchMetrics, ExperimentRecord, LatencyStats, Proposal

MODEL_1B = "meta-llama/Llama-3.2-1B-Instruct"


def metrics(throughput: float = 1000.0, p99: float = 250.0) -> BenchMetrics:
    return BenchMetrics(completed=50, duration_s=10.0, input_tokens=5000, output_tokens=6400,
                        request_throughput=5.0, output_throughput=throughput,
                        total_token_throughput=throughput * 1.8,
                        e2e_ms=LatencyStats(mean=150.0, p50=140.0, p90=200.0, p99=p99))


def record(exp: int, *, status: str = "ok", score: float | None = 1.0, kept: bool = False,
           rationale: str | None = None, reason: str = "", layer: int = 1,
           accuracy: float | None = 1.0, **extra: Any) -> ExperimentRecord:
    proposal = (Proposal(rationale=rationale, layer=layer, changes={"max_num_seqs": 512})
                if rationale is not None else None)
    data: dict[str, Any] = dict(
        exp=exp, recipe={"model": "m", "config": {}}, recipe_id=f"id{exp:06d}",
        parent_id=None if exp == 0 else "id000000", generation=exp, layer=layer,
        proposal=proposal, status=status, reason=reason,
        metrics=metrics() if status == "ok" else None,
        accuracy=accuracy if status == "ok" else None,
        score=score if status == "ok" else None, kept=kept,
        started_at="2026-11-22T11:05:01Z", finished_at="2026-11-22T11:06:01Z",
    )
    data.update(extra)
    return ExperimentRecord.model_validate(data)


def full_recipe() -> Recipe:
    return Recipe(
        model=MODEL_1B,
        config={"max_num_seqs": 128, "gpu_memory_utilization": 0.92,
                "enable_prefix_caching": False, "enforce_eager": True, "max_model_len": None},
        quant=QuantSettings(kv_cache_dtype="fp8"),
        kernel=KernelSettings(attention_backend="FLASHINFER",
                              compilation_config={"cudagraph_mode": "PIECEWISE", "level": 3},
                              env={"VLLM_CPU_KVCACHE_SPACE": "8"}),
    )


DEMO_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "forge_kernel_demo"


def install_demo_plugin(site: Path) -> Path:
    """Install examples/forge_kernel_demo into the folder `site` the way an installer
    lays a package out (its code, and setuptools' own metadata with the entry points),
    touching no environment: a process with `site` on its path (PYTHONPATH, sys.path)
    sees the plug-in through importlib.metadata, one without it does not."""
    site.mkdir(parents=True, exist_ok=True)
    src = site.parent / f"{site.name}-build"
    shutil.copytree(DEMO_PLUGIN, src, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    subprocess.run([sys.executable, "-W", "ignore", "-c", "import setuptools; setuptools.setup()",
                    "-q", "egg_info", "--egg-base", str(site)], cwd=src, check=True,
                   capture_output=True)
    shutil.copytree(src / "forge_kernel_demo", site / "forge_kernel_demo")
    shutil.rmtree(src)
    return site
