"""The GPU price table: every catalogued GPU priced, with a dated source, looked up by the
names vendor tools print."""

from __future__ import annotations

import re

from aevyra_forge.space.gpu_catalogue import GPU_CATALOG
from aevyra_forge.space.gpu_prices import GPU_PRICES, gpu_price


def test_every_catalogued_gpu_has_a_dated_price() -> None:
    assert set(GPU_PRICES) == {spec.name for spec in GPU_CATALOG}
    for name, price in GPU_PRICES.items():
        assert 0.1 < price.usd_per_hour < 20, name
        assert re.search(r"20\d\d-\d\d-\d\d", price.source), f"{name}: source without a date"


def test_lookup_by_the_names_tools_print() -> None:
    assert gpu_price("NVIDIA A10G") == GPU_PRICES["A10G"]
    assert gpu_price("NVIDIA A100-SXM4-40GB") == GPU_PRICES["A100-40GB"]
    assert gpu_price("NVIDIA GeForce RTX 4090") is None
