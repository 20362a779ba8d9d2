"""The prompt: the playbook and reply format as the system message; every fact the agent
needs in the user message (hardware, memory budget, workload, layer, knobs with ranges and
defaults, best recipe, history with metrics and failures, budget, feedback); and history
compressed to the token budget without losing the latest rows or the failures."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.agent import AgentContext, Budget
from aevyra_forge.agent.prompt import USER_BUDGET_TOKENS, build_prompt
from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.settings import Objective
from aevyra_forge.core.slo import Slo, parse_slo
from aevyra_forge.core.values import (
    BenchMetrics,
    Diagnosis,
    ExperimentRecord,
    InertKnob,
    LatencyStats,
    Layer,
    Proposal,
    Status,
)
from aevyra_forge.core.workload import estimate_tokens, load_workload
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD

PLAYBOOK = load_playbook()
WORKLOAD = load_workload(SAMPLE_WORKLOAD).stats
A100 = KnobSpace(gpu_spec("A100-80GB").hardware(), profile(MODEL_8B), simulated=True)
BASE = A100.baseline(MODEL_8B)


def _metrics(tput: float) -> BenchMetrics:
    return BenchMetrics(
        completed=50, failed=1, duration_s=10.0, input_tokens=9000, output_tokens=8000,
        request_throughput=5.0, output_throughput=tput, total_token_throughput=tput * 2,
        ttft_ms=LatencyStats(mean=80, p50=70, p90=150, p99=412.0),
        tpot_ms=LatencyStats(mean=20, p50=19, p90=25, p99=31.5),
        e2e_ms=LatencyStats(mean=2000, p50=1900, p90=3000, p99=5123.0),
        server={"num_preemptions": 17.0, "prefix_cache_hit_rate": 0.42})


def _rec(exp: int, changes: dict[str, Any] | None, status: Status = "ok",
         score: float | None = 1.0, kept: bool = False, reason: str = "",
         layer: Layer = 1) -> ExperimentRecord:
    refused = status in ("invalid", "duplicate")
    recipe = A100.apply(BASE, changes) if changes and not refused else BASE
    ok = status == "ok"
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=BASE.id,
        generation=recipe.generation, layer=layer, status=status, reason=reason,
        metrics=_metrics(1000.0 * (score or 1)) if ok else None, accuracy=1.0 if ok else None,
        score=score if ok else None, kept=kept, decision="kept" if kept else "reverted",
        proposal=Proposal(rationale=f"rationale {exp}", layer=layer, changes=changes)
        if changes else None,
        started_at="t", finished_at="t")


def _ctx(history: list[ExperimentRecord], best: Recipe = BASE, layer: Layer = 1,
         feedback: str | None = None, dollars: float | None = None,
         objective: Objective = "throughput", slo: Slo | None = None) -> AgentContext:
    return AgentContext(hardware=A100.hw, workload=WORKLOAD, layer=layer, space=A100,
                        best=best, best_score=1.0, history=tuple(history),
                        playbook=PLAYBOOK, budget=Budget(37, 9.5, dollars),
                        tried_ids=frozenset(r.recipe_id for r in history),
                        feedback=feedback, attempt=1 if feedback else 0,
                        objective=objective, slo=slo)


def test_system_is_the_playbook_and_the_reply_format() -> None:
    system = build_prompt(_ctx([])).system
    assert PLAYBOOK.text.strip() in system
    assert "## Reply format" in system
    for key in ("rationale", "layer", "changes", "expected_effect"):
        assert f'"{key}"' in system
    assert "never the model" in system


def test_user_message_carries_the_facts() -> None:
    best = A100.apply(BASE, {"max_num_seqs": 512})
    user = build_prompt(_ctx([_rec(0, None), _rec(1, {"max_num_seqs": 512}, score=1.21,
                                                  kept=True)], best=best)).user
    # hardware and memory budget: 8.03 B params in bf16 ~ 15.0 GiB; 128 KiB per token
    assert "A100" in user and "FP8 support: no" in user
    assert "weights ~15.0 GiB (none)" in user and "128 KiB per token" in user
    assert "gpu_memory_utilization 0.9" in user and "for the KV cache" in user
    assert WORKLOAD.summary() in user
    assert "## Active layer\n1 (config)" in user
    # knobs allowed now: type, range, default for this GPU class, the incumbent's value
    assert ("- max_num_seqs: int in [1, 4096]; default here 256; best recipe has 512."
            in user)
    assert "- enable_prefix_caching: bool (true or false); default here true" in user
    assert "kv_cache_dtype" not in user.split("## Best recipe")[0]  # layer 2 not offered
    assert f"id {best.id}, generation 1" in user and "max_num_seqs=512" in user
    assert "37 experiments, 9.5 GPU hours, LLM spend no cap" in user


def test_history_rows_have_metrics_counters_and_failures() -> None:
    history = [_rec(0, None), _rec(1, {"max_num_seqs": 512}, score=1.21, kept=True),
               _rec(2, {"gpu_memory_utilization": 0.95}, status="oom",
                    reason="CUDA out of memory in sampler warm-up"),
               _rec(3, {"max_num_seq": 1}, status="invalid", reason="unknown knob")]
    user = build_prompt(_ctx(history)).user
    assert "exp 0 [layer 1] baseline -> ok" in user
    row = next(line for line in user.splitlines() if line.startswith("exp 1 "))
    for needle in ("KEPT", "score 1.210", "output 1210.0 tok/s", "TTFT p99 412 ms",
                   "TPOT p99 31.5 ms", "E2E p99 5123 ms", "accuracy 1.000",
                   "failed requests 1", "num_preemptions 17", "prefix_cache_hit_rate 0.42",
                   "rationale: rationale 1"):
        assert needle in row, needle
    assert ("exp 2 [layer 1] gpu_memory_utilization=0.95 -> oom: CUDA out of memory in "
            "sampler warm-up") in user
    assert "exp 3 [layer 1] max_num_seq=1 -> invalid (refused before booting)" in user


SLO = parse_slo("ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s,itl_p90<40ms")


def _objective_section(user: str) -> str:
    return user.split("## Objective: ", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize(("objective", "metric"), [
    ("throughput", "Score = output tokens per second, relative to the baseline's"),
    ("latency", "Score = 1000 / p99 end-to-end (E2E) request latency in ms, relative to "
                "the baseline's"),
    ("goodput", "Score = goodput, the requests per second that met every per-request SLO "
                "bound, relative to the baseline's"),
])
def test_the_prompt_states_the_metric_actually_scored(objective: Objective,
                                                      metric: str) -> None:
    user = build_prompt(_ctx([_rec(0, None)], objective=objective, slo=SLO)).user
    section = _objective_section(user)
    assert section.startswith(f"{objective}\n{metric}")
    if objective != "throughput":  # no claim anywhere that throughput is what counts
        assert "throughput" not in section and "tokens per second" not in section
        assert not any(line.startswith("Score") and "throughput" in line
                       for line in user.splitlines())


def test_the_objective_defaults_to_throughput() -> None:
    assert _objective_section(build_prompt(_ctx([])).user).startswith(
        "throughput\nScore = output tokens per second")


def test_the_prompt_states_the_runs_minimum_improvement() -> None:
    ctx = replace(_ctx([]), min_improvement=0.025)
    assert "by more than the minimum improvement (+2.5%, judged over repeated bench " \
        "passes)" in _objective_section(build_prompt(ctx).user)


def test_slo_bounds_reach_the_prompt() -> None:
    section = _objective_section(build_prompt(_ctx([], objective="latency", slo=SLO)).user)
    assert "meets every SLO below" in section
    assert ("SLOs (each bound tested on its median over the bench passes): ttft_p99<500ms, "
            "tpot_p99<50ms, e2e_p99<10s, itl_p90<40ms") in section
    assert "counts toward goodput" not in section
    goodput = _objective_section(build_prompt(_ctx([], objective="goodput", slo=SLO)).user)
    # ITL is pooled over requests, so only TTFT, TPOT and E2E bound a single request
    assert ("A request counts toward goodput when its TTFT <500ms, its TPOT <50ms and its "
            "E2E <10s.") in goodput
    assert "SLO" not in build_prompt(_ctx([])).user


def test_feedback_and_dollars() -> None:
    user = build_prompt(_ctx([], feedback="repeat of experiment 4 (recipe abc)",
                             dollars=0.4321)).user
    assert "## Your previous proposal was refused\nrepeat of experiment 4" in user
    assert "LLM spend $0.4321" in user
    assert "refused" not in build_prompt(_ctx([])).user


def test_long_history_is_compressed_within_budget() -> None:
    history = [_rec(0, None)]
    for i in range(1, 300):
        if i % 50 == 0:
            history.append(_rec(i, {"gpu_memory_utilization": 0.97}, status="oom",
                                reason="out of memory under load"))
        else:
            history.append(_rec(i, {"max_num_seqs": 8 + i}, score=1.0 + i / 1000,
                                kept=i % 30 == 0))
    short = build_prompt(_ctx(history)).user  # the default budget: one line each
    assert estimate_tokens(short) <= USER_BUDGET_TOKENS
    assert "exp 50 L1 gpu_memory_utilization=0.97: oom (out of memory under load)" in short
    user = build_prompt(_ctx(history), budget_tokens=3000).user  # tighter: folded
    assert estimate_tokens(user) <= 3000
    assert "## Experiment history (300 so far" in user
    assert "exp 299 [layer 1] max_num_seqs=307 -> ok" in user  # the latest, in full
    assert "Experiments 0-" in user and "in brief: " in user  # the oldest, aggregated
    assert "Failed (do not retry these or values beyond them): " \
           "gpu_memory_utilization=0.97 (oom)" in user
    assert "max_num_seqs=38 (1.030)" in user  # a kept step from the folded part


def test_short_history_is_all_in_full() -> None:
    history = [_rec(i, {"max_num_seqs": 8 + i} if i else None) for i in range(6)]
    user = build_prompt(_ctx(history)).user
    assert "in brief" not in user and "one line each" not in user
    assert all(f"exp {i} [layer 1]" in user for i in range(6))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=0, max_value=250),
       budget=st.integers(min_value=2500, max_value=8000),
       failing=st.sampled_from(["oom", "crash", "boot_failed", "timeout"]))
def test_any_history_fits_and_keeps_the_latest(n: int, budget: int, failing: Status) -> None:
    history = [_rec(i, {"max_num_seqs": 8 + i} if i else None,
                    status=failing if i % 7 == 3 else "ok",
                    reason="x" * 300, kept=i % 11 == 0) for i in range(n)]
    user = build_prompt(_ctx(history), budget_tokens=budget).user
    head = build_prompt(_ctx([]), budget_tokens=budget).user
    # The budget holds whenever the fixed sections plus three full rows (and the history's
    # title and labels, ~20 tokens) fit in it.
    if estimate_tokens(head) + 3 * 120 + 20 <= budget:
        assert estimate_tokens(user) <= budget
    if n:
        assert f"exp {n - 1} [layer 1]" in user


def test_the_baselines_diagnosis_is_shown_with_the_knobs_that_cannot_matter() -> None:
    diagnosis = Diagnosis(binding="kv_capacity", why="KV cache peaked at 99% with 40 preemptions",
                          inert=(InertKnob(knob="max_num_seqs", at_least=32,
                                           reason="at most 32 requests are ever in flight"),))
    user = build_prompt(_ctx([_rec(0, None).model_copy(update={"diagnosis": diagnosis})])).user
    assert "## What bound experiment 0" in user
    assert "binding: kv capacity (KV cache peaked at 99% with 40 preemptions)" in user
    assert "max_num_seqs >= 32 cannot matter: at most 32 requests are ever in flight" in user
    assert "What bound" not in build_prompt(_ctx([_rec(0, None)])).user  # control
    assert "another config now" not in user


def test_once_another_config_leads_the_prompt_says_which_knobs_still_cannot_matter() -> None:
    diagnosis = Diagnosis(binding="decode_bandwidth", why="decode takes 80% of request time",
                          inert=(InertKnob(knob="max_num_seqs", at_least=32, standing=True,
                                           reason="at most 32 requests are ever in flight"),
                                 InertKnob(knob="gpu_memory_utilization",
                                           reason="the KV cache never filled")))
    kept = _rec(1, {"max_num_batched_tokens": 1024}, kept=True)
    history = [_rec(0, None).model_copy(update={"diagnosis": diagnosis}), kept]
    user = build_prompt(_ctx(history, best=recipe_from_dict(kept.recipe))).user
    assert "of these only max_num_seqs still cannot matter (fixed by the workload or the " \
        "hardware)" in user
    alone = diagnosis.model_copy(update={"inert": diagnosis.inert[1:]})
    history[0] = history[0].model_copy(update={"diagnosis": alone})
    user = build_prompt(_ctx(history, best=recipe_from_dict(kept.recipe))).user
    assert "none of these knobs is ruled out any more" in user


def test_layer_two_lists_each_candidate_with_its_cost_and_what_the_cpu_refuses() -> None:
    """A CPU without AVX-512: the candidates forge built, each with what it costs, one
    refused at boot, and what this instruction set cannot serve."""
    from aevyra_forge.core.values import Hardware
    from aevyra_forge.space.layer2 import QuantCandidate
    cpu = Hardware(device="cpu", cpu_cores=2, memory_gib=16, cpu_isa=("avx2",))
    space = KnobSpace(cpu, profile(MODEL_8B))
    space.offer_quant([
        QuantCandidate(name="hub:org/m-w8a8", kind="hub", method="w8a8_int8", bits=8,
                       checkpoint="org/m-w8a8", download_bytes=2**31),
        QuantCandidate(name="rtn-w8a8", kind="rtn", method="w8a8_int8", bits=8,
                       checkpoint="/q/w8a8", prepare_s=90.0),
        QuantCandidate(name="rtn-fp8", kind="rtn", method="fp8", bits=8,
                       checkpoint="/q/fp8", prepare_s=90.0)])
    base = space.baseline(MODEL_8B)
    space.refuse_quant(space.apply(base, {"quant_candidate": "rtn-fp8"}),
                       "unsupported on this hardware: no fp8 kernel")
    ctx = AgentContext(hardware=cpu, workload=WORKLOAD, layer=2, space=space, best=base,
                       best_score=1.0, history=(), playbook=PLAYBOOK,
                       budget=Budget(10, 2.0, None), tried_ids=frozenset())
    user = build_prompt(ctx).user
    assert "- quant_candidate: one of none, hub:org/m-w8a8, rtn-w8a8;" in user
    assert "  - hub:org/m-w8a8: w8a8_int8, 8-bit; download ~2.00 GiB" in user
    assert "  - rtn-w8a8: w8a8_int8, 8-bit; ~1.5 min to write before its boot" in user
    assert "rtn-fp8:" not in user.split("Not possible")[0]
    refused = user.split("Not possible on this hardware (do not propose): ")[1]
    assert refused.startswith("w4a16 checkpoints: this CPU lacks avx512_bf16 + avx512f")
    assert "fp8 KV cache: this CPU lacks avx512f" in refused
    assert "rtn-fp8: refused when it booted here (unsupported on this hardware" in refused
    assert "Not possible" not in build_prompt(
        AgentContext(**{**ctx.__dict__, "layer": 1})).user


def test_layer_three_lists_each_kernel_plugin_with_its_note() -> None:
    from aevyra_forge.space import plugins
    cand = plugins.KernelCandidate(name="fast_attn", plugins=("fast_kernels",),
                                   proof="fast-kernels: loaded", generator="fast_pkg",
                                   note="a generated attention kernel for head dim 128")
    space = KnobSpace(A100.hw, profile(MODEL_8B), simulated=True,
                      plugins=plugins.slot([cand], {}))
    booted = _rec(1, {"optimization_level": 0})
    unproven = _rec(2, {"kernel_plugin": "fast_attn"}, status="invalid", layer=3,
                    reason="invalid: kernel plug-in 'fast_attn' did not load").model_copy(
        update={"status": "boot_failed"})
    ctx = AgentContext(hardware=A100.hw, workload=WORKLOAD, layer=3, space=space, best=BASE,
                       best_score=1.0, history=(booted.model_copy(update={"boot_s": 41.0}),
                                                unproven.model_copy(update={"boot_s": 30.0})),
                       playbook=PLAYBOOK, budget=Budget(10, 2.0, None), tried_ids=frozenset())
    user = build_prompt(ctx).user
    assert "- kernel_plugin: one of none, fast_attn; default here none;" in user
    assert "  - fast_attn (from fast_pkg): a generated attention kernel for head dim 128" in user
    assert "boot 41 s" in user  # compilation settings are judged on their boot time too
    assert "exp 2 [layer 3] kernel_plugin=fast_attn -> boot_failed: invalid: kernel " \
           "plug-in 'fast_attn' did not load" in user
    layer1 = build_prompt(AgentContext(**{**ctx.__dict__, "layer": 1})).user
    assert "- spec_method: one of null, ngram, suffix; default here unset;" in layer1
    assert "prompt 3-gram repetition" in layer1  # what n-gram speculation could copy
    assert "found on the Hub" not in layer1
    space.offer_drafts({"eagle3": "org/eagle3-head"})  # a head the Hub lookup found
    layer1 = build_prompt(AgentContext(**{**ctx.__dict__, "layer": 1})).user
    assert "- spec_method: one of null, ngram, suffix, eagle3; default here unset;" in layer1
    assert "  - eagle3: runs org/eagle3-head (found on the Hub for this model; spec_model " \
           "follows)" in layer1
