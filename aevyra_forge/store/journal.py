"""Replaying the run's append-only logs (experiments.jsonl, trials.jsonl) the way a
careful reader would: a torn last line is a crash mid-write and is dropped; anything
else that is wrong (a bad line in the middle, an experiment recorded twice, records
missing for trials the log says were run) stops the replay with a one-line StoreError
naming the line and what to do, never a silent repair."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from aevyra_forge.core.errors import StoreError
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.values import SCHEMA_VERSION, ExperimentRecord

M = TypeVar("M", bound=BaseModel)


def replay(path: Path, kind: type[M], what: str) -> tuple[list[tuple[int, M]], int]:
    """(line number, record) for each valid line, and the byte offset just past the last
    complete, valid line."""
    data = path.read_bytes()
    # Anything after the last newline was cut off mid-write: ignored.
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.splitlines(keepends=True)
    last = max((i for i, raw in enumerate(lines, start=1) if raw.strip()), default=0)
    records: list[tuple[int, M]] = []
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
            records.append((number, kind.model_validate(obj)))
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


def check_unique(path: Path, records: Sequence[tuple[int, ExperimentRecord]]) -> None:
    """Each experiment is recorded once: a second line for the same id is a log that was
    edited, merged or copied into, and replaying both would count it twice."""
    first: dict[int, int] = {}
    for number, rec in records:
        if rec.exp in first:
            raise StoreError(
                f"{path}:{number}: experiment {rec.exp} is recorded twice (also on line "
                f"{first[rec.exp]}); the log was edited or merged: delete one of the two "
                "lines, then retry")
        first[rec.exp] = number


def check_nothing_lost(path: Path, records: Sequence[tuple[int, ExperimentRecord]],
                       trials_path: Path, started: Sequence[tuple[int, Trial]]) -> None:
    """The loop records a trial before it starts the next one (with several workers, a
    round's trials before the next round), so only the trials started last can lack a
    record (the run was killed while they ran). Earlier trials without a record mean
    lines were cut from `path`: say so rather than quietly running them again."""
    recorded = {rec.exp for _, rec in records}
    last_start: dict[int, int] = {}
    for index, (_, trial) in enumerate(started):
        last_start[trial.exp] = index
    in_flight = len(started) - 1  # where the trials that may lack a record begin
    last_round = started[-1][1].round if started else None
    while last_round is not None and in_flight > 0 \
            and started[in_flight - 1][1].round == last_round:
        in_flight -= 1
    lost = sorted(exp for exp, index in last_start.items()
                  if exp not in recorded and index < in_flight)
    if lost:
        shown = ", ".join(str(e) for e in lost[:10]) + (" ..." if len(lost) > 10 else "")
        raise StoreError(
            f"{path}: no record of experiments {shown}, which {trials_path.name} says "
            f"were run before others: the log was cut after line {_last_line(records)}; "
            f"restore {path.name} from a backup, or delete those experiments' lines from "
            f"{trials_path.name} to run them again, then retry")


def _last_line(records: Sequence[tuple[int, ExperimentRecord]]) -> int:
    return records[-1][0] if records else 0
