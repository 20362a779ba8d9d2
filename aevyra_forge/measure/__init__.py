"""Measuring a live OpenAI-compatible server: the streaming bench client, metric
aggregation with vllm bench serve's definitions, and the accuracy probe against the
baseline's outputs."""

from __future__ import annotations

from aevyra_forge.measure.accuracy import VllmQualityProbe
from aevyra_forge.measure.client import BenchConfig
from aevyra_forge.measure.metrics import aggregate, median_pass, parse_metrics

__all__ = [
    "BenchConfig", "VllmQualityProbe", "aggregate", "median_pass", "parse_metrics",
]
