"""Cost per million tokens, an estimate: the GPU rent of the baseline and of the best
recipe over the tokens each served at the measured concurrency, what the best saves a month
at a stated traffic, and the same workload priced on a few commercial APIs (agent.pricing)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aevyra_forge.agent.pricing import PRICES_AS_OF, TOKENS_PER_UNIT, PriceTable
from aevyra_forge.core.errors import RecipeError
from aevyra_forge.core.recipe import recipe_from_dict
from aevyra_forge.core.values import ExperimentRecord, best_record
from aevyra_forge.report.best import Model, baseline_record
from aevyra_forge.report.export import Deployment
from aevyra_forge.space.gpu_catalogue import find_gpu_spec
from aevyra_forge.space.gpu_prices import GPU_PRICES, GPU_PRICES_AS_OF, gpu_price

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
SECONDS_PER_HOUR = 3600.0
# Commercial APIs the workload is priced on: small general models and a hosted Llama 8B,
# the class a self-hosted vLLM deployment usually replaces.
COMPARED_APIS: tuple[tuple[str, str], ...] = (
    ("openai", "gpt-5-mini"), ("openai", "gpt-4.1-mini"), ("anthropic", "claude-haiku-4-5"),
    ("groq", "llama-3.1-8b-instant"),
)
TRAFFIC = "the best's measured output throughput sustained 24x7, 730 h a month"
HOW_TO_PRICE = "pass --gpu-price USD_PER_HOUR to `aevyra-forge report` (or to `tune`)"


class ServingCost(Model):
    """One measured config's GPU rent per million tokens (all of it charged to the tokens
    it served at the run's concurrency)."""

    exp: int
    gpus: int  # GPUs one server of this recipe uses (tensor x pipeline parallel)
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (input + output) tokens/s
    usd_per_hour: float  # GPU price x gpus
    usd_per_m_output: float
    usd_per_m_total: float


class ApiCost(Model):
    """The workload's input:output mix priced on one commercial API."""

    api: str  # provider/model
    input_per_mtok: float
    output_per_mtok: float
    usd_per_m_output: float  # input and output charges per million output tokens
    usd_per_m_total: float
    monthly_usd: float | None  # at `Cost.monthly_output_tokens`


class Cost(Model):
    """The cost section of the report: every figure an estimate, with its inputs."""

    gpu: str | None  # the GPU the price is for, as the catalogue names it
    gpu_price: float | None  # USD per GPU-hour; None: unknown (then `note` says how to give it)
    price_source: str
    concurrency: int | None
    dry_run: bool
    baseline: ServingCost | None
    best: ServingCost | None
    input_tokens: int | None  # one bench pass of the workload, as the best measured it
    output_tokens: int | None
    monthly_output_tokens: float | None
    traffic: str
    monthly_baseline_usd: float | None
    monthly_best_usd: float | None
    monthly_saving_usd: float | None
    apis: list[ApiCost]
    api_prices_as_of: str
    note: str  # what is missing and how to supply it; "" when nothing is


def per_million(usd_per_hour: float, tokens_per_s: float) -> float:
    """USD per million tokens of a server rented at `usd_per_hour` serving `tokens_per_s`."""
    return usd_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * TOKENS_PER_UNIT


def build_cost(path: Path, config: dict[str, Any], records: Sequence[ExperimentRecord],
               gpu_price_override: float | None = None) -> Cost:
    """The run's cost estimate. The GPU price is the report's --gpu-price, else the run's,
    else the table's for the recorded GPU; a CPU run has none unless one is given."""
    settings = config.get("settings")
    raw: dict[str, Any] = settings if isinstance(settings, dict) else {}
    price, source, gpu, note = _price(config, raw, gpu_price_override)
    baseline, best = baseline_record(records), best_record(records)
    base_cost = _serving(path, baseline, price)
    best_cost = _serving(path, best, price)
    metrics = best.metrics if best is not None else None
    traffic = (metrics.output_throughput * SECONDS_PER_HOUR * HOURS_PER_MONTH
               if metrics is not None and metrics.output_throughput > 0 else None)
    monthly_base = _monthly(base_cost, traffic)
    monthly_best = _monthly(best_cost, traffic)
    if best is None:
        note = "nothing was measured healthy yet, so there is nothing to price"
    concurrency = raw.get("concurrency")
    return Cost(
        gpu=gpu, gpu_price=price, price_source=source,
        concurrency=concurrency if isinstance(concurrency, int) else None,
        dry_run=bool(raw.get("dry_run")), baseline=base_cost, best=best_cost,
        input_tokens=metrics.input_tokens if metrics else None,
        output_tokens=metrics.output_tokens if metrics else None,
        monthly_output_tokens=traffic, traffic=TRAFFIC,
        monthly_baseline_usd=monthly_base, monthly_best_usd=monthly_best,
        monthly_saving_usd=(monthly_base - monthly_best
                            if monthly_base is not None and monthly_best is not None else None),
        apis=_apis(metrics.input_tokens if metrics else 0,
                   metrics.output_tokens if metrics else 0, traffic),
        api_prices_as_of=PRICES_AS_OF, note=note)


def _price(config: dict[str, Any], raw: dict[str, Any],
           override: float | None) -> tuple[float | None, str, str | None, str]:
    """(USD per GPU-hour, its source, the GPU, what is missing): the report's option, then
    the run's setting, then the table, then none."""
    detail = config.get("hardware_detail")
    detail = detail if isinstance(detail, dict) else {}
    gpus = detail.get("gpus") or []
    # Runs without the detail record only a description, which names the GPU too.
    name = (str(gpus[0].get("name")) if gpus and isinstance(gpus[0], dict)
            else str(config.get("hardware") or "") or None)
    device = str(detail.get("device") or raw.get("device") or "cuda")
    spec = find_gpu_spec(name) if name and device != "cpu" else None
    gpu = spec.name if spec is not None else (name if device != "cpu" else None)
    if override is not None:
        return override, "--gpu-price given to report", gpu, ""
    recorded = raw.get("gpu_price")
    if isinstance(recorded, int | float) and recorded > 0:
        return float(recorded), "--gpu-price recorded with the run", gpu, ""
    if device == "cpu":
        return None, "", None, f"a CPU run has no GPU price; to price its machine, {HOW_TO_PRICE}"
    found = gpu_price(name) if name else None
    if found is None:
        known = ", ".join(GPU_PRICES)
        return None, "", gpu, (f"no price for GPU '{name or '?'}' in the table (known: "
                               f"{known}); {HOW_TO_PRICE}")
    return found.usd_per_hour, f"{found.source}; price table of {GPU_PRICES_AS_OF}", gpu, ""


def _serving(path: Path, record: ExperimentRecord | None,
             price: float | None) -> ServingCost | None:
    m = record.metrics if record is not None else None
    if record is None or m is None or price is None or m.output_throughput <= 0:
        return None
    try:  # the deploy export's count, so the cost is of what deploy.sh would serve
        gpus = Deployment(recipe_from_dict(record.recipe, source=f"experiment {record.exp}"),
                          None, path).gpus
    except RecipeError:
        gpus = 1
    hourly = price * gpus
    return ServingCost(
        exp=record.exp, gpus=gpus, output_throughput=m.output_throughput,
        total_token_throughput=m.total_token_throughput, usd_per_hour=hourly,
        usd_per_m_output=per_million(hourly, m.output_throughput),
        usd_per_m_total=(per_million(hourly, m.total_token_throughput)
                         if m.total_token_throughput > 0 else per_million(hourly,
                                                                          m.output_throughput)))


def _monthly(cost: ServingCost | None, traffic: float | None) -> float | None:
    if cost is None or traffic is None:
        return None
    return traffic * cost.usd_per_m_output / TOKENS_PER_UNIT


def _apis(input_tokens: int, output_tokens: int, traffic: float | None) -> list[ApiCost]:
    if output_tokens <= 0:
        return []
    table = PriceTable()
    out = []
    for provider, model in COMPARED_APIS:
        price = table.lookup(provider, model)
        if price is None:  # a table edited without this list: skip rather than invent
            continue
        workload = price.cost(input_tokens, output_tokens)  # USD for one pass
        per_m_output = workload / output_tokens * TOKENS_PER_UNIT
        out.append(ApiCost(
            api=f"{provider}/{model}", input_per_mtok=price.input_per_mtok,
            output_per_mtok=price.output_per_mtok, usd_per_m_output=per_m_output,
            usd_per_m_total=workload / (input_tokens + output_tokens) * TOKENS_PER_UNIT,
            monthly_usd=traffic * per_m_output / TOKENS_PER_UNIT if traffic else None))
    return out


# -- phrasing shared by the renderers (plain text; each renderer escapes it) ------------


def usd(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:,.0f}" if x >= 1000 else f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def inputs_text(cost: Cost) -> str:
    """The estimate's inputs in one sentence."""
    if cost.gpu_price is None:
        return f"Estimate not possible: {cost.note}."
    gpus = sorted({c.gpus for c in (cost.baseline, cost.best) if c is not None}) or [1]
    per = "/".join(map(str, gpus))
    what = f"{cost.gpu} " if cost.gpu else ""
    sim = (" Measured by the simulator (--dry-run): the arithmetic, not this GPU's real "
           "figures." if cost.dry_run else "")
    missing = f" Not priced: {cost.note}." if cost.note else ""
    return (f"Estimate: {what}at ${cost.gpu_price:g} per GPU-hour ({cost.price_source}), "
            f"{per} GPU(s) per server, at concurrency {cost.concurrency or '?'}; GPU rent "
            f"only (no storage, egress or idle time).{sim}{missing}")


def serving_rows(cost: Cost) -> list[tuple[str, str, str, str]]:
    """(config, tokens/s, $/1M output, $/1M total) for the baseline and the best."""
    rows = []
    for label, c in (("baseline", cost.baseline), ("best", cost.best)):
        if c is not None:
            rows.append((f"{label} (experiment {c.exp})", f"{c.output_throughput:,.1f}",
                         usd(c.usd_per_m_output), usd(c.usd_per_m_total)))
    return rows


def saving_text(cost: Cost) -> str:
    if cost.monthly_best_usd is None or cost.monthly_output_tokens is None:
        return ""
    tokens = f"{cost.monthly_output_tokens / 1e6:,.0f}M output tokens a month"
    if cost.monthly_saving_usd is None:
        return (f"At {tokens} ({cost.traffic}): best {usd(cost.monthly_best_usd)} a month "
                "(no healthy baseline to compare with).")
    # a latency objective or a wider tensor-parallel recipe may cost more per token
    change = ("saving" if cost.monthly_saving_usd >= 0 else "costing") + " " + usd(
        abs(cost.monthly_saving_usd)) + ("" if cost.monthly_saving_usd >= 0 else " more")
    return (f"At {tokens} ({cost.traffic}): baseline {usd(cost.monthly_baseline_usd)}, best "
            f"{usd(cost.monthly_best_usd)}, {change} a month.")


def api_rows(cost: Cost) -> list[tuple[str, str, str, str, str]]:
    """(api, $/1M in, $/1M out, this workload per 1M output tokens, a month)."""
    return [(a.api, usd(a.input_per_mtok), usd(a.output_per_mtok), usd(a.usd_per_m_output),
             usd(a.monthly_usd)) for a in cost.apis]


def one_line(cost: Cost) -> str:
    """The terminal panel's line."""
    if cost.best is None:
        return f"- ({cost.note})" if cost.note else "-"
    base = (f" vs baseline {usd(cost.baseline.usd_per_m_output)}"
            if cost.baseline is not None and cost.baseline.exp != cost.best.exp else "")
    saved = cost.monthly_saving_usd or 0.0
    saving = (f"; saves {usd(saved)}/month at 24x7 traffic" if saved > 0 else
              f"; costs {usd(-saved)}/month more at 24x7 traffic" if saved < 0 else "")
    return (f"{usd(cost.best.usd_per_m_output)} per 1M output tokens{base}{saving} "
            f"(estimate: {cost.gpu or 'GPU'} at ${cost.gpu_price or 0:g}/GPU-h)")
