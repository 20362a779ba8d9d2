"""Tests for aevyra_forge.space.playbook: the bundled default, structure and knob checks, move
parsing, loading errors, and that validation reports problems instead of raising."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import PlaybookError
from aevyra_forge.space.knob_space import KNOBS
from aevyra_forge.space.playbook import (
    REQUIRED_SECTIONS,
    Playbook,
    bundled_path,
    ensure_valid,
    first_moves,
    load_playbook,
    parse_value,
    validate,
)

REPO = Path(__file__).resolve().parents[2]


def _playbook(moves: str = "1. `max_num_seqs=512` — more sequences per step",
              knobs: str = "- `max_num_seqs`: 8 to 2048", extra: str = "") -> str:
    """A minimal valid playbook with replaceable moves and knob sections."""
    return (
        "# Test playbook\n\n"
        "## Goal\nGo fast.\n\n"
        f"## Knobs and safe ranges\n{knobs}\n\n"
        f"## What to try first\n{moves}\n\n"
        "## What to avoid\nOOM.\n\n"
        "## Recovering from crashes\nRevert.\n\n"
        f"## When to stop\nAfter 4 flat experiments.\n{extra}"
    )


def _problems(text: str) -> list[str]:
    return validate(Playbook.from_text(text, "pb.md"))


# -- the bundled default ------------------------------------------------------------------

def test_bundled_copy_equals_repo_playbook_byte_for_byte() -> None:
    assert bundled_path().read_bytes() == (REPO / "playbooks" / "default.md").read_bytes()


def test_default_playbook_validates_clean() -> None:
    pb = load_playbook()
    assert pb.path == str(bundled_path())
    assert validate(pb) == []
    assert ensure_valid(pb) is pb


def test_default_has_exactly_the_required_sections_in_order_after_a_title() -> None:
    pb = load_playbook()
    assert pb.text.startswith("# ")
    assert tuple(pb.sections) == REQUIRED_SECTIONS
    assert all(body.strip() for body in pb.sections.values())


def test_default_first_moves_use_registry_knobs_and_cover_every_layer() -> None:
    moves = first_moves(load_playbook())
    assert len(moves) >= 6
    assert all(move and set(move) <= set(KNOBS) for move in moves)
    layers = [KNOBS[name].layer for move in moves for name in move]
    assert set(layers) == {1, 2, 3}
    assert layers == sorted(layers), "moves should escalate config -> quant -> kernel"
    # the CPU build gets its own moves, too
    assert {"dtype": "float32"} in moves
    assert any(name.startswith("VLLM_CPU_") for move in moves for name in move)


def test_default_knob_section_names_every_registry_knob() -> None:
    body = load_playbook().sections["Knobs and safe ranges"]
    missing = [name for name in KNOBS if f"- `{name}`:" not in body]
    assert missing == []


# -- structure ------------------------------------------------------------------------------

def test_minimal_playbook_is_valid() -> None:
    assert _problems(_playbook()) == []


@pytest.mark.parametrize("section", REQUIRED_SECTIONS)
def test_missing_section_is_named(section: str) -> None:
    text = _playbook().replace(f"## {section}\n", "")
    problems = _problems(text)
    assert any(f"'## {section}'" in p and "missing" in p for p in problems), problems


def test_heading_with_wrong_case_or_level_points_at_its_line() -> None:
    text = _playbook().replace("## When to stop", "### when to stop")
    problems = _problems(text)
    line = text.split("\n").index("### when to stop") + 1
    assert problems == [f"pb.md:{line}: heading '### when to stop' should read "
                        "'## When to stop' (a required section)"]


def test_heading_inside_code_fence_does_not_count() -> None:
    text = _playbook().replace("## Goal\nGo fast.", "```\n## Goal\n```")
    assert any("missing required section '## Goal'" in p for p in _problems(text))


def test_duplicate_and_empty_sections_are_problems() -> None:
    text = _playbook(extra="\n## Goal\nAgain.\n").replace("OOM.", "")
    problems = _problems(text)
    assert any("'## Goal' appears again" in p for p in problems)
    assert any("'## What to avoid' is empty" in p for p in problems)


def test_sections_map_headings_to_bodies() -> None:
    pb = Playbook.from_text(_playbook(), "pb.md")
    assert pb.sections["Goal"] == "Go fast."
    assert pb.sections["When to stop"] == "After 4 flat experiments."


# -- knob references ------------------------------------------------------------------------

def test_unknown_knob_in_knob_list_suggests_the_closest_name() -> None:
    text = _playbook(knobs="- `max_num_seq`: typo")
    line = text.split("\n").index("- `max_num_seq`: typo") + 1
    assert _problems(text) == [
        f"pb.md:{line}: unknown knob 'max_num_seq'; did you mean 'max_num_seqs'?"]


def test_unknown_knob_in_a_move_suggests_the_closest_name() -> None:
    problems = _problems(_playbook(moves="- `max_num_seq=512` — typo"))
    assert len(problems) == 1
    assert "'max_num_seq'" in problems[0] and "did you mean 'max_num_seqs'" in problems[0]


def test_bad_value_type_is_a_problem() -> None:
    problems = _problems(_playbook(moves="- `max_num_seqs=lots` — vague"))
    assert problems == ["pb.md:10: max_num_seqs takes an integer, got 'lots'"]


@pytest.mark.parametrize(("span", "expected"), [
    ("gpu_memory_utilization=1.5", "out of range [0.5, 0.98]"),
    ("block_size=48", "block_size must be one of"),
    ("enforce_eager=1", "takes true or false"),
    ("attention_backend=true", "attention_backend must be one of"),
    ("max_model_len=", "missing value"),
    ("max_num_seqs=[1, 2]", "cannot read"),
    ("enable_chunked_prefill=true", "not a tunable knob"),
])
def test_bad_references_anywhere_are_problems(span: str, expected: str) -> None:
    text = _playbook(extra=f"\nNever set `{span}` here.\n")
    problems = _problems(text)
    assert problems and all(p.startswith("pb.md:") for p in problems)
    assert any(expected in p for p in problems), problems


def test_values_valid_on_any_device_are_accepted() -> None:
    # block_size=64 is CPU-only and dtype=float32 too: the playbook may name both.
    text = _playbook(extra="\nOn CPU `block_size=64` and `dtype=float32` pay off.\n")
    assert _problems(text) == []


@pytest.mark.parametrize(("value", "ok"), [
    ("cal-w8a8", True), ("cal-w4a16-awq", True), ("rtn-w4a16", True),
    ("hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8", True),
    ("cal-w3a16", False), ("rtn-", False), ("hub:no-owner", False), ("hub:a/b/c", False),
    ("w8a8", False), ("/tmp/ckpt", False),
])
def test_layer_two_candidates_are_named_by_their_pattern(value: str, ok: bool) -> None:
    """A playbook may name a candidate a run may list (which ones it lists is known only
    when it runs); anything else is a problem, as for any choice."""
    problems = _problems(_playbook(moves=f"- `quant_candidate={value}` — try it"))
    assert (problems == []) == ok, problems
    if not ok:
        assert "quant_candidate must be one of" in problems[0]


def test_flags_and_bare_names_in_prose_are_not_knob_references() -> None:
    text = _playbook(extra="\n`--enable-chunked-prefill` and `VLLM_ATTENTION_BACKEND` are "
                           "ignored; so is `--max-num-seqs=9`.\n- `--kv-cache-dtype` too\n")
    assert _problems(text) == []


# -- moves ----------------------------------------------------------------------------------

def test_first_moves_parse_values_in_order() -> None:
    moves = _playbook(moves=(
        "1. `max_num_seqs=512, max_num_batched_tokens=16384` — together\n"
        "   continued explanation\n"
        "   - an indented note, not a move\n"
        "2. `gpu_memory_utilization=0.93` — more KV\n"
        "3. `enforce_eager=false` — explicit\n"
        "4. `attention_backend=FLASHINFER` — kernels"))
    pb = Playbook.from_text(moves, "pb.md")
    assert validate(pb) == []
    assert first_moves(pb) == [
        {"max_num_seqs": 512, "max_num_batched_tokens": 16384},
        {"gpu_memory_utilization": 0.93},
        {"enforce_eager": False},
        {"attention_backend": "FLASHINFER"},
    ]


@pytest.mark.parametrize(("move", "expected"), [
    ("- raise max_num_seqs", "must start with a backticked"),
    ("- `max_num_seqs`: no value", "must start with a backticked"),
    ("- `max_num_seqs=1, max_num_seqs=2` — twice", "sets max_num_seqs twice"),
    ("- `max_num_seqs=64, quant_method=fp8` — mixed", "within one layer"),
    ("- `max_num_seqs=64,` — dangling", "an empty item"),
])
def test_moves_that_do_not_parse_are_problems_and_left_out(move: str, expected: str) -> None:
    text = _playbook(moves=f"{move}\n- `max_num_seqs=128` — fine")
    problems = _problems(text)
    assert any(expected in p for p in problems), problems
    assert first_moves(Playbook.from_text(text)) == [{"max_num_seqs": 128}]


def test_empty_move_list_is_a_problem() -> None:
    problems = _problems(_playbook(moves="Nothing here yet."))
    assert any("lists no moves" in p for p in problems)


def test_first_moves_without_the_section_is_empty() -> None:
    assert first_moves(Playbook.from_text("# only a title\n")) == []


@pytest.mark.parametrize(("raw", "value"), [
    ("512", 512), ("-3", -3), ("0.95", 0.95), (".5", 0.5), ("1e3", 1000.0),
    ("true", True), ("False", False), ("null", None), ("none", "none"),
    ("FLASHINFER", "FLASHINFER"), ("'quoted, text'", "quoted, text"), (" fp8 ", "fp8"),
])
def test_parse_value(raw: str, value: object) -> None:
    parsed = parse_value(raw)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("raw", ["", "[1]", "{a: 1}", "*ref", "a: b", "-x", "9" * 5000])
def test_parse_value_rejects_non_scalars(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_value(raw)


# -- loading --------------------------------------------------------------------------------

def test_load_missing_path_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    with pytest.raises(PlaybookError, match=r"playbook not found: .*nope\.md; pass an "
                                            r"existing markdown file to --playbook"):
        load_playbook(missing)


def test_load_directory_and_non_utf8_are_playbook_errors(tmp_path: Path) -> None:
    with pytest.raises(PlaybookError, match="is a directory"):
        load_playbook(tmp_path)
    binary = tmp_path / "bin.md"
    binary.write_bytes(b"\xff\xfe## Goal\n")
    with pytest.raises(PlaybookError, match="not UTF-8"):
        load_playbook(binary)


def test_load_given_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.md"
    path.write_text(_playbook(), encoding="utf-8")
    pb = load_playbook(path)
    assert pb.path == str(path)
    assert validate(pb) == []
    assert first_moves(pb) == [{"max_num_seqs": 512}]


def test_ensure_valid_raises_with_the_first_problem() -> None:
    pb = Playbook.from_text(_playbook(moves="- `max_num_seqs=lots` — vague"), "pb.md")
    with pytest.raises(PlaybookError, match=r"pb\.md:10: max_num_seqs takes an integer.*"
                                            r"1 problem\(s\)"):
        ensure_valid(pb)


# -- robustness -----------------------------------------------------------------------------

_MARKDOWNISH = st.lists(
    st.one_of(
        st.sampled_from(["## ", "# ", "### ", "- ", "1. ", "`", "```", "~~~", "=", ", ",
                         "\n", "\r\n", " — ", "\t"]),
        st.sampled_from([*REQUIRED_SECTIONS, *KNOBS, "max_num_seq", "lots", "0.95",
                         "true", "[1", "{", "*", "9" * 5000, "1e999", "é"]),
        st.text(max_size=12),
    ),
    max_size=60,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(_MARKDOWNISH)
def test_validate_never_raises_on_markdownish_text(text: str) -> None:
    pb = Playbook.from_text(text, "fuzz.md")
    problems = validate(pb)
    assert all(isinstance(p, str) and p.startswith("fuzz.md") for p in problems)
    assert all("\n" not in p for p in problems)
    moves = first_moves(pb)
    assert all(isinstance(move, dict) and set(move) <= set(KNOBS) for move in moves)
