"""`report --format html`: the morning report as one self-contained page (inline CSS and
SVG; no script, font or image is fetched when it is viewed). It leads with what to deploy
and why, then the charts, the experiments, the failures and the run's settings. Every text
that comes from the run (recipe values, reasons, LLM rationales) is escaped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from aevyra_forge.decide.diagnosis import summary as diagnosis_summary
from aevyra_forge.report import cost, fmt
from aevyra_forge.report.charts import Chart, charts
from aevyra_forge.report.model import ExperimentRow, Report

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827;
 margin:0;background:#f9fafb}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#6b7280;margin:0 0 16px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:16px;margin:12px 0}
.lead{font-size:16px;font-weight:600}
.good{color:#15803d}.bad{color:#c62828}.dim{color:#6b7280}
table{border-collapse:collapse;font-size:12.5px;width:100%;margin:10px 0}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f4f6;position:sticky;top:0}td.n{text-align:right;white-space:nowrap}
tr.kept td{font-weight:600;background:#fffbeb}
pre{background:#111827;color:#f9fafb;padding:10px;border-radius:6px;overflow-x:auto;
 white-space:pre-wrap;word-break:break-all;font-size:12.5px}
figure{margin:12px 0;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:8px}
figure svg{max-width:100%;height:auto}figcaption{color:#6b7280;font-size:12.5px}
.scroll{overflow-x:auto}.scroll td:last-child{min-width:360px}
"""

_COLUMNS = ("exp", "layer", "change", "status", "kept", "score", "gain interval", "tok/s",
            "TTFT p99", "TPOT p99", "ITL p99", "E2E p99", "preempt", "KV use",
            "prefix hit", "accuracy", "prepare s", "boot s", "bench s", "why")


def render_html(report: Report) -> str:
    """The whole page."""
    s = report.summary
    title = f"aevyra-forge: {s.model} on {s.hardware}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{escape(s.run_dir)} &middot; {escape(fmt.state(report))}</p>',
        _deploy(report),
        _cost(report),
        _run_facts(report),
        _diagnosis(report),
        "<h2>Charts</h2>",
        *(_figure(c) for c in charts(report)),
        "<h2>Experiments</h2>",
        _experiments(report.experiments, report.pooled),
        _failures(report),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>\n{chr(10).join(body)}\n</main></body></html>\n")


def _deploy(report: Report) -> str:
    best = report.best
    parts = ["<h2>What to deploy</h2>", '<div class="card">',
             f'<p class="lead">{escape(fmt.headline(report))}</p>']
    if best is not None:
        if best.changes:
            parts.append(_table(("setting", "baseline", "best"),
                                ([c.setting, _value(c.baseline), _value(c.best)]
                                 for c in best.changes)))
        figures = [("gain", fmt.gain_text(best)),
                   ("output tokens/s", f"{fmt.num(best.baseline_throughput)} -> "
                                       f"{fmt.num(best.best_throughput)}"),
                   ("accuracy", fmt.num(best.accuracy, 4)),
                   ("p99 TTFT", fmt.latency_change("", best.ttft_p99_ms).strip()),
                   ("p99 E2E", fmt.latency_change("", best.e2e_p99_ms).strip())]
        parts.append(_table(("figure", "value"), ([k, v] for k, v in figures)))
        if best.slo:
            parts.append(_table(("SLO", "baseline", "best"),
                                ([v.term, v.baseline, v.best] for v in best.slo),
                                classes=lambda row: "" if row[2] == "met" else "bad"))
        else:
            parts.append('<p class="dim">No SLO was set for this run (--slo).</p>')
        if best.deploy_command:
            parts.append(f"<p>Serve it with:</p><pre>{escape(best.deploy_command)}</pre>")
        if best.deploy_caveat:
            parts.append(f'<p class="bad">Before deploying: {escape(best.deploy_caveat)}.</p>')
    parts.append("</div>")
    return "\n".join(parts)


def _cost(report: Report) -> str:
    """Cost per million tokens (report/cost.py), labelled as the estimate it is."""
    c = report.cost
    parts = ['<h2 id="cost">Cost (estimate)</h2>', '<div class="card">',
             f"<p>{escape(cost.inputs_text(c))}</p>"]
    if rows := cost.serving_rows(c):
        parts.append(_table(("config", "output tokens/s", "$ / 1M output tokens",
                             "$ / 1M total tokens"), rows, numeric={1, 2, 3}))
    if saving := cost.saving_text(c):
        parts.append(f"<p>{escape(saving)}</p>")
    if c.apis:
        parts.append(f"<p>The same workload ({c.input_tokens or 0:,} input and "
                     f"{c.output_tokens or 0:,} output tokens a pass) on commercial APIs, at "
                     f"list prices of {escape(c.api_prices_as_of)}:</p>")
        parts.append(_table(("API", "$ / 1M input", "$ / 1M output",
                             "this workload, $ / 1M output tokens", "a month"),
                            cost.api_rows(c), numeric={1, 2, 3, 4}))
    parts.append("</div>")
    return "\n".join(parts)


def _run_facts(report: Report) -> str:
    s, t = report.summary, report.totals
    statuses = ", ".join(f"{k} {v}" for k, v in s.statuses.items()) or "-"
    facts: list[tuple[str, str]] = [
        ("model", s.model), ("hardware", s.hardware), ("workload", report.workload),
        *((k, str(v)) for k, v in report.settings.items()),
        ("experiments", f"{s.experiments} ({statuses}); layers "
                        f"{', '.join(map(str, s.layers_reached)) or '-'}"),
        ("stopped", report.stop_reason or "not finished"),
        ("GPU time", f"prepare {fmt.duration(t.prepare_s)}, boot {fmt.duration(t.boot_s)}, "
                     f"bench {fmt.duration(t.bench_s)}"),
        ("started / last record", f"{t.started_at or '-'} / {t.finished_at or '-'}"),
        ("LLM", f"{t.llm_input_tokens:,} input + {t.llm_output_tokens:,} output tokens, "
                f"{fmt.dollars(t.llm_cost_usd)}"),
        ("note", s.note),
    ]
    return ("<h2>The run</h2><div class=\"card\">"
            + _table(("", ""), ([k, v] for k, v in facts)) + "</div>")


def _figure(chart: Chart) -> str:
    return (f'<figure class="chart" id="chart-{chart.key}" data-points="{chart.points}">'
            f"<figcaption><b>{escape(chart.title)}</b> ({chart.points} points). "
            f"{escape(chart.caption)}</figcaption>\n{chart.svg}\n</figure>")


def _experiments(rows: Sequence[ExperimentRow], pooled: bool = False) -> str:
    """Every experiment; with several workers, the round and worker each ran on too."""
    def cells(e: ExperimentRow) -> list[str]:
        why = " -> ".join(x for x in (e.rationale, e.reason, e.decision) if x)
        where = [fmt.num(e.round, 0), e.worker or "-"] if pooled else []
        return [str(e.exp), f"L{e.layer}", *where, fmt.change(e), e.status,
                "yes" if e.kept else "",
                fmt.num(e.score, 3), fmt.interval(e.interval), fmt.num(e.output_throughput),
                *(fmt.num(getattr(e, f).p99 if getattr(e, f) else None)
                  for f in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")),
                fmt.num(e.preemptions, 0), _fraction(e.kv_cache_usage),
                _fraction(e.prefix_cache_hit_rate), fmt.num(e.accuracy, 4),
                fmt.num(e.prepare_s), fmt.num(e.boot_s), fmt.num(e.bench_s), why]

    shift = 2 if pooled else 0
    header = (*_COLUMNS[:2], "round", "worker", *_COLUMNS[2:]) if pooled else _COLUMNS
    numeric = set(range(5 + shift, 19 + shift)) | ({2} if pooled else set())
    return '<div class="scroll">' + _table(
        header, (cells(e) for e in rows), numeric=numeric,
        classes=lambda row: "kept" if row[4 + shift] == "yes" else "") + "</div>"


def _diagnosis(report: Report) -> str:
    """What bound the baseline and the knobs that could not matter (decide.diagnosis)."""
    d = report.diagnosis
    if d is None:
        return ""
    items = "".join(f"<li>{escape(line.removeprefix('- '))}</li>"
                    for line in diagnosis_summary(d).splitlines()[1:])
    return (f"<h2>What bound the baseline</h2><p>{escape(d.binding.replace('_', ' '))}: "
            f"{escape(d.why)}</p>" + (f"<ul>{items}</ul>" if items else ""))


def _failures(report: Report) -> str:
    if not report.failures:
        return "<h2>Failures</h2><p class=\"dim\">No experiment failed.</p>"
    items = []
    for f in report.failures:
        tail = f"<pre>{escape(f.log_tail)}</pre>" if f.log_tail else ""
        log = f" (log: {escape(f.log)})" if f.log else ""
        items.append(f"<li><b>experiment {f.exp}</b> {escape(f.status)}: "
                     f"{escape(fmt.changes_text(f.changes) or 'baseline')} &mdash; "
                     f"{escape(f.reason)}{log}{tail}</li>")
    return "<h2>Failures</h2><ul>" + "".join(items) + "</ul>"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *,
           numeric: set[int] | None = None,
           classes: Any = None) -> str:
    """A table of text cells, every cell escaped."""
    numeric = numeric or set()
    out = ["<table><thead><tr>", *(f"<th>{escape(h)}</th>" for h in header),
           "</tr></thead><tbody>"]
    for row in rows:
        cls = classes(row) if classes else ""
        out.append(f'<tr class="{escape(cls)}">' if cls else "<tr>")
        out.extend(f'<td class="n">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
                   for i, c in enumerate(row))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _value(v: Any) -> str:
    return "-" if v is None else str(v)


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"
