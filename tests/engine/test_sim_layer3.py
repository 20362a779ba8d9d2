"""The dry-run simulator follows the wider search space: a kernel plug-in it cannot model
is neutral and says so in the record (or uses the plug-in's own estimate), speculative
decoding pays by acceptance (the trace's repetition) and concurrency, compilation settings
trade boot time for speed, a long-prefill cap helps short requests behind long ones, and
data-parallel replicas need their GPUs and add throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.engine.sim.engine import SimulatedEngine, capture_sizes
from aevyra_forge.space import plugins
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from tests.engine.test_sim_engine import (
    LLAMA_1B,
    LLAMA_8B,
    boot,
    make_engine,
    make_workload,
    run,
    short_rows,
)


def plugin_engine(speedup: float | None) -> tuple[SimulatedEngine, KnobSpace]:
    spec = gpu_spec("A100-80GB")
    hw = spec.hardware()
    cand = plugins.KernelCandidate(name="fast_attn", plugins=("fast_kernels",),
                                   proof="fast-kernels: loaded", speedup=speedup)
    space = KnobSpace(hw, profile(LLAMA_8B), simulated=True,
                      plugins=plugins.slot([cand], {}))
    return SimulatedEngine(hw, spec, profile(LLAMA_8B), space, noise_cv=0.0), space


def test_a_plugin_kernel_is_neutral_and_the_record_says_it_was_simulated(
        tmp_path: Path) -> None:
    engine, space = plugin_engine(None)
    wl = make_workload(tmp_path / "w.jsonl", short_rows(32))
    base = space.baseline(LLAMA_8B)
    chosen = space.apply(base, {"kernel_plugin": "fast_attn"})
    plain = engine.bench(boot(engine, base, tmp_path), wl, 8)
    outcome = engine.bench(boot(engine, chosen, tmp_path), wl, 8)
    assert outcome.status == "ok" and outcome.metrics is not None
    assert plain.metrics is not None
    assert outcome.metrics.output_throughput == plain.metrics.output_throughput
    assert "kernel plug-in fast_attn simulated as neutral" in outcome.reason
    assert plain.reason == ""
    assert "simulated as neutral" in (tmp_path / f"{chosen.id}.log").read_text()


def test_a_plugins_own_estimate_is_used(tmp_path: Path) -> None:
    engine, space = plugin_engine(1.25)
    wl = make_workload(tmp_path / "w.jsonl", short_rows(32))
    base = run(engine, space.baseline(LLAMA_8B), wl, 8, tmp_path)
    outcome = engine.bench(boot(engine, space.apply(space.baseline(LLAMA_8B), {
        "kernel_plugin": "fast_attn"}), tmp_path), wl, 8)
    assert outcome.metrics is not None and "own estimate (x1.25" in outcome.reason
    assert outcome.metrics.output_throughput > base.output_throughput * 1.15


def repetitive_rows(n: int, repeat: bool) -> list[dict[str, Any]]:
    """Prompts that quote themselves (a document and an edit of it) or do not."""
    def text(i: int) -> str:
        words = [f"w{i}_{j}" for j in range(80)]
        return " ".join(words + words) if repeat else " ".join(words * 1)
    return [{"prompt": text(i), "expected_output_tokens": 128} for i in range(n)]


def test_speculative_decoding_pays_with_repetition_at_low_concurrency(
        tmp_path: Path) -> None:
    engine, space = make_engine(model=LLAMA_1B)
    base = space.baseline(LLAMA_1B)
    ngram = space.apply(base, {"spec_method": "ngram"})
    assert space.value(ngram, space.get("spec_tokens")) == 3
    quoting = make_workload(tmp_path / "q.jsonl", repetitive_rows(8, True))
    chatty = make_workload(tmp_path / "c.jsonl", repetitive_rows(8, False))
    assert quoting.stats.ngram_repetition > 0.4 > chatty.stats.ngram_repetition
    plain = run(engine, base, quoting, 1, tmp_path).output_throughput
    quoted = run(engine, ngram, quoting, 1, tmp_path).output_throughput
    unquoted = run(engine, ngram, chatty, 1, tmp_path).output_throughput
    assert quoted > 1.5 * plain  # most proposals accepted: several tokens per step
    assert quoted > unquoted


def test_speculative_decoding_costs_at_high_concurrency(tmp_path: Path) -> None:
    engine, space = make_engine(model=LLAMA_8B)
    base = space.baseline(LLAMA_8B)
    wide = space.apply(space.apply(base, {"spec_method": "ngram"}), {"spec_tokens": 8})
    chatty = make_workload(tmp_path / "c.jsonl", repetitive_rows(512, False))
    plain = run(engine, base, chatty, 512, tmp_path).output_throughput
    assert run(engine, wide, chatty, 512, tmp_path).output_throughput < plain


def test_compilation_settings_trade_boot_time_for_speed(tmp_path: Path) -> None:
    engine, space = make_engine()
    wl = make_workload(tmp_path / "w.jsonl", short_rows(64))
    base = space.baseline(LLAMA_8B)
    o0 = space.apply(base, {"optimization_level": 0})
    small = space.apply(base, {"max_cudagraph_capture_size": 16})
    boots = {name: boot(engine, r, tmp_path).boot_s for name, r in
             (("base", base), ("o0", o0), ("small", small))}
    assert boots["o0"] < boots["small"] < boots["base"]
    assert run(engine, o0, wl, 32, tmp_path).output_throughput < run(
        engine, base, wl, 32, tmp_path).output_throughput
    # a capture size below the batch the workload reaches runs that batch without graphs
    assert run(engine, small, wl, 32, tmp_path).output_throughput < run(
        engine, base, wl, 32, tmp_path).output_throughput
    assert capture_sizes(512) == 51 and capture_sizes(16) == 5


def test_a_long_prefill_cap_lets_short_requests_overtake_long_ones(tmp_path: Path) -> None:
    engine, space = make_engine(model=LLAMA_8B)
    rows = []
    for i in range(24):
        words = 6000 if i % 4 == 0 else 20
        rows.append({"prompt": f"Doc {i}: " + " ".join(f"t{i}_{j}" for j in range(words)),
                     "expected_output_tokens": 64})
    wl = make_workload(tmp_path / "mixed.jsonl", rows)
    base = space.apply(space.baseline(LLAMA_8B), {"max_num_batched_tokens": 16384})
    capped = space.apply(base, {"long_prefill_token_threshold": 512})
    free_ttft = run(engine, base, wl, 24, tmp_path).ttft_ms.p50
    capped_ttft = run(engine, capped, wl, 24, tmp_path).ttft_ms.p50
    assert capped_ttft < free_ttft


def test_replicas_need_their_gpus_and_add_throughput(tmp_path: Path) -> None:
    _, space1 = make_engine("H100", model=LLAMA_8B, count=1)
    assert "data_parallel_size" not in [k.name for k in space1.knobs()]
    two, space2 = make_engine("H100", model=LLAMA_8B, count=2)
    assert space2.choices(space2.get("data_parallel_size")) == (1, 2)
    wl = make_workload(tmp_path / "w.jsonl", short_rows(512))
    base = space2.baseline(LLAMA_8B)
    dp2 = space2.apply(base, {"data_parallel_size": 2})
    single = run(two, base, wl, 512, tmp_path).output_throughput
    assert run(two, dp2, wl, 512, tmp_path).output_throughput > 1.5 * single
    too_many = space2.apply(dp2, {"tensor_parallel_size": 2})
    with pytest.raises(Exception, match="needs more than the 2 GPUs"):
        space2.check_combination(too_many)
    failed = two.launch(too_many, tmp_path / "tm.log")
    assert isinstance(failed, LaunchFailure) and failed.status == "boot_failed"


def test_a_known_eagle_head_pays_on_chat_where_ngram_does_not(tmp_path: Path) -> None:
    spec = gpu_spec("A100-80GB")
    hw = spec.hardware()
    space = KnobSpace(hw, profile(LLAMA_8B), simulated=True,
                      drafts={"eagle3": "org/eagle3-head"})
    engine = SimulatedEngine(hw, spec, profile(LLAMA_8B), space, noise_cv=0.0)
    chatty = make_workload(tmp_path / "c.jsonl", repetitive_rows(8, False))
    base = space.baseline(LLAMA_8B)
    eagle = space.apply(base, {"spec_method": "eagle3"})
    ngram = space.apply(base, {"spec_method": "ngram"})
    plain = run(engine, base, chatty, 4, tmp_path).output_throughput
    assert run(engine, eagle, chatty, 4, tmp_path).output_throughput > 1.5 * plain
    assert run(engine, ngram, chatty, 4, tmp_path).output_throughput < 1.1 * plain
