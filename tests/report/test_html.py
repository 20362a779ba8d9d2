from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from aevyra_forge.report.html import render_html
from aevyra_forge.report.model import build_report
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD, run_cli
from tests.report.conftest import FP8, HOSTILE


class Page(HTMLParser):
    """Tags, attribute values and text of a page, as a browser's parser splits them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.text: list[str] = []
        self.figures: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((k, v or "") for k, v in attrs)
        values = dict(attrs)
        if tag == "figure" and values.get("data-points") is not None:
            self.figures[str(values["id"])] = int(str(values["data-points"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_leads_with_what_to_deploy_and_why(run_dir: Path) -> None:
    html = render_html(build_report(run_dir))
    text = " ".join(parse(html).text)
    deploy = text.index("What to deploy")
    assert deploy < text.index("Charts") < text.index("Experiments")
    assert f"Deploy recipe {FP8.id} (experiment 4): +35.0% [" in text
    assert "p99 TTFT 200 -> 150 ms (-25.0%)" in text
    assert "p99 E2E 800 -> 650 ms (-18.7%)" in text
    assert "accuracy 0.9950" in text
    assert "quant.kv_cache_dtype" in text and "config.max_num_seqs" in text
    assert "e2e_p99 800 ms, needs <750 ms" in text  # the baseline's SLO verdict
    assert "--kv-cache-dtype fp8" in text
    assert "CUDA out of memory while allocating KV cache" in text  # the failure's reason
    assert "Tried to allocate 2.00 GiB" in text  # and its log tail
    assert "every layer converged" in text


def test_hostile_run_text_is_escaped(run_dir: Path) -> None:
    html = render_html(build_report(run_dir))
    page = parse(html)
    assert "script" not in page.tags and "img" not in page.tags
    assert '<script>alert("x")</script>' not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert HOSTILE in " ".join(page.text)  # shown to the reader as the text it was


def test_the_page_is_self_contained(run_dir: Path) -> None:
    html = render_html(build_report(run_dir))
    page = parse(html)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    for name, value in page.attrs:  # nothing the browser would fetch
        assert "//" not in value and not value.startswith("http"), (name, value)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html)
    assert "@import" not in html and "@font-face" not in html
    # the only URLs in the page are run text, escaped, which no browser follows
    urls = re.findall(r"https?://[^\s<\"&]+", html)
    assert urls == ["https://evil.example/a?b=1"] * len(urls) and urls


def test_every_chart_is_on_the_page_with_its_point_count(run_dir: Path) -> None:
    html = render_html(build_report(run_dir))
    assert parse(html).figures == {"chart-score": 4, "chart-pareto": 4, "chart-knobs": 3,
                                   "chart-accuracy": 4, "chart-time": 5}
    for key, count in parse(html).figures.items():
        body = html[html.index(f'id="{key}"'):]
        group = body[body.index(f'<g id="{key.removeprefix("chart-")}-points">'):]
        assert group[:group.index("</g>\n")].count("<use ") == count, key


def test_report_command_writes_html_and_md(run_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out.html"
    code, _, err = run_cli(["report", str(run_dir), "--format", "html", "--output",
                            str(target)], capsys)
    assert code == 0 and f"wrote {target}" in err
    assert target.read_text().startswith("<!DOCTYPE html>")
    code, out, _ = run_cli(["report", str(run_dir), "--format", "md"], capsys)
    assert code == 0 and out.startswith("## aevyra-forge: meta-llama/Llama-3.2-1B-Instruct")
    code, out, _ = run_cli(["report", str(run_dir), "--format", "html"], capsys)
    assert code == 0 and out.rstrip().endswith("</html>")


@pytest.mark.parametrize(("argv", "message"), [
    (["--format", "pdf"], "--format pdf: expected one of table, tsv, json, md, html"),
    (["--output", "x.txt"], "--output writes tsv, json, md or html"),
])
def test_report_command_refuses_bad_options(run_dir: Path, argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["report", str(run_dir), *argv], capsys)
    assert code == 1 and message in err


def test_a_run_leaves_its_report_in_the_run_folder(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / ".forge"
    code, _, _ = run_cli(["tune", "--dry-run", "--model", MODEL_8B, "--workload",
                          str(SAMPLE_WORKLOAD), "--llm", "builtin", "--max-experiments", "8",
                          "--run-dir", str(root)], capsys)
    assert code == 0
    (run,) = (p for p in (root / "runs").iterdir() if p.is_dir())
    html = (run / "report.html").read_text()
    completed = json.loads((run / "completed.json").read_text())
    report = build_report(run)
    assert report.best is not None
    assert report.best.recipe_id == completed["best_recipe_id"]  # the loop's best
    assert f"recipe {completed['best_recipe_id']}" in html
    assert len(parse(html).figures) == 5


def test_an_interrupted_run_leaves_the_report_of_what_was_recorded(
        tmp_path: Path, small_workload: Path) -> None:
    root = tmp_path / ".forge"
    cmd = [sys.executable, "-m", "aevyra_forge", "tune", "--dry-run", "--model", MODEL_8B,
           "--workload", str(small_workload), "--llm", "builtin", "--run-dir", str(root),
           "--max-experiments", "30", "--patience", "30"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    for line in proc.stderr:
        if "/30 " in line:  # the first experiment is recorded
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    (run,) = (p for p in (root / "runs").iterdir() if p.is_dir())
    assert not (run / "completed.json").exists()
    html = (run / "report.html").read_text()
    assert "not finished (running, or interrupted and resumable)" in html
    assert len(parse(html).figures) == 5
