"""Process groups for the servers we start: each `vllm serve` leads its own group (so the
EngineCore child goes with it), gets SIGTERM when forge dies even by SIGKILL, and is torn
down at interpreter exit if nobody stopped it; teardown escalates SIGTERM to SIGKILL."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import time

TERM_GRACE_S = 30.0  # SIGTERM -> SIGKILL
_PR_SET_PDEATHSIG = 1

_LIVE: dict[int, subprocess.Popen[bytes]] = {}  # pgid -> server process, for exit cleanup


def die_with_parent(parent_pid: int) -> None:
    """In the child: get SIGTERM when forge dies, even by SIGKILL (Linux). The kernel
    sends it when the forking *thread* exits, so launch from the main thread."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # forge died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def track(proc: subprocess.Popen[bytes]) -> None:
    """Tear down the group `proc` leads at interpreter exit unless `untrack`ed first."""
    _LIVE[proc.pid] = proc


def untrack(pgid: int) -> None:
    _LIVE.pop(pgid, None)


def terminate_group(pgid: int, proc: subprocess.Popen[bytes] | None = None,
                    grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace_s`, reap our child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.1)  # grandchildren exit on their own once the leader is gone
    if group_alive(pgid):  # never signal a group id that may have been reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    deadline = time.monotonic() + 10.0
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an orphaned
    EngineCore is reparented to init, and an init that never reaps (common in containers)
    would keep the group "alive" forever."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: signal 0 is all we have
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _stop_all() -> None:
    for pgid, proc in list(_LIVE.items()):
        terminate_group(pgid, proc, grace_s=5.0)
        _LIVE.pop(pgid, None)


atexit.register(_stop_all)
