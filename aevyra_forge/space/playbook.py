"""The playbook: markdown the agent reads before each proposal (goal, knob ranges, first
moves, what to avoid, crash recovery, when to stop). This module loads it and checks its
structure and every knob it names against the registry; it decides nothing itself."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aevyra_forge.core.errors import PlaybookError
from aevyra_forge.core.values import Scalar
from aevyra_forge.space.knob_space import KNOBS, NOT_TUNABLE, Knob
from aevyra_forge.space.layer2 import CandidateSlot, is_candidate_name
from aevyra_forge.space.placement import PluginSlot

REQUIRED_SECTIONS: tuple[str, ...] = (
    "Goal", "Knobs and safe ranges", "What to try first",
    "What to avoid", "Recovering from crashes", "When to stop",
)
KNOBS_SECTION = "Knobs and safe ranges"
MOVES_SECTION = "What to try first"

_HEADING = re.compile(r"^(#{1,6})(?:[ \t]+(.*))?$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"`([^`]+)`")
# A knob reference is `name=value` (not `a == b`); flags such as `--x=1` are prose.
_ASSIGN_START = re.compile(r"^[A-Za-z_][\w.]*[ \t]*=(?!=)")
_ASSIGN = re.compile(r"^([A-Za-z_][\w.]*)[ \t]*=[ \t]*(.*)$")
_IDENT = re.compile(r"^[A-Za-z_][\w.]*$")
# Only unindented items count as moves; indented ones are commentary under a move.
_TOP_ITEM = re.compile(r"^ ?(?:[-*+]|[0-9]{1,9}[.)])[ \t]+(.*)$")
_ANY_ITEM = re.compile(r"^[ \t]*(?:[-*+]|[0-9]{1,9}[.)])[ \t]+`([^`]+)`")
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$")
_YAML_SPECIAL = set("[]{}#&*!|>%@`\"'")
_MAX_SHOWN = 60  # characters of a bad line quoted back in a problem


class Playbook(BaseModel):
    """One playbook as read from disk: its text and its `## ` sections (heading -> body)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    text: str
    sections: dict[str, str]

    @classmethod
    def from_text(cls, text: str, path: str = "<playbook>") -> Playbook:
        sections: dict[str, str] = {}
        for section in _scan(text):
            if section.line and section.title:
                sections.setdefault(section.title, section.body)
        return cls(path=path, text=text, sections=sections)


_Problem = tuple[int, str]  # (1-based line, or 0 when no line applies; message)


@dataclass(frozen=True)
class _Section:
    title: str  # "" for the text before the first `## ` heading
    line: int  # 1-based line of the heading (0 for the preamble)
    lines: tuple[tuple[int, str], ...]  # body lines outside code fences, numbered
    body: str


def bundled_path() -> Path:
    """The default playbook shipped inside the package."""
    return Path(str(files("aevyra_forge").joinpath("data", "default.md")))


def load_playbook(path: Path | None = None) -> Playbook:
    """Read a playbook (the bundled default when `path` is None). Structure is checked
    by `validate`, not here, so `playbook validate` can list every problem."""
    target = bundled_path() if path is None else Path(path).expanduser()
    hint = ("reinstall aevyra-forge" if path is None
            else "pass an existing markdown file to --playbook, or leave the option out "
                 "to use the bundled default")
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlaybookError(f"playbook not found: {target}; {hint}") from None
    except IsADirectoryError:
        raise PlaybookError(f"playbook {target} is a directory; {hint}") from None
    except UnicodeDecodeError:
        raise PlaybookError(
            f"playbook {target} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise PlaybookError(f"cannot read playbook {target}: {exc.strerror}; check that "
                            "the file is readable") from None
    return Playbook.from_text(text, str(target))


def validate(pb: Playbook) -> list[str]:
    """Every problem in `pb`, one line each (`path:line: ...` where a line is known);
    an empty list means the playbook is valid."""
    sections = _scan(pb.text)
    problems = _structure_problems(pb.text, sections)
    for section in sections:
        for lineno, line in section.lines:
            for span in _CODE_SPAN.findall(line):
                if _ASSIGN_START.match(span.strip()):
                    problems += _assignment_problems(lineno, span)
        if section.title == KNOBS_SECTION and section.line:
            for lineno, line in section.lines:
                item = _ANY_ITEM.match(line)
                name = item.group(1).strip() if item else ""
                if _IDENT.match(name) and name not in KNOBS:
                    problems.append((lineno, _unknown(name)))
        if section.title == MOVES_SECTION and section.line:
            moves, move_problems = _parse_moves(section)
            problems += move_problems
            if not moves and not move_problems:
                problems.append((section.line, f"'## {MOVES_SECTION}' lists no moves; add "
                                 "items such as '- `max_num_seqs=512` — why'"))
    # The same bad span can be reported by the general scan and the move parser.
    ordered = sorted(dict.fromkeys(problems), key=lambda p: p[0])
    return [f"{pb.path}:{n}: {msg}" if n else f"{pb.path}: {msg}" for n, msg in ordered]


def ensure_valid(pb: Playbook) -> Playbook:
    """`pb` unchanged if it validates; otherwise a PlaybookError naming the first problem."""
    problems = validate(pb)
    if problems:
        raise PlaybookError(f"{problems[0]} ({len(problems)} problem(s) in all; run "
                            f"'aevyra-forge playbook validate {pb.path}' to list them)")
    return pb


def first_moves(pb: Playbook) -> list[dict[str, Scalar]]:
    """The moves of "What to try first", in order, as knob -> value. Items with a problem
    are left out (`validate` reports them); whether a move is allowed on this hardware
    is for the knob registry (KnobSpace) to say."""
    for section in _scan(pb.text):
        if section.title == MOVES_SECTION and section.line:
            return _parse_moves(section)[0]
    return []


def parse_value(raw: str) -> Scalar:
    """A YAML-style scalar: integer, float, true/false, null, or a plain or quoted
    string. ValueError says why `raw` is none of these."""
    text = raw.strip()
    if not text:
        raise ValueError("missing value after '='")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~"):
        return None
    if _INT.match(text):
        try:
            return int(text)
        except ValueError:  # past Python's limit on digits in a conversion
            raise ValueError(f"{text[:20]}... is too long to be a number") from None
    if _FLOAT.match(text):
        return float(text)
    if any(c in _YAML_SPECIAL for c in text) or ": " in text or text.startswith("-"):
        raise ValueError(f"{_show(text)} is not a plain value; write a number, true/false "
                         "or a word")
    return text


# -- internals -------------------------------------------------------------------------

def _scan(text: str) -> list[_Section]:
    """Split `text` at level-1 and level-2 headings, ignoring headings in code fences.
    Only `## ` headings start a named section; a `# ` title closes the one before it."""
    sections: list[_Section] = []
    title, start = "", 0
    raw: list[str] = []
    visible: list[tuple[int, str]] = []
    for lineno, line, fenced in _lines(text):
        heading = None if fenced else _heading(line)
        if heading and len(heading[0]) <= 2:
            sections.append(_Section(title, start, tuple(visible), "\n".join(raw).strip()))
            title = heading[1] if len(heading[0]) == 2 else ""
            start, raw, visible = lineno, [], []
            continue
        raw.append(line)
        if not fenced:
            visible.append((lineno, line))
    sections.append(_Section(title, start, tuple(visible), "\n".join(raw).strip()))
    return sections


def _lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, inside a code fence?); fence lines count as inside."""
    fence: str | None = None
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        marker = _FENCE.match(line)
        if fence is None:
            if marker:
                fence = marker.group(1)
            yield lineno, line, fence is not None
            continue
        # A fence closes on a bare run of its own character at least as long.
        if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(
                fence) and not line.strip().strip(fence[0]):
            fence = None
        yield lineno, line, True


def _structure_problems(text: str, sections: list[_Section]) -> list[_Problem]:
    problems: list[_Problem] = []
    first_seen: dict[str, int] = {}
    for section in sections:
        if not section.line or not section.title:
            continue
        if section.title in first_seen:
            problems.append((section.line, f"section '## {_show(section.title)}' appears "
                             f"again (first at line {first_seen[section.title]}); merge "
                             "the two"))
            continue
        first_seen[section.title] = section.line
        if section.title in REQUIRED_SECTIONS and not section.body:
            problems.append((section.line, f"section '## {section.title}' is empty; write "
                             "what the agent should know there"))
    for name in REQUIRED_SECTIONS:
        if name in first_seen:
            continue
        # A near miss ("## goal", "### Goal") is reported where it is, to make the fix easy.
        near = [(n, *h) for n, line, fenced in _lines(text)
                if not fenced and (h := _heading(line)) and _norm(h[1]) == _norm(name)]
        if near:
            n, hashes, found = near[0]
            problems.append((n, f"heading '{hashes} {_show(found)}' should read "
                                f"'## {name}' (a required section)"))
        else:
            problems.append((0, f"missing required section '## {name}'; add it (compare "
                                "with 'aevyra-forge playbook show')"))
    return problems


def _heading(line: str) -> tuple[str, str] | None:
    """(hashes, title) when `line` is an ATX heading; an optional closing run of `#` is
    dropped. Plain string work, so long lines of spaces cannot make it slow."""
    match = _HEADING.match(line)
    if match is None:
        return None
    title = (match.group(2) or "").rstrip(" \t")
    bare = title.rstrip("#")
    if bare != title and (not bare or bare[-1] in " \t"):
        title = bare.rstrip(" \t")
    return match.group(1), title


def _norm(title: str) -> str:
    return " ".join(title.lower().split())


def _split_assignments(span: str) -> tuple[list[tuple[str, str]], str | None]:
    """`a=1, b=2` -> [(a, "1"), (b, "2")], or an error saying what does not parse."""
    pairs: list[tuple[str, str]] = []
    for part in span.split(","):
        match = _ASSIGN.match(part.strip())
        if match is None:
            what = f"'{_show(part.strip())}'" if part.strip() else "an empty item"
            return pairs, (f"cannot read {what} in `{_show(span)}`; write knob=value, "
                           "comma-separated")
        pairs.append((match.group(1), match.group(2)))
    return pairs, None


def _assignment_problems(lineno: int, span: str) -> list[_Problem]:
    pairs, error = _split_assignments(span)
    problems: list[_Problem] = [(lineno, error)] if error else []
    for name, raw in pairs:
        knob = KNOBS.get(name)
        if knob is None:
            problems.append((lineno, _unknown(name)))
            continue
        try:
            value = parse_value(raw)
        except ValueError as exc:
            problems.append((lineno, f"{name}: {exc}"))
            continue
        bad = _value_problem(knob, value)
        if bad:
            problems.append((lineno, bad))
    return problems


def _parse_moves(section: _Section) -> tuple[list[dict[str, Scalar]], list[_Problem]]:
    """The section's moves and its problems; a move with any problem, including an
    unknown knob or a value no device accepts, is left out of the moves."""
    moves: list[dict[str, Scalar]] = []
    problems: list[_Problem] = []
    for lineno, line in section.lines:
        item = _TOP_ITEM.match(line)
        if item is None:
            continue
        lead = re.match(r"^`([^`]+)`", item.group(1))
        if lead is None or not _ASSIGN_START.match(lead.group(1).strip()):
            shown = _show(item.group(1)[:_MAX_SHOWN])
            problems.append((lineno, f"move '{shown}' must start with a backticked "
                                     "`knob=value` (several: `a=1, b=2`)"))
            continue
        pairs, error = _split_assignments(lead.group(1).strip())
        if error:
            problems.append((lineno, error))
            continue
        move: dict[str, Scalar] = {}
        for name, raw in pairs:
            if name in move:
                problems.append((lineno, f"move sets {name} twice; keep one value"))
                break
            try:
                move[name] = parse_value(raw)
            except ValueError as exc:
                problems.append((lineno, f"{name}: {exc}"))
                break
        else:
            registry = _assignment_problems(lineno, lead.group(1))
            layers = {KNOBS[n].layer for n in move if n in KNOBS}
            if len(layers) > 1:
                registry.append((lineno, "a move must stay within one layer (knobs from "
                                         f"layers {sorted(layers)}); split it in two"))
            problems += registry
            if not registry:
                moves.append(move)
    return moves, problems


def _value_problem(knob: Knob, value: Scalar) -> str | None:
    """Why `value` is outside everything `knob` accepts on any device, or None."""
    if knob.kind == "bool":
        return None if isinstance(value, bool) else (
            f"{knob.name} takes true or false, got {value!r}")
    if knob.kind == "choice":
        options = _all_choices(knob)
        if not isinstance(value, bool) and value in options:
            return None
        if isinstance(knob.placement, PluginSlot) and isinstance(value, str):
            return None  # a kernel plug-in's candidate: known per run, checked then
        if isinstance(knob.placement, CandidateSlot) and isinstance(value, str) \
                and is_candidate_name(value):
            return None  # a layer-2 candidate: which ones a run lists is checked then
        return f"{knob.name} must be one of {', '.join(map(str, options))}; got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            knob.kind == "int" and not isinstance(value, int)):
        wanted = "an integer" if knob.kind == "int" else "a number"
        return f"{knob.name} takes {wanted}, got {value!r}"
    if (math.isnan(value) or (knob.low is not None and value < knob.low)
            or (knob.high is not None and value > knob.high)):
        return (f"{knob.name}={value} is out of range "
                f"[{_num(knob.low)}, {_num(knob.high)}]")
    return None


def _all_choices(knob: Knob) -> tuple[Scalar, ...]:
    """The union of the knob's choices over every device, in registry order."""
    return tuple(dict.fromkeys(c for options in knob.choices.values() for c in options))


def _unknown(name: str) -> str:
    if name in NOT_TUNABLE:
        return f"'{name}' is not a tunable knob ({NOT_TUNABLE[name]}); leave it out"
    close = difflib.get_close_matches(name, list(KNOBS), n=1, cutoff=0.6)
    if close:
        return f"unknown knob '{name}'; did you mean '{close[0]}'?"
    return f"unknown knob '{name}'; known knobs: {', '.join(KNOBS)}"


def _num(x: float | None) -> str:
    return "-" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def _show(text: str) -> str:
    """`text` safe to put on one line of output."""
    return text if text.isprintable() else repr(text)[1:-1]
