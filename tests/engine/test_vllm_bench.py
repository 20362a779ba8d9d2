"""Tests for aevyra_forge.engine.vllm_bench against tests/data/fake_vllm/vllm (see
conftest.py): a bench of a live server, and its failures classified: a server dying in
the middle of one, answering 500s, refusing requests, stalling, timing out."""

from __future__ import annotations

from pathlib import Path

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import BenchOutcome
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
        told: list[tuple[int, int]] = []
        outcome = VllmBenchmarker(request_timeout_s=10.0, bench_timeout_s=30.0,
                                  warmup_requests=1,
                                  on_pass=lambda k, n: told.append((k, n))
                                  ).bench(server, workload, 4, passes=2)
    finally:
        launcher.stop(server)
    assert outcome.status == "ok", outcome.reason
    assert outcome.pass_isolation is not None
    # each timed pass announced as it begins; a pass 1 slowed by a busy machine is set
    # aside as a warm pass, and pass 2 announced again
    extra = [(2, 2)] if outcome.pass_isolation.method == "warm_pass" else []
    assert told == [(1, 2), (2, 2), *extra]
    assert outcome.pass_isolation.method in ("salt", "warm_pass")
    assert "no prefix-cache counters" not in outcome.pass_isolation.note
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


def _bench(tmp_path: Path, pidfile: Path, workload: Workload | None = None,
           benchmarker: VllmBenchmarker | None = None, passes: int = 1,
           **fake_env: str) -> BenchOutcome:
    launcher = make_launcher(pidfile, **fake_env)
    server = launcher.launch(Recipe(model=MODEL), tmp_path / "exp.log")
    assert isinstance(server, VllmServer), server
    try:
        bench = benchmarker or VllmBenchmarker(request_timeout_s=10.0, warmup_requests=1)
        return bench.bench(server, workload or small_workload(), 2, passes=passes)
    finally:
        launcher.stop(server)


def test_a_server_answering_500_after_a_runtime_oom_is_oom_not_ok(tmp_path: Path,
                                                                   pidfile: Path) -> None:
    """Every request after the first three answers HTTP 500 while the server lives on:
    the bench finishes, but the measurement is the engine's OOM, with its root cause."""
    outcome = _bench(tmp_path, pidfile, FAKE_VLLM_500_AFTER_N_REQUESTS="3")
    assert outcome.status == "oom", outcome.reason
    assert outcome.reason.startswith("9 of 11 requests failed (82%), first: HTTP 500: "
                                     "EngineCore encountered an issue")
    assert "log: out of memory: torch.OutOfMemoryError: CUDA out of memory" in outcome.reason
    assert outcome.metrics is not None and outcome.metrics.failed == 9  # kept for the audit


def test_requests_over_the_context_are_a_request_error(tmp_path: Path, pidfile: Path
                                                       ) -> None:
    reqs = small_workload().requests
    poisoned = (*reqs[:5], reqs[5].model_copy(update={"prompt": "POISON-PILL now"}),
                *reqs[6:])
    workload = Workload(path="mem.jsonl", sha256="1" * 64, requests=poisoned)
    outcome = _bench(tmp_path, pidfile, workload)
    assert outcome.status == "request_error"
    assert outcome.reason.startswith("1 of 11 requests failed (9%), first: HTTP 400: ")


def test_a_server_that_stops_producing_tokens_is_hung(tmp_path: Path, pidfile: Path
                                                      ) -> None:
    """The watchdog, not the 10 s request timeout, ends the bench: the limit is tiny and
    checked often, so the test is quick without asserting on how long it took."""
    watchdog = VllmBenchmarker(request_timeout_s=600.0, warmup_requests=1,
                               stall_timeout_s=0.2, watch_interval_s=0.02)
    outcome = _bench(tmp_path, pidfile, benchmarker=watchdog,
                     FAKE_VLLM_STALL_AFTER_N_TOKENS="40", FAKE_VLLM_TOKEN_DELAY_S="0.001")
    assert outcome.status == "hung", outcome.reason
    assert outcome.reason.startswith("server stopped producing tokens: none for ")
    assert "request(s) in flight (stall limit 0.2 s)" in outcome.reason


def test_requests_that_time_out_are_hung(tmp_path: Path, pidfile: Path) -> None:
    slow = VllmBenchmarker(request_timeout_s=0.2, warmup_requests=0)
    outcome = _bench(tmp_path, pidfile, benchmarker=slow, FAKE_VLLM_TOKEN_DELAY_S="5")
    assert outcome.status == "hung", outcome.reason
    assert outcome.reason == "11 of 11 requests failed (100%), first: timeout after 0.2 s"


def _cached_workload() -> Workload:
    """Prompts of two full prefix-cache blocks each, so a second pass under a salt the
    server ignores is served from the cache."""
    reqs = [Request(line=i, prompt=" ".join(f"r{i}w{j}" for j in range(32)),
                    expected_output_tokens=4) for i in range(1, 7)]
    return Workload(path="mem.jsonl", sha256="2" * 64, requests=tuple(reqs))


def test_a_server_ignoring_the_cache_salt_is_reset_between_passes(
        tmp_path: Path, pidfile: Path) -> None:
    outcome = _bench(tmp_path, pidfile, _cached_workload(), passes=3,
                     FAKE_VLLM_IGNORE_CACHE_SALT="1", VLLM_SERVER_DEV_MODE="1")
    assert outcome.status == "ok", outcome.reason
    isolation = outcome.pass_isolation
    assert isolation is not None and isolation.method == "reset", isolation
    assert "cache_salt ignored" in isolation.note and isolation.note in outcome.reason
    assert [m.server["prefix_cache_hit_rate"] for m in outcome.passes] == [0.0] * 3


def test_without_dev_mode_an_ignored_salt_gets_a_warm_pass(tmp_path: Path, pidfile: Path
                                                            ) -> None:
    outcome = _bench(tmp_path, pidfile, _cached_workload(), passes=3,
                     FAKE_VLLM_IGNORE_CACHE_SALT="1")
    isolation = outcome.pass_isolation
    assert isolation is not None and isolation.method == "warm_pass", isolation
    assert [m.server["prefix_cache_hit_rate"] for m in outcome.passes] == [1.0] * 3
