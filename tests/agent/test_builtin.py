"""The offline strategy: context fix, playbook moves, model-based search, learning from
crashes, determinism, and always-valid proposals (property test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.agent import AgentContext, Budget, BuiltinStrategy
from aevyra_forge.agent.moves import Move
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import (
    Diagnosis,
    ExperimentRecord,
    InertKnob,
    Layer,
    Proposal,
    Status,
)
from aevyra_forge.core.workload import load_workload
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import first_moves, load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD

PLAYBOOK = load_playbook()
WORKLOAD = load_workload(SAMPLE_WORKLOAD).stats
H100 = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)


def _rec(exp: int, recipe: Recipe, status: Status = "ok", score: float | None = 1.0,
         kept: bool = False, reason: str = "", layer: Layer = 1,
         changes: dict[str, Any] | None = None) -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.parent_id,
        generation=recipe.generation, layer=layer, status=status, reason=reason,
        score=score if status == "ok" else None, kept=kept,
        proposal=Proposal(rationale="t", layer=layer, changes=changes) if changes else None,
        started_at="t", finished_at="t")


def _ctx(space: KnobSpace, best: Recipe, history: list[ExperimentRecord], layer: Layer = 1,
         best_score: float | None = 1.0) -> AgentContext:
    return AgentContext(hardware=space.hw, workload=WORKLOAD, layer=layer, space=space,
                        best=best, best_score=best_score, history=tuple(history),
                        playbook=PLAYBOOK, budget=Budget(10, 1.0, None),
                        tried_ids=frozenset(r.recipe_id for r in history))


def test_a_context_that_does_not_fit_is_cut_to_what_the_workload_needs() -> None:
    base = H100.baseline(MODEL_8B)
    failed = _rec(0, base, "boot_failed", reason="... the estimated maximum model length "
                  "is 40960. Try increasing `gpu_memory_utilization` ...").model_copy(
                      update={"suggested_max_model_len": 40960})
    reply = BuiltinStrategy().propose(_ctx(H100, base, [failed], best_score=None))
    assert reply.proposal is not None
    value = reply.proposal.changes["max_model_len"]
    need = WORKLOAD.input_tokens.max + WORKLOAD.output_tokens.max
    assert isinstance(value, int) and need <= value <= 40960
    assert "40960" in reply.proposal.rationale


def test_playbook_first_moves_come_first_and_once() -> None:
    base = H100.baseline(MODEL_8B)
    strategy = BuiltinStrategy()
    history = [_rec(0, base, kept=True)]
    expected = [m for m in first_moves(PLAYBOOK)
                if all(KNOBS[k].layer == 1 for k in m)]
    first = strategy.propose(_ctx(H100, base, history)).proposal
    assert first is not None and "playbook" in first.rationale
    assert first.changes in [H100.validate(m) for m in expected if _valid(H100, m)]
    child = H100.apply(base, first.changes)
    history.append(_rec(1, child, score=0.99, changes=dict(first.changes)))
    second = strategy.propose(_ctx(H100, base, history)).proposal
    assert second is not None and second.changes != first.changes


def _valid(space: KnobSpace, move: dict[str, Any]) -> bool:
    try:
        space.validate(move)
    except Exception:
        return False
    return True


def test_crashes_mark_a_region_infeasible() -> None:
    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, kept=True)]
    for i, value in enumerate((0.92,), start=1):
        child = H100.apply(base, {"gpu_memory_utilization": value})
        history.append(_rec(i, child, "oom", changes={"gpu_memory_utilization": value}))
    strategy = BuiltinStrategy()
    tried: list[float] = []  # gpu_memory_utilization values proposed after the crash
    for _ in range(30):
        proposal = strategy.propose(_ctx(H100, base, history)).proposal
        if proposal is None:
            break
        value = proposal.changes.get("gpu_memory_utilization")
        if value is not None:
            tried.append(float(value))  # type: ignore[arg-type]
        child = H100.apply(base, proposal.changes)
        history.append(_rec(len(history), child, score=0.98, changes=dict(proposal.changes)))
    # the knob is still tuned below the crash (so the check is not vacuous), never at or
    # above it
    assert tried, "the strategy never proposed gpu_memory_utilization after the crash"
    assert max(tried) < 0.92, tried


def test_search_is_deterministic_and_eventually_exhausts_a_layer() -> None:
    base = H100.baseline(MODEL_8B)

    def play(seed: int) -> list[dict[str, Any]]:
        history = [_rec(0, base, kept=True)]
        moves = []
        for _ in range(60):
            proposal = BuiltinStrategy(seed=seed).propose(
                _ctx(H100, base, history, layer=3)).proposal
            if proposal is None:
                break
            moves.append(dict(proposal.changes))
            child = H100.apply(base, proposal.changes)
            history.append(_rec(len(history), child, score=0.97, layer=3,
                                changes=dict(proposal.changes)))
        return moves

    first, again = play(5), play(5)
    assert first == again
    assert 0 < len(first) < 60  # it stops once nothing is worth trying
    assert len({tuple(sorted(m.items())) for m in first}) == len(first)


def test_a_winning_direction_is_followed() -> None:
    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, kept=True)]
    used = [m for m in first_moves(PLAYBOOK) if all(KNOBS[k].layer == 1 for k in m)]
    for m in used:  # spend the playbook moves as losers
        if _valid(H100, m) and H100.apply(base, m).id != base.id:
            history.append(_rec(len(history), H100.apply(base, m), score=0.97,
                                changes=H100.validate(m)))
    winner = H100.apply(base, {"max_num_batched_tokens": 16384})
    history.append(_rec(len(history), winner, score=1.2, kept=True,
                        changes={"max_num_batched_tokens": 16384}))
    proposal = BuiltinStrategy().propose(_ctx(H100, winner, history, best_score=1.2)).proposal
    assert proposal is not None
    assert proposal.changes == {"max_num_batched_tokens": 32768}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["ok", "ok", "oom", "crash", "boot_failed"]),
                          st.floats(0.5, 1.5), st.integers(0, 10_000)), max_size=8),
       st.sampled_from([1, 2, 3]), st.integers(0, 3))
def test_proposals_are_always_valid_fresh_and_in_layer(
        outcomes: list[tuple[str, float, int]], layer: int, seed: int) -> None:
    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, kept=True)]
    strategy = BuiltinStrategy(seed=seed)
    for status, score, _ in outcomes:
        proposal = strategy.propose(_ctx(H100, base, history, layer=layer)).proposal  # type: ignore[arg-type]
        if proposal is None:
            assert len(history) > 1, "nothing proposed from a fresh baseline"
            break
        assert proposal.layer == layer
        assert H100.validate(proposal.changes, layer) == proposal.changes  # type: ignore[arg-type]
        child = H100.apply(base, proposal.changes)
        assert child.id not in {r.recipe_id for r in history} and child.id != base.id
        history.append(_rec(len(history), child, status, score,  # type: ignore[arg-type]
                            layer=layer, changes=dict(proposal.changes)))  # type: ignore[arg-type]


def test_cpu_first_moves_use_cpu_knobs(tmp_path: Path) -> None:
    from aevyra_forge.core.values import Hardware

    cpu = KnobSpace(Hardware(device="cpu", cpu_cores=2, memory_gib=24),
                    profile(MODEL_8B), simulated=False)
    base = cpu.baseline(MODEL_8B)
    proposal = BuiltinStrategy().propose(_ctx(cpu, base, [_rec(0, base, kept=True)])).proposal
    assert proposal is not None
    for knob in proposal.changes:
        assert KNOBS[knob].allowed_on(cpu.hw)


def test_never_proposes_a_combination_vllm_rejects() -> None:
    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, kept=True)]
    strategy = BuiltinStrategy()
    checked = 0
    for _ in range(25):
        proposal = strategy.propose(_ctx(H100, base, history)).proposal
        if proposal is None:
            break
        child = H100.apply(base, proposal.changes)
        H100.check_combination(child)  # raises if the strategy proposed an invalid pair
        checked += 1
        history.append(_rec(len(history), child, score=0.98, changes=dict(proposal.changes)))
    assert checked > 0, "the strategy proposed nothing, so no combination was checked"


# -- the baseline's diagnosis ---------------------------------------------------------------

ROOMY = Diagnosis(  # the long-context run at concurrency 32 on one GPU
    binding="decode_bandwidth", why="decode takes 80% of request time",
    inert=(InertKnob(knob="max_num_seqs", at_least=32, reason="at most 32 in flight",
                     standing=True),
           InertKnob(knob="gpu_memory_utilization", reason="the KV cache never filled"),
           InertKnob(knob="dtype", values=("bfloat16", "float16"), reason="16-bit here",
                     standing=True)))


def _drive(space: KnobSpace, diagnosis: Diagnosis | None, layers: tuple[Layer, ...],
           steps: int = 30, kept: Move | None = None) -> list[Proposal]:
    """Ask the strategy layer by layer, every move measured as no change, until each layer
    has nothing left: the moves it spends boots on (from the baseline, or from the config
    a first move `kept` made the incumbent)."""
    base = space.baseline(MODEL_8B)
    history = [_rec(0, base, kept=True).model_copy(update={"diagnosis": diagnosis})]
    if kept is not None:
        base = space.apply(base, kept)
        history.append(_rec(1, base, kept=True, score=1.05, changes=kept))
    out: list[Proposal] = []
    strategy = BuiltinStrategy()
    for layer in layers:
        for _ in range(steps):
            proposal = strategy.propose(_ctx(space, base, history, layer=layer)).proposal
            if proposal is None:
                break
            out.append(proposal)
            child = space.apply(base, proposal.changes)
            history.append(_rec(len(history), child, score=1.0, layer=layer,
                                changes=dict(proposal.changes)).model_copy(
                                    update={"proposal": proposal}))
    return out


def test_moves_the_diagnosis_proves_nil_are_skipped_with_the_reason() -> None:
    moves = _drive(H100, ROOMY, (1,))
    for move in moves:
        for name, value in move.changes.items():
            assert ROOMY.inert_reason(name, value) is None, move
    said = " ".join(m.rationale for m in moves)
    assert "gpu_memory_utilization=0.93 (the KV cache never filled)" in said
    assert "max_num_seqs=512, max_num_batched_tokens=16384 (at most 32 in flight)" in said
    assert said.count("gpu_memory_utilization=0.93 (") == 1  # recorded once, where skipped
    without = _drive(H100, None, (1,))  # control: the same strategy spends boots on them
    assert {"gpu_memory_utilization": 0.93} in [m.changes for m in without]


def test_once_another_config_leads_only_what_the_workload_fixes_is_skipped() -> None:
    """The KV cache that never filled was read off the baseline's config; a cap above the
    client's concurrency and the dtype auto resolves to hold for any config."""
    moves = _drive(H100, ROOMY, (1,), kept={"max_num_batched_tokens": 4096})
    said = " ".join(m.rationale for m in moves)
    standing = ROOMY.model_copy(update={"inert": (ROOMY.inert[0], ROOMY.inert[2])})
    for move in moves:
        # what vLLM requires to come with a move (a cap within a smaller token budget) is
        # named in its rationale and is not the move
        brought = move.rationale.split(" comes with it")[0].rsplit("(", 1)[-1] \
            if " comes with it" in move.rationale else ""
        for name, value in move.changes.items():
            if f"{name}={value}" not in brought:
                assert standing.inert_reason(name, value) is None, move
    assert "(at most 32 in flight)" in said
    assert "(the KV cache never filled)" not in said
    assert {"gpu_memory_utilization": 0.93} in [m.changes for m in moves]


def test_a_layer_whose_levers_are_all_off_escalates_at_once() -> None:
    client = Diagnosis(binding="client", why="open loop: the server kept up")
    assert _drive(H100, client, (1,)) == []
    assert _drive(H100, client, (2,)) != []  # the next layer still has its own levers


def test_fp8_and_fp8_e4m3_kv_caches_are_one_value_on_nvidia() -> None:
    moves = _drive(H100, ROOMY, (2,))
    kv = [m.changes["kv_cache_dtype"] for m in moves if "kv_cache_dtype" in m.changes]
    assert "fp8" in kv and "fp8_e4m3" not in kv


def test_a_round_gets_distinct_moves_none_of_them_pending() -> None:
    """Asked again with the round's chosen moves pending, the strategy never repeats one
    (neither a playbook move nor a search move)."""
    import dataclasses

    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, "ok", score=1.0, kept=True)]
    chosen: list[Proposal] = []
    ids: set[str] = set()
    layer: Layer = 3
    for _ in range(4):
        ctx = dataclasses.replace(_ctx(H100, base, history, layer=layer), want=4 - len(chosen),
                                  pending=tuple(chosen), pending_ids=frozenset(ids))
        reply = BuiltinStrategy(seed=0).propose(ctx)
        if reply.proposal is None:
            break
        recipe_id = H100.apply(base, dict(reply.proposal.changes)).id
        assert recipe_id not in ids
        ids.add(recipe_id)
        chosen.append(reply.proposal)
    assert len(chosen) >= 2
