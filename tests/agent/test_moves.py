"""The builtin strategy's moves: the open layers (the active one and those before it),
explicit defaults and other synonyms counted as the value they select, and the
diagnosis's off-lever rule lapsing once the incumbent is no longer the config diagnosed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aevyra_forge.agent import AgentContext, Budget
from aevyra_forge.agent.moves import (
    candidates,
    fresh,
    layer_of,
    off_lever,
    open_layers,
    same_kernels,
)
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Diagnosis, ExperimentRecord, Layer, Proposal
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD

WORKLOAD = load_workload(SAMPLE_WORKLOAD).stats
H100 = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)
DECODE = Diagnosis(binding="decode_bandwidth", why="decode takes 94% of request time")


def _rec(exp: int, recipe: Recipe, kept: bool = True, diagnosis: Diagnosis | None = None,
         changes: dict[str, Any] | None = None) -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.parent_id,
        generation=recipe.generation, layer=1, status="ok", score=1.0, kept=kept,
        proposal=Proposal(rationale="t", layer=1, changes=changes) if changes else None,
        started_at="t", finished_at="t", diagnosis=diagnosis)


def _ctx(best: Recipe, history: list[ExperimentRecord], layer: Layer = 1) -> AgentContext:
    return AgentContext(hardware=H100.hw, workload=WORKLOAD, layer=layer, space=H100,
                        best=best, best_score=1.0, history=tuple(history),
                        playbook=load_playbook(), budget=Budget(10, 1.0, None),
                        tried_ids=frozenset(r.recipe_id for r in history))


def test_a_later_layer_keeps_the_earlier_ones_open_and_the_next_one_closed() -> None:
    base = H100.baseline(MODEL_8B)
    ctx = _ctx(base, [_rec(0, base)], layer=2)
    assert open_layers(ctx) == (1, 2)
    layers = {KNOBS[k].layer for move in candidates(ctx, open_layers(ctx)) for k in move}
    assert layers == {1, 2}
    assert layer_of({"max_num_batched_tokens": 2048, "kv_cache_dtype": "fp8"}) == 2


def test_explicit_defaults_are_not_fresh_once_the_default_was_measured() -> None:
    """On an H100 vLLM picks FLASH_ATTN, runs -O3 as -O2 and captures up to 512: naming
    any of them measures the baseline again; another backend is a move."""
    base = H100.baseline(MODEL_8B)
    ctx = _ctx(base, [_rec(0, base)], layer=3)
    assert not fresh(ctx, {"attention_backend": "FLASH_ATTN"})
    assert not fresh(ctx, {"optimization_level": 3})
    assert not fresh(ctx, {"max_cudagraph_capture_size": 512})
    assert fresh(ctx, {"attention_backend": "FLASHINFER"})
    assert fresh(ctx, {"max_cudagraph_capture_size": 64})


def test_the_off_lever_rule_lapses_once_a_move_was_kept() -> None:
    """Decode-bound at the baseline, the token budget does not act on what binds; once
    speculative decoding was kept, the engine verifies drafts in larger steps and the
    baseline's diagnosis no longer rules the budget out."""
    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, diagnosis=DECODE)]
    move = {"max_num_batched_tokens": 2048}
    assert off_lever(_ctx(base, history), move) is not None
    spec = H100.apply(base, {"spec_method": "suffix"})
    history.append(_rec(1, spec, changes={"spec_method": "suffix"}))
    assert off_lever(_ctx(spec, history), move) is None
    assert off_lever(_ctx(base, history), move) is not None  # still the config diagnosed


def test_another_checkpoint_of_the_incumbents_method_is_no_speed_move() -> None:
    """Once a W8A8 Hub copy serves, forge's own W8A8 checkpoints run the same kernels (a
    calibrated one would cost minutes to write for accuracy the keep rule does not
    reward); another method is still a move, and from the baseline every candidate is."""
    space = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)
    sim_layer2.offer(MODEL_8B, space, lambda _: None)
    hub = space.apply(space.baseline(MODEL_8B), {
        "quant_candidate": "hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"})
    ctx = replace(_ctx(hub, []), space=space)
    for name in ("rtn-w8a8", "cal-w8a8"):
        why = same_kernels(ctx, {"quant_candidate": name})
        assert why is not None and why.startswith("serves w8a8_int8 as the incumbent's hub:")
    assert same_kernels(ctx, {"quant_candidate": "rtn-fp8"}) is None
    assert same_kernels(ctx, {"max_num_seqs": 64}) is None
    base = replace(ctx, best=space.baseline(MODEL_8B))
    assert all(same_kernels(base, {"quant_candidate": c.name}) is None
               for c in space.quant_candidates)
