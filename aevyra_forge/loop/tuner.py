"""The tuning loop (SPEC §4). ONE loop serves `tune` and `tune resume`: its state is
always rebuilt by replaying the run's experiments.jsonl, so the only difference between
the two is whether the log starts empty. It talks to the engine, the agent and the store
through small Protocols."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aevyra_forge.agent import AgentContext, Budget, BudgetExceeded, Proposer
from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import (
    BenchMetrics,
    BenchOutcome,
    ExperimentRecord,
    Hardware,
    LaunchFailure,
    Layer,
    LLMUsage,
    Proposal,
    QualityScore,
    Status,
)
from aevyra_forge.core.workload import Workload
from aevyra_forge.decide.verdict import judge
from aevyra_forge.measure.client import median_pass
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.playbook import Playbook

MAX_ASKS = 3  # proposals refused before spending an experiment, then one row records why


class Server(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def boot_s(self) -> float: ...


class Launcher(Protocol):
    def launch(self, recipe: Recipe, log_path: Path) -> Server | LaunchFailure: ...
    def stop(self, server: Any) -> None: ...


class Benchmarker(Protocol):
    def bench(self, server: Any, workload: Workload, concurrency: int,
              passes: int = 1, slo: Slo | None = None) -> BenchOutcome: ...


class QualityProbe(Protocol):
    """Accuracy against the baseline: `reference` captures the baseline's outputs (kept in
    its record, so resume has them), `accuracy` scores another config against them."""

    def reference(self, server: Any) -> dict[str, Any] | None: ...
    def accuracy(self, server: Any, reference: dict[str, Any] | None
                 ) -> QualityScore | None: ...


class RunLog(Protocol):
    path: Path

    def append(self, record: ExperimentRecord) -> None: ...
    def records(self) -> list[ExperimentRecord]: ...
    def write_tables(self, records: Sequence[ExperimentRecord]) -> None: ...
    def write_best(self, recipe_yaml: str) -> None: ...
    def complete(self, summary: dict[str, Any]) -> None: ...
    def log_path(self, exp: int) -> Path: ...
    def close(self) -> None: ...


class Observer(Protocol):
    def event(self, kind: str, **data: Any) -> None: ...


class _Silent:
    def event(self, kind: str, **data: Any) -> None:
        del kind, data


@dataclass
class Engine:
    launcher: Launcher
    benchmarker: Benchmarker
    quality: QualityProbe


@dataclass
class LoopState:
    """What the loop knows, derived from the records alone."""

    records: list[ExperimentRecord]
    baseline: Recipe
    best: Recipe = field(init=False)
    best_score: float | None = field(init=False, default=None)
    reference: BenchMetrics | None = field(init=False, default=None)
    quality_reference: dict[str, Any] | None = field(init=False, default=None)
    best_passes: tuple[BenchMetrics, ...] = field(init=False, default=())
    best_measured_exp: int = field(init=False, default=0)  # the incumbent's latest boot

    def __post_init__(self) -> None:
        self.best = self.baseline
        for rec in self.records:
            self._absorb(rec)

    def _absorb(self, rec: ExperimentRecord) -> None:
        if rec.quality_reference is not None and self.quality_reference is None:
            self.quality_reference = rec.quality_reference
        if rec.kept and rec.metrics is not None:
            if self.reference is None:
                self.reference = rec.metrics
            self.best = recipe_from_dict(rec.recipe, source=f"experiment {rec.exp}")
            self.best_score = rec.score
        if rec.recipe_id == self.best.id and (rec.kept or rec.remeasure):
            self.best_measured_exp = rec.exp
            if rec.status == "ok" and rec.passes:
                self.best_passes = rec.passes

    def add(self, rec: ExperimentRecord) -> None:
        self.records.append(rec)
        self._absorb(rec)

    @property
    def tried_ids(self) -> frozenset[str]:
        return frozenset(r.recipe_id for r in self.records if r.status not in
                         ("invalid", "duplicate"))

    def spent_s(self) -> float:
        return sum((r.boot_s or 0.0) + (r.bench_s or 0.0) for r in self.records)

    def spent_usd(self) -> float:
        return sum(r.llm.cost_usd for r in self.records)

    def active_layer(self, settings: TuneSettings, exhausted: set[int]) -> Layer | None:
        """The layer to work on: the latest one reached, unless it has converged (patience
        or its cap spent) or its proposer ran out of ideas; then the next enabled one."""
        reached = max((r.layer for r in self.records[1:]), default=0)
        for layer in settings.layers():
            if layer < reached or layer in exhausted:
                continue
            rows = [r for r in self.records[1:] if r.layer == layer]
            cap = settings.layer_cap(layer)
            if cap is not None and len(rows) >= cap:
                continue
            trailing = 0
            for r in reversed(rows):
                if r.kept:
                    break
                trailing += 1
            if trailing >= settings.patience:
                continue
            return layer
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Tuner:
    """Runs experiments until a budget is spent or every layer has converged."""

    def __init__(self, settings: TuneSettings, hardware: Hardware, workload: Workload,
                 space: KnobSpace, playbook: Playbook, proposer: Proposer, engine: Engine,
                 run: RunLog, baseline: Recipe, observer: Observer | None = None) -> None:
        self.s = settings
        self.hw = hardware
        self.workload = workload
        self.space = space
        self.playbook = playbook
        self.proposer = proposer
        self.engine = engine
        self.run_log = run
        self.observer = observer or _Silent()
        self.state = LoopState(records=run.records(), baseline=baseline)
        self.exhausted: set[int] = set()
        self.unbilled = LLMUsage()  # LLM usage not yet attached to a recorded row

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> str:
        """Tune until done; returns why it stopped. KeyboardInterrupt propagates after the
        server in flight is torn down; the run stays resumable."""
        st = self.state
        self.observer.event("start", records=len(st.records))
        if not st.records:
            self._measure(0, self.state.baseline, 1, None, "", LLMUsage())
        while True:
            why = self._budget_spent()
            if why:
                break
            layer = st.active_layer(self.s, self.exhausted)
            if layer is None:
                why = "every layer converged"
                break
            try:
                self._step(layer)
            except BudgetExceeded as exc:
                why = str(exc)
                break
        self.run_log.complete({"reason": why, "experiments": len(st.records),
                               "best_recipe_id": st.best.id, "best_score": st.best_score,
                               "llm_cost_usd": self._spent_usd(),
                               "finished_at": _now()})
        self.observer.event("finish", reason=why, best=st.best, best_score=st.best_score)
        return why

    def _spent_usd(self) -> float:
        return self.state.spent_usd() + self.unbilled.cost_usd

    def _budget_spent(self) -> str | None:
        st = self.state
        if len(st.records) >= self.s.max_experiments:
            return f"experiment budget spent ({self.s.max_experiments})"
        if st.spent_s() >= self.s.max_hours * 3600:
            return f"time budget spent ({self.s.max_hours} h)"
        if self.s.max_dollars is not None and self._spent_usd() >= self.s.max_dollars:
            return f"LLM budget spent (${self.s.max_dollars:.2f})"
        return None

    def _context(self, layer: Layer, feedback: str | None, attempt: int) -> AgentContext:
        st = self.state
        return AgentContext(
            hardware=self.hw, workload=self.workload.stats, layer=layer, space=self.space,
            best=st.best, best_score=st.best_score, history=tuple(st.records),
            playbook=self.playbook,
            budget=Budget(
                experiments_left=self.s.max_experiments - len(st.records),
                hours_left=self.s.max_hours - st.spent_s() / 3600,
                dollars_left=(None if self.s.max_dollars is None
                              else self.s.max_dollars - self._spent_usd())),
            tried_ids=st.tried_ids, feedback=feedback, attempt=attempt)

    def _step(self, layer: Layer) -> None:
        st = self.state
        exp = len(st.records)
        if self._incumbent_stale(exp):
            self._measure(exp, st.best, layer, None, None, LLMUsage(), remeasure=True)
            return
        usage = LLMUsage()
        feedback: str | None = None
        raw: str | None = None
        proposal: Proposal | None = None
        for attempt in range(MAX_ASKS):
            reply = self.proposer.propose(self._context(layer, feedback, attempt))
            usage = _add_usage(usage, reply.usage)
            raw = reply.raw
            if reply.error is not None:
                self._refuse(exp, layer, reply.proposal, raw, "invalid", reply.error, usage)
                return
            if reply.proposal is None:
                # the call that said "nothing left" still cost tokens: bill the next row
                self.unbilled = _add_usage(self.unbilled, usage)
                self.exhausted.add(layer)
                self.observer.event("escalate", layer=layer,
                                    why="the strategy has nothing left to try")
                return
            proposal = reply.proposal
            refusal, status = self._vet(proposal, layer)
            if refusal is None:
                changes = self.space.validate(proposal.changes, layer)
                recipe = self.space.apply(st.best, changes)
                self._measure(exp, recipe, layer, proposal, raw, usage)
                return
            feedback = refusal
            self.observer.event("refused", exp=exp, reason=refusal)
        assert proposal is not None and feedback is not None
        self._refuse(exp, layer, proposal, raw, status, feedback, usage)

    def _incumbent_stale(self, exp: int) -> bool:
        """Re-measure the incumbent on a fresh boot every --remeasure-every experiments
        (when two experiments of budget remain): its passes won a comparison, so they are
        flattered, and servers drift; fresh passes also measure between-boot noise."""
        every = self.s.remeasure_every
        st = self.state
        return bool(every and st.best_passes and exp - st.best_measured_exp >= every
                    and self.s.max_experiments - exp >= 2)

    def _vet(self, proposal: Proposal, layer: Layer) -> tuple[str | None, Status]:
        """Why a proposal must not be run (None when it may), before any GPU time."""
        if proposal.layer != layer:
            return f"proposal is for layer {proposal.layer}; the active layer is {layer}", \
                "invalid"
        try:
            changes = self.space.validate(proposal.changes, layer)
        except KnobError as exc:
            return str(exc), "invalid"
        recipe = self.space.apply(self.state.best, changes)
        try:
            self.space.check_combination(recipe)
        except KnobError as exc:
            return str(exc), "invalid"
        if recipe.id == self.state.best.id:
            return "no-op: these values are already the incumbent's", "duplicate"
        for rec in self.state.records:
            if rec.recipe_id == recipe.id and rec.status not in ("invalid", "duplicate"):
                return f"repeat of experiment {rec.exp} (recipe {recipe.id})", "duplicate"
        return None, "ok"

    def _refuse(self, exp: int, layer: Layer, proposal: Proposal | None, raw: str | None,
                status: Status, reason: str, usage: LLMUsage) -> None:
        now = _now()
        recipe = self.state.best
        self._record(ExperimentRecord(
            exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.id,
            generation=recipe.generation, layer=layer, proposal=proposal, raw_reply=raw,
            status=status, reason=reason, decision=f"refused before booting: {reason}",
            started_at=now, finished_at=now, llm=usage))

    def _measure(self, exp: int, recipe: Recipe, layer: Layer, proposal: Proposal | None,
                 raw: str | None, usage: LLMUsage, remeasure: bool = False) -> None:
        st = self.state
        self.observer.event("experiment_start", exp=exp, layer=layer, recipe=recipe,
                            proposal=proposal)
        started = _now()
        log_path = self.run_log.log_path(exp)
        launched = self.engine.launcher.launch(recipe, log_path)
        passes: tuple[BenchMetrics, ...] = ()
        quality: QualityScore | None = None
        captured: dict[str, Any] | None = None
        bench_s: float | None = None
        if isinstance(launched, LaunchFailure):
            status, reason, boot_s = launched.status, launched.reason, launched.boot_s
        else:
            boot_s = launched.boot_s
            try:
                outcome = self.engine.benchmarker.bench(
                    launched, self.workload, self.s.concurrency, self.s.repeats,
                    self.s.parsed_slo())
                status, reason, bench_s = outcome.status, outcome.reason, outcome.bench_s
                passes = outcome.passes
                if status == "ok" and st.reference is None:  # the reference config
                    captured = self.engine.quality.reference(launched)
                    quality = QualityScore(agreement=1.0, logprob_shift=0.0) \
                        if captured is not None else None
                elif status == "ok":
                    quality = self.engine.quality.accuracy(launched, st.quality_reference)
            finally:
                self.engine.launcher.stop(launched)
        verdict = judge(self.s, status, passes, quality.agreement if quality else None,
                        reference=st.reference, incumbent=st.best_passes,
                        incumbent_id=st.best.id, best_score=st.best_score,
                        history=st.records, identical=exp > 0 and recipe.id == st.best.id)
        kept, decision = verdict.decision.kept, verdict.decision.reason
        if remeasure:
            kept, decision = False, f"drift check of the incumbent: {decision}"
        if exp == 0 and status == "ok":
            reason = reason or "baseline: vLLM's defaults on this hardware"
        interval = verdict.interval
        self._record(ExperimentRecord(
            exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id,
            parent_id=recipe.parent_id, generation=recipe.generation, layer=layer,
            proposal=proposal, raw_reply=raw, status=status, reason=reason,
            metrics=median_pass(passes) if passes else None, passes=passes,
            accuracy=quality.agreement if quality else None,
            logprob_shift=quality.logprob_shift if quality else None,
            score=verdict.score, kept=kept, decision=decision,
            interval=(interval.low, interval.high) if interval is not None else None,
            slo_violations=verdict.slo_violations, remeasure=remeasure,
            quality_reference=captured, started_at=started, finished_at=_now(),
            boot_s=boot_s, bench_s=bench_s,
            log=str(log_path.relative_to(self.run_log.path)) if log_path.exists() else None,
            llm=usage))

    def _record(self, rec: ExperimentRecord) -> None:
        """Persist first (fsync'd append), then update state and the derived files."""
        if self.unbilled != LLMUsage():
            rec = rec.model_copy(update={"llm": _add_usage(rec.llm, self.unbilled)})
            self.unbilled = LLMUsage()
        self.run_log.append(rec)
        self.state.add(rec)
        self.run_log.write_tables(self.state.records)
        self.run_log.write_best(self.state.best.to_yaml())
        self.observer.event("experiment_end", record=rec)


def _add_usage(a: LLMUsage, b: LLMUsage) -> LLMUsage:
    return LLMUsage(input_tokens=a.input_tokens + b.input_tokens,
                    output_tokens=a.output_tokens + b.output_tokens,
                    cost_usd=a.cost_usd + b.cost_usd)
