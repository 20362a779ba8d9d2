"""Cost per million tokens: the arithmetic on a hand-computed run, where the GPU price
comes from (report option > run setting > table > none), CPU runs, the commercial APIs
priced from agent.pricing, and the cost in every renderer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.agent.pricing import DEFAULT_PRICES, Price, PriceTable
from aevyra_forge.report.cost import COMPARED_APIS, per_million
from aevyra_forge.report.html import render_html
from aevyra_forge.report.markdown import WIDTH, render_md
from aevyra_forge.report.model import build_report
from aevyra_forge.report.render import render_json, render_table
from aevyra_forge.space.gpu_prices import GPU_PRICES
from tests.conftest import run_cli
from tests.report.conftest import BASE, CONFIG, HISTORY, SETTINGS, make_run, rec

H100 = {"device": "cuda", "cpu_cores": 8, "memory_gib": 64.0, "simulated": False,
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559,
                  "compute_capability": "9.0"}]}


def _run(tmp_path: Path, *, settings: dict[str, Any] | None = None,
         detail: dict[str, Any] | None = None, records: Any = HISTORY) -> Path:
    config = {**CONFIG, "settings": {**SETTINGS, **(settings or {})},
              **({"hardware_detail": detail} if detail is not None else {})}
    with make_run(tmp_path, records, config) as run:
        run.complete({"reason": "every layer converged"})
    return run.path


def test_hand_computed_costs(tmp_path: Path) -> None:
    # $3.60 per GPU-hour, one GPU: the baseline serves 1000 output tokens/s = 3.6M tokens an
    # hour, so $1.00 per 1M; the best (experiment 4) 1350 tokens/s -> 3.6 / 4.86 = $0.7407.
    # Total tokens are 1.8x output tokens. Traffic: 1350 * 3600 * 730 = 3,547.8M tokens a
    # month; the best serves it for 3.6 * 730 = $2,628, the baseline for $3,547.80.
    cost = build_report(_run(tmp_path, settings={"gpu_price": 3.6, "concurrency": 8})).cost
    assert cost.baseline is not None and cost.best is not None
    assert (cost.baseline.exp, cost.best.exp, cost.best.gpus) == (0, 4, 1)
    assert cost.baseline.usd_per_m_output == pytest.approx(1.0)
    assert cost.baseline.usd_per_m_total == pytest.approx(1.0 / 1.8)
    assert cost.best.usd_per_m_output == pytest.approx(3.6 / 4.86)
    assert cost.monthly_output_tokens == pytest.approx(3_547_800_000)
    assert cost.monthly_best_usd == pytest.approx(2628.0)
    assert cost.monthly_baseline_usd == pytest.approx(3547.8)
    assert cost.monthly_saving_usd == pytest.approx(919.8)
    assert cost.concurrency == 8 and cost.note == ""


def test_a_tensor_parallel_recipe_pays_for_each_gpu(tmp_path: Path) -> None:
    tp2 = BASE.child(config={"tensor_parallel_size": 2})
    records = [rec(0, BASE, score=1.0, kept=True),
               rec(1, tp2, tp=1800.0, score=1.8, kept=True, rationale="two GPUs",
                   changes={"tensor_parallel_size": 2})]
    cost = build_report(_run(tmp_path, settings={"gpu_price": 3.6}, records=records)).cost
    assert cost.best is not None and cost.best.gpus == 2
    assert cost.best.usd_per_m_output == pytest.approx(7.2 / (1800 * 3600) * 1e6)


@given(st.floats(0.01, 100.0), st.floats(0.1, 1e6))
def test_per_million_is_the_rent_of_the_hour_over_its_tokens(price: float, tps: float) -> None:
    assert per_million(price, tps) * tps * 3600 / 1e6 == pytest.approx(price)


def test_price_order_report_then_run_then_table_then_none(tmp_path: Path) -> None:
    recorded = _run(tmp_path / "a", settings={"gpu_price": 1.5}, detail=H100)
    assert build_report(recorded, gpu_price=3.0).cost.gpu_price == 3.0
    assert build_report(recorded, gpu_price=3.0).cost.price_source == "--gpu-price given to report"
    assert build_report(recorded).cost.gpu_price == 1.5
    table = build_report(_run(tmp_path / "b", detail=H100)).cost
    assert (table.gpu, table.gpu_price) == ("H100", GPU_PRICES["H100"].usd_per_hour)
    assert GPU_PRICES["H100"].source in table.price_source
    unknown = {**H100, "gpus": [{**H100["gpus"][0], "name": "NVIDIA GeForce RTX 4090"}]}
    none = build_report(_run(tmp_path / "c", detail=unknown)).cost
    assert none.gpu_price is None and none.best is None and none.monthly_best_usd is None
    assert "RTX 4090" in none.note and "--gpu-price" in none.note


def test_cpu_run_has_no_gpu_price_unless_given(tmp_path: Path) -> None:
    cpu = {"device": "cpu", "gpus": [], "cpu_cores": 2, "memory_gib": 8.0}
    path = _run(tmp_path, settings={"device": "cpu"}, detail=cpu)
    cost = build_report(path).cost
    assert cost.gpu_price is None and cost.baseline is None and cost.gpu is None
    assert "CPU" in cost.note and "--gpu-price" in cost.note
    given_price = build_report(path, gpu_price=0.5).cost
    assert given_price.best is not None and given_price.gpu_price == 0.5


def test_commercial_apis_are_priced_from_the_agent_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DEFAULT_PRICES, "gpt-5-mini", Price(1.0, 3.0))
    cost = build_report(_run(tmp_path, settings={"gpu_price": 3.6})).cost
    # one bench pass of the best: 5000 input and 6400 output tokens (tests/report/conftest)
    assert (cost.input_tokens, cost.output_tokens) == (5000, 6400)
    assert [a.api for a in cost.apis] == [f"{p}/{m}" for p, m in COMPARED_APIS]
    for api in cost.apis:
        provider, model = api.api.split("/", 1)
        price = PriceTable().lookup(provider, model)
        assert price is not None
        assert api.usd_per_m_output == pytest.approx(price.cost(5000, 6400) / 6400 * 1e6)
        assert api.usd_per_m_total == pytest.approx(price.cost(5000, 6400) / 11400 * 1e6)
    mini = cost.apis[0]
    # (5000 * $1 + 6400 * $3) / 1M = $0.0242 a pass -> $3.78125 per 1M output tokens
    assert mini.usd_per_m_output == pytest.approx(3.78125)
    assert mini.monthly_usd == pytest.approx(3547.8 * 3.78125)


def test_every_renderer_shows_the_estimate(tmp_path: Path) -> None:
    report = build_report(_run(tmp_path, settings={"gpu_price": 3.6}))
    page = render_html(report)
    assert page.index("What to deploy") < page.index("Cost (estimate)") < page.index("The run")
    assert "$0.7407" in page and "$919.80" in page and "openai/gpt-5-mini" in page
    md = render_md(report)
    assert "### Cost (estimate)" in md and "$0.7407" in md and "recorded with the run" in md
    assert max(len(line) for line in md.splitlines()) <= WIDTH
    assert json.loads(render_json(report))["cost"]["monthly_saving_usd"] == pytest.approx(919.8)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_table(report))
    assert "$0.7407 per 1M output tokens vs baseline $1.00" in console.export_text()


def test_report_without_a_price_says_how_to_give_one(tmp_path: Path) -> None:
    unknown = {**H100, "gpus": [{**H100["gpus"][0], "name": "Mystery GPU"}]}
    report = build_report(_run(tmp_path, detail=unknown))
    for text in (render_html(report), render_md(report)):
        assert "--gpu-price USD_PER_HOUR" in " ".join(text.split())


def test_report_command_takes_gpu_price(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = _run(tmp_path, settings={"gpu_price": 1.5})
    code, out, err = run_cli(["report", str(path), "--format", "json", "--gpu-price", "3.6"],
                             capsys)
    assert code == 0, err
    cost = json.loads(out)["cost"]
    assert (cost["gpu_price"], cost["price_source"]) == (3.6, "--gpu-price given to report")


def test_a_dearer_best_is_said_to_cost_more(tmp_path: Path) -> None:
    # two GPUs for 1.5x the throughput: each token costs 2 / 1.5 = 1.33x the baseline's
    tp2 = BASE.child(config={"tensor_parallel_size": 2})
    records = [rec(0, BASE, score=1.0, kept=True),
               rec(1, tp2, tp=1500.0, score=1.5, kept=True, rationale="two GPUs",
                   changes={"tensor_parallel_size": 2})]
    report = build_report(_run(tmp_path, settings={"gpu_price": 3.6}, records=records))
    assert report.cost.monthly_saving_usd is not None and report.cost.monthly_saving_usd < 0
    assert "costing $1,314 more a month" in render_md(report).replace("\n", " ")
