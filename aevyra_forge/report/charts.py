"""The report's charts, drawn with matplotlib (Agg, no display, no network) from the report
model and returned as inline SVG: score over experiments, throughput against p99 latency,
per-knob effect, accuracy against the floor, time per experiment. Each chart's data points
are one marker series with a known id, so a test (or a reader) can count them."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aevyra_forge.core.slo import parse_slo
from aevyra_forge.core.values import LAYER_NAMES
from aevyra_forge.report.fmt import changes_text
from aevyra_forge.report.model import ExperimentRow, Report

SIZE_IN = (7.5, 3.6)  # inches; 96 dpi in a browser makes 720 x 346 px
LAYER_COLOURS = {1: "#e8f0fe", 2: "#fef3e0", 3: "#eaf6ec"}
POINT, BEST, BAD, GUIDE = "#1f6feb", "#d97706", "#c62828", "#6b7280"
# What an SVG from matplotlib carries that a self-contained page must not: the XML prolog,
# a DOCTYPE naming a remote DTD, RDF metadata, and namespace URIs (the HTML parser puts an
# inline <svg> in the SVG namespace by itself).
_STRIP = (re.compile(r"<\?xml[^>]*\?>\s*"), re.compile(r"<!DOCTYPE[^>]*>\s*"),
          re.compile(r"<metadata>.*?</metadata>\s*", re.S),
          re.compile(r'\s+xmlns(:\w+)?="[^"]*"'))

_ID_OR_REF = re.compile(r'(\sid="|href="#|url\(#)([^")]+)([")])')


@dataclass(frozen=True)
class Chart:
    """One chart: `svg` holds `points` markers inside `<g id="{key}-points">`."""

    key: str
    title: str
    caption: str
    svg: str
    points: int


def charts(report: Report) -> list[Chart]:
    """Every chart of the report, in reading order."""
    import matplotlib

    matplotlib.use("Agg")  # no display; a report is written on headless hosts too
    drawers: Sequence[tuple[str, str, str, Callable[[Any, Report, str], int]]] = (
        ("score", "Score and best so far",
         "Score per experiment (1.0 = baseline) with the keep interval of its gain over "
         "the incumbent; the line is the incumbent's score; bands are layers.", _score),
        ("pareto", "Throughput against p99 latency",
         "Every measured config; the line joins the Pareto front (nothing else is both "
         "faster and lower-latency); dashed lines are E2E SLO bounds.", _pareto),
        ("knobs", "Per-knob effect",
         "Each single-knob move's measured gain over the incumbent it was tried on, with "
         "its interval.", _knobs),
        ("accuracy", "Accuracy against the floor",
         "Agreement of each config's outputs with the baseline's (1.0 = identical); the "
         "dashed line is the accuracy floor.", _accuracy),
        ("time", "Time per experiment",
         "Seconds spent preparing (quantization), booting and benchmarking each "
         "experiment.", _time),
    )
    return [_draw(report, key, title, caption, draw) for key, title, caption, draw in drawers]


def _draw(report: Report, key: str, title: str, caption: str,
          draw: Callable[[Any, Report, str], int]) -> Chart:
    import matplotlib.pyplot as plt

    # Text as <text> (small, searchable), no math parsing of run text (a `$` in a knob
    # value), and a fixed salt so that the same run draws the same SVG.
    with plt.rc_context({"svg.fonttype": "none", "text.parse_math": False,
                         "svg.hashsalt": "aevyra-forge", "font.size": 9}):
        fig, ax = plt.subplots(figsize=SIZE_IN)
        try:
            points = draw(ax, report, f"{key}-points")
            if points == 0:
                ax.text(0.5, 0.5, "no data yet", ha="center", va="center",
                        transform=ax.transAxes, color=GUIDE)
            ax.grid(True, color="#e5e7eb", linewidth=0.6)
            ax.set_axisbelow(True)
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    svg = buf.getvalue()
    for pattern in _STRIP:
        svg = pattern.sub("", svg)
    return Chart(key=key, title=title, caption=caption, svg=_own_ids(svg.strip(), key),
                 points=points)


def _own_ids(svg: str, key: str) -> str:
    """Every id (and reference to one) prefixed with the chart's key: matplotlib names its
    groups figure_1, axes_1... in every SVG, and ids must be unique in a page."""
    prefix = f"{key}-"

    def own(match: re.Match[str]) -> str:
        name = match[2]
        return match[1] + (name if name.startswith(prefix) else prefix + name) + match[3]

    return _ID_OR_REF.sub(own, svg)


def _points(ax: Any, xs: Sequence[float], ys: Sequence[float], gid: str, **style: Any) -> int:
    """The chart's data points as one marker series with id `gid` (an empty series still
    writes its group, so a count of 0 is visible too)."""
    (line,) = ax.plot(list(xs), list(ys), linestyle="none", marker=style.pop("marker", "o"),
                      markersize=style.pop("markersize", 5), zorder=3, **style)
    line.set_gid(gid)
    return len(xs)


def _measured(report: Report) -> list[ExperimentRow]:
    return [e for e in report.experiments if e.status == "ok" and e.output_throughput]


# -- (a) score and best so far --------------------------------------------------------


def _score(ax: Any, report: Report, gid: str) -> int:
    rows = report.experiments
    _layer_bands(ax, rows)
    scored = [e for e in rows if e.score is not None]
    lo, hi = [], []
    for e in scored:
        # the interval is of the gain over the incumbent: as scores, incumbent * (1 + gain)
        score, base, iv = e.score or 0.0, e.incumbent_score, e.interval
        finite = iv is not None and all(abs(v) != float("inf") for v in iv)
        lo.append(score - base * (1 + iv[0]) if base is not None and iv and finite else 0.0)
        hi.append(base * (1 + iv[1]) - score if base is not None and iv and finite else 0.0)
    if scored:
        ax.errorbar([e.exp for e in scored], [e.score for e in scored], yerr=[lo, hi],
                    fmt="none", ecolor="#9ca3af", elinewidth=1, capsize=2, zorder=2)
    best_x, best_y, running = [], [], None
    for e in rows:
        if e.leads:
            running = e.score
        if running is not None:
            best_x.append(e.exp)
            best_y.append(running)
    if best_x:
        ax.step(best_x, best_y, where="post", color=BEST, linewidth=1.6, label="best so far")
    n = _points(ax, [e.exp for e in scored], [e.score or 0 for e in scored], gid,
                color=POINT, label="measured")
    kept = [e for e in scored if e.leads]  # drawn over the dots of the same experiments
    _points(ax, [e.exp for e in kept], [e.score or 0 for e in kept], f"{gid}-kept",
            color=BEST, marker="*", markersize=11, label="kept")
    ax.set_xlabel("experiment")
    ax.set_ylabel("score (baseline = 1.0)")
    if scored:
        ax.legend(loc="lower right", fontsize=8)
    return n


def _layer_bands(ax: Any, rows: Sequence[ExperimentRow]) -> None:
    start = 0
    for i, e in enumerate(rows):
        last = i + 1 == len(rows) or rows[i + 1].layer != e.layer
        if last:
            ax.axvspan(rows[start].exp - 0.5, e.exp + 0.5,
                       color=LAYER_COLOURS.get(e.layer, "#f3f4f6"), zorder=0)
            ax.text((rows[start].exp + e.exp) / 2, 1.0, f"L{e.layer} "
                    f"{LAYER_NAMES.get(e.layer, '')}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color=GUIDE)
            start = i + 1


# -- (b) throughput against p99 latency -----------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, throughput) points no other point beats on both, by latency."""
    front: list[tuple[float, float]] = []
    for lat, tp in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or tp > front[-1][1]:
            front.append((lat, tp))
    return front


def _pareto(ax: Any, report: Report, gid: str) -> int:
    rows = [e for e in _measured(report) if e.e2e_ms is not None]
    xy = [(e.e2e_ms.p99, e.output_throughput or 0.0) for e in rows if e.e2e_ms]
    front = pareto_front(xy)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], color=GUIDE, linewidth=1,
                drawstyle="steps-post", label="Pareto front", zorder=2)
    slo = report.settings.get("slo")
    for term in parse_slo(slo).terms if isinstance(slo, str) and slo else ():
        if term.metric == "e2e":  # the only bound on these axes
            ax.axvline(term.threshold_ms, color=BAD, linestyle="--", linewidth=1,
                       label=f"SLO {term}")
    n = _points(ax, [p[0] for p in xy], [p[1] for p in xy], gid, color=POINT,
                label="configs")
    best = report.best
    if best is not None and best.e2e_p99_ms is not None and best.best_throughput:
        ax.plot([best.e2e_p99_ms[1]], [best.best_throughput], marker="*", markersize=12,
                color=BEST, linestyle="none", label="best", zorder=4)
    ax.set_xlabel("p99 E2E latency (ms)")
    ax.set_ylabel("output tokens/s")
    if xy:
        ax.legend(loc="lower right", fontsize=8,
                  title=None if slo else "no SLO set", title_fontsize=8)
    return n


# -- (c) per-knob effect --------------------------------------------------------------


def _knobs(ax: Any, report: Report, gid: str) -> int:
    moves = [e for e in _measured(report)
             if len(e.changes) == 1 and not e.remeasure and e.score is not None
             and e.incumbent_score]
    labels = [f"{changes_text(e.changes)} (exp {e.exp})" for e in moves]
    gains = [(e.score or 0) / (e.incumbent_score or 1) * 100 - 100 for e in moves]
    ys = list(range(len(moves)))
    colours = [BEST if e.leads else POINT if g >= 0 else BAD for e, g in zip(moves, gains,
                                                                             strict=True)]
    ax.barh(ys, gains, color=colours, height=0.6, zorder=2)
    for y, e, g in zip(ys, moves, gains, strict=True):
        if e.interval and all(abs(v) != float("inf") for v in e.interval):
            ax.errorbar([g], [y], xerr=[[g - e.interval[0] * 100], [e.interval[1] * 100 - g]],
                        fmt="none", ecolor="#374151", capsize=2, elinewidth=1, zorder=3)
    ax.axvline(0, color=GUIDE, linewidth=0.8)
    n = _points(ax, gains, ys, gid, color="#111827", marker="D", markersize=3)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("gain over the incumbent (%)")
    if moves:
        ax.figure.set_size_inches(SIZE_IN[0], max(SIZE_IN[1], 0.9 + 0.28 * len(moves)))
    return n


# -- (d) accuracy against the floor ---------------------------------------------------


def _accuracy(ax: Any, report: Report, gid: str) -> int:
    rows = [e for e in report.experiments if e.accuracy is not None]
    floor = report.settings.get("accuracy_floor")
    if isinstance(floor, int | float):
        ax.axhline(floor, color=BAD, linestyle="--", linewidth=1, label=f"floor {floor:g}")
    below = [e for e in rows if isinstance(floor, int | float) and (e.accuracy or 0) < floor]
    if below:
        ax.plot([e.exp for e in below], [e.accuracy for e in below], linestyle="none",
                marker="o", markersize=9, markerfacecolor="none", color=BAD,
                label="below floor", zorder=4)
    n = _points(ax, [e.exp for e in rows], [e.accuracy or 0 for e in rows], gid, color=POINT,
                label="accuracy")
    ax.set_xlabel("experiment")
    ax.set_ylabel("agreement with baseline")
    if rows:
        ax.legend(loc="lower left", fontsize=8)
    return n


# -- (e) time per experiment ----------------------------------------------------------


def _time(ax: Any, report: Report, gid: str) -> int:
    rows = [e for e in report.experiments if (e.prepare_s or e.boot_s or e.bench_s)]
    xs = [e.exp for e in rows]
    bottom = [0.0] * len(rows)
    for name, colour in (("prepare_s", "#a78bfa"), ("boot_s", "#fbbf24"),
                         ("bench_s", POINT)):
        values = [getattr(e, name) or 0.0 for e in rows]
        ax.bar(xs, values, bottom=bottom, color=colour, width=0.7,
               label=name.removesuffix("_s"), zorder=2)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    n = _points(ax, xs, bottom, gid, color="#111827", marker="_", markersize=8)
    ax.set_xlabel("experiment")
    ax.set_ylabel("seconds")
    if rows:
        ax.legend(loc="upper right", fontsize=8)
    return n
