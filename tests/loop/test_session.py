"""Crash safety end to end: a real `aevyra-forge tune --dry-run` process is SIGKILLed at
several points and resumed; no recorded experiment is lost or duplicated, and the result
is the same as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_8B, run_cli

# Experiments of each run here: fewer than the builtin strategy needs to converge on every
# layer (with the dry run's layer-2 candidates it converges after 10: its moves carry their
# refinements along), so every run spends its whole budget
BUDGET = 9
POOL_BUDGET = 16  # the pool's runs (an LLM's fixed moves): four rounds of four and more


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
        if f"/{BUDGET} done" in line or line.startswith("run "):
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
        if f"/{BUDGET} done" in line:
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


# moves the baseline's diagnosis cannot rule out (the loop refuses those before a boot)
POOL_MOVES = [{"long_prefill_token_threshold": v} for v in range(64, 64 * 19, 64)]


def test_sigkill_with_a_pool_of_workers_then_resume(
        tmp_path: Path, small_workload: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--parallel 4, proposals from a fake LLM asked once per round: a round's trials are
    all logged before any runs and recorded as each finishes; killed mid-round and
    resumed, the trials in flight are run again, every finished one never, and the run
    completes with every experiment once."""
    from tests.fake_provider import FakeProvider
    from tests.loop.test_scale import KEY, batch_agent, llm_options

    with FakeProvider(batch_agent(POOL_MOVES)) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        run_dir = tmp_path / "pool"
        cmd = _cmd(run_dir, small_workload, "--parallel", "4", "--max-experiments",
                   str(POOL_BUDGET))
        cmd[cmd.index("--llm"):cmd.index("--llm") + 2] = llm_options(fake)
        _sigkill_the_pool_and_resume(run_dir, cmd)


def _sigkill_the_pool_and_resume(run_dir: Path, cmd: list[str]) -> None:
    caught: set[int] = set()
    finished_before: set[int] = set()
    _kill_at_boot(cmd, 3)
    for _ in range(8):  # a dry-run round is short: the kill can land between rounds
        recorded = {int(str(r["exp"])) for r in _records(run_dir)}
        finished_before |= recorded
        caught |= {exp for exp in _started(run_dir) if exp not in recorded}
        if len(caught) >= 2:
            break
        _kill_at_boot(_resume_cmd(run_dir), 2)
    assert caught, "never killed a round in flight"

    done = subprocess.run(_resume_cmd(run_dir), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = _records(run_dir)
    assert sorted(int(str(r["exp"])) for r in records) == list(range(POOL_BUDGET))
    started = _started(run_dir)
    assert all(started.count(exp) >= 2 for exp in caught)  # run again on resume
    assert all(started.count(exp) == 1 for exp in finished_before)  # never repeated
    assert {r["worker"] for r in records} == {"sim0", "sim1", "sim2", "sim3"}
    assert max(int(str(r["round"] or 0)) for r in records) >= 4


# -- detached runs: SIGHUP -----------------------------------------------------------------

LONG = 200  # a budget the run cannot spend before the test has sent its signal


def _long_cmd(run_dir: Path, workload: Path) -> list[str]:
    cmd = _cmd(run_dir, workload)
    cmd[cmd.index("--max-experiments") + 1] = str(LONG)
    cmd[cmd.index("--patience") + 1] = str(LONG)
    return cmd


def _until_first_experiment(proc: subprocess.Popen[str], budget: int) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"/{budget} " in line:
            return
    raise AssertionError("the run printed no experiment line")


def _drop_reader_and_hang_up(proc: subprocess.Popen[str]) -> None:
    """What a dropped SSH session does: the reader of the output goes, then SIGHUP."""
    assert proc.stderr is not None and proc.stdout is not None
    proc.stderr.close()
    proc.stdout.close()
    proc.send_signal(signal.SIGHUP)


def test_sighup_with_the_reader_gone_exits_130(tmp_path: Path, small_workload: Path) -> None:
    """A dropped SSH session: the terminal's reader goes away, then SIGHUP arrives. The run
    stops as on Ctrl-C (exit 130, resumable), whichever the process meets first."""
    run_dir = tmp_path / "forge"
    proc = subprocess.Popen(_long_cmd(run_dir, small_workload), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _until_first_experiment(proc, LONG)
    _drop_reader_and_hang_up(proc)
    assert proc.wait() == 130
    (run,) = sorted((run_dir / "runs").glob("0*"))
    assert not (run / "completed.json").exists()
    assert 1 <= len(_records(run_dir)) < LONG
    done = subprocess.run([*_resume_cmd(run_dir), "--max-experiments", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _nohup(cmd: list[str]) -> list[str]:
    nohup = shutil.which("nohup")
    if nohup is None:
        pytest.skip("no nohup on PATH")
    return [nohup, *cmd]


def test_sighup_under_nohup_is_ignored(tmp_path: Path, small_workload: Path) -> None:
    """`nohup aevyra-forge tune ... &`: SIGHUP stays ignored and the run finishes."""
    run_dir = tmp_path / "forge"
    proc = subprocess.Popen(_nohup(_cmd(run_dir, small_workload)), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _until_first_experiment(proc, BUDGET)
    proc.send_signal(signal.SIGHUP)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert proc.wait() == 0, rest
    assert len(_records(run_dir)) == BUDGET


def test_nohup_run_outlives_its_reader(tmp_path: Path, small_workload: Path) -> None:
    """Under nohup, a reader that goes away (`nohup aevyra-forge tune ... | tee log` and
    the session drops) only silences the run: it finishes and records everything."""
    run_dir = tmp_path / "forge"
    proc = subprocess.Popen(_nohup(_cmd(run_dir, small_workload)), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _until_first_experiment(proc, BUDGET)
    _drop_reader_and_hang_up(proc)
    assert proc.wait() == 0
    (run,) = sorted((run_dir / "runs").glob("0*"))
    assert (run / "completed.json").exists()
    assert len(_records(run_dir)) == BUDGET


# -- the log is validated like user input; secrets are not stored -----------------------------

def _finished_run(tmp_path: Path, workload: Path, capsys: pytest.CaptureFixture[str],
                  experiments: int = 3) -> Path:
    """A dry run of `experiments`, made resumable again (completed.json removed)."""
    code, _, err = run_cli(["tune", "--dry-run", "--gpu", "A100-80GB", "--model", MODEL_8B,
                            "--workload", str(workload), "--llm", "builtin", "--run-dir",
                            str(tmp_path / ".forge"), "--max-experiments",
                            str(experiments)], capsys)
    assert code == 0, err
    (run,) = (tmp_path / ".forge" / "runs").glob("0*")
    (run / "completed.json").unlink()
    return run


def test_a_deployment_recipe_resumes_and_its_fixed_arguments_cannot_be_edited(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "prod.yaml"
    recipe.write_text("config:\n  trust_remote_code: true\n  seed: 7\n")
    code, _, err = run_cli(["tune", "--dry-run", "--gpu", "A100-80GB", "--model", MODEL_8B,
                            "--workload", str(small_workload), "--llm", "builtin",
                            "--run-dir", str(tmp_path / ".forge"), "--recipe", str(recipe),
                            "--max-experiments", "2"], capsys)
    assert code == 0, err
    (run,) = (tmp_path / ".forge" / "runs").glob("0*")
    (run / "completed.json").unlink()
    code, _, err = run_cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge"),
                            "--max-experiments", "3"], capsys)
    assert code == 0, err  # the fixed arguments pass the resume's checks
    path = run / "experiments.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["recipe"]["config"]["seed"] == 7 for r in rows)
    (run / "completed.json").unlink()
    rows[1]["recipe"]["config"]["seed"] = 8  # an edited log: not the run's deployment
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge"),
                            "--max-experiments", "4"], capsys)
    line = _one_line_error(code, err)
    assert f"{path}:2: " in line and "'seed': 8" in line and "'seed': 7" in line, line


def _one_line_error(code: int, err: str) -> str:
    assert code == 1
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    return line


@pytest.mark.parametrize(("where", "key", "value", "says"), [
    ("config", "trust_remote_code", True, "trust_remote_code"),
    ("config", "download_dir", "/tmp/elsewhere", "download_dir"),
    ("env", "LD_PRELOAD", "/tmp/evil.so", "LD_PRELOAD"),
])
def test_resume_refuses_a_logged_recipe_that_recipe_would_refuse(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str],
        where: str, key: str, value: object, says: str) -> None:
    run = _finished_run(tmp_path, small_workload, capsys)
    path = run / "experiments.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    rec = json.loads(lines[1])
    if where == "config":
        rec["recipe"]["config"][key] = value
    else:
        rec["recipe"].setdefault("kernel", {}).setdefault("env", {})[key] = value
    rec["kept"] = True
    lines[1] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    code, _, err = run_cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge")], capsys)
    line = _one_line_error(code, err)
    assert f"{path}:2: " in line and says in line, line
    assert "delete it or restore the log from a backup" in line
    assert path.read_bytes() == before
    assert not list((run / "logs").glob("exp_003*"))  # nothing was booted


def test_resume_refuses_a_logged_recipe_for_another_model(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path, small_workload, capsys)
    path = run / "trials.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    start = json.loads(lines[0])
    start["recipe"]["model"] = "someone/evil-model"
    lines[0] = json.dumps(start) + "\n"
    path.write_text("".join(lines))
    code, _, err = run_cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge")], capsys)
    line = _one_line_error(code, err)
    assert f"{path}:1: the recipe serves 'someone/evil-model'" in line


def test_resume_reports_a_duplicated_experiment(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path, small_workload, capsys)
    path = run / "experiments.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[0], lines[1], lines[1], *lines[2:]]))
    code, _, err = run_cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge")], capsys)
    line = _one_line_error(code, err)
    assert f"{path}:3: experiment 1 is recorded twice (also on line 2)" in line


def test_resume_says_what_a_torn_last_line_dropped(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path, small_workload, capsys, experiments=3)
    path = run / "experiments.jsonl"
    with open(path, "ab") as fh:
        fh.write(b'{"exp": 3, "recipe": {"mo')
    code, _, err = run_cli(["tune", "resume", "--run-dir", str(tmp_path / ".forge"),
                            "--max-experiments", "4"], capsys)
    assert code == 0, err
    assert "dropped 25 bytes after the last complete line" in " ".join(err.split())
    assert [json.loads(ln)["exp"] for ln in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_a_credential_in_the_llm_url_is_never_written(
        tmp_path: Path, small_workload: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from aevyra_forge.agent import llm as llm_module
    from tests.fake_provider import Fail, FakeProvider

    monkeypatch.setattr(llm_module, "BACKOFF_BASE_S", 0.0)
    store = tmp_path / ".forge"
    with FakeProvider(lambda rec: Fail(503)) as fake:
        secret_url = fake.openai_url.replace("http://", "http://me:s3cret-pw@")
        code, _, err = run_cli(["tune", "--dry-run", "--gpu", "A100-80GB", "--model",
                                MODEL_8B, "--workload", str(small_workload), "--llm",
                                "openai/gpt-4o-mini", "--llm-base-url", secret_url,
                                "--llm-api-key", "k", "--run-dir", str(store),
                                "--max-experiments", "2"], capsys)
        assert code == 1  # the provider is down: the run stops, resumable
        (run,) = (store / "runs").glob("0*")
        config = json.loads((run / "config.json").read_text())
        assert config["settings"]["llm_base_url"] == fake.openai_url.replace(
            "http://", "http://REDACTED@")
        code, _, err = run_cli(["tune", "resume", "--run-dir", str(store)], capsys)
        line = _one_line_error(code, err)
        assert "credential in --llm-base-url, which is never stored" in line
        assert "tune resume --llm-base-url URL" in line
        code, _, err = run_cli(["tune", "resume", "--run-dir", str(store), "--llm-base-url",
                                secret_url], capsys)
        assert code == 1 and "unreachable" in err  # still down, asked at the URL again
    assert "s3cret-pw" not in err
    (amendment,) = json.loads((run / "config.json").read_text())["amendments"]
    assert amendment["new"]["llm_base_url"] == config["settings"]["llm_base_url"]
    for path in run.rglob("*"):
        if path.is_file():
            assert b"s3cret-pw" not in path.read_bytes(), path


# -- resume with amendments ------------------------------------------------------------------

class _Quiet:
    def notify(self, event: object) -> None:
        del event


def test_amendments_are_recorded_once_and_kept_on_later_resumes(tmp_path: Path,
                                                                small_workload: Path) -> None:
    from aevyra_forge.core.errors import UsageError
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.loop import session

    store = tmp_path / "forge"
    settings = TuneSettings(model=MODEL_8B, workload=str(small_workload), llm="builtin",
                            run_dir=str(store), dry_run=True, gpu="A100-80GB")
    session.start(settings, _Quiet()).run_log.close()  # a run interrupted before exp 0
    (config_path,) = store.glob("runs/0*/config.json")

    def amendments() -> list[dict[str, object]]:
        return list(json.loads(config_path.read_text()).get("amendments", []))

    tuner = session.resume(store, _Quiet(), amendments={"max_experiments": 9,
                                                         "max_dollars": 1.5})
    tuner.run_log.close()
    assert (tuner.s.max_experiments, tuner.s.max_dollars) == (9, 1.5)
    (first,) = amendments()
    assert (first["old"], first["new"]) == ({"max_experiments": 50, "max_dollars": None},
                                            {"max_experiments": 9, "max_dollars": 1.5})
    tuner = session.resume(store, _Quiet())  # no options: the amended values hold
    tuner.run_log.close()
    assert (tuner.s.max_experiments, tuner.s.max_dollars) == (9, 1.5)
    tuner = session.resume(store, _Quiet(), amendments={"max_experiments": 9})
    tuner.run_log.close()
    assert len(amendments()) == 1  # the same value again changes nothing
    tuner = session.resume(store, _Quiet(), amendments={"max_experiments": 12})
    tuner.run_log.close()
    assert tuner.s.max_experiments == 12
    assert [a["new"] for a in amendments()] == [{"max_experiments": 9, "max_dollars": 1.5},
                                               {"max_experiments": 12}]
    assert amendments()[1]["old"] == {"max_experiments": 9}
    with pytest.raises(UsageError, match=r"^--max-hours: "):
        session.resume(store, _Quiet(), amendments={"max_hours": -1.0})
    with pytest.raises(UsageError, match="cannot change repeats"):
        session.resume(store, _Quiet(), amendments={"repeats": 2})
    assert len(amendments()) == 2  # refused amendments leave no trace


def test_sighup_with_the_terminal_hung_up_exits_130(tmp_path: Path,
                                                    small_workload: Path) -> None:
    """An SSH session's terminal goes away (its writes answer EIO), then SIGHUP: exit 130."""
    import pty

    run_dir = tmp_path / "forge"
    leader, follower = pty.openpty()
    proc = subprocess.Popen(_long_cmd(run_dir, small_workload), stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(follower)
    seen = b""
    while b"L1 baseline" not in seen:  # the first experiment (a terminal gets colours)
        chunk = os.read(leader, 4096)  # blocks until the run writes; EOF raises OSError
        assert chunk, seen
        seen += chunk
    os.close(leader)  # the terminal hangs up: the run's next write fails with EIO
    proc.send_signal(signal.SIGHUP)
    assert proc.wait() == 130
    (run,) = sorted((run_dir / "runs").glob("0*"))
    assert not (run / "completed.json").exists()


# -- real runs on this host: orphans, one tuner per device, a busy GPU ----------------------

FAKE_VLLM = Path(__file__).resolve().parents[1] / "data" / "fake_vllm" / "vllm"
HELP = Path(__file__).resolve().parents[1] / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"
DEADLINE_S = 60.0  # how long a server may take to come up or go away before a test fails


def _wrapper(folder: Path, version: str = "0.32.0+cpu") -> Path:
    """A `vllm` that is a bash script around tests/data/fake_vllm/vllm and does NOT exec
    it, so forge's parent-death signal reaches only bash. Files in `folder` steer it:
    `stall` (streams stop after one token: forge stays in the bench), `gated` (the
    server starts only once `open` exists)."""
    script = folder / "vllm"
    script.write_text(f"""#!/bin/bash
if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi
if [ "$1 $2" = "serve --help=all" ]; then cat "{HELP}"; exit 0; fi
export FAKE_VLLM_TOKEN_DELAY_S=0.001
[ -f "{folder}/stall" ] && export FAKE_VLLM_STALL_AFTER_N_TOKENS=1
if [ -f "{folder}/gated" ]; then until [ -f "{folder}/open" ]; do sleep 0.05; done; fi
"{sys.executable}" "{FAKE_VLLM}" "$@"
echo "vllm exited with $?"
""")
    script.chmod(0o755)
    return script


def _host_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Our environment with the device locks and the flag cache in `tmp_path`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FAKE_VLLM_", "VLLM_", "FORGE_"))}
    (tmp_path / "runtime").mkdir(exist_ok=True)
    return {**env, "XDG_RUNTIME_DIR": str(tmp_path / "runtime"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200", **extra}


def _real_cmd(run_dir: Path, workload: Path, vllm: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model",
            "fake/tiny-1b", "--workload", str(workload), "--llm", "builtin", "--run-dir",
            str(run_dir), "--vllm-bin", str(vllm), "--max-experiments", "2", "--repeats",
            "1", "--seed", "7", *extra]


def _server_groups(run_dir: Path) -> list[int]:
    """The process groups of every server the runs under `run_dir` recorded."""
    return sorted({json.loads(line)["pgid"] for path in run_dir.glob("runs/*/servers.jsonl")
                   for line in path.read_text().splitlines() if line.strip()})


def _kill_groups(run_dir: Path) -> None:
    """Whatever a failed test left running."""
    from aevyra_forge.engine.process import members

    for pgid in _server_groups(run_dir):
        if members(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_a_server_behind_a_wrapper_outlives_a_sigkill_and_resume_removes_it(
        tmp_path: Path, small_workload: Path) -> None:
    """The wrapper case of SIGKILL-and-resume, with real processes: forge dies mid-bench,
    the parent-death signal kills only the bash wrapper, the server it started keeps
    running; `tune resume` finds it in servers.jsonl, says so, tears the whole group down
    before booting, and the run completes with no process left."""
    from aevyra_forge.engine.process import members
    from tests.engine.conftest import wait_gone

    run_dir = tmp_path / "forge"
    vllm = _wrapper(tmp_path)
    (tmp_path / "stall").touch()
    env = _host_env(tmp_path)
    forge = subprocess.Popen(_real_cmd(run_dir, small_workload, vllm), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert forge.stderr is not None
        for line in forge.stderr:
            if "exp 0: bench" in line:
                break
        else:
            raise AssertionError("forge never reached the bench")
        forge.kill()
        forge.wait()
        forge.stderr.close()
        (pgid,) = _server_groups(run_dir)
        # the parent-death signal reaches the wrapper asynchronously (late on a loaded host)
        assert wait_gone(pgid), "the wrapper outlived forge: no parent-death signal"
        survivors = members(pgid)
        assert survivors and pgid not in survivors  # the wrapper died, the server did not
        (tmp_path / "stall").unlink()
        done = subprocess.run([sys.executable, "-m", "aevyra_forge", "tune", "resume",
                               "--run-dir", str(run_dir)], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        said = " ".join(done.stderr.split())
        assert ("stopped a vLLM server left behind by run 001_" in said
                and f"(experiment 0, process group {pgid}," in said), said
        assert said.index("stopped a vLLM server") < said.index("resuming")
        assert wait_gone(*survivors)
        records = _records(run_dir)
        assert [r["exp"] for r in records] == [0, 1] and records[0]["status"] == "ok"
        assert all(not members(g) for g in _server_groups(run_dir))
        (run,) = sorted((run_dir / "runs").glob("0*"))
        lines = [json.loads(ln) for ln in (run / "servers.jsonl").read_text().splitlines()]
        assert sum(ln["event"] == "launched" for ln in lines) == \
            sum(ln["event"] == "gone" for ln in lines) == 3  # killed run's + exp 0, 1 again
    finally:
        if forge.poll() is None:
            forge.kill()
            forge.wait()
        _kill_groups(run_dir)


def test_a_second_tuner_on_the_same_device_is_refused_with_the_first_ones_pid(
        tmp_path: Path, small_workload: Path) -> None:
    vllm = _wrapper(tmp_path)
    (tmp_path / "gated").touch()  # the first tuner's server waits for `open`
    (tmp_path / "ungated").mkdir()
    other_vllm = _wrapper(tmp_path / "ungated")  # the second's would not wait for anything
    env = _host_env(tmp_path)
    first = subprocess.Popen(_real_cmd(tmp_path / "first", small_workload, vllm), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        for line in first.stderr:
            if line.startswith("run "):  # the run exists: its device lock is held
                break
        second = subprocess.run(_real_cmd(tmp_path / "second", small_workload, other_vllm),
                                env=env, capture_output=True, text=True)
        assert second.returncode == 1
        message = _last_line(second.stderr)
        assert f"this host's CPU is in use by another aevyra-forge tuner (pid {first.pid})" \
            in message, message
        assert not (tmp_path / "second").exists()  # refused before a run folder was made
        _kill_groups(tmp_path / "second")
        (tmp_path / "open").touch()
        rest = first.stderr.read()
        assert first.wait() == 0, rest
        assert len(_records(tmp_path / "first")) == 2
    finally:
        (tmp_path / "open").touch()
        if first.poll() is None:
            first.kill()
            first.wait()
        _kill_groups(tmp_path / "first")
    again = subprocess.run(_real_cmd(tmp_path / "second", small_workload, other_vllm,
                                     "--max-experiments", "1"),
                           env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # free once the first has finished


def _last_line(stderr: str) -> str:
    """The one-line error that ends a refused run (notes may come before it)."""
    assert "Traceback" not in stderr
    *_, line = [ln for ln in stderr.splitlines() if ln.strip()]
    assert line.startswith("error: "), stderr
    return line


def _fake_nvidia_smi(folder: Path, used_mib: int) -> Path:
    """One T4, `used_mib` of its memory in use (by someone else)."""
    bin_dir = folder / "smi"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"""#!/bin/sh
case "$*" in
  *memory.used*) echo "0, GPU-39cd9454-0976-646a-acef-01a35ad02034, {used_mib}" ;;
  *) echo "0, Tesla T4, 15360, 7.5, 535.104.05, GPU-39cd9454-0976-646a-acef-01a35ad02034" ;;
esac
""")
    tool.chmod(0o755)
    return bin_dir


def test_a_gpu_busy_with_another_process_is_reported_before_the_baseline(
        tmp_path: Path, small_workload: Path) -> None:
    vllm = _wrapper(tmp_path, version="0.32.0")  # a GPU build
    smi = _fake_nvidia_smi(tmp_path, used_mib=9000)
    env = _host_env(tmp_path, PATH=f"{smi}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "forge"
    cmd = _real_cmd(run_dir, small_workload, vllm)
    cmd[cmd.index("--device") + 1] = "cuda"
    busy = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert busy.returncode == 1
    message = _last_line(busy.stderr)
    assert "9000 MiB of memory on GPU 0 is already in use by another process: wait for it " \
           "to finish and retry, or pass --allow-busy-gpu" in message, message
    assert not run_dir.exists()
    allowed = subprocess.run([*cmd, "--allow-busy-gpu", "--max-experiments", "1"], env=env,
                             capture_output=True, text=True)
    try:
        assert allowed.returncode == 0, allowed.stderr
        assert "tuning beside it (--allow-busy-gpu)" in " ".join(allowed.stderr.split())
        assert _records(run_dir)[0]["status"] == "ok"
    finally:
        _kill_groups(run_dir)

