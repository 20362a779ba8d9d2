"""Tests for aevyra_forge.engine.vllm_bench against tests/data/fake_vllm/vllm (see
conftest.py): a bench of a live server, and a server dying in the middle of one."""

from __future__ import annotations

from pathlib import Path

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.workload import Message, Request, Workload
from aevyra_forge.engine.launcher import VllmServer
from aevyra_forge.engine.vllm_bench import VllmBenchmarker
from tests.engine.conftest import MODEL, engine_pid, gone, make_launcher


def small_workload() -> Workload:
    reqs = [Request(line=i, prompt=f"summarise report number {i} in detail",
                    expected_output_tokens=6 + i) for i in range(1, 9)]
    reqs += [Request(line=i, messages=(Message(role="user", content=f"question {i}"),),
                     expected_output_tokens=10) for i in range(9, 12)]
    return Workload(path="mem.jsonl", sha256="0" * 64, requests=tuple(reqs))


def test_bench_a_live_server(tmp_path: Path, pidfile: Path, recipe: Recipe) -> None:
    launcher = make_launcher(pidfile)
    server = launcher.launch(recipe, tmp_path / "logs" / "exp_001.log")
    assert isinstance(server, VllmServer), server
    try:
        workload = small_workload()
        outcome = VllmBenchmarker(request_timeout_s=10.0, bench_timeout_s=30.0,
                                  warmup_requests=1).bench(server, workload, 4, passes=2)
    finally:
        launcher.stop(server)
    assert outcome.status == "ok", outcome.reason
    assert outcome.metrics is not None and len(outcome.passes) == 2
    m = outcome.metrics
    expected = sum(r.expected_output_tokens for r in workload.requests)
    assert (m.completed, m.failed) == (11, 0)
    assert m.output_tokens == expected
    assert m.ttft_ms.mean < m.e2e_ms.mean
    assert m.e2e_ms.p99 >= m.e2e_ms.p50 and m.ttft_ms.p99 >= m.ttft_ms.p50
    assert m.server["generation_tokens"] == expected  # the pass alone, warm-up excluded
    assert m.server["prompt_tokens"] == m.input_tokens
    assert m.server["requests_succeeded"] == 11


def test_server_dying_mid_bench_is_a_crash(tmp_path: Path, pidfile: Path) -> None:
    launcher = make_launcher(pidfile, FAKE_VLLM_DIE_AFTER_N_REQUESTS="4",
                             FAKE_VLLM_TOKEN_DELAY_S="0.01")
    server = launcher.launch(Recipe(model=MODEL), tmp_path / "exp.log")
    assert isinstance(server, VllmServer), server
    child = engine_pid(pidfile)
    outcome = VllmBenchmarker(request_timeout_s=10.0, warmup_requests=1).bench(
        server, small_workload(), 2)
    assert outcome.status == "crash"
    assert outcome.metrics is None
    assert outcome.reason == ("server died during the bench: RuntimeError: CUDA error: an "
                              "illegal memory access was encountered")
    assert not gone(child)  # the orphaned engine still holds the "GPU" ...
    launcher.stop(server)
    assert gone(child)  # ... until the group is torn down
