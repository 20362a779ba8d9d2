"""The diagnosis of a measurement: every binding resource produced by the simulator in
the situation that binds it, the knobs it proves inert (each with the figure in its
reason, and a control where the same knob is not inert), the real server's counters
(histogram sums, no peaks) and the client's latencies alone, and the synonyms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import (
    BenchMetrics,
    Diagnosis,
    ExperimentRecord,
    GpuInfo,
    Hardware,
    LatencyStats,
    LaunchFailure,
)
from aevyra_forge.core.workload import Workload, load_workload
from aevyra_forge.decide.diagnosis import diagnose, in_force, summary, synonyms
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
WORDS = ("router", "invoice", "printer", "kernel", "budget", "tenant", "cluster", "ledger")


def _space(gpu: str = "H100") -> KnobSpace:
    return KnobSpace(gpu_spec(gpu).hardware(), profile(LLAMA_8B), simulated=True)


def _text(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3 + j // 5) % len(WORDS)] for j in range(words))


def _workload(tmp_path: Path, n: int, words: int, out: int, gap_s: float | None = None
              ) -> Workload:
    rows: list[dict[str, Any]] = [
        {"prompt": f"Request {i}: {_text(i, words)}", "expected_output_tokens": out}
        for i in range(n)]
    if gap_s is not None:
        rows = [dict(r, arrival_offset_s=i * gap_s) for i, r in enumerate(rows)]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_workload(path)


def _simulate(tmp_path: Path, gpu: str, workload: Workload, concurrency: int,
              changes: dict[str, Any] | None = None) -> tuple[Diagnosis, Recipe, KnobSpace]:
    space = _space(gpu)
    spec = gpu_spec(gpu)
    engine = SimulatedEngine(space.hw, spec, space.model, space, noise_cv=0.0)
    recipe = space.apply(space.baseline(LLAMA_8B), changes or {})
    server = engine.launch(recipe, tmp_path / "server.log")
    if isinstance(server, LaunchFailure):
        return diagnose(server.status, server.reason, None, recipe, space, workload.stats,
                        concurrency), recipe, space
    out = engine.bench(server, workload, concurrency)
    return diagnose(out.status, out.reason, out.metrics, recipe, space, workload.stats,
                    concurrency), recipe, space


CASES = {  # binding -> (gpu, (requests, words, output tokens, arrival gap), concurrency, changes)
    "kv_capacity": ("L4", (32, 6000, 256, None), 16, {"max_model_len": 16384}),
    "batch_slots": ("H100", (128, 60, 256, None), 64, {"max_num_seqs": 16}),
    "token_budget": ("H100", (64, 3000, 64, None), 32,
                     {"max_num_batched_tokens": 512, "max_num_seqs": 256}),
    "prefill_compute": ("H100", (64, 3000, 2, None), 16, {}),
    "decode_bandwidth": ("H100", (64, 60, 512, None), 16, {}),
    "client": ("H100", (40, 60, 128, 0.5), 32, {}),
    "boot": ("T4", (8, 60, 64, None), 8, {}),
}


def _case(binding: str, tmp_path: Path) -> Diagnosis:
    gpu, (n, words, out, gap), concurrency, changes = CASES[binding]
    return _simulate(tmp_path, gpu, _workload(tmp_path, n, words, out, gap), concurrency,
                     changes)[0]


@pytest.mark.parametrize("binding", list(CASES))
def test_each_binding_resource_is_named_where_the_simulator_binds_it(
        tmp_path: Path, binding: str) -> None:
    diagnosis = _case(binding, tmp_path)
    assert diagnosis.binding == binding, diagnosis.why
    assert binding.replace("_", " ") in summary(diagnosis)


def test_kv_bound_keeps_memory_knobs_and_a_roomy_cache_marks_them_inert(tmp_path: Path
                                                                         ) -> None:
    tight = _case("kv_capacity", tmp_path)
    roomy = _case("decode_bandwidth", tmp_path)
    assert tight.inert_reason("gpu_memory_utilization", 0.95) is None
    reason = roomy.inert_reason("gpu_memory_utilization", 0.95)
    assert reason is not None and "never filled" in reason and "no preemptions" in reason


def test_a_cap_above_the_requests_in_flight_is_inert_and_one_below_is_not(tmp_path: Path
                                                                         ) -> None:
    diagnosis = _case("decode_bandwidth", tmp_path)  # concurrency 16
    reason = diagnosis.inert_reason("max_num_seqs", 512)
    assert reason is not None and "16 requests" in reason
    assert diagnosis.inert_reason("max_num_seqs", 16) is not None
    assert diagnosis.inert_reason("max_num_seqs", 8) is None


def test_a_budget_above_the_largest_step_is_inert_and_a_full_one_is_not(tmp_path: Path
                                                                       ) -> None:
    decode = _case("decode_bandwidth", tmp_path)
    peak = decode.evidence["batch_tokens_peak"]
    assert decode.inert_reason("max_num_batched_tokens", 16384) is not None
    assert decode.inert_reason("max_num_batched_tokens", int(peak) - 1) is None
    budget = _case("token_budget", tmp_path)
    assert budget.inert_reason("max_num_batched_tokens", 16384) is None


def test_a_sixteen_bit_dtype_is_inert_on_a_gpu_and_float32_is_not(tmp_path: Path) -> None:
    diagnosis = _case("decode_bandwidth", tmp_path)
    assert diagnosis.inert_reason("dtype", "bfloat16") is not None
    assert diagnosis.inert_reason("dtype", "float16") is not None
    assert diagnosis.inert_reason("dtype", "float32") is None


def _diagnosed(exp: int, recipe_id: str, diagnosis: Diagnosis) -> ExperimentRecord:
    return ExperimentRecord(exp=exp, recipe={}, recipe_id=recipe_id, parent_id=None,
                            generation=0, layer=1, status="ok",
                            started_at="t", finished_at="t", diagnosis=diagnosis)


def test_once_another_config_leads_only_what_the_workload_fixes_still_holds(tmp_path: Path
                                                                          ) -> None:
    """A cap above the client's concurrency and the dtype auto resolves to stay nil
    whatever config leads; a KV cache that never filled or a step that never reached the
    token budget was read off the baseline's config."""
    diagnosis = _case("decode_bandwidth", tmp_path)
    assert {i.knob for i in diagnosis.inert} >= {"max_num_seqs", "gpu_memory_utilization",
                                                 "max_num_batched_tokens", "dtype"}
    assert {i.knob for i in diagnosis.inert if i.standing} == {"max_num_seqs", "dtype"}
    failed = Diagnosis(binding="boot", why="out of memory")
    records = [_diagnosed(0, "base", diagnosis), _diagnosed(1, "other", failed)]
    assert in_force(records, "base") == diagnosis  # a later failed boot reads nothing
    moved = in_force(records, "kept")
    assert moved is not None and moved.binding == diagnosis.binding
    assert moved.inert_reason("max_num_seqs", 512) is not None
    assert moved.inert_reason("gpu_memory_utilization", 0.95) is None
    assert moved.inert_reason("max_num_batched_tokens", 16384) is None
    assert moved.inert_reason("dtype", "bfloat16") is not None
    assert in_force(records[1:], "other") is None


# -- a real server's counters -------------------------------------------------------------


def _metrics(server: dict[str, float], *, ttft_ms: float = 100.0, e2e_ms: float = 1000.0
             ) -> BenchMetrics:
    return BenchMetrics(completed=10, duration_s=10.0, input_tokens=1000, output_tokens=1000,
                        request_throughput=1.0, output_throughput=100.0,
                        total_token_throughput=200.0, ttft_ms=LatencyStats(mean=ttft_ms),
                        e2e_ms=LatencyStats(mean=e2e_ms), server=server)


def test_time_outside_the_engine_blames_the_client(tmp_path: Path) -> None:
    space, workload = _space(), _workload(tmp_path, 10, 60, 100)
    recipe = space.baseline(LLAMA_8B)
    # ten requests of 1 s each at the client; the engine accounts for 4 s of them
    slow_client = _metrics({"queue_time_s": 0.0, "prefill_time_s": 0.4, "decode_time_s": 3.6})
    busy_engine = _metrics({"queue_time_s": 0.0, "prefill_time_s": 1.0, "decode_time_s": 8.9})
    assert diagnose("ok", "", slow_client, recipe, space, workload.stats, 8).binding == "client"
    assert diagnose("ok", "", busy_engine, recipe, space, workload.stats, 8).binding \
        == "decode_bandwidth"


def test_without_server_counters_the_latency_split_decides(tmp_path: Path) -> None:
    space, workload = _space(), _workload(tmp_path, 10, 60, 100)
    recipe = space.baseline(LLAMA_8B)
    long_ttft = _metrics({}, ttft_ms=800.0, e2e_ms=1000.0)
    short_ttft = _metrics({}, ttft_ms=100.0, e2e_ms=1000.0)
    assert diagnose("ok", "", long_ttft, recipe, space, workload.stats, 8).binding \
        == "prefill_compute"
    assert diagnose("ok", "", short_ttft, recipe, space, workload.stats, 8).binding \
        == "decode_bandwidth"


def test_a_cache_size_that_holds_every_request_in_flight_proves_memory_inert(
        tmp_path: Path) -> None:
    """vLLM shows no peak usage, only its cache size (cache_config_info): demand at the
    workload's p99 length times the requests in flight decides."""
    space, workload = _space(), _workload(tmp_path, 10, 60, 100)
    recipe = space.baseline(LLAMA_8B)
    need = 8 * (workload.stats.input_tokens.p99 + workload.stats.output_tokens.p99)
    big = diagnose("ok", "", _metrics({"kv_cache_capacity_tokens": need * 2}), recipe, space,
                   workload.stats, 8)
    small = diagnose("ok", "", _metrics({"kv_cache_capacity_tokens": need / 2}), recipe,
                     space, workload.stats, 8)
    assert big.inert_reason("gpu_memory_utilization", 0.95) is not None
    assert small.inert_reason("gpu_memory_utilization", 0.95) is None


def test_preemptions_bind_the_kv_cache_whatever_else_was_seen(tmp_path: Path) -> None:
    space, workload = _space(), _workload(tmp_path, 10, 60, 100)
    m = _metrics({"num_preemptions": 3.0, "kv_cache_capacity_tokens": 1e9})
    d = diagnose("ok", "", m, space.baseline(LLAMA_8B), space, workload.stats, 8)
    assert d.binding == "kv_capacity"
    assert d.inert_reason("gpu_memory_utilization", 0.95) is None


@given(st.sampled_from(["auto", "bfloat16", "float16", "float32"]))
def test_dtype_synonyms_follow_what_auto_resolves_to(value: str) -> None:
    h100, t4 = _space("H100"), _space("T4")
    assert ("bfloat16" in synonyms(h100, "dtype", value)) == (value == "auto")
    assert ("auto" in synonyms(h100, "dtype", value)) == (value == "bfloat16")
    assert ("auto" in synonyms(t4, "dtype", value)) == (value == "float16")


def test_fp8_kv_cache_names_are_one_value_on_nvidia_only() -> None:
    assert synonyms(_space("H100"), "kv_cache_dtype", "fp8") == ("fp8_e4m3",)
    assert synonyms(_space("H100"), "kv_cache_dtype", "fp8_e4m3") == ("fp8",)
    assert synonyms(_space("H100"), "kv_cache_dtype", "fp8_e5m2") == ()
    rocm = Hardware(device="rocm", gpus=(GpuInfo(index=0, name="MI300X", memory_mib=196608),))
    assert synonyms(KnobSpace(rocm, profile(LLAMA_8B), simulated=True), "kv_cache_dtype",
                    "fp8") == ()


@given(st.sampled_from([None, "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"]))
def test_an_unset_attention_backend_is_the_one_vllm_picks_here(value: str | None) -> None:
    """FLASH_ATTN on an H100 (compute capability 9.0), TRITON_ATTN on a T4 (7.5): naming
    it measures nothing new; any other backend is a move of its own."""
    h100, t4 = _space("H100"), _space("T4")
    assert (None in synonyms(h100, "attention_backend", value)) == (value == "FLASH_ATTN")
    assert ("FLASH_ATTN" in synonyms(h100, "attention_backend", value)) == (value is None)
    assert (None in synonyms(t4, "attention_backend", value)) == (value == "TRITON_ATTN")


def test_o3_is_o2_and_a_capture_size_is_its_default_for_the_recipes_seqs() -> None:
    space = _space("H100")
    base = space.baseline(LLAMA_8B)
    assert synonyms(space, "optimization_level", 3) == (2,)
    assert synonyms(space, "optimization_level", 1) == ()
    # default: min(512, 2 x max_num_seqs); the H100's max_num_seqs is 1024, so 512
    assert synonyms(space, "max_cudagraph_capture_size", 512, base) == (None,)
    assert synonyms(space, "max_cudagraph_capture_size", None, base) == (512,)
    small = space.apply(base, {"max_num_seqs": 64})
    assert synonyms(space, "max_cudagraph_capture_size", 128, small) == (None,)
    assert synonyms(space, "max_cudagraph_capture_size", 512, small) == ()
    assert synonyms(space, "max_cudagraph_capture_size", 512) == ()  # no recipe: unknown
