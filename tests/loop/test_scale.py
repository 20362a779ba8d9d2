"""Several experiments at once on one host: a 4-GPU fake host (a fake `nvidia-smi` on
PATH) running tests/fake_vllm.py behind a `vllm` wrapper, one server per GPU, each
pinned to its own GPU; the workers' GPUs from --gpus / --parallel; the pinned child env."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import GpuInfo, Hardware
from aevyra_forge.engine.process import members
from aevyra_forge.loop import scale
from aevyra_forge.space.child_env import pinned
from tests.fake_provider import FakeProvider, Recorded, Reply, proposal
from tests.loop.test_session import (
    _host_env,
    _kill_groups,
    _real_cmd,
    _records,
    _server_groups,
    _wrapper,
)

GPUS = 4
BARRIER_S = 120  # how long a server waits for the others of its round before it fails
KEY = "sk-test-scale"
_ACTIVE = re.compile(r"## Active layer\n(\d)")
_WANT = re.compile(r"Propose (\d+) DIFFERENT experiments")


def batch_agent(moves: Sequence[Mapping[str, Any]]) -> Callable[[Recorded], Reply]:
    """An LLM stand-in for rounds: answers each ask with as many of the next layer-1
    `moves` as the prompt asks for, in one {"proposals": [...]} reply, and with none
    (nothing left) once they are used up or in another layer."""
    left = iter(moves)

    def respond(rec: Recorded) -> Reply:
        asked = " ".join(str(t["content"]) for t in rec.turns if t["role"] == "user")
        layer = _ACTIVE.search(asked)
        want = _WANT.search(asked)
        count = int(want.group(1)) if want else 1
        chosen = list(itertools.islice(left, count)) if layer and layer.group(1) == "1" \
            else []
        return Reply(json.dumps({"proposals": [
            json.loads(proposal(c, 1, rationale=f"try {c}")) for c in chosen]}))

    return respond


def llm_options(fake: FakeProvider) -> list[str]:
    return ["--llm", "openai/gpt-4o-mini", "--llm-base-url", fake.openai_url,
            "--llm-api-key", KEY]


def _hw(n: int) -> Hardware:
    return Hardware(device="cuda", gpus=tuple(GpuInfo(index=i, name="NVIDIA A100-SXM4-80GB",
                                                      memory_mib=81920) for i in range(n)))


def _settings(**values: object) -> TuneSettings:
    return TuneSettings.model_validate({"model": "m", "workload": "w.jsonl", **values})


def test_workers_one_per_gpu_or_per_group() -> None:
    assert scale.workers(_settings(gpus="0,1,2,3"), _hw(8)) == [
        ("gpu0", (0,)), ("gpu1", (1,)), ("gpu2", (2,)), ("gpu3", (3,))]
    assert scale.workers(_settings(gpus="4,5,6,7", parallel=2), _hw(8)) == [
        ("gpu4+5", (4, 5)), ("gpu6+7", (6, 7))]
    assert scale.workers(_settings(parallel=4), _hw(8)) == [
        ("gpu0+1", (0, 1)), ("gpu2+3", (2, 3)), ("gpu4+5", (4, 5)), ("gpu6+7", (6, 7))]
    assert scale.workers(_settings(parallel=3, dry_run=True), _hw(1)) == [
        ("sim0", ()), ("sim1", ()), ("sim2", ())]
    assert scale.workers(_settings(), _hw(8)) == []
    one = scale.trial_hardware(_settings(gpus="4,5,6,7", parallel=2), _hw(8))
    assert [g.index for g in one.gpus] == [4, 5]  # tensor parallelism up to a group


@pytest.mark.parametrize(("values", "message"), [
    ({"gpus": "0,1,2", "parallel": 2}, "do not split into --parallel 2 equal groups"),
    ({"gpus": "0,x"}, "expected GPU indices separated by commas"),
    ({"gpus": "1,1"}, "each GPU index once"),
])
def test_malformed_gpus_are_refused_naming_the_fix(values: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _settings(**values)


def test_more_workers_than_gpus_or_a_missing_gpu_is_refused() -> None:
    with pytest.raises(UsageError, match="this host shows 2 GPUs; ask for at most 2"):
        scale.workers(_settings(parallel=4), _hw(2))
    with pytest.raises(UsageError, match="no GPU 5 here"):
        scale.selected(_settings(gpus="0,5"), _hw(4))
    with pytest.raises(UsageError, match="one CPU"):
        scale.workers(_settings(parallel=2, device="cpu"), Hardware(device="cpu"))


def test_the_child_is_pinned_to_its_gpus_and_nothing_renumbers_them() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "ROCR_VISIBLE_DEVICES": "1", "PATH": "/bin"}
    assert pinned(env, "cuda", (2, 3)) == {"CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}
    assert pinned(env, "rocm", (1,)) == {"HIP_VISIBLE_DEVICES": "1", "PATH": "/bin"}


# -- a 4-GPU host, end to end ------------------------------------------------------------

def _four_gpus(folder: Path, used: Mapping[int, int] | None = None) -> Path:
    """A fake nvidia-smi: four A100s, holding `used` MiB each (default none)."""
    used = used or {}
    bin_dir = folder / "smi"
    bin_dir.mkdir()
    lines = {"mem": "\n".join(f"{i}, GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd, "
                              f"{used.get(i, 0)}" for i in range(GPUS)),
             "info": "\n".join(f"{i}, NVIDIA A100-SXM4-80GB, 81920, 8.0, 535.129.03, "
                               f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd"
                               for i in range(GPUS))}
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"""#!/bin/sh
case "$*" in
  *memory.used*) printf '%s\\n' "{lines['mem']}" ;;
  *) printf '%s\\n' "{lines['info']}" ;;
esac
""")
    tool.chmod(0o755)
    return bin_dir


def _barrier(vllm: Path, folder: Path, round_size: int) -> None:
    """Make the wrapper's servers after the first (the baseline, alone) wait until
    `round_size` of them have started: a pool that ran them one at a time would leave
    the first of them waiting, and it fails its boot after BARRIER_S."""
    text = vllm.read_text()
    gate = f"""if [ "$1" = "serve" ]; then
  echo "wrapper: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  mkdir -p "{folder}/starts"; touch "{folder}/starts/$$"
  n=$(ls "{folder}/starts" | wc -l)
  if [ "$n" -gt 1 ]; then
    waited=0
    until [ "$(ls "{folder}/starts" | wc -l)" -ge {1 + round_size} ]; do
      sleep 0.05; waited=$((waited + 1))
      [ "$waited" -gt {BARRIER_S * 20} ] && echo "barrier: alone after {BARRIER_S} s" && exit 1
    done
  fi
fi
"""
    marker = "export FAKE_VLLM_TOKEN_DELAY_S"
    vllm.write_text(text.replace(marker, gate + marker, 1))


def test_four_experiments_at_once_each_on_its_own_gpu(tmp_path: Path,
                                                      small_workload: Path) -> None:
    vllm = _wrapper(tmp_path, version="0.32.0")  # a GPU build of the fake
    _barrier(vllm, tmp_path, GPUS)
    smi = _four_gpus(tmp_path)
    env = _host_env(tmp_path, PATH=f"{smi}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "forge"
    moves = [{"long_prefill_token_threshold": v} for v in (16, 32, 64, 128)]
    try:
        with FakeProvider(batch_agent(moves)) as fake:
            cmd = _real_cmd(run_dir, small_workload, vllm, "--gpus", "0,1,2,3",
                            "--patience", "20")
            cmd[cmd.index("--device") + 1] = "cuda"
            cmd[cmd.index("--max-experiments") + 1] = str(1 + GPUS)
            cmd[cmd.index("--llm"):cmd.index("--llm") + 2] = llm_options(fake)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            asks = [r.last_user for r in fake.requests]
        assert len(asks) == 1 and "Propose 4 DIFFERENT experiments" in asks[0]  # one call
        assert done.returncode == 0, done.stderr
        records = _records(run_dir)
        assert sorted(int(str(r["exp"])) for r in records) == list(range(1 + GPUS))
        first_round = [r for r in records if r["round"] == 1]
        assert len(first_round) == GPUS
        assert all(r["status"] == "ok" for r in first_round), first_round
        (run,) = sorted((run_dir / "runs").glob("0*"))
        seen = {}
        for rec in first_round:  # every server of the round was up while the others were
            log = (run / str(rec["log"])).read_text()
            assert "barrier" not in log, log
            (line,) = [ln for ln in log.splitlines() if ln.startswith("wrapper: CUDA")]
            seen[rec["worker"]] = line.rsplit("=", 1)[1]
        assert seen == {f"gpu{i}": str(i) for i in range(GPUS)}
        starts = [json.loads(ln) for ln in (run / "trials.jsonl").read_text().splitlines()]
        assert [t["exp"] for t in starts[1:]] == [1, 2, 3, 4]  # logged before any ran
        groups = _server_groups(run_dir)
        assert len(groups) == 1 + GPUS
        assert all(not members(g) for g in groups)  # no server left alive
    finally:
        _kill_groups(run_dir)


def test_a_busy_gpu_of_the_pool_is_named_before_anything_boots(
        tmp_path: Path, small_workload: Path) -> None:
    """Memory is checked GPU by GPU: one held by another process refuses the run, named,
    though the four together hold less than four idle GPUs may."""
    vllm = _wrapper(tmp_path, version="0.32.0")
    smi = _four_gpus(tmp_path, used={2: 2048})
    env = _host_env(tmp_path, PATH=f"{smi}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "forge"
    cmd = _real_cmd(run_dir, small_workload, vllm, "--gpus", "0,1,2,3")
    cmd[cmd.index("--device") + 1] = "cuda"
    busy = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert busy.returncode == 1
    assert "2048 MiB of memory on GPU 2 is already in use by another process" in \
        " ".join(busy.stderr.split()), busy.stderr
    assert not run_dir.exists()


def _stall_the_round(vllm: Path, folder: Path) -> None:
    """Make the wrapper's servers after the first (the baseline) stall their streams
    after one token while `folder/stall_round` exists (forge stays in their benches),
    and write each one's engine child pid under `folder/pids`."""
    text = vllm.read_text()
    gate = f"""if [ "$1" = "serve" ]; then
  mkdir -p "{folder}/starts" "{folder}/pids"; touch "{folder}/starts/$$"
  if [ "$(ls "{folder}/starts" | wc -l)" -gt 1 ] && [ -f "{folder}/stall_round" ]; then
    export FAKE_VLLM_STALL_AFTER_N_TOKENS=1 FAKE_VLLM_PIDFILE="{folder}/pids/$$"
  fi
fi
"""
    marker = "export FAKE_VLLM_TOKEN_DELAY_S"
    vllm.write_text(text.replace(marker, gate + marker, 1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigint_during_a_pool_round_exits_130_kills_every_server_and_resumes(
        tmp_path: Path, small_workload: Path) -> None:
    """Ctrl-C while four servers of a round are benching on a 4-GPU fake host: exit 130,
    every server of the round gone (their leaders' and engine children's pids), the run
    resumable; the resume runs the round's four trials again and completes."""
    vllm = _wrapper(tmp_path, version="0.32.0")
    _stall_the_round(vllm, tmp_path)
    (tmp_path / "stall_round").touch()
    smi = _four_gpus(tmp_path)
    env = _host_env(tmp_path, PATH=f"{smi}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "forge"
    moves = [{"long_prefill_token_threshold": v} for v in (16, 32, 64, 128, 256, 8)]
    try:
        with FakeProvider(batch_agent(moves)) as fake:
            cmd = _real_cmd(run_dir, small_workload, vllm, "--gpus", "0,1,2,3",
                            "--patience", "20")
            cmd[cmd.index("--device") + 1] = "cuda"
            cmd[cmd.index("--max-experiments") + 1] = str(1 + GPUS)
            cmd[cmd.index("--llm"):cmd.index("--llm") + 2] = llm_options(fake)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            assert proc.stderr is not None
            benching: set[str] = set()
            for line in proc.stderr:  # every server of the round is up and benched
                benching |= set(re.findall(r"exp ([1-4]): bench", line))
                if len(benching) == GPUS:
                    break
            assert len(benching) == GPUS, "the round never reached its benches"
            proc.send_signal(signal.SIGINT)
            rest = proc.stderr.read()
            assert proc.wait() == 130, rest
            assert "tune resume" in rest
            engines = [int(p.read_text()) for p in (tmp_path / "pids").iterdir()]
            groups = _server_groups(run_dir)
            assert len(engines) == GPUS and len(groups) == 1 + GPUS
            assert not any(members(g) for g in groups)  # no server left alive
            assert not any(_alive(pid) for pid in (*groups, *engines))
            (run,) = sorted((run_dir / "runs").glob("0*"))
            assert not (run / "completed.json").exists()
            assert [int(str(r["exp"])) for r in _records(run_dir)] == [0]

            (tmp_path / "stall_round").unlink()
            resume = [sys.executable, "-m", "aevyra_forge", "tune", "resume", "--run-dir",
                      str(run_dir), "--llm-api-key", KEY]
            done = subprocess.run(resume, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        records = _records(run_dir)
        assert sorted(int(str(r["exp"])) for r in records) == list(range(1 + GPUS))
        assert {r["worker"] for r in records if r["round"] == 1} == {
            f"gpu{i}" for i in range(GPUS)}
        starts = [json.loads(ln)["exp"] for ln in (run / "trials.jsonl").read_text()
                  .splitlines()]
        assert sorted(starts) == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # the round again, once
        assert not any(members(g) for g in _server_groups(run_dir))
    finally:
        _kill_groups(run_dir)
