"""The worker pool: a round's trials run at once, one per worker, come back in the
caller's thread named by their worker, and a bug in a worker is raised there."""

from __future__ import annotations

import threading

import pytest

from aevyra_forge.core.trial import Measurement, Trial
from aevyra_forge.engine.pool import WorkerPool, worker_name

WAIT_S = 60.0  # a worker waits this long for the others before the test fails


class Rendezvous:
    """A worker that returns only once every worker of the round is running."""

    def __init__(self, barrier: threading.Barrier, fail: bool = False) -> None:
        self.barrier, self.fail = barrier, fail
        self.threads: list[str] = []

    def run(self, trial: Trial) -> Measurement:
        self.threads.append(threading.current_thread().name)
        self.barrier.wait(WAIT_S)
        if self.fail:
            raise RuntimeError(f"bug in trial {trial.exp}")
        return Measurement(status="ok", boot_s=float(trial.exp))


def _trial(exp: int, worker: str | None) -> Trial:
    return Trial(exp=exp, recipe={"model": "m"}, recipe_id=f"r{exp}", layer=1,
                 worker=worker)


def test_a_round_runs_at_once_and_each_result_names_its_worker() -> None:
    barrier = threading.Barrier(3)
    runners = {worker_name((i,)): Rendezvous(barrier) for i in range(3)}
    pool = WorkerPool(runners)
    got = dict((t.exp, m) for t, m in pool.run_many(
        [_trial(i, f"gpu{i}") for i in range(3)]))
    assert {exp: m.worker for exp, m in got.items()} == {0: "gpu0", 1: "gpu1", 2: "gpu2"}
    assert all(r.threads == [f"forge-{name}"] for name, r in runners.items())


def test_a_bug_in_a_worker_is_raised_in_the_callers_thread() -> None:
    barrier = threading.Barrier(2)
    pool = WorkerPool({"gpu0": Rendezvous(barrier), "gpu1": Rendezvous(barrier, fail=True)})
    with pytest.raises(RuntimeError, match="bug in trial 1"):
        list(pool.run_many([_trial(0, "gpu0"), _trial(1, "gpu1")]))


def test_a_round_must_name_distinct_known_workers() -> None:
    pool = WorkerPool({"gpu0": Rendezvous(threading.Barrier(1))})
    assert pool.run(_trial(7, None)).worker == "gpu0"  # a trial naming none: the first
    with pytest.raises(ValueError, match="same worker"):
        list(pool.run_many([_trial(0, "gpu0"), _trial(1, "gpu0")]))
    with pytest.raises(ValueError, match="names worker 'gpu9'"):
        pool.run(_trial(0, "gpu9"))
