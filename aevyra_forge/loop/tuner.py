"""The tuning loop (SPEC §4) as ask -> vet -> run -> judge -> record. ONE loop serves `tune`
and `tune resume`: its state is always rebuilt by replaying the run's log, so the only
difference between the two is whether the log starts empty. A trial gets its experiment
id when it is asked, and its start is logged before it runs, so a trial cut short by a
crash is visible on resume and run again there, never lost or duplicated."""

from __future__ import annotations

from datetime import UTC, datetime

from aevyra_forge.agent import AgentContext, Budget, BudgetExceeded, Proposer
from aevyra_forge.core.errors import AgentError
from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.trial import Measurement, Trial
from aevyra_forge.core.values import (
    ExperimentRecord,
    Hardware,
    Layer,
    LLMUsage,
    Proposal,
    Status,
)
from aevyra_forge.core.workload import Workload
from aevyra_forge.decide.diagnosis import diagnose
from aevyra_forge.decide.rules import output_changes
from aevyra_forge.decide.verdict import judge, pass_stop
from aevyra_forge.loop import plan
from aevyra_forge.loop.events import (
    LayerEscalated,
    Note,
    Observer,
    Planned,
    ProposalRefused,
    RunFinished,
    RunOutcome,
    RunStarted,
    Silent,
    TrialFinished,
    TrialStarted,
)
from aevyra_forge.loop.ports import Executor, RunLog
from aevyra_forge.loop.rounds import Rounds
from aevyra_forge.loop.state import Incumbent, LoopState
from aevyra_forge.loop.vet import Vetted, vet
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.playbook import Playbook

MAX_ASKS = 3  # proposals refused before spending an experiment, then one row records why
# Refusal rows in a row (each MAX_ASKS asks, each of them with the LLM's own fix rounds)
# before the run stops: an agent whose replies were refused this often, with every error
# sent back, is not going to recover, and more asks spend tokens without measuring
# anything. The run stays resumable with another --llm.
MAX_REFUSALS_IN_A_ROW = 3


def learned_gate(status: Status, reason: str) -> bool:
    """A boot failure classified as unsupported on this hardware (engine/failures.py): the
    candidate it served is a gate learned for the run, rebuilt from its log on resume."""
    return status == "boot_failed" and reason.startswith("unsupported on this hardware")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Tuner:
    """Runs experiments until a budget is spent or every layer has converged."""

    def __init__(self, settings: TuneSettings, hardware: Hardware, workload: Workload,
                 space: KnobSpace, playbook: Playbook, proposer: Proposer,
                 executor: Executor, run: RunLog, baseline: Recipe,
                 observer: Observer | None = None) -> None:
        self.s = settings
        self.hw = hardware
        self.workload = workload
        self.space = space
        self.playbook = playbook
        self.proposer = proposer
        self.executor = executor
        self.run_log = run
        self.observer = observer or Silent()
        self.state = LoopState(records=run.records(), baseline=baseline)
        self.exhausted: set[int] = set()
        self.unbilled = LLMUsage()  # LLM usage not yet attached to a recorded row
        self.refusals_in_a_row = 0  # this session's; a resume gives the agent a new chance
        workers = tuple(getattr(executor, "workers", ()))
        # several workers: trials are asked, run and judged a round at a time
        self.rounds = Rounds(self, workers) if len(workers) > 1 else None

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        """Tune until done. KeyboardInterrupt propagates after the server in flight is
        torn down; the run stays resumable."""
        st = self.state
        self.observer.notify(RunStarted(recorded=len(st.records), spent_s=st.spent_s()))
        for rec in st.records:  # a gate learned before an interruption holds after it
            if learned_gate(rec.status, rec.reason):
                self.space.refuse_quant(recipe_from_dict(rec.recipe), rec.reason)
        if self.rounds is not None:
            self.rounds.rerun(self.unfinished())
        for pending in self.unfinished():
            self.execute(pending)
        if not st.records:
            self.execute(Trial(exp=0, recipe=st.baseline.to_dict(),
                               recipe_id=st.baseline.id, layer=1,
                               worker=self.rounds.workers[0] if self.rounds else None))
        self._replan()
        while True:
            why = self._budget_spent()
            if why:
                break
            layer = st.active_layer(self.s, self.exhausted)
            if layer is None:
                why = "every layer converged"
                break
            try:
                if self.rounds is not None:
                    self.rounds.step(layer)
                    continue
                trial = self.ask(layer)
            except BudgetExceeded as exc:
                why = str(exc)
                break
            if trial is not None:
                self.refusals_in_a_row = 0
                self.execute(trial)
        outcome = RunOutcome(reason=why, run_dir=self.run_log.path,
                             experiments=st.experiments, best=st.best,
                             best_record=st.best_record, llm_cost_usd=self._spent_usd())
        self.run_log.complete({"reason": why, "experiments": outcome.experiments,
                               "best_recipe_id": st.best.id, "best_score": st.best_score,
                               "llm_cost_usd": outcome.llm_cost_usd,
                               "finished_at": _now()})
        self.observer.notify(RunFinished(outcome))
        return outcome

    def unfinished(self) -> list[Trial]:
        """Trials whose start was logged but whose record never was (the run was killed
        while they ran), in the order they were asked."""
        done = {r.exp for r in self.state.records}
        pending: dict[int, Trial] = {}
        for trial in self.run_log.started():
            if trial.exp not in done:
                pending[trial.exp] = trial
        return [pending[exp] for exp in sorted(pending)]

    # -- ask ------------------------------------------------------------------------------
    def ask(self, layer: Layer) -> Trial | None:
        """The next trial for `layer`, with its experiment id; None when this ask ended in
        a refusal row or the layer's proposer has nothing left."""
        st = self.state
        exp = st.next_exp
        if self._incumbent_stale():
            return Trial(exp=exp, recipe=st.best.to_dict(), recipe_id=st.best.id,
                         layer=layer, remeasure=True)
        usage = LLMUsage()
        feedback: str | None = None
        raw: str | None = None
        proposal: Proposal | None = None
        status: Status = "invalid"
        for attempt in range(MAX_ASKS):
            reply = self.proposer.propose(self._context(layer, feedback, attempt))
            usage = _add_usage(usage, reply.usage)
            raw = reply.raw
            if reply.error is not None:
                self._refuse(exp, layer, reply.proposal, raw, "invalid", reply.error, usage)
                return None
            if reply.proposal is None:
                # the call that said "nothing left" still cost tokens: bill the next row
                self.unbilled = _add_usage(self.unbilled, usage)
                self.exhausted.add(layer)
                self.observer.notify(LayerEscalated(
                    layer=layer, why=reply.reason or "the strategy has nothing left to try"))
                return None
            proposal = reply.proposal
            recipe, refusal, status = self._vet(proposal, layer)
            if recipe is not None:
                return Trial(exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id,
                             layer=layer, proposal=proposal, raw_reply=raw, llm=usage)
            feedback = refusal
            self.observer.notify(ProposalRefused(exp=exp, reason=refusal))
        assert proposal is not None and feedback is not None
        self._refuse(exp, layer, proposal, raw, status, feedback, usage)
        return None

    def _context(self, layer: Layer, feedback: str | None, attempt: int, want: int = 1,
                 pending: tuple[Trial, ...] = ()) -> AgentContext:
        st = self.state
        return AgentContext(
            hardware=self.hw, workload=self.workload.stats, layer=layer, space=self.space,
            best=st.best, best_score=st.best_score, history=tuple(st.records),
            playbook=self.playbook,
            budget=Budget(
                experiments_left=self.s.max_experiments - st.experiments,
                hours_left=self.s.max_hours - st.spent_s() / 3600,
                dollars_left=(None if self.s.max_dollars is None
                              else self.s.max_dollars - self._spent_usd())),
            tried_ids=st.tried_ids, feedback=feedback, attempt=attempt,
            objective=self.s.objective, slo=self.s.parsed_slo(), want=want,
            accuracy_floor=self.s.accuracy_floor, concurrency=self.s.concurrency,
            min_improvement=self.s.min_improvement_pct / 100,
            pending=tuple(t.proposal for t in pending if t.proposal is not None),
            pending_ids=frozenset(t.recipe_id for t in pending))

    def _incumbent_stale(self) -> bool:
        """Re-measure the incumbent on a fresh boot every --remeasure-every experiments
        (when two experiments of budget remain): its passes won a comparison, so they are
        flattered, and servers drift; fresh passes also measure between-boot noise."""
        every = self.s.remeasure_every
        st = self.state
        return bool(every and st.best_passes
                    and st.experiments_since(st.best_measured_exp) + 1 >= every
                    and self.s.max_experiments - st.experiments >= 2)

    def _vet(self, proposal: Proposal, layer: Layer, pending: tuple[Trial, ...] = ()
             ) -> Vetted:
        """The recipe a proposal leads to, or why it must not run (loop/vet.py)."""
        return vet(self.space, self.state.best, self.state.records, proposal, layer, pending)

    def _refuse(self, exp: int, layer: Layer, proposal: Proposal | None, raw: str | None,
                status: Status, reason: str, usage: LLMUsage) -> None:
        """Record a refusal row (no experiment: no budget, no patience), and stop the run,
        resumably, after MAX_REFUSALS_IN_A_ROW of them."""
        now = _now()
        recipe = self.state.best
        self._record(ExperimentRecord(
            exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.id,
            generation=recipe.generation, layer=layer, proposal=proposal, raw_reply=raw,
            status=status, reason=reason, decision=f"refused before booting: {reason}",
            started_at=now, finished_at=now, llm=usage))
        self.refusals_in_a_row += 1
        if self.refusals_in_a_row >= MAX_REFUSALS_IN_A_ROW:
            raise AgentError(
                f"the agent's proposals were refused {self.refusals_in_a_row} times in a "
                f"row, each after its errors were sent back (last: {reason[:200]}); the run "
                "stopped before spending more on them: resume it with another agent, e.g. "
                f"`aevyra-forge tune resume --run-dir {self.run_log.path} --llm builtin`")

    # -- run ------------------------------------------------------------------------------
    def execute(self, trial: Trial) -> ExperimentRecord:
        """Log the trial's start, run it, judge and record it. The accuracy reference is
        attached here, from the state as it is now (also for a trial re-run on resume)."""
        trial = self.begin(trial)
        return self.tell(trial, self.executor.run(trial))

    def begin(self, trial: Trial) -> Trial:
        """The trial stamped and its start logged (on disk when this returns)."""
        st = self.state
        trial = trial.model_copy(update={
            "started_at": trial.started_at or _now(),
            "capture_reference": st.reference is None,
            "quality_reference": st.quality_reference,
            # a candidate's bench may end once its passes decide (never a drift check's)
            "stop": None if trial.remeasure else pass_stop(
                self.s, st.incumbent().passes_for(trial.worker), st.best.id, st.records,
                trial.worker)})
        self.run_log.start(trial)
        self.observer.notify(TrialStarted(trial))
        return trial

    # -- judge and record -----------------------------------------------------------------
    def tell(self, trial: Trial, m: Measurement, against: Incumbent | None = None,
             rival: ExperimentRecord | None = None) -> ExperimentRecord:
        """Judge `m` against `against` (the round's incumbent; default: the incumbent now)
        and record it. `rival` is the round's best kept trial so far: a trial of the same
        round must beat it too to be kept, so the round's best surviving trial leads."""
        st = self.state
        exp = trial.exp
        inc = against or st.incumbent()
        verdict = judge(self.s, m.status, m.passes, m.metrics,
                        m.quality.agreement if m.quality else None,
                        reference=st.reference, incumbent=inc.passes_for(trial.worker),
                        incumbent_id=inc.recipe.id, best_score=inc.score,
                        history=inc.history,
                        identical=exp > 0 and trial.recipe_id == inc.recipe.id,
                        output_changes=output_changes(
                            st.accuracy_base or st.baseline,
                            recipe_from_dict(trial.recipe, source=f"experiment {exp}")),
                        worker=trial.worker)
        kept, decision = verdict.decision.kept, verdict.decision.reason
        if trial.remeasure:
            kept, decision = False, f"drift check of the incumbent: {decision}"
        elif kept and rival is not None and (verdict.score or 0.0) <= (rival.score or 0.0):
            kept, decision = False, (f"{decision}; but experiment {rival.exp} of the same "
                                     f"round scored higher ({rival.score:.3f})")
        reason = m.reason
        if exp == 0 and m.status == "ok":
            reason = "; ".join(filter(None, ("baseline: vLLM's defaults on this hardware",
                                             reason)))
        interval = verdict.interval
        recipe = trial.recipe
        # what bound the baseline (or the first config that served): the engine read once
        diagnosis = diagnose(m.status, m.reason, m.metrics, recipe_from_dict(recipe),
                             self.space, self.workload.stats, self.s.concurrency) \
            if exp == 0 or (st.reference is None and not trial.remeasure) else None
        rec = self._record(ExperimentRecord(
            exp=exp, recipe=recipe, recipe_id=trial.recipe_id,
            parent_id=recipe.get("parent_id"), generation=int(recipe.get("generation", 0)),
            layer=trial.layer, proposal=trial.proposal, raw_reply=trial.raw_reply,
            status=m.status, reason=reason, metrics=m.metrics, passes=m.passes,
            pass_isolation=m.pass_isolation,
            accuracy=m.quality.agreement if m.quality else None,
            accuracy_method=m.quality.method if m.quality else None,
            logprob_shift=m.quality.logprob_shift if m.quality else None,
            score=verdict.score, kept=kept, decision=decision,
            interval=(interval.low, interval.high) if interval is not None else None,
            slo_violations=verdict.slo_violations, remeasure=trial.remeasure,
            quality_reference=m.quality_reference, started_at=trial.started_at,
            finished_at=_now(), prepare_s=m.prepare_s, boot_s=m.boot_s, bench_s=m.bench_s,
            log=m.log, suggested_max_model_len=m.suggested_max_model_len,
            worker=m.worker or trial.worker, round=trial.round,
            llm=trial.llm, diagnosis=diagnosis))
        if learned_gate(m.status, m.reason):
            gone = self.space.refuse_quant(recipe_from_dict(recipe), m.reason)
            if gone:
                self.observer.notify(Note(f"layer 2: this host refused {gone}; it is not "
                                          "offered again this run"))
        # Accuracy measured another way, or not at all, is said once: with the reference.
        if trial.capture_reference and m.status == "ok" and m.reason and (
                m.quality is None or m.quality.method != "teacher_forced"):
            self.observer.notify(Note(f"experiment {exp}: {m.reason}"))
        return rec

    def _record(self, rec: ExperimentRecord) -> ExperimentRecord:
        """Persist first (fsync'd append), then update state and the derived files."""
        if self.unbilled != LLMUsage():
            rec = rec.model_copy(update={"llm": _add_usage(rec.llm, self.unbilled)})
            self.unbilled = LLMUsage()
        self.run_log.append(rec)
        self.state.add(rec)
        self.run_log.write_tables(self.state.records)
        self.run_log.write_best(self.state.best.to_yaml())
        self.observer.notify(TrialFinished(rec))
        return rec

    # -- budgets --------------------------------------------------------------------------
    def _replan(self) -> None:
        """The plan again, from measurement, once an experiment has been measured."""
        estimate = plan.from_records(self.state.records)
        if estimate is None:
            return
        measured = plan.Plan(estimate, self.s.max_hours * 3600, self.s.max_experiments,
                             workers=len(self.rounds.workers) if self.rounds else 1)
        self.observer.notify(Planned(measured))
        if measured.fit < min(plan.FEW, self.s.max_experiments):
            self.observer.notify(Note(f"only {measured.fit} experiments fit in --max-hours "
                                      f"{self.s.max_hours:g} at the measured pace"))

    def _spent_usd(self) -> float:
        return self.state.spent_usd() + self.unbilled.cost_usd

    def _budget_spent(self) -> str | None:
        st = self.state
        if st.experiments >= self.s.max_experiments:
            return f"experiment budget spent ({self.s.max_experiments})"
        if st.spent_s() >= self.s.max_hours * 3600:
            return f"time budget spent ({self.s.max_hours} h)"
        estimate = plan.from_records(st.records)
        if estimate is not None and st.spent_s() + estimate.total_s > self.s.max_hours * 3600:
            return (f"time budget: another experiment (~{estimate.total_s / 60:.0f} min) "
                    f"would not finish inside {self.s.max_hours} h "
                    f"({st.spent_s() / 3600:.2f} h used)")
        if self.s.max_dollars is not None and self._spent_usd() >= self.s.max_dollars:
            return f"LLM budget spent (${self.s.max_dollars:.2f})"
        return None


def _add_usage(a: LLMUsage, b: LLMUsage) -> LLMUsage:
    return LLMUsage(input_tokens=a.input_tokens + b.input_tokens,
                    output_tokens=a.output_tokens + b.output_tokens,
                    cost_usd=a.cost_usd + b.cost_usd)
