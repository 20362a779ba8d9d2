"""`report A B`: two runs side by side from their two report models, through every
renderer and the command line."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from aevyra_forge.core.values import ExperimentRecord
from aevyra_forge.report.compare import (
    Comparison,
    compare,
    render_compare,
    render_compare_md,
    render_compare_table,
)
from aevyra_forge.report.markdown import WIDTH
from aevyra_forge.report.model import Report, build_report
from tests.conftest import run_cli
from tests.report.conftest import AWQ, BASE, CONFIG, FP8, HOSTILE, make_run, rec
from tests.report.test_html import parse

OTHER_WORKLOAD = {**CONFIG, "workload": {"path": "other.jsonl", "requests": 9,
                                         "sha256": "f" * 64},
                  "hardware": "1x NVIDIA L4 (24 GiB each)"}
# run B: the same workload, where AWQ was kept instead of the fp8 KV cache
B_HISTORY = [
    rec(0, BASE, tp=900.0, p99=1000.0, ttft=250.0, score=1.0, kept=True),
    rec(1, AWQ, tp=1350.0, p99=500.0, ttft=125.0, score=1.5, kept=True, layer=2,
        accuracy=0.992, rationale="AWQ", changes={"quant_method": "awq"}),
]
FAILED = [rec(0, BASE, status="boot_failed", reason="KV cache does not fit")]


def _report(root: Path, records: Sequence[ExperimentRecord],
            config: dict[str, Any] | None = None) -> Report:
    with make_run(root, records, config) as run:
        pass
    return build_report(run.path)


@pytest.fixture
def a(run_dir: Path) -> Report:
    return build_report(run_dir)


def _figures(c: Comparison) -> dict[str, tuple[float | None, float | None, float | None]]:
    return {m.name: (m.a, m.b, m.change) for m in c.metrics}


def test_same_workload_diffs_the_best_recipes_and_their_figures(
        a: Report, tmp_path: Path) -> None:
    c = compare(a, _report(tmp_path / "b", B_HISTORY))
    assert c.same_workload and c.same_model and c.same_hardware
    assert c.facts[0].startswith("Same workload (sha256 000000000000)")
    assert c.a.best_recipe_id == FP8.id and c.b.best_recipe_id == AWQ.id
    # A's best is SEQS + fp8 KV cache, B's is SEQS + AWQ: both share max_num_seqs
    assert {d.setting: (d.a, d.b) for d in c.diff} == {
        "quant.kv_cache_dtype": ("fp8", "auto"), "quant.method": ("none", "awq")}
    figures = _figures(c)
    assert figures["output tokens/s"] == (1350.0, 1350.0, 0.0)
    assert figures["p99 TTFT ms"] == pytest.approx((150.0, 125.0, 125 / 150 - 1))
    assert figures["p99 E2E ms"] == pytest.approx((650.25, 500.0, 500 / 650.25 - 1))
    assert figures["accuracy"] == pytest.approx((0.995, 0.992, 0.992 / 0.995 - 1))
    assert figures["score"] == pytest.approx((1.35, 1.5, 1.5 / 1.35 - 1))
    b = _report(tmp_path / "b2", B_HISTORY)
    assert a.cost.best is not None and b.cost.best is not None
    assert figures["$ per 1M output tokens"] == pytest.approx(
        (a.cost.best.usd_per_m_output, b.cost.best.usd_per_m_output, 0.0))  # same tok/s
    md = _md_rows(render_compare_md(c))
    assert md["p99 E2E ms"] == ["650.2", "500.0", "-23.1% (better)"]
    assert md["accuracy"] == ["0.9950", "0.9920", "-0.3% (worse)"]
    assert md["output tokens/s"] == ["1,350.0", "1,350.0", "+0.0%"]


def _md_rows(md: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows}


def test_the_same_run_twice_has_nothing_to_diff(a: Report) -> None:
    c = compare(a, a)
    assert c.diff == [] and "Both runs found the same best recipe." in c.facts
    assert all(m.change in (0.0, None) for m in c.metrics)


def test_different_workloads_and_hardware_are_said_plainly(a: Report, tmp_path: Path) -> None:
    c = compare(a, _report(tmp_path / "b", B_HISTORY, OTHER_WORKLOAD))
    assert c.same_workload is False and not c.same_hardware and c.same_model
    assert c.facts[0] == ("Different workloads (sha256 000000000000 vs ffffffffffff): the "
                          "figures measure different traffic and do not compare like with "
                          "like.")
    assert c.facts[2] == ("Different hardware: 1x NVIDIA H100 80GB HBM3 (80 GiB each) vs "
                          "1x NVIDIA L4 (24 GiB each).")


def test_a_run_without_a_recorded_workload_hash_is_not_called_the_same(
        a: Report, tmp_path: Path) -> None:
    old = {**CONFIG, "workload": "examples/chat.jsonl"}  # runs before the hash was recorded
    c = compare(a, _report(tmp_path / "b", B_HISTORY, old))
    assert c.same_workload is None and c.facts[0].startswith("Workload unknown")


def test_a_failed_run_on_one_side(a: Report, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    failed = _report(tmp_path / "b", FAILED)
    c = compare(a, failed)
    assert c.diff == [] and c.b.best_exp is None
    assert any(f.startswith("Run B has no best recipe (nothing served: all 1 "
                            "experiment(s) failed, the baseline included (boot_failed")
               for f in c.facts)
    assert all(m.b is None and m.change is None for m in c.metrics
               if m.name != "GPU $/hour")  # the price is known before anything is measured
    assert _figures(c)["output tokens/s"][0] == 1350.0
    for format in ("md", "html", "json"):
        assert "boot_failed" in render_compare(c, format)
    console = Console(record=True, width=200)
    console.print(render_compare_table(c))
    assert "Run B has no best recipe" in console.export_text()


def test_md_within_100_columns(a: Report, tmp_path: Path) -> None:
    md = render_compare_md(compare(a, _report(tmp_path / "b", FAILED, OTHER_WORKLOAD)))
    assert md.startswith("## aevyra-forge: two runs compared\n")
    assert max(len(line) for line in md.splitlines()) <= WIDTH


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=text, hardware=text, workload=text)
def test_any_run_text_stays_within_100_columns(a: Report, model: str, hardware: str,
                                               workload: str) -> None:
    b = a.model_copy(update={"workload": workload, "summary": a.summary.model_copy(
        update={"model": model, "hardware": hardware, "run_dir": HOSTILE + workload})})
    md = render_compare_md(compare(a, b))
    assert max(len(line) for line in md.splitlines()) <= WIDTH


def test_html_is_self_contained_and_escapes_run_text(a: Report) -> None:
    b = a.model_copy(update={"summary": a.summary.model_copy(update={"hardware": HOSTILE})})
    html = render_compare(compare(a, b), "html")
    page = parse(html)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    for name, value in page.attrs:  # nothing the browser would fetch
        assert "//" not in value and not value.startswith("http"), (name, value)
    assert "@import" not in html and not re.search(r"url\(", html)
    assert HOSTILE in " ".join(page.text)  # shown as the text it was, never as markup
    assert "B vs A" in page.text


def test_json_reads_back_as_the_comparison(a: Report, tmp_path: Path) -> None:
    c = compare(a, _report(tmp_path / "b", B_HISTORY))
    assert Comparison.model_validate_json(render_compare(c, "json")) == c


def test_the_command_compares_two_runs(run_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    b = _report(tmp_path / "b", B_HISTORY).summary.run_dir
    code, out, err = run_cli(["report", str(run_dir), b, "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["b"]["best_recipe_id"] == AWQ.id
    code, out, _ = run_cli(["report", str(run_dir), b], capsys)
    assert code == 0 and "Same workload" in out and "quant.method" in out
    target = tmp_path / "ab.md"
    code, _, err = run_cli(["report", str(run_dir), b, "--format", "md", "--output",
                            str(target)], capsys)
    assert code == 0 and target.read_text().startswith("## aevyra-forge: two runs")


@pytest.mark.parametrize(("extra", "needle"), [
    (["x"], "report takes one run, or two to compare, not 3"),
    (["--format", "tsv"], "comparing two runs writes table, md, html, json"),
    (["--run", "1"], "--run picks a run under one store root"),
])
def test_wrong_uses_get_one_line(run_dir: Path, extra: list[str], needle: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["report", str(run_dir), str(run_dir), *extra], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and needle in lines[0], err

