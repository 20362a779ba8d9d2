from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.report.charts import charts, pareto_front
from aevyra_forge.report.model import build_report
from tests.report.conftest import BASE, make_run, rec


def markers(svg: str, gid: str) -> int:
    """The markers matplotlib wrote inside the group with id `gid`."""
    match = re.search(rf'<g id="{re.escape(gid)}">(.*?)</g>\s*</g>', svg, re.S)
    assert match is not None, f"no group {gid}"
    return match.group(1).count("<use ")


def test_every_chart_has_its_data_points(run_dir: Path) -> None:
    drawn = {c.key: c for c in charts(build_report(run_dir))}
    # 4 measured configs; 3 single-knob moves judged against an incumbent; 5 experiments
    # with accuracy... except the OOM; 5 with recorded time
    expected = {"score": 4, "pareto": 4, "knobs": 3, "accuracy": 4, "time": 5}
    assert {k: c.points for k, c in drawn.items()} == expected
    for key, chart in drawn.items():
        assert markers(chart.svg, f"{key}-points") == expected[key], key


def test_svgs_are_inline_ready_and_share_no_ids(run_dir: Path) -> None:
    seen: set[str] = set()
    for chart in charts(build_report(run_dir)):
        assert chart.svg.startswith("<svg")
        assert "http" not in chart.svg  # no DTD, metadata or namespace URI left
        ids = set(re.findall(r'\sid="([^"]+)"', chart.svg))
        assert not ids & seen, f"{chart.key} reuses ids {sorted(ids & seen)[:3]}"
        seen |= ids


def test_an_empty_run_draws_empty_charts(tmp_path: Path) -> None:
    with make_run(tmp_path, []) as run:
        drawn = charts(build_report(run.path))
    assert [c.points for c in drawn] == [0] * 5
    assert all("no data yet" in c.svg for c in drawn)


def test_run_text_in_a_chart_is_escaped(tmp_path: Path) -> None:
    hostile = rec(1, BASE.child(config={"max_num_seqs": 512}), score=1.1,
                  rationale="x", changes={"served_name": "<b>&$x$</b>"})
    with make_run(tmp_path, [rec(0, BASE, score=1.0, kept=True), hostile]) as run:
        knobs = next(c for c in charts(build_report(run.path)) if c.key == "knobs")
    assert "<b>" not in knobs.svg
    assert "&lt;b&gt;&amp;$x$&lt;/b&gt;" in knobs.svg  # no math parsing of the `$`


points = st.lists(st.tuples(st.floats(1, 1e5), st.floats(1, 1e5)), max_size=30)


@given(points)
def test_pareto_front_is_exactly_the_undominated_points(pts: list[tuple[float, float]]) -> None:
    front = pareto_front(pts)

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts)

    assert all(not dominated(p) for p in front)
    assert all(p in front for p in set(pts) if not dominated(p))
    assert [p[0] for p in front] == sorted(p[0] for p in front)
