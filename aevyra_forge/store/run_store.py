"""The run store (SPEC §3): numbered run folders under `.forge/runs/`, an append-only,
fsync'd experiments.jsonl that resume replays, and the derived tables, best recipe and
completion marker, each replaced atomically. The only module that writes under `.forge/`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from aevyra_forge.core.errors import StoreError
from aevyra_forge.core.redact import redact_urls
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.values import ExperimentRecord
from aevyra_forge.store.disk import (
    RESUME,
    RETRY,
    acquire,
    append_line,
    atomic_write,
    fsync_dir,
    on_disk,
    release,
    store_lock,
)
from aevyra_forge.store.journal import check_nothing_lost, check_unique, replay
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
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"  # UTC, e.g. 20261122T110501Z

_RUN_NAME = re.compile(r"^(\d{3,})_\d{8}T\d{6}Z$")
# Names that would hold a credential; matched case-insensitively as substrings.
_SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")

Clock = Callable[[], datetime]


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
        config.json written. Refuses a config that carries a credential; a credential
        inside a URL (`http://user:pass@host`) is redacted."""
        config = redact_urls(config)
        _refuse_secrets(config, "config")
        text = _to_json(config)  # before claiming a number: an unserialisable config is a bug
        with on_disk("creating the run store", self.runs_dir, RETRY):
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT)
        # Numbering is scan-then-mkdir; a store-wide lock stops two tuners starting at
        # once from both taking the same number (their timestamps may differ).
        with store_lock(self.runs_dir):
            number = max((n for n, _ in _numbered(self.runs_dir)), default=0) + 1
            path = self.runs_dir / f"{number:03d}_{stamp}"
            with on_disk("creating the run folder", path, RETRY):
                path.mkdir()
        run = Run(path, dict(config), self.clock, then=RETRY)
        try:
            atomic_write(path / CONFIG, text, then=RETRY)
            with on_disk("creating the logs folder", path / LOGS, RETRY):
                (path / LOGS).mkdir(exist_ok=True)
        except BaseException:
            run.close()
            raise
        return run

    def open_run(self, run_dir: Path) -> Run:
        """An existing run, locked, for resume. Cuts a torn last line off the logs so the
        next append starts on a clean line (`Run.dropped` says what went); raises on
        anything else wrong with them, before changing a byte."""
        config = read_config(run_dir)
        run = Run(Path(run_dir), config, self.clock)
        try:
            run.repair()
            with on_disk("creating the logs folder", run.path / LOGS):
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
    """One run folder held under an exclusive lock for the object's lifetime. `then` is
    what an OS error taking the lock tells the user to do next."""

    def __init__(self, path: Path, config: dict[str, Any], clock: Clock = utc_now, *,
                 then: str = RESUME) -> None:
        self.path = path
        self.config = config
        self._clock = clock
        self._lock_fd: int | None = acquire(path, then)
        self.dropped: list[str] = []  # what repair() cut off, one line each
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
        return [t for _, t in replay(path, Trial, "trial start")[0]] if path.exists() else []

    def _append_line(self, name: str, line: str) -> None:
        self._check_open()
        append_line(self.path / name, line)
        if name not in self._durable:
            with on_disk(f"syncing {name}", self.path):
                fsync_dir(self.path)
            self._durable.add(name)

    def repair(self) -> None:
        """Check both logs (no experiment twice, none lost: journal.py), then cut each
        back to the end of its last complete, valid line: what lies past it is a write
        a crash cut off. Each cut is described in `self.dropped`."""
        self._check_open()
        exps, trials = self.experiments_path, self.path / TRIALS
        records, exps_good = replay(exps, ExperimentRecord, "experiment record") \
            if exps.exists() else ([], 0)
        started, trials_good = replay(trials, Trial, "trial start") \
            if trials.exists() else ([], 0)
        check_unique(exps, records)
        check_nothing_lost(exps, records, trials, started)
        for path, good in ((exps, exps_good), (trials, trials_good)):
            size = path.stat().st_size if path.exists() else 0
            if good < size:
                with on_disk(f"repairing {path.name}", path), open(path, "r+b") as fh:
                    fh.truncate(good)
                    fh.flush()
                    os.fsync(fh.fileno())
                self.dropped.append(f"{path}: dropped {size - good} bytes after the last "
                                    "complete line (a write cut off by a crash)")

    def write_tables(self, records: Sequence[ExperimentRecord]) -> None:
        self._check_open()
        rows = experiment_rows(records)
        atomic_write(self.path / TABLE_TSV, rows_to_tsv(rows))
        atomic_write(self.path / TABLE_JSON, json.dumps(rows, indent=2) + "\n")

    def write_best(self, recipe_yaml: str) -> None:
        self._check_open()
        atomic_write(self.path / BEST_RECIPE, recipe_yaml)

    def write_artifact(self, name: str, text: str, executable: bool = False) -> None:
        """Replace one file of the run folder (deploy.sh, report.html, ...) atomically."""
        self._check_open()
        if Path(name).name != name or name in ("", ".", ".."):
            raise StoreError(f"artifact name {name!r} is not a plain file name")
        atomic_write(self.path / name, text, mode=0o777 if executable else 0o666)

    def amend(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """Add {at, old, new} to config.json's `amendments`: settings a resume changed."""
        entry = {"at": self._clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT),
                 "old": dict(old), "new": dict(new)}
        config = {**self.config, "amendments": [*self.config.get("amendments", []),
                                                redact_urls(entry)]}
        _refuse_secrets(config, "config")
        self._check_open()
        atomic_write(self.path / CONFIG, _to_json(config))
        self.config = config

    def complete(self, summary: Mapping[str, Any]) -> None:
        """Mark a clean finish; a run without completed.json is resumable."""
        self._check_open()
        stamp = self._clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT)
        atomic_write(self.path / COMPLETED, _to_json({"completed_at": stamp, **summary}))

    def close(self) -> None:
        if self._lock_fd is not None:
            release(self._lock_fd)
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
    records, _ = replay(path, ExperimentRecord, "experiment record")
    check_unique(path, records)
    return [rec for _, rec in records]


def logged_recipes(run_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", recipe) for every recipe a run's logs hold (experiments, then trial
    starts), so a resume can vet each one like user input before it is replayed."""
    exps, trials = Path(run_dir) / EXPERIMENTS, Path(run_dir) / TRIALS
    if exps.exists():
        for number, rec in replay(exps, ExperimentRecord, "experiment record")[0]:
            yield f"{exps}:{number}", rec.recipe
    if trials.exists():
        for number, trial in replay(trials, Trial, "trial start")[0]:
            yield f"{trials}:{number}", trial.recipe


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
