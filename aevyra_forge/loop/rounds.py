"""Several experiments at once (one per worker: a GPU, a group of GPUs, a Ray task) as
rounds of the same ask -> vet -> run -> judge -> record loop. A round asks for one trial
per free worker (an LLM gives them in one reply, the builtin strategy its best-ranked
distinct moves), logs every start before any runs, and records each trial from the
driver's thread as it finishes. The keep rule stays that of one trial at a time: every
trial of a round is judged against the incumbent the round started from, and only the
best surviving one leads afterwards (a later finisher is kept only if it beats the
round's kept ones). Two GPUs are two instruments: a trial is judged against the
incumbent's passes from its own worker when that worker measured it, and a stale worker
re-measures the incumbent in one slot of a round (--remeasure-every)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from aevyra_forge.core.trial import Measurement, Trial
from aevyra_forge.core.values import ExperimentRecord, Layer, LLMUsage, Proposal, Status
from aevyra_forge.loop.events import LayerEscalated, ProposalRefused
from aevyra_forge.loop.state import refused

if TYPE_CHECKING:
    from aevyra_forge.loop.tuner import Tuner


class ParallelExecutor(Protocol):
    """An executor with several workers: runs a round's trials at once, each on the
    worker named in it, and yields each with its measurement as it finishes, in the
    caller's thread (so the run's log has one writer)."""

    @property
    def workers(self) -> tuple[str, ...]: ...

    def run(self, trial: Trial) -> Measurement: ...
    def run_many(self, trials: Sequence[Trial]) -> Iterator[tuple[Trial, Measurement]]: ...


class Rounds:
    """The round-at-a-time part of a Tuner whose executor has several workers."""

    def __init__(self, tuner: Tuner, workers: tuple[str, ...]) -> None:
        self.t = tuner
        self.workers = workers

    def step(self, layer: Layer) -> None:
        """Ask for one round and run it."""
        trials = self.ask(layer)
        if trials:
            self.t.refusals_in_a_row = 0
            self.run(trials)

    def rerun(self, unfinished: list[Trial]) -> None:
        """Trials a killed run left in flight, run again as one round (on their own
        workers where this pool still has them)."""
        if not unfinished:
            return
        taken = {t.worker for t in unfinished if t.worker in self.workers}
        free = iter(w for w in self.workers if w not in taken)
        self.run([t if t.worker in self.workers and t.worker is not None
                  else t.model_copy(update={"worker": next(free, self.workers[0])})
                  for t in unfinished])

    # -- ask ------------------------------------------------------------------------------
    def ask(self, layer: Layer) -> list[Trial]:
        """Up to one trial per worker (fewer when the budget or the proposer runs short);
        [] when this ask ended in a refusal row or the layer has nothing left."""
        from aevyra_forge.loop.tuner import MAX_ASKS, _add_usage

        t, st = self.t, self.t.state
        size = min(len(self.workers), t.s.max_experiments - st.experiments,
                   self._cap_left(layer))
        remeasure_on = self.stale_worker() if size >= 2 else None
        chosen: list[Trial] = []  # proposals vetted for this round, exp ids not yet final
        usage = LLMUsage()
        feedback: str | None = None
        raw: str | None = None
        last: Proposal | None = None
        status: Status = "invalid"
        failures = 0
        want = size - (remeasure_on is not None)
        while len(chosen) < want and failures < MAX_ASKS:
            reply = t.proposer.propose(t._context(layer, feedback, failures,
                                                  want - len(chosen), tuple(chosen)))
            usage = _add_usage(usage, reply.usage)
            raw = reply.raw
            if reply.error is not None or not reply.proposals:
                if chosen:  # run what this round has; the tokens go on its first row
                    break
                if reply.error is not None:
                    t._refuse(st.next_exp, layer, reply.proposal, raw, "invalid",
                              reply.error, usage)
                else:
                    t.unbilled = _add_usage(t.unbilled, usage)
                    t.exhausted.add(layer)
                    t.observer.notify(LayerEscalated(
                        layer=layer,
                        why=reply.reason or "the strategy has nothing left to try"))
                return []
            refusals = []
            for proposal in reply.proposals[:want - len(chosen)]:
                last = proposal
                recipe, why, status = t._vet(proposal, layer, tuple(chosen))
                if recipe is None:
                    refusals.append(why)
                    continue
                chosen.append(Trial(exp=-1, recipe=recipe.to_dict(), recipe_id=recipe.id,
                                    layer=layer, proposal=proposal, raw_reply=raw))
            if refusals:
                failures += 1
                feedback = "; ".join(refusals)
                t.observer.notify(ProposalRefused(exp=st.next_exp + len(chosen),
                                                  reason=feedback))
        if not chosen:
            assert last is not None and feedback is not None
            t._refuse(st.next_exp, layer, last, raw, status, feedback, usage)
            return []
        return self._place(layer, chosen, remeasure_on, usage)

    def _cap_left(self, layer: Layer) -> int:
        """Experiments the layer's cap (--max-config/quant-experiments) still allows: a
        round never overshoots it, or it would spend the next layer's budget."""
        cap = self.t.s.layer_cap(layer)
        if cap is None:
            return len(self.workers)
        ran = sum(1 for r in self.t.state.records[1:] if r.layer == layer and not refused(r))
        return max(1, cap - ran)  # the active layer has room for one at least

    def _place(self, layer: Layer, chosen: list[Trial], remeasure_on: str | None,
               usage: LLMUsage) -> list[Trial]:
        """The round's trials with their experiment ids, round and worker: the incumbent's
        re-measurement first (on the stale worker), then the proposals on the others."""
        st = self.t.state
        trials = chosen
        if remeasure_on is not None:
            trials = [Trial(exp=-1, recipe=st.best.to_dict(), recipe_id=st.best.id,
                            layer=layer, remeasure=True, worker=remeasure_on), *chosen]
        free = iter(w for w in self.workers if w != remeasure_on)
        number, base = st.next_round, st.next_exp
        out = []
        for i, trial in enumerate(trials):
            update: dict[str, object] = {"exp": base + i, "round": number,
                                         "worker": trial.worker or next(free)}
            if trial is chosen[0]:
                update["llm"] = usage  # one ask for the round: billed once, on its first
            out.append(trial.model_copy(update=update))
        return out

    def stale_worker(self) -> str | None:
        """The worker that should re-measure the incumbent in this round, or None: one
        that never measured it, else the one whose measurement of it is oldest, once
        --remeasure-every experiments have run since (never measured there counts from
        when it took the lead)."""
        t, st = self.t, self.t.state
        every = t.s.remeasure_every
        if not every or not st.best_passes or t.s.max_experiments - st.experiments < 2:
            return None
        since = st.best_record.exp if st.best_record is not None else 0
        oldest = min(self.workers,  # one that never measured it first
                     key=lambda w: (w in st.measured_on, st.measured_on.get(w, since)))
        if st.experiments_since(st.measured_on.get(oldest, since)) + 1 >= every:
            return oldest
        return None

    # -- run, judge and record ------------------------------------------------------------
    def run(self, trials: list[Trial]) -> None:
        """Log every start, run the round, and record each trial as it finishes, judged
        against the incumbent the round started from."""
        t = self.t
        against = t.state.incumbent()
        started = [t.begin(trial) for trial in trials]
        rival: ExperimentRecord | None = None
        run_many = getattr(t.executor, "run_many", None)
        results = run_many(started) if run_many is not None else \
            ((trial, t.executor.run(trial)) for trial in started)
        for trial, measurement in results:
            rec = t.tell(trial, measurement, against, rival)
            if rec.kept and (rival is None or (rec.score or 0.0) > (rival.score or 0.0)):
                rival = rec
