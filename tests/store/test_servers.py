"""Tests for aevyra_forge.store.servers: servers.jsonl records each server launched and
gone; what was never marked gone is a leftover, except in a run another tuner holds."""

from __future__ import annotations

import json
from pathlib import Path

from aevyra_forge.engine.process import ServerGroup
from aevyra_forge.store.run_store import RunStore
from aevyra_forge.store.servers import SERVERS, ServerLog, leftovers, mark_gone, not_gone


def _run(root: Path) -> Path:
    run = RunStore(root).create_run({"model": "m"})
    run.close()
    return run.path


def test_launched_then_gone(tmp_path: Path) -> None:
    run = _run(tmp_path)
    log = ServerLog(run, ("gpu0",))
    first, second = ServerGroup(101, 5000, 8001), ServerGroup(102, 5001, 8002)
    log.launched(first, run / "logs" / "exp_000.log")
    log.launched(second, run / "logs" / "exp_001.attempt1.log")
    assert [(r.pgid, r.exp, r.devices) for r in not_gone(run)] == [(101, 0, ("gpu0",)),
                                                                    (102, 1, ("gpu0",))]
    log.gone(first)
    (left,) = not_gone(run)
    assert left.group == second and left.port == 8002
    lines = [json.loads(ln) for ln in (run / SERVERS).read_text().splitlines()]
    assert [ln["event"] for ln in lines] == ["launched", "launched", "gone"]
    assert all(ln["schema_version"] == 1 for ln in lines)


def test_a_reused_pid_is_another_server(tmp_path: Path) -> None:
    run = _run(tmp_path)
    log = ServerLog(run, ("cpu",))
    log.launched(ServerGroup(101, 5000, 8001), run / "logs" / "exp_000.log")
    log.gone(ServerGroup(101, 9999, 8001))  # same pid, another process: not this one
    assert [r.start_time for r in not_gone(run)] == [5000]


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    run = _run(tmp_path)
    ServerLog(run, ("cpu",)).launched(ServerGroup(101, 5000, 8001), run / "exp_000.log")
    with open(run / SERVERS, "ab") as fh:
        fh.write(b'{"schema_version": 1, "event": "go')
    assert len(not_gone(run)) == 1


def test_leftovers_skip_runs_another_tuner_holds(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    idle = _run(tmp_path)
    busy = store.create_run({"model": "m"})  # held, as a live tuner holds its run
    try:
        ServerLog(idle, ("gpu0",)).launched(ServerGroup(101, 5000, 8001), idle / "exp_000.log")
        ServerLog(busy.path, ("gpu1",)).launched(ServerGroup(202, 6000, 8002),
                                                 busy.path / "exp_000.log")
        assert [(run, rec.pgid) for run, rec in leftovers(tmp_path)] == [(idle, 101)]
        (_, rec), = leftovers(tmp_path)
        mark_gone(idle, rec)
        assert leftovers(tmp_path) == []
        mark_gone(busy.path, not_gone(busy.path)[0])  # its tuner's to record, not ours
        assert len(not_gone(busy.path)) == 1
    finally:
        busy.close()
    assert [rec.pgid for _, rec in leftovers(tmp_path)] == [202]
    assert leftovers(tmp_path / "nowhere") == []
