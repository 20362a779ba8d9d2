"""The HTML report in a real headless browser (Debian's chromium-headless-shell, driven by
playwright, which downloads nothing: it is pointed at the installed binary). Skipped, with
the reason, where the browser or playwright is absent; .ci/run installs both."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.report.html import render_html
from aevyra_forge.report.model import build_report

_CANDIDATES = ("chromium-headless-shell", "/usr/lib/chromium/chromium-headless-shell")


def _browser() -> str | None:
    explicit = os.environ.get("FORGE_TEST_CHROMIUM")
    if explicit:
        return explicit
    return next((found for name in _CANDIDATES if (found := shutil.which(name))), None)


BROWSER = _browser()
sync_api: Any = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no headless browser: apt-get install -y chromium-headless-shell "
                            "(or set FORGE_TEST_CHROMIUM to a Chromium binary)")

EXPECTED = {"chart-score": 4, "chart-pareto": 4, "chart-knobs": 3, "chart-accuracy": 4,
            "chart-time": 5}


def test_the_report_loads_offline_with_every_chart(run_dir: Path, tmp_path: Path) -> None:
    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(build_report(run_dir)))
    shot = tmp_path / "report.png"
    problems: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        try:
            context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri(), wait_until="load")
            charts = page.evaluate("""() => [...document.querySelectorAll('figure.chart')]
                .map(f => {
                    const svg = f.querySelector('svg');
                    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
                    const key = f.id.replace('chart-', '');
                    return [f.id, Number(f.dataset.points),
                            f.querySelectorAll(`g[id="${key}-points"] use`).length,
                            box.width, box.height];
                })""")
            scripts = page.evaluate("document.scripts.length")
            heading = page.inner_text("h2")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshot of the HTML report: {shot}")
    assert problems == []
    assert requests == [page_file.as_uri()]  # nothing but the page itself
    assert scripts == 0  # the hostile rationale stayed text
    assert heading == "What to deploy"
    assert {c[0]: c[1] for c in charts} == EXPECTED
    for key, declared, drawn, width, height in charts:
        assert drawn == declared, key  # every data point is on the page
        assert width > 300 and height > 100, key  # and the chart is laid out
    assert shot.stat().st_size > 20_000
