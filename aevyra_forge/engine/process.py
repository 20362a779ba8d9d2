"""Process groups for the servers we start: each `vllm serve` leads its own group (so the
EngineCore child goes with it), gets SIGTERM when forge dies even by SIGKILL, and is torn
down at interpreter exit if nobody stopped it; teardown escalates SIGTERM to SIGKILL. A
group left behind by a forge that died (a wrapper script that does not `exec` passes the
parent-death signal to nobody) is recognised by its leader's start time before it is
signalled."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
    if not Path("/proc/self/stat").exists():  # not Linux: signal 0 is all we have
        return True
    return bool(members(pgid))


@dataclass(frozen=True)
class ServerGroup:
    """What identifies a server's process group after forge is gone: the leader's pid
    (= the pgid) and its start time in clock ticks since boot (a reused pid has another),
    and the port it was told to bind."""

    pgid: int
    start_time: int | None
    port: int

    @classmethod
    def of(cls, pid: int, port: int) -> ServerGroup:
        return cls(pgid=pid, start_time=start_time(pid), port=port)


def start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/<pid>/stat, clock ticks since boot;
    a zombie keeps it), or None when it is gone or this is not Linux."""
    fields = _stat(Path("/proc") / str(pid))
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _stat(proc_dir: Path) -> list[bytes] | None:
    """/proc/<pid>/stat's fields after the command name (which may contain spaces)."""
    try:
        return (proc_dir / "stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def members(pgid: int) -> list[int]:
    """The live (not zombie) processes of group `pgid`."""
    try:
        entries = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []
    found = []
    for entry in entries:
        fields = _stat(entry)
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid \
                and fields[0] not in (b"Z", b"X"):
            found.append(int(entry.name))
    return sorted(found)


def ours(group: ServerGroup, marker: bytes = b"serve") -> list[int]:
    """The live members of `group` if it is still the one we started, else []. Ours when
    its leader, if still there (a zombie counts), has the recorded start time, and a live
    member started no earlier and runs `serve` (a wrapper that does not exec has died and
    left vLLM itself). A pid still used as a process group id is never handed out again,
    so a group whose leader is gone was created by that leader."""
    if group.start_time is None:
        return []  # never verified: do not signal what we cannot recognise
    leader = start_time(group.pgid)
    if leader is not None and leader != group.start_time:
        return []  # the pid was reused: someone else's process
    alive = members(group.pgid)
    for pid in alive:
        began = start_time(pid)
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if began is not None and began >= group.start_time and marker in cmdline:
            return alive
    return []


def _stop_all() -> None:
    for pgid, proc in list(_LIVE.items()):
        terminate_group(pgid, proc, grace_s=5.0)
        _LIVE.pop(pgid, None)


atexit.register(_stop_all)
