from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import RunLockedError, StoreError
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.values import ExperimentRecord, Proposal
from aevyra_forge.store.rows import COLUMNS
from aevyra_forge.store.run_store import (
    Run,
    RunStore,
    logged_recipes,
    read_config,
    read_records,
    resolve_run_dir,
)
from tests.builders import metrics, record

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 22, 11, 5, 1, tzinfo=UTC)
CONFIG = {"model": "meta-llama/Llama-3.2-1B-Instruct", "hardware": "1x NVIDIA H100",
          "workload": "examples/chat.jsonl", "max_experiments": 50}


class StepClock:
    """Each call returns a time one minute after the previous one."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        current = self.now
        self.now += timedelta(minutes=1)
        return current


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / ".forge", clock=StepClock())


def test_runs_are_numbered_from_001_with_a_utc_timestamp(store: RunStore) -> None:
    with store.create_run(CONFIG) as first:
        assert first.path == store.root / "runs" / "001_20261122T110501Z"
        assert json.loads((first.path / "config.json").read_text()) == CONFIG
        assert first.config == CONFIG
        assert (first.path / "logs").is_dir()
    with store.create_run(CONFIG) as second:
        assert second.path.name == "002_20261122T110601Z"


def test_numbering_continues_after_the_highest_existing_run(store: RunStore) -> None:
    (store.runs_dir / "041_20250101T000000Z").mkdir(parents=True)  # crashed while creating
    with store.create_run(CONFIG) as run:
        assert run.path.name.startswith("042_")
    # the config-less folder keeps its number but is not a run
    assert store.latest_run() == run.path


def test_append_and_replay_round_trip(store: RunStore) -> None:
    recs = [record(0, kept=True), record(1, rationale="more seqs", score=1.2, kept=True),
            record(2, status="oom", rationale="even more", reason="CUDA out of memory")]
    with store.create_run(CONFIG) as run:
        for r in recs:
            run.append(r)
        assert run.records() == recs
    assert read_records(run.path) == recs
    lines = (run.path / "experiments.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["schema_version"] == 1 for line in lines)


def test_torn_last_line_is_ignored_then_cut_off_before_the_next_append(
        store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0))
        run.append(record(1, rationale="a"))
    path = run.path / "experiments.jsonl"
    intact = path.read_bytes()
    torn = record(2, rationale="killed mid-write").model_dump_json().encode()[:57]
    path.write_bytes(intact + torn)

    assert [r.exp for r in read_records(run.path)] == [0, 1]
    with store.open_run(run.path) as resumed:
        assert path.read_bytes() == intact
        resumed.append(record(2, rationale="retried"))
        assert [r.exp for r in resumed.records()] == [0, 1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_garbage_complete_last_line_is_treated_as_torn(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0))
    path = run.path / "experiments.jsonl"
    intact = path.read_bytes()
    path.write_bytes(intact + b"\x00\x00\x00\x00\n")  # a filesystem's zero fill after a crash
    assert [r.exp for r in read_records(run.path)] == [0]
    with store.open_run(run.path):
        assert path.read_bytes() == intact


def test_corrupt_middle_line_names_file_and_line(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        for i in range(3):
            run.append(record(i))
    path = run.path / "experiments.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"exp": 1, "oops": true}\n'
    path.write_text("".join(lines))
    with pytest.raises(StoreError, match=r"experiments\.jsonl:2: .*delete line 2"):
        read_records(run.path)
    with pytest.raises(StoreError, match=r"experiments\.jsonl:2:"):
        store.open_run(run.path)
    assert path.read_text() == "".join(lines)  # nothing was cut from a corrupted log


def test_newer_schema_version_asks_for_an_upgrade(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0))
    path = run.path / "experiments.jsonl"
    newer = json.loads(record(1).model_dump_json()) | {"schema_version": 99}
    with open(path, "a") as fh:
        fh.write(json.dumps(newer) + "\n")
    with pytest.raises(StoreError, match=r"schema_version 99.*upgrade aevyra-forge"):
        read_records(run.path)


def test_latest_run_and_latest_resumable(store: RunStore) -> None:
    assert store.latest_run() is None
    assert store.latest_resumable() is None
    paths = []
    for _ in range(3):
        with store.create_run(CONFIG) as run:
            paths.append(run.path)
    assert store.latest_run() == paths[2]
    assert store.latest_resumable() == paths[2]
    with store.open_run(paths[2]) as run:
        run.complete({"reason": "budget"})
    assert store.latest_run() == paths[2]
    assert store.latest_resumable() == paths[1]


def test_completed_json_is_written_only_by_complete(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0, kept=True))
        run.write_tables(run.records())
        run.write_best("model: m\n")
        assert not run.is_complete
        assert not (run.path / "completed.json").exists()
        run.complete({"reason": "converged", "experiments": 1})
        assert run.is_complete
    done = json.loads((run.path / "completed.json").read_text())
    assert done == {"completed_at": "20261122T110601Z", "reason": "converged",
                    "experiments": 1}


def test_writes_leave_exactly_the_documented_files(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0, kept=True))
        run.write_tables(run.records())
        run.write_best("model: m\n")
        run.write_best("model: m2\n")
        run.complete({})
    assert sorted(p.name for p in run.path.iterdir()) == sorted([
        ".lock", "config.json", "experiments.jsonl", "experiments.tsv", "experiments.json",
        "best_recipe.yaml", "completed.json", "logs"])
    assert (run.path / "best_recipe.yaml").read_text() == "model: m2\n"
    assert sorted(p.name for p in store.runs_dir.iterdir()) == [".lock", run.path.name]


def test_failed_atomic_write_keeps_the_old_file_and_no_temp(
        store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with store.create_run(CONFIG) as run:
        run.write_best("model: old\n")
        before = sorted(p.name for p in run.path.iterdir())

        def broken_replace(src: str, dst: str) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(StoreError, match=r"disk full while writing best_recipe\.yaml"):
            run.write_best("model: new\n")
        monkeypatch.undo()
        assert (run.path / "best_recipe.yaml").read_text() == "model: old\n"
        assert sorted(p.name for p in run.path.iterdir()) == before


def test_tables_are_written_as_tsv_and_json(store: RunStore) -> None:
    recs = [record(0, kept=True), record(1, status="crash", rationale="x", reason="segfault")]
    with store.create_run(CONFIG) as run:
        run.write_tables(recs)
    tsv = (run.path / "experiments.tsv").read_text().splitlines()
    assert tsv[0] == "\t".join(COLUMNS)
    assert len(tsv) == 3
    rows = json.loads((run.path / "experiments.json").read_text())
    assert [r["exp"] for r in rows] == [0, 1]
    assert rows[1]["throughput"] is None


def test_the_lock_is_held_against_a_second_process(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from aevyra_forge.store.run_store import RunStore\n"
         "run = RunStore(Path(sys.argv[1])).open_run(Path(sys.argv[2]))\n"
         "print('locked', flush=True); sys.stdin.readline(); run.close()",
         str(store.root), str(run.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"  # the child holds the lock now
        with pytest.raises(RunLockedError,
                           match=rf"in use by another aevyra-forge process \(pid {holder.pid}\)"):
            store.open_run(run.path)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with store.open_run(run.path) as reopened:  # released when the holder finished
        assert reopened.records() == []


def test_a_second_process_cannot_open_a_run_we_hold(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        result = subprocess.run(
            [sys.executable, "-c",
             "import sys; from pathlib import Path\n"
             "from aevyra_forge.store.run_store import RunStore\n"
             "RunStore(Path(sys.argv[1])).open_run(Path(sys.argv[2]))",
             str(store.root), str(run.path)],
            capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 1
        assert f"RunLockedError: run {run.path} is in use" in result.stderr
        assert f"(pid {os.getpid()})" in result.stderr


@pytest.mark.parametrize("config", [
    {"model": "m", "api_key": "sk-ant-123"},
    {"model": "m", "llm": {"provider": "openai", "OPENAI_API_KEY": "sk-1"}},
    {"model": "m", "hf_token": "hf_abc"},
    {"model": "m", "providers": [{"client_secret": "s"}]},
])
def test_create_run_refuses_secrets(store: RunStore, config: dict[str, Any]) -> None:
    with pytest.raises(StoreError, match="credential"):
        store.create_run(config)
    assert store.latest_run() is None
    assert not any(store.runs_dir.glob("0*"))


def test_secret_guard_allows_token_counts_and_empty_keys(store: RunStore) -> None:
    config = {"model": "m", "max_num_batched_tokens": 8192, "api_key": None, "hf_token": ""}
    with store.create_run(config) as run:
        assert read_config(run.path) == config


def test_resolve_run_dir(store: RunStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no runs in this store yet"):
        store.runs_dir.mkdir(parents=True)
        resolve_run_dir(store.root)
    with store.create_run(CONFIG) as one, store.create_run(CONFIG) as two:
        pass
    assert resolve_run_dir(store.root) == two.path
    assert resolve_run_dir(one.path) == one.path
    with pytest.raises(StoreError, match="neither a forge store nor a run folder"):
        resolve_run_dir(tmp_path)
    with pytest.raises(StoreError, match="no such folder"):
        resolve_run_dir(tmp_path / "missing")


def test_open_run_and_read_config_reject_non_runs(store: RunStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a run folder"):
        store.open_run(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"config\.json: not valid JSON"):
        read_config(tmp_path)


def test_closed_run_refuses_writes_and_log_paths_are_numbered(store: RunStore) -> None:
    run = store.create_run(CONFIG)
    assert run.log_path(7) == run.path / "logs" / "exp_007.log"
    run.close()
    run.close()  # idempotent
    with pytest.raises(StoreError, match="was closed"):
        run.append(record(0))


finite = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
text = st.text(max_size=40)


@st.composite
def records_strategy(draw: st.DrawFn) -> ExperimentRecord:
    status = draw(st.sampled_from(["ok", "crash", "boot_failed", "invalid", "oom", "timeout",
                                   "duplicate"]))
    has_proposal = draw(st.booleans())
    layer = draw(st.sampled_from([1, 2, 3]))
    return ExperimentRecord(
        exp=draw(st.integers(0, 10_000)),
        recipe={"model": draw(text), "config": {"max_num_seqs": draw(st.integers(1, 4096))}},
        recipe_id=draw(st.text("0123456789abcdef", min_size=8, max_size=8)),
        parent_id=draw(st.none() | text), generation=draw(st.integers(0, 100)), layer=layer,
        proposal=Proposal(rationale=draw(text), layer=layer,
                          changes={"gpu_memory_utilization": draw(finite)})
        if has_proposal else None,
        raw_reply=draw(st.none() | text), status=status, reason=draw(text),
        metrics=metrics(draw(finite), draw(finite)) if status == "ok" else None,
        accuracy=draw(st.none() | st.floats(0, 1)), score=draw(st.none() | finite),
        kept=draw(st.booleans()), decision=draw(text),
        started_at=draw(text), finished_at=draw(text),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records_strategy(), max_size=6, unique_by=lambda r: r.exp))
def test_any_records_round_trip(recs: list[ExperimentRecord]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with RunStore(Path(tmp), clock=StepClock()).create_run(CONFIG) as run:
            for r in recs:
                run.append(r)
            assert run.records() == recs
            run.write_tables(recs)
            assert len(json.loads((run.path / "experiments.json").read_text())) == len(recs)
            assert len((run.path / "experiments.tsv").read_text().splitlines()) == len(recs) + 1
        assert read_records(run.path) == recs


def test_run_can_be_constructed_only_on_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="run folder not found"):
        Run(tmp_path / "nope", {})


# -- a log that is wrong is reported, not repaired -------------------------------------------

def trial(exp: int) -> Trial:
    return Trial(exp=exp, recipe={"model": "m", "config": {}}, recipe_id=f"id{exp:06d}",
                 layer=1)


def test_an_experiment_recorded_twice_is_refused_with_its_line(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        for i in (0, 1, 1, 2):  # a duplicated line, as an edit or a sync might leave
            run.append(record(i))
    path = run.path / "experiments.jsonl"
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"experiments\.jsonl:3: experiment 1 is recorded "
                                         r"twice \(also on line 2\).*delete one"):
        store.open_run(run.path)
    with pytest.raises(StoreError, match=r"experiments\.jsonl:3: experiment 1"):
        read_records(run.path)
    assert path.read_bytes() == before


def test_a_log_cut_in_the_middle_is_reported_not_truncated_further(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        for i in range(5):
            run.start(trial(i))
            run.append(record(i))
    path = run.path / "experiments.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    cut = b"".join(lines[:2]) + lines[2][:40]  # cut inside line 3: 2, 3 and 4 are gone
    path.write_bytes(cut)
    with pytest.raises(StoreError, match=r"experiments\.jsonl: no record of experiments "
                                         r"2, 3, which trials\.jsonl says were run before others: "
                                         r"the log was cut after line 2; restore"):
        store.open_run(run.path)
    assert path.read_bytes() == cut


def test_a_rounds_trials_may_all_be_in_flight_but_not_an_earlier_rounds(
        store: RunStore) -> None:
    """Several workers: the last round's trials can all lack a record (killed while they
    ran, some finished), an earlier round's cannot."""
    with store.create_run(CONFIG) as run:
        run.start(trial(0))
        run.append(record(0))
        for i in (1, 2, 3):
            run.start(trial(i).model_copy(update={"round": 1, "worker": f"gpu{i}"}))
        run.append(record(2))
        store_path = run.path
    store.open_run(store_path).close()  # 1 and 3 were in flight: resumable
    with store.open_run(store_path) as run:
        run.append(record(1))
        run.append(record(3))
        for i in (4, 5):
            run.start(trial(i).model_copy(update={"round": 2, "worker": f"gpu{i}"}))
        run.append(record(5))
    path = store_path / "experiments.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(line for line in lines if b'"exp":3,' not in line))
    with pytest.raises(StoreError, match=r"no record of experiments 3, which"):
        store.open_run(store_path)


def test_a_torn_last_line_is_still_a_crash_and_says_what_it_dropped(store: RunStore
                                                                     ) -> None:
    with store.create_run(CONFIG) as run:
        run.start(trial(0))
        run.append(record(0))
        run.start(trial(1))
    exps, trials = run.path / "experiments.jsonl", run.path / "trials.jsonl"
    with open(exps, "ab") as fh:
        fh.write(record(1).model_dump_json().encode()[:30])  # killed writing record 1
    with open(trials, "ab") as fh:
        fh.write(b'{"exp": 2, "reci')  # and, say, a torn start on the other log
    with store.open_run(run.path) as resumed:
        assert [d.split(": ", 1)[1] for d in resumed.dropped] == [
            "dropped 30 bytes after the last complete line (a write cut off by a crash)",
            "dropped 16 bytes after the last complete line (a write cut off by a crash)"]
        resumed.start(trial(1))
        resumed.append(record(1))
        assert [t.exp for t in resumed.started()] == [0, 1, 1]
        assert [r.exp for r in resumed.records()] == [0, 1]


def test_logged_recipes_name_their_file_and_line(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.start(trial(0))
        run.append(record(0))
        assert [(where.rsplit("/", 1)[1], recipe["model"])
                for where, recipe in logged_recipes(run.path)] == [
            ("experiments.jsonl:1", "m"), ("trials.jsonl:1", "m")]


# -- OS errors are user errors -----------------------------------------------------------------

def _failing(errno_: int, real: Callable[..., Any], after: int = 0) -> Callable[..., Any]:
    """`real`, which raises OSError(errno_) from its call number `after` on."""
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno_, os.strerror(errno_))
        return real(*args, **kwargs)
    return call


def test_a_full_disk_while_appending_is_one_line_and_the_run_resumes(
        store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0))
        path = run.path / "experiments.jsonl"
        before = path.read_bytes()
        real_write = os.write

        def half_then_full(fd: int, data: bytes) -> int:  # a part lands, then ENOSPC
            if len(data) > 10:
                return real_write(fd, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(StoreError) as info:
            run.append(record(1))
        monkeypatch.undo()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: no space left on the device while appending "
                                  "to experiments.jsonl; free some space, then run "
                                  "`aevyra-forge tune resume`")
        assert path.read_bytes() == before  # the half line was taken back
    with store.open_run(run.path) as resumed:
        assert resumed.dropped == []
        resumed.append(record(1))
        assert [r.exp for r in resumed.records()] == [0, 1]


def test_a_failed_fsync_is_a_store_error_and_keeps_the_old_file(
        store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with store.create_run(CONFIG) as run:
        run.write_best("model: old\n")
        monkeypatch.setattr(os, "fsync", _failing(errno.ENOSPC, os.fsync))
        with pytest.raises(StoreError, match=r"no space left on the device while writing "
                                             r"best_recipe\.yaml; free some space"):
            run.write_best("model: new\n")
        monkeypatch.undo()
        assert (run.path / "best_recipe.yaml").read_text() == "model: old\n"


@pytest.mark.parametrize(("code", "says"), [
    (errno.EROFS, "the file system is read-only while creating the run store; remount it"),
    (errno.EACCES, "permission denied while creating the run store; give this user write"),
    (errno.ENOSPC, "no space left on the device while creating the run store; free some"),
])
def test_a_store_that_cannot_be_created_is_one_line(
        store: RunStore, monkeypatch: pytest.MonkeyPatch, code: int, says: str) -> None:
    monkeypatch.setattr(os, "mkdir", _failing(code, os.mkdir))
    with pytest.raises(StoreError) as info:
        store.create_run(CONFIG)
    assert says in str(info.value) and str(info.value).endswith("then retry")


def test_a_lock_that_cannot_be_taken_is_one_line(
        store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0))
    real_open = os.open

    def no_lock(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_lock)
    with pytest.raises(StoreError, match=r"\.lock: the file system is read-only while "
                                         r"taking the run's lock; remount it read-write"):
        store.open_run(run.path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_run_folder_is_one_line(store: RunStore) -> None:
    with store.create_run(CONFIG) as run:
        run.append(record(0))
    (run.path / ".lock").chmod(0o444)
    run.path.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="permission denied while taking the run's"):
            store.open_run(run.path)
    finally:
        run.path.chmod(0o755)
