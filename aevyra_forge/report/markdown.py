"""`report --format md`: a run for a pull request or a ticket, in GitHub-flavoured Markdown
no wider than 100 columns: the summary, the recipe's diff against the baseline, the deploy
command and the best-scoring experiments."""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Sequence

from aevyra_forge.decide.diagnosis import summary as diagnosis_summary
from aevyra_forge.report import cost, fmt
from aevyra_forge.report.model import ExperimentRow, Report

WIDTH = 100  # columns
TOP_ROWS = 10  # experiments shown, best score first
_CELL = 36  # widest text cell of the table, characters


def render_md(report: Report) -> str:
    s = report.summary
    lines = [f"## aevyra-forge: {_cut(s.model, WIDTH - 30)}", ""]
    lines += _wrap(fmt.headline(report))
    lines.append("")
    facts = [("hardware", s.hardware), ("workload", report.workload),
             ("settings", ", ".join(f"{k} {v}" for k, v in report.settings.items())),
             ("experiments", f"{s.experiments} ("
                             + (", ".join(f"{k} {v}" for k, v in s.statuses.items()) or "-")
                             + ")"),
             ("run", f"{s.run_dir} ({fmt.state(report)})"),
             ("LLM", f"{report.totals.llm_input_tokens:,} + {report.totals.llm_output_tokens:,} "
                     f"tokens, {fmt.dollars(report.totals.llm_cost_usd)}")]
    for key, value in facts:
        lines += _wrap(f"- **{key}**: {value}", indent="  ")
    best = report.best
    if best is not None and best.changes:
        lines += ["", "### Recipe against the baseline", ""]
        lines += _table(("setting", "baseline", "best"),
                        [[c.setting, str(c.baseline), str(c.best)] for c in best.changes])
    if best is not None and best.slo:
        lines += ["", "### SLOs", ""]
        lines += _table(("term", "baseline", "best"), [[v.term, v.baseline, v.best]
                                                       for v in best.slo])
    if best is not None and best.deploy_command:
        lines += ["", "### Deploy", "", "```bash", *_command(best.deploy_command), "```"]
        if best.deploy_caveat:
            lines += ["", *_wrap(f"Before deploying: {best.deploy_caveat}.")]
    if report.diagnosis is not None:
        lines += ["", "### What bound the baseline", ""]
        for line in diagnosis_summary(report.diagnosis).splitlines():
            lines += _wrap(line, indent="  " if line.startswith("- ") else "")
    lines += _cost(report)
    top = sorted((e for e in report.experiments if e.score is not None),
                 key=lambda e: -(e.score or 0.0))[:TOP_ROWS]
    if top:
        lines += ["", f"### Top {len(top)} of {s.experiments} experiments by score", ""]
        header: tuple[str, ...] = ("exp", "change", "status", "kept", "score", "tok/s",
                                   "p99 ms", "accuracy")
        rows, right = [_row(e) for e in top], {0, 4, 5, 6, 7}
        if report.pooled:  # several workers: which round and worker each ran on
            header += ("round", "worker")
            rows = [[*row, fmt.num(e.round, 0), e.worker or "-"] for row, e in zip(
                rows, top, strict=True)]
            right |= {8}
        lines += _table(header, rows, right=right)
    return "\n".join(lines) + "\n"


def _cost(report: Report) -> list[str]:
    c = report.cost
    lines = ["", "### Cost (estimate)", "", *_wrap(cost.inputs_text(c))]
    if rows := cost.serving_rows(c):
        lines += ["", *_table(("config", "tok/s", "$/1M output", "$/1M total"),
                              [list(r) for r in rows], right={1, 2, 3})]
    if saving := cost.saving_text(c):
        lines += ["", *_wrap(saving)]
    if c.apis:
        lines += ["", *_wrap(f"The same workload on commercial APIs (list prices of "
                             f"{c.api_prices_as_of}):"), ""]
        lines += _table(("API", "$/1M in", "$/1M out", "workload $/1M out", "a month"),
                        [list(r) for r in cost.api_rows(c)], right={1, 2, 3, 4})
    return lines


def _row(e: ExperimentRow) -> list[str]:
    return [str(e.exp), fmt.change(e), e.status, "yes" if e.kept else "",
            fmt.num(e.score, 3), fmt.num(e.output_throughput),
            fmt.num(e.e2e_ms.p99 if e.e2e_ms else None, 0), fmt.num(e.accuracy, 4)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           right: set[int] | None = None) -> list[str]:
    """A Markdown table; text cells are cut so that a row stays within WIDTH."""
    right = right or set()
    cells = [[_cut(_cell(c), _CELL) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    over = sum(widths) + 3 * len(widths) + 1 - WIDTH
    if over > 0:  # shrink the widest column, which is free text
        widest = max(range(len(widths)), key=lambda i: widths[i])
        widths[widest] -= over
        cells = [[_cut(c, widths[i]) for i, c in enumerate(r)] for r in cells]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if i in right else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(values, widths,
                                                                strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *(line(r) for r in cells)]


def _cell(text: str) -> str:
    """One line, with the pipe that would end the cell escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    cut = text[: max(1, width - 1)]
    if cut.endswith("\\"):  # never leave half of an escaped pipe
        cut = cut[:-1]
    return cut + "…"


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _command(command: str) -> list[str]:
    """The deploy command one environment variable or option per line, joined with
    backslashes (still one shell command)."""
    words = shlex.split(command)
    at = words.index("vllm") if "vllm" in words else 0
    lines = []
    for assignment in words[:at]:  # quoted as an assignment, or the shell runs it
        key, _, value = assignment.partition("=")
        lines.append(f"{key}={shlex.quote(value)}")
    groups: list[list[str]] = []
    for word in words[at:]:
        if word.startswith("--") or not groups:
            groups.append([word])
        else:
            groups[-1].append(word)
    lines += [shlex.join(g) for g in groups]
    return [f"{line} \\" for line in lines[:-1]] + lines[-1:]
