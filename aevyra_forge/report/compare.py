"""`report RUN_A RUN_B`: two runs side by side, computed from their two report models:
whether they measured the same workload (its sha256), model and hardware, said plainly;
each run's best recipe and the diff between them (core.recipe.diff); the headline figures
with B's relative change over A; rendered as a terminal table, Markdown, HTML or JSON."""

from __future__ import annotations

from html import escape
from typing import Any

import yaml
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from aevyra_forge.core.errors import RecipeError, UsageError
from aevyra_forge.core.recipe import Recipe, diff, recipe_from_dict
from aevyra_forge.report import fmt
from aevyra_forge.report.best import Model
from aevyra_forge.report.html import _CSS
from aevyra_forge.report.html import _table as html_table
from aevyra_forge.report.markdown import _table as md_table
from aevyra_forge.report.markdown import _wrap as md_wrap
from aevyra_forge.report.model import ExperimentRow, Report

FORMATS = ("table", "md", "html", "json")
SHA_SHOWN = 12  # hex digits of a workload's sha256 shown to a reader


class Side(Model):
    """One run as the comparison shows it."""

    run_dir: str
    model: str
    hardware: str
    workload: str
    workload_sha256: str | None
    experiments: int
    state: str
    best_exp: int | None
    best_recipe_id: str | None
    note: str


class RecipeChange(Model):
    setting: str  # dotted path, e.g. config.max_num_seqs
    a: Any
    b: Any


class Metric(Model):
    """One headline figure of each run's best; `change` is B / A - 1."""

    name: str
    a: float | None
    b: float | None
    change: float | None
    higher_is_better: bool
    decimals: int


class Comparison(Model):
    a: Side
    b: Side
    same_workload: bool | None  # None: a run predates the recorded sha256
    same_model: bool
    same_hardware: bool
    facts: list[str]  # plain sentences: workload, model, hardware, what the diff covers
    diff: list[RecipeChange]
    metrics: list[Metric]


def compare(a: Report, b: Report) -> Comparison:
    """Run B against run A (A is the reference every relative change is taken from)."""
    side_a, side_b = _side(a), _side(b)
    same_workload = (side_a.workload_sha256 == side_b.workload_sha256
                     if side_a.workload_sha256 and side_b.workload_sha256 else None)
    recipe_a, recipe_b = _best_recipe(a), _best_recipe(b)
    changes = ([RecipeChange(setting=k, a=x, b=y) for k, (x, y) in
                diff(recipe_a, recipe_b).items()]
               if recipe_a is not None and recipe_b is not None else [])
    return Comparison(
        a=side_a, b=side_b, same_workload=same_workload,
        same_model=side_a.model == side_b.model,
        same_hardware=side_a.hardware == side_b.hardware,
        facts=_facts(side_a, side_b, same_workload, recipe_a, recipe_b, len(changes)),
        diff=changes, metrics=_metrics(a, b))


def _side(r: Report) -> Side:
    s = r.summary
    return Side(run_dir=s.run_dir, model=s.model, hardware=s.hardware, workload=r.workload,
                workload_sha256=r.workload_sha256, experiments=s.experiments,
                state=fmt.state(r), best_exp=s.best_exp, best_recipe_id=s.best_recipe_id,
                note=s.note)


def _best_recipe(r: Report) -> Recipe | None:
    if r.best is None or not r.best.recipe_yaml:
        return None
    try:
        return recipe_from_dict(yaml.safe_load(r.best.recipe_yaml), source="best recipe")
    except (RecipeError, yaml.YAMLError):
        return None


def _facts(a: Side, b: Side, same_workload: bool | None, recipe_a: Recipe | None,
           recipe_b: Recipe | None, changes: int) -> list[str]:
    def sha(side: Side) -> str:
        return (side.workload_sha256 or "?")[:SHA_SHOWN]

    if same_workload:
        workload = f"Same workload (sha256 {sha(a)}): the figures compare like with like."
    elif same_workload is None:
        workload = ("Workload unknown for one run (no sha256 recorded): the figures may not "
                    "compare like with like.")
    else:
        workload = (f"Different workloads (sha256 {sha(a)} vs {sha(b)}): the figures measure "
                    "different traffic and do not compare like with like.")
    facts = [workload,
             f"Same model ({a.model})." if a.model == b.model
             else f"Different models: {a.model} vs {b.model}.",
             f"Same hardware ({a.hardware})." if a.hardware == b.hardware
             else f"Different hardware: {a.hardware} vs {b.hardware}."]
    for label, side, recipe in (("A", a, recipe_a), ("B", b, recipe_b)):
        if recipe is None:
            facts.append(f"Run {label} has no best recipe ({side.note}): nothing to diff.")
    if recipe_a is not None and recipe_b is not None:
        facts.append("Both runs found the same best recipe." if changes == 0 else
                     f"The two best recipes differ in {changes} setting"
                     f"{'' if changes == 1 else 's'}.")
    facts.append("Scores are each relative to their own run's baseline; costs are "
                 "estimates (see each run's report for their inputs).")
    return facts


def _metrics(a: Report, b: Report) -> list[Metric]:
    row_a, row_b = _best_row(a), _best_row(b)

    def p99(row: ExperimentRow | None, field: str) -> float | None:
        stats = getattr(row, field) if row is not None else None
        return stats.p99 if stats is not None else None

    figures: list[tuple[str, float | None, float | None, bool, int]] = [
        ("output tokens/s", _get(row_a, "output_throughput"),
         _get(row_b, "output_throughput"), True, 1),
        ("baseline output tokens/s", a.summary.baseline_throughput,
         b.summary.baseline_throughput, True, 1),
        ("p99 TTFT ms", p99(row_a, "ttft_ms"), p99(row_b, "ttft_ms"), False, 1),
        ("p99 E2E ms", p99(row_a, "e2e_ms"), p99(row_b, "e2e_ms"), False, 1),
        ("accuracy", _get(row_a, "accuracy"), _get(row_b, "accuracy"), True, 4),
        ("score", a.summary.best_score, b.summary.best_score, True, 3),
        # estimates (report.cost): GPU rent over the tokens the best served
        ("GPU $/hour", a.cost.gpu_price, b.cost.gpu_price, False, 2),
        ("$ per 1M output tokens", _usd_per_m(a), _usd_per_m(b), False, 4),
    ]
    return [Metric(name=name, a=x, b=y, change=fmt.relative((x, y)) if x is not None
                   and y is not None else None, higher_is_better=up, decimals=d)
            for name, x, y, up, d in figures]


def _usd_per_m(r: Report) -> float | None:
    return r.cost.best.usd_per_m_output if r.cost.best is not None else None


def _best_row(r: Report) -> ExperimentRow | None:
    return next((e for e in r.experiments if e.exp == r.summary.best_exp), None)


def _get(row: ExperimentRow | None, field: str) -> float | None:
    value = getattr(row, field) if row is not None else None
    return float(value) if value is not None else None


# -- renderers ----------------------------------------------------------------------------


def render_compare(c: Comparison, format: str) -> str:
    """The comparison as text in one of FORMATS other than the terminal table."""
    if format == "json":
        return c.model_dump_json(indent=2) + "\n"
    if format == "md":
        return render_compare_md(c)
    if format == "html":
        return render_compare_html(c)
    raise UsageError(f"--format {format}: comparing two runs writes "
                     f"{', '.join(FORMATS)} (table prints to the terminal only)")


def _change(m: Metric) -> str:
    if m.change is None:
        return "-"
    if m.change == 0:
        return fmt.pct(m.change)
    better = (m.change > 0) == m.higher_is_better
    return f"{fmt.pct(m.change)} ({'better' if better else 'worse'})"


def _best(side: Side) -> str:
    if side.best_exp is None:
        return "none"
    return f"{side.best_recipe_id} (experiment {side.best_exp})"


def _rows(c: Comparison) -> tuple[list[tuple[str, str, str]], list[list[str]],
                                  list[list[str]]]:
    """What every renderer shows: per-run facts, the metrics and the recipe diff."""
    runs = [(key, value(c.a), value(c.b)) for key, value in (
        ("run", lambda s: s.run_dir), ("state", lambda s: s.state),
        ("model", lambda s: s.model), ("hardware", lambda s: s.hardware),
        ("workload", lambda s: s.workload),
        ("experiments", lambda s: str(s.experiments)), ("best", _best))]
    metrics = [[m.name, fmt.num(m.a, m.decimals), fmt.num(m.b, m.decimals), _change(m)]
               for m in c.metrics]
    changes = [[d.setting, _value(d.a), _value(d.b)] for d in c.diff]
    return runs, metrics, changes


def _value(v: object) -> str:
    return "-" if v is None else str(v)


def render_compare_table(c: Comparison) -> Group:
    runs, metrics, changes = _rows(c)
    facts = Text("\n".join(c.facts))
    sides = Table("", "A", "B", header_style="bold")
    for side in runs:
        sides.add_row(*side)
    figures = Table("figure", "A", "B", "B vs A", header_style="bold")
    for metric in metrics:
        figures.add_row(*metric)
    parts: list[Panel | Table | Text] = [Panel(facts, title="aevyra-forge: A vs B",
                                               expand=False), sides, figures]
    if changes:
        recipe = Table("setting", "A's best", "B's best", header_style="bold")
        for change in changes:
            recipe.add_row(*change)
        parts.append(recipe)
    return Group(*parts)


def render_compare_md(c: Comparison) -> str:
    runs, metrics, changes = _rows(c)
    lines = ["## aevyra-forge: two runs compared", ""]
    for fact in c.facts:
        lines += md_wrap(f"- {fact}", indent="  ")
    lines += ["", *md_table(("", "A", "B"), runs)]
    lines += ["", "### Best recipes' figures", "",
              *md_table(("figure", "A", "B", "B vs A"), metrics, right={1, 2, 3})]
    if changes:
        lines += ["", "### Best recipes' diff", "",
                  *md_table(("setting", "A's best", "B's best"), changes)]
    return "\n".join(lines) + "\n"


def render_compare_html(c: Comparison) -> str:
    """One self-contained page (inline CSS, no script), every run-supplied text escaped."""
    runs, metrics, changes = _rows(c)
    title = "aevyra-forge: two runs compared"
    body = [f"<h1>{escape(title)}</h1>", '<div class="card">',
            *(f"<p>{escape(fact)}</p>" for fact in c.facts), "</div>",
            "<h2>The runs</h2>", html_table(("", "A", "B"), runs),
            "<h2>Best recipes' figures</h2>",
            html_table(("figure", "A", "B", "B vs A"), metrics, numeric={1, 2, 3})]
    if changes:
        body += ["<h2>Best recipes' diff</h2>",
                 html_table(("setting", "A's best", "B's best"), changes)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>\n{chr(10).join(body)}\n</main></body></html>\n")

