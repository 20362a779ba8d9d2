from __future__ import annotations

from aevyra_forge.store.rows import COLUMNS, experiment_rows, rows_to_tsv
from tests.builders import metrics, record


def test_rows_format_numbers_and_flatten_rationales() -> None:
    rec = record(3, rationale="raise\tmax_num_seqs\nfor  batching", score=1.23456, kept=True,
                 accuracy=0.987654, layer=2, metrics=metrics(1234.5678, 456.789),
                 interval=(0.041, 0.2093))
    failed = record(4, status="oom", rationale="bigger batch", reason="CUDA OOM\nat boot")
    base = record(0, reason="vLLM defaults", kept=True)
    rows = experiment_rows([base, rec, failed])
    assert list(rows[1]) == list(COLUMNS)
    assert rows[1] == {"exp": 3, "id": "id000003", "gen": 3, "layer": 2, "score": 1.235,
                       "throughput": 1234.6, "p99_ms": 456.8, "accuracy": 0.9877,
                       "kept": True, "status": "ok", "interval": "[+4.1%, +20.9%]",
                       "slo": "ok", "rationale": "raise max_num_seqs for batching"}
    assert rows[0]["rationale"] == "vLLM defaults"
    assert rows[2]["rationale"] == "bigger batch (failed: CUDA OOM at boot)"
    lines = rows_to_tsv(rows).splitlines()
    assert lines[2].split("\t") == ["3", "id000003", "3", "2", "1.235", "1234.6", "456.8",
                                    "0.9877", "yes", "ok", "[+4.1%, +20.9%]", "ok",
                                    "raise max_num_seqs for batching"]
    assert lines[3].split("\t")[4:12] == ["-", "-", "-", "-", "no", "oom", "-", "-"]
