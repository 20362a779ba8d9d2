"""A pool of workers on this host, one per GPU (or group of GPUs for tensor-parallel
recipes), each with its own executor whose launcher pins the child to its GPUs: the
trials of a round run at once, in threads, and come back to the caller's thread as they
finish, so the run's log keeps a single writer. Threads, not processes: a worker spends
its time waiting on a vLLM server in another process anyway."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from aevyra_forge.core.trial import Measurement, Trial


class TrialRunner(Protocol):
    def run(self, trial: Trial) -> Measurement: ...


class WorkerPool:
    """Named workers, each running one trial at a time. A trial runs on the worker it
    names (`Trial.worker`); one naming none runs on the first."""

    def __init__(self, executors: Mapping[str, TrialRunner]) -> None:
        if not executors:
            raise ValueError("a pool needs at least one worker")
        self.executors = dict(executors)

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(self.executors)

    def run(self, trial: Trial) -> Measurement:
        """One trial on its worker, in this thread."""
        worker = self._worker(trial)
        return _named(self.executors[worker].run(trial), worker)

    def run_many(self, trials: Sequence[Trial]) -> Iterator[tuple[Trial, Measurement]]:
        """Run `trials` at once, at most one per worker, and yield each with its
        measurement as it finishes. A bug raised in a worker is raised here. The threads
        are daemons: an interrupt here leaves the servers to the process-exit teardown
        (engine.process) rather than waiting minutes for their benches to end."""
        workers = [self._worker(t) for t in trials]
        if len(set(workers)) != len(workers):
            raise ValueError(f"two trials of one round on the same worker: {workers}")
        done: queue.Queue[tuple[Trial, Measurement | BaseException]] = queue.Queue()
        for trial, worker in zip(trials, workers, strict=True):
            threading.Thread(target=self._work, args=(trial, worker, done), daemon=True,
                             name=f"forge-{worker}").start()
        for _ in trials:
            trial, outcome = done.get()
            if isinstance(outcome, BaseException):
                raise outcome
            yield trial, outcome

    def _work(self, trial: Trial, worker: str,
              done: queue.Queue[tuple[Trial, Measurement | BaseException]]) -> None:
        try:
            done.put((trial, _named(self.executors[worker].run(trial), worker)))
        except BaseException as exc:  # handed to the driver, which raises it
            done.put((trial, exc))

    def _worker(self, trial: Trial) -> str:
        if trial.worker is None:
            return self.workers[0]
        if trial.worker not in self.executors:
            raise ValueError(f"trial {trial.exp} names worker {trial.worker!r}, not one of "
                             f"{', '.join(self.workers)}")
        return trial.worker


def _named(m: Measurement, worker: str) -> Measurement:
    return m if m.worker == worker else m.model_copy(update={"worker": worker})


def worker_name(gpus: Sequence[int]) -> str:
    """A worker's name from its GPUs: "gpu0", "gpu2+3"."""
    return "gpu" + "+".join(str(g) for g in gpus)
