"""Tests for aevyra_forge.engine.process: group teardown escalating to SIGKILL, and no
vLLM (tests/data/fake_vllm/vllm, see conftest.py) outliving forge, killed or exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aevyra_forge.engine.process import ServerGroup, members, ours, start_time, terminate_group
from tests.engine.conftest import DEADLINE_S, FAKE_BIN, ROOT, engine_pid, gone, wait_gone


def test_terminate_group_escalates_to_sigkill() -> None:
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    start = time.monotonic()
    terminate_group(proc.pid, proc, grace_s=0.3)
    assert time.monotonic() - start < 3.0
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()


FORGE_STAND_IN = """\
import os, sys, time
from pathlib import Path
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.engine.launcher import VllmLauncher
# the whole environment: the fake vllm is steered by FAKE_VLLM_* variables
launcher = VllmLauncher(sys.argv[1], boot_timeout_s=20.0, health_poll_s=0.05,
                        env=os.environ)
server = launcher.launch(Recipe(model="fake/m"), Path(sys.argv[2]))
print(server.process.pid, flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)
time.sleep(120)
"""


@pytest.fixture
def stand_in(tmp_path: Path, pidfile: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    script = tmp_path / "forge_stand_in.py"
    script.write_text(FORGE_STAND_IN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
    env.update({"FAKE_VLLM_PIDFILE": str(pidfile), "PYTHONPATH": str(ROOT)})
    yield script, env


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_no_vllm_outlives_forge(how: str, tmp_path: Path, pidfile: Path,
                                stand_in: tuple[Path, dict[str, str]]) -> None:
    """SIGKILLed forge: PR_SET_PDEATHSIG sends vLLM SIGTERM. A normal exit without stop():
    the atexit handler tears the group down."""
    script, env = stand_in
    proc = subprocess.Popen([sys.executable, str(script), str(FAKE_BIN),
                             str(tmp_path / "exp.log"), "exit" if how == "exit" else "wait"],
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    assert line.strip().isdigit(), line
    vllm_pid, child = int(line), engine_pid(pidfile)
    if how == "sigkill":
        assert not gone(vllm_pid) and not gone(child)
        proc.kill()
    proc.wait(timeout=DEADLINE_S)
    assert wait_gone(vllm_pid, child)


# -- recognising a group left behind --------------------------------------------------------

SERVE_STAND_IN = "import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n"


def _group(*argv: str) -> subprocess.Popen[bytes]:
    """A process leading its own group, as the launcher starts vLLM; argv[1:] become its
    command line (`serve ...` makes it look like a server)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE_STAND_IN, *argv],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    return proc


def test_a_server_group_is_recognised_by_its_start_time_and_command() -> None:
    proc = _group("serve", "some/model")
    try:
        group = ServerGroup.of(proc.pid, port=8000)
        assert group.start_time is not None and group.start_time == start_time(proc.pid)
        assert members(proc.pid) == [proc.pid]
        assert ours(group) == [proc.pid]
        reused = ServerGroup(pgid=proc.pid, start_time=group.start_time - 1, port=8000)
        assert ours(reused) == []  # another start time: the pid was handed out again
        assert ours(ServerGroup(pgid=proc.pid, start_time=None, port=8000)) == []
    finally:
        terminate_group(proc.pid, proc, grace_s=5.0)
    assert ours(group) == [] and members(proc.pid) == []


def test_a_group_that_runs_no_server_is_not_ours() -> None:
    proc = _group("bench")
    try:
        assert ours(ServerGroup.of(proc.pid, port=8000)) == []
    finally:
        terminate_group(proc.pid, proc, grace_s=5.0)


def test_a_group_whose_wrapper_died_is_still_ours(tmp_path: Path, pidfile: Path) -> None:
    """A wrapper script that does not exec: killing it (what the parent-death signal
    does) leaves the server it started running in its group; that group is still ours."""
    wrapper = tmp_path / "vllm"
    wrapper.write_text(f'#!/bin/bash\n"{sys.executable}" -c "{SERVE_STAND_IN}" serve m\n')
    wrapper.chmod(0o755)
    proc = subprocess.Popen([str(wrapper), "serve", "m"], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    group = ServerGroup.of(proc.pid, port=8000)
    proc.kill()
    proc.wait()
    (server,) = ours(group)
    assert server != proc.pid
    terminate_group(group.pgid, grace_s=5.0)
    assert wait_gone(server)
