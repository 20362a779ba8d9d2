"""The record of every `vllm serve` a run started (`servers.jsonl` in the run folder): a
line when its process group exists, another once it is gone, each fsync'd. What is
launched and never marked gone was left behind by a forge that died; the next `tune` or
`tune resume` on the store finds it here before booting anything."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from aevyra_forge.core.errors import RunLockedError
from aevyra_forge.core.values import SCHEMA_VERSION
from aevyra_forge.engine.process import ServerGroup
from aevyra_forge.store.disk import RETRY, acquire, append_line, release
from aevyra_forge.store.journal import replay
from aevyra_forge.store.run_store import RUNS

SERVERS = "servers.jsonl"
_EXP = re.compile(r"exp_(\d+)")


class ServerRecord(BaseModel):
    """One line of servers.jsonl: a server group launched, or gone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    event: Literal["launched", "gone"]
    pgid: int
    start_time: int | None  # the leader's, in clock ticks since boot: tells a reused pid
    port: int
    devices: tuple[str, ...] = ()  # the device locks it ran under ("gpu0", "cpu")
    exp: int | None = None
    log: str | None = None
    at: str

    @property
    def group(self) -> ServerGroup:
        return ServerGroup(pgid=self.pgid, start_time=self.start_time, port=self.port)


class ServerLog:
    """Appends to one run's servers.jsonl (the launcher's GroupRecorder). The run's own
    lock, held by whoever runs experiments in it, covers these appends too."""

    def __init__(self, run_dir: Path, devices: tuple[str, ...]) -> None:
        self.path = Path(run_dir) / SERVERS
        self.devices = devices

    def launched(self, group: ServerGroup, log_path: Path) -> None:
        match = _EXP.search(log_path.name)
        self._append(ServerRecord(event="launched", pgid=group.pgid,
                                  start_time=group.start_time, port=group.port,
                                  devices=self.devices, exp=int(match.group(1)) if match
                                  else None, log=_relative(log_path, self.path.parent),
                                  at=_now()))

    def gone(self, group: ServerGroup) -> None:
        self._append(ServerRecord(event="gone", pgid=group.pgid, start_time=group.start_time,
                                  port=group.port, at=_now()))

    def _append(self, record: ServerRecord) -> None:
        append_line(self.path, record.model_dump_json())


def not_gone(run_dir: Path) -> list[ServerRecord]:
    """Servers of a run launched and never marked gone (a torn last line is ignored)."""
    path = Path(run_dir) / SERVERS
    if not path.exists():
        return []
    live: dict[tuple[int, int | None], ServerRecord] = {}
    for _, rec in replay(path, ServerRecord, "server record")[0]:
        key = (rec.pgid, rec.start_time)
        if rec.event == "launched":
            live[key] = rec
        else:
            live.pop(key, None)
    return list(live.values())


def leftovers(store_root: Path) -> list[tuple[Path, ServerRecord]]:
    """(run folder, record) for every server not marked gone in the store's runs that no
    live tuner holds: a run whose lock another process has runs its own servers."""
    runs = Path(store_root) / RUNS
    found: list[tuple[Path, ServerRecord]] = []
    for run in sorted(runs.glob(f"*/{SERVERS}")) if runs.is_dir() else []:
        with _unless_in_use(run.parent) as free:
            if free:
                found += [(run.parent, rec) for rec in not_gone(run.parent)]
    return found


def mark_gone(run_dir: Path, record: ServerRecord) -> None:
    """Record that a leftover server is gone (torn down now, or found dead), unless a
    tuner took the run meanwhile (it then finds the record itself)."""
    with _unless_in_use(run_dir) as free:
        if free:
            ServerLog(run_dir, record.devices).gone(record.group)


@contextlib.contextmanager
def _unless_in_use(run_dir: Path) -> Iterator[bool]:
    """The run's lock for the block (True), or False when another process holds it."""
    try:
        fd = acquire(run_dir, RETRY)
    except RunLockedError:
        yield False
        return
    try:
        yield True
    finally:
        release(fd)


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
