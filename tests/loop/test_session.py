"""Crash safety end to end: a real `aevyra-forge tune --dry-run` process is SIGKILLed at
several points and resumed; no recorded experiment is lost or duplicated, and the result
is the same as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import MODEL_8B

BUDGET = 16


def _cmd(run_dir: Path, workload: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aevyra_forge", "tune", "--dry-run", "--model", MODEL_8B,
            "--workload", str(workload), "--llm", "builtin", "--run-dir", str(run_dir),
            "--max-experiments", str(BUDGET), "--patience", "20", "--seed", "7", *extra]


def _resume_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "aevyra_forge", "tune", "resume", "--run-dir",
            str(run_dir)]


def _kill_after(cmd: list[str], lines: int) -> None:
    """Start `cmd` and SIGKILL it once it has printed `lines` experiment lines."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if f"/{BUDGET} " in line or line.startswith("run "):
            seen += 1
        if seen > lines:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _records(run_dir: Path) -> list[dict[str, object]]:
    (run,) = sorted((run_dir / "runs").glob("0*"))
    return [json.loads(line) for line in (run / "experiments.jsonl").read_text().splitlines()
            if line.strip()]


def test_sigkill_at_several_points_then_resume(tmp_path: Path, small_workload: Path) -> None:
    reference_dir = tmp_path / "reference"
    subprocess.run(_cmd(reference_dir, small_workload), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = [(r["exp"], r["recipe_id"], r["score"]) for r in _records(reference_dir)]
    assert len(expected) == BUDGET

    run_dir = tmp_path / "killed"
    _kill_after(_cmd(run_dir, small_workload), 0)  # during start-up or the baseline
    for point in (2, 2, 3):  # after a few more experiments each time
        _kill_after(_resume_cmd(run_dir), point)
    done = subprocess.run(_resume_cmd(run_dir), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    records = _records(run_dir)
    assert [r["exp"] for r in records] == list(range(BUDGET))
    assert [(r["exp"], r["recipe_id"], r["score"]) for r in records] == expected
    (run,) = sorted((run_dir / "runs").glob("0*"))
    assert (run / "completed.json").exists()
    again = subprocess.run(_resume_cmd(run_dir), capture_output=True, text=True)
    assert again.returncode == 1 and "no interrupted run" in again.stderr


def test_sigint_exits_130_and_leaves_a_resumable_run(tmp_path: Path,
                                                     small_workload: Path) -> None:
    run_dir = tmp_path / "forge"
    proc = subprocess.Popen(_cmd(run_dir, small_workload), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"/{BUDGET} " in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    assert "tune resume" in rest
    (run,) = sorted((run_dir / "runs").glob("0*"))
    assert not (run / "completed.json").exists()
    assert 1 <= len(_records(run_dir)) <= BUDGET


def _kill_at_boot(cmd: list[str], skip: int) -> None:
    """Start `cmd` with --verbose and SIGKILL it as soon as it announces the boot of a
    trial after `skip` such announcements: the trial's start is logged by then."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, "--verbose"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if "booting recipe" in line:
            seen += 1
            if seen > skip:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _started(run_dir: Path) -> list[int]:
    (run,) = sorted((run_dir / "runs").glob("0*"))
    path = run / "trials.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["exp"] for line in path.read_text().splitlines()
            if line.strip()]


def test_sigkill_between_a_trials_start_and_its_finish(tmp_path: Path,
                                                       small_workload: Path) -> None:
    """A trial whose start was logged but whose record was not is run again on resume,
    under the same experiment id, and the run ends as an uninterrupted one does."""
    reference_dir = tmp_path / "reference"
    subprocess.run(_cmd(reference_dir, small_workload), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = [(r["exp"], r["recipe_id"], r["score"]) for r in _records(reference_dir)]

    run_dir = tmp_path / "killed"
    caught: list[int] = []
    _kill_at_boot(_cmd(run_dir, small_workload), 2)
    for _ in range(6):  # a dry-run trial is short: the kill can land after its record
        recorded = {int(str(r["exp"])) for r in _records(run_dir)}
        caught += [exp for exp in _started(run_dir) if exp not in recorded]
        if caught:
            break
        _kill_at_boot(_resume_cmd(run_dir), 1)
    assert caught, "never killed a trial in flight"

    done = subprocess.run(_resume_cmd(run_dir), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = _records(run_dir)
    assert [(r["exp"], r["recipe_id"], r["score"]) for r in records] == expected
    started = _started(run_dir)
    assert started.count(caught[0]) == 2  # started, killed, started again on resume
    assert sorted(set(started)) == sorted({int(str(r["exp"])) for r in records
                                           if r["status"] not in ("invalid", "duplicate")})
