"""The run store (SPEC §3): numbered run folders under `.forge/runs/`, an append-only,
fsync'd experiments.jsonl that resume replays, and the derived tables, best recipe and
completion marker, each replaced atomically. The only module that writes under `.forge/`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from aevyra_forge.core.errors import RunLockedError, StoreError
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.values import SCHEMA_VERSION, ExperimentRecord
from aevyra_forge.store.rows import experiment_rows, rows_to_tsv

RUNS = "runs"
CONFIG = "config.json"
EXPERIMENTS = "experiments.jsonl"
TRIALS = "trials.jsonl"  # one line per trial started, so work in flight is visible
TABLE_TSV = "experiments.tsv"
TABLE_JSON = "experiments.json"
BEST_RECIPE = "best_recipe.yaml"
COMPLETED = "completed.json"
LOGS = "logs"
LOCK = ".lock"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"  # UTC, e.g. 20261122T110501Z

_RUN_NAME = re.compile(r"^(\d{3,})_\d{8}T\d{6}Z$")
# Names that would hold a credential; matched case-insensitively as substrings.
_SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")

Clock = Callable[[], datetime]
M = TypeVar("M", bound=BaseModel)


def utc_now() -> datetime:
    return datetime.now(UTC)


class RunStore:
    """The store root (the `--run-dir`, `.forge` by default) and its numbered runs."""

    def __init__(self, root: Path, clock: Clock = utc_now) -> None:
        self.root = Path(root)
        self.clock = clock

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS

    def create_run(self, config: Mapping[str, Any]) -> Run:
        """A new run folder numbered after the highest existing one, locked, with
        config.json written. Refuses a config that carries a credential."""
        _refuse_secrets(config, "config")
        text = _to_json(config)  # before claiming a number: an unserialisable config is a bug
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT)
        # Numbering is scan-then-mkdir; a store-wide lock stops two tuners starting at
        # once from both taking the same number (their timestamps may differ).
        with _store_lock(self.runs_dir):
            number = max((n for n, _ in _numbered(self.runs_dir)), default=0) + 1
            path = self.runs_dir / f"{number:03d}_{stamp}"
            path.mkdir()
        run = Run(path, dict(config), self.clock)
        try:
            _atomic_write(path / CONFIG, text)
            (path / LOGS).mkdir(exist_ok=True)
        except BaseException:
            run.close()
            raise
        return run

    def open_run(self, run_dir: Path) -> Run:
        """An existing run, locked, for resume. Cuts a torn last line off experiments.jsonl
        so the next append starts on a clean line; raises on corruption before that."""
        config = read_config(run_dir)
        run = Run(Path(run_dir), config, self.clock)
        try:
            run.repair()
            (run.path / LOGS).mkdir(exist_ok=True)
        except BaseException:
            run.close()
            raise
        return run

    def latest_run(self) -> Path | None:
        runs = _runs(self.runs_dir)
        return runs[-1] if runs else None

    def latest_resumable(self) -> Path | None:
        """The newest run without completed.json."""
        for path in reversed(_runs(self.runs_dir)):
            if not (path / COMPLETED).exists():
                return path
        return None


def resolve_run_dir(path: Path) -> Path:
    """A run folder as given, or the latest run when `path` is a store root."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    if (path / RUNS).is_dir():
        latest = RunStore(path).latest_run()
        if latest is None:
            raise StoreError(f"{path}: no runs in this store yet; start one with "
                             "`aevyra-forge tune`")
        return latest
    if not path.exists():
        raise StoreError(f"{path}: no such folder; pass the store root (.forge) or one "
                         "run's folder (.forge/runs/NNN_...)")
    raise StoreError(f"{path}: neither a forge store nor a run folder; pass the store root "
                     "(.forge) or one run's folder (.forge/runs/NNN_...)")


class Run:
    """One run folder held under an exclusive lock for the object's lifetime."""

    def __init__(self, path: Path, config: dict[str, Any], clock: Clock = utc_now) -> None:
        self.path = path
        self.config = config
        self._clock = clock
        self._lock_fd: int | None = _acquire(path)
        # Once a log exists its directory entry needs no further syncing.
        self._durable = {name for name in (EXPERIMENTS, TRIALS) if (path / name).exists()}

    @property
    def experiments_path(self) -> Path:
        return self.path / EXPERIMENTS

    @property
    def is_complete(self) -> bool:
        return (self.path / COMPLETED).exists()

    def log_path(self, exp: int) -> Path:
        return self.path / LOGS / f"exp_{exp:03d}.log"

    def append(self, record: ExperimentRecord) -> None:
        """Add one line to experiments.jsonl; it is on disk when this returns."""
        self._append_line(EXPERIMENTS, record.model_dump_json())

    def records(self) -> list[ExperimentRecord]:
        return read_records(self.path)

    def start(self, trial: Trial) -> None:
        """Log that a trial is about to run (on disk when this returns). The accuracy
        reference it carries is left out: the baseline's record holds it."""
        self._append_line(TRIALS, trial.model_dump_json(exclude={"quality_reference"}))

    def started(self) -> list[Trial]:
        """Every trial whose start was logged (a torn last line is ignored)."""
        path = self.path / TRIALS
        return _replay(path, Trial, "trial start")[0] if path.exists() else []

    def _append_line(self, name: str, line: str) -> None:
        self._check_open()
        with open(self.path / name, "ab") as fh:
            fh.write((line + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        if name not in self._durable:
            _fsync_dir(self.path)
            self._durable.add(name)

    def repair(self) -> None:
        """Truncate experiments.jsonl to the end of its last complete, valid line."""
        self._check_open()
        path = self.experiments_path
        if not path.exists():
            return
        _, good_bytes = _replay(path, ExperimentRecord, "experiment record")
        if good_bytes < path.stat().st_size:
            with open(path, "r+b") as fh:
                fh.truncate(good_bytes)
                fh.flush()
                os.fsync(fh.fileno())

    def write_tables(self, records: Sequence[ExperimentRecord]) -> None:
        self._check_open()
        rows = experiment_rows(records)
        _atomic_write(self.path / TABLE_TSV, rows_to_tsv(rows))
        _atomic_write(self.path / TABLE_JSON, json.dumps(rows, indent=2) + "\n")

    def write_best(self, recipe_yaml: str) -> None:
        self._check_open()
        _atomic_write(self.path / BEST_RECIPE, recipe_yaml)

    def complete(self, summary: Mapping[str, Any]) -> None:
        """Mark a clean finish; a run without completed.json is resumable."""
        self._check_open()
        stamp = self._clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT)
        _atomic_write(self.path / COMPLETED, _to_json({"completed_at": stamp, **summary}))

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"run {self.path} was closed; open it again with open_run")


def read_records(run_dir: Path) -> list[ExperimentRecord]:
    """Replay experiments.jsonl without taking the lock (a torn last line is ignored)."""
    path = Path(run_dir) / EXPERIMENTS
    if not path.exists():
        return []
    records, _ = _replay(path, ExperimentRecord, "experiment record")
    return records


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise StoreError(f"{run_dir}: not a run folder (no {CONFIG}); pass a folder under "
                         ".forge/runs/ or the store root")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}); restore it from a backup") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object; restore it from a backup")
    return data


def _replay(path: Path, kind: type[M], what: str) -> tuple[list[M], int]:
    """Records and the byte offset just past the last complete, valid line."""
    data = path.read_bytes()
    # Anything after the last newline was cut off mid-write: ignored.
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.splitlines(keepends=True)
    last = max((i for i, raw in enumerate(lines, start=1) if raw.strip()), default=0)
    records: list[M] = []
    offset = good = 0
    for number, raw in enumerate(lines, start=1):
        offset += len(raw)
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            _bad_line(path, number, number == last, what, f"not JSON: {exc.msg}")
            break
        except UnicodeDecodeError:
            _bad_line(path, number, number == last, what, "not UTF-8 text")
            break
        version = obj.get("schema_version") if isinstance(obj, dict) else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}:{number}: written by a newer aevyra-forge (record schema_version "
                f"{version}, this one reads up to {SCHEMA_VERSION}); upgrade aevyra-forge"
            )
        try:
            records.append(kind.model_validate(obj))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "record"
            _bad_line(path, number, number == last, what, f"{where}: {err['msg']}")
            break
        good = offset
    return records, good


def _bad_line(path: Path, number: int, is_last: bool, what: str, why: str) -> None:
    # The last line may have been torn by a crash (or zero-filled by the filesystem);
    # the caller drops it. Anywhere else it is damage a human must look at.
    if is_last:
        return
    raise StoreError(
        f"{path}:{number}: not a valid {what} ({why}); the log is corrupted: "
        f"fix or delete line {number} (the other lines are kept), then retry"
    )


def _refuse_secrets(value: Any, where: str) -> None:
    """A bug guard: keys are resolved from the environment and never written to disk."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            name = str(key).lower()
            # Only strings can be credentials; counts such as max_num_batched_tokens pass.
            if any(m in name for m in _SECRET_MARKERS) and isinstance(item, str) and item:
                raise StoreError(
                    f"refusing to write {where}.{key} to {CONFIG}: it looks like a "
                    "credential; pass keys through the environment, never the run config"
                )
            _refuse_secrets(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _refuse_secrets(item, f"{where}[{i}]")


def _acquire(path: Path) -> int:
    if not path.is_dir():
        raise StoreError(f"{path}: run folder not found; pass a folder under .forge/runs/")
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"run {path} is in use by another aevyra-forge process (pid {holder}); wait for "
            "it to finish or stop that process, then retry"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    # Our pid goes in the file only so a second process can name the holder.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def _store_lock(runs_dir: Path) -> Iterator[None]:
    fd = os.open(runs_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a scan and a mkdir only: blocking is fine
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _numbered(runs_dir: Path) -> list[tuple[int, Path]]:
    if not runs_dir.is_dir():
        return []
    found = []
    for child in runs_dir.iterdir():
        match = _RUN_NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _runs(runs_dir: Path) -> list[Path]:
    """Run folders oldest first; a folder left without config.json by a crash during
    creation holds its number but is not a run."""
    return [p for _, p in _numbered(runs_dir) if (p / CONFIG).is_file()]


def _to_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it, so a reader
    sees the old file or the new one, never half of either."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
