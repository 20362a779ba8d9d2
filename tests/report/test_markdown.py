from __future__ import annotations

import shlex
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.report.best import BestVsBaseline
from aevyra_forge.report.markdown import WIDTH, _command, render_md
from aevyra_forge.report.model import Report, build_report
from tests.report.conftest import FP8, HOSTILE


def test_summary_diff_command_and_top_of_the_table(run_dir: Path) -> None:
    md = render_md(build_report(run_dir))
    assert md.startswith("## aevyra-forge: meta-llama/Llama-3.2-1B-Instruct\n")
    assert f"Deploy recipe {FP8.id} (experiment 4)" in md
    assert "| config.max_num_seqs  | None     | 512  |" in md
    assert "| quant.kv_cache_dtype | auto     | fp8  |" in md
    assert "| e2e_p99<750ms  | e2e_p99 800 ms, needs <750 ms | met  |" in md
    assert "```bash\n" in md and "--kv-cache-dtype fp8" in md
    table = md[md.index("### Top 4 of 5 experiments by score"):]
    exps = [line.split("|")[1].strip() for line in table.splitlines()[4:]]
    assert exps == ["3", "4", "1", "0"]  # by score; the OOM has none


def test_within_100_columns(run_dir: Path) -> None:
    md = render_md(build_report(run_dir))
    assert max(len(line) for line in md.splitlines()) <= WIDTH


def test_the_deploy_block_is_the_same_command(run_dir: Path) -> None:
    best = build_report(run_dir).best
    assert best is not None
    lines = _command(best.deploy_command)
    joined = " ".join(line.removesuffix(" \\") for line in lines)
    assert shlex.split(joined) == shlex.split(best.deploy_command)
    assert all(len(line) <= WIDTH for line in lines)


def test_an_environment_value_that_needs_quoting_stays_an_assignment() -> None:
    lines = _command("A='x y' vllm serve m --max-num-seqs 8")
    assert lines == ["A='x y' \\", "vllm serve m \\", "--max-num-seqs 8"]


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rationale=text, model=text, reason=text, value=text)
def test_any_run_text_stays_within_100_columns(run_dir: Path, rationale: str, model: str,
                                               reason: str, value: str) -> None:
    report = build_report(run_dir)
    rows = [e.model_copy(update={"rationale": rationale, "reason": reason,
                                 "changes": {"knob": value}}) for e in report.experiments]
    assert report.best is not None
    best: BestVsBaseline = report.best.model_copy(update={"changes": [
        c.model_copy(update={"best": value}) for c in report.best.changes]})
    hostile: Report = report.model_copy(update={
        "experiments": rows, "best": best, "workload": HOSTILE + value,
        "summary": report.summary.model_copy(update={"model": model or "m",
                                                     "note": reason})})
    md = render_md(hostile)
    assert max(len(line) for line in md.splitlines()) <= WIDTH
