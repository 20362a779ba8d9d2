from __future__ import annotations

import pytest
from pydantic import ValidationError

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.settings import (
    CPU_BOOT_CV,
    DEFAULT_BOOT_CV,
    TuneSettings,
)
from aevyra_forge.core.slo import parse_slo


def _s(**kw: object) -> TuneSettings:
    return TuneSettings(model="m", workload="w.jsonl", **kw)  # type: ignore[arg-type]


def test_layers_follow_skips_and_start_layer() -> None:
    assert _s().layers() == [1, 2, 3]
    assert _s(skip_quant=True).layers() == [1, 3]
    assert _s(start_layer=2).layers() == [2, 3]
    assert _s(start_layer=2, skip_kernel=True).layers() == [2]
    with pytest.raises(UsageError, match="nothing to tune"):
        _s(start_layer=3, skip_kernel=True)


def test_layer_caps() -> None:
    s = _s(max_config_experiments=4, max_quant_experiments=2)
    assert (s.layer_cap(1), s.layer_cap(2), s.layer_cap(3)) == (4, 2, None)


def test_settings_never_hold_a_key_and_reject_unknowns() -> None:
    assert not any("key" in name or "token" in name for name in TuneSettings.model_fields)
    with pytest.raises(ValidationError):
        _s(llm_api_key="sk-secret")
    with pytest.raises(ValidationError):
        _s(concurrency=0)


def test_round_trip_through_json() -> None:
    s = _s(device="cpu", max_dollars=3.5, skip_config=True)
    assert TuneSettings.model_validate(s.model_dump(mode="json")) == s


def test_the_slo_is_parsed_once_and_stored_as_text() -> None:
    s = _s(objective="goodput", slo="ttft_p99<500ms, tpot_p99<50ms")
    slo = s.parsed_slo()
    assert slo == parse_slo("ttft_p99<500ms,tpot_p99<50ms")
    assert s.parsed_slo() is slo  # the same object on every call: never parsed again
    dumped = s.model_dump(mode="json")
    assert dumped["slo"] == "ttft_p99<500ms, tpot_p99<50ms"  # config.json keeps the text
    assert not any(key.startswith("_") for key in dumped)
    assert TuneSettings.model_validate(dumped).parsed_slo() == slo
    assert _s().parsed_slo() is None
    with pytest.raises(UsageError, match="bad SLO term"):
        _s(slo="ttft<3")


def test_every_setting_says_what_it_is_for() -> None:
    missing = [name for name, field in TuneSettings.model_fields.items()
               if not field.description]
    assert not missing, f"give these settings a description (their --help): {missing}"


def test_boot_cv_follows_the_device_unless_given() -> None:
    assert _s().boot_cv() == DEFAULT_BOOT_CV
    assert _s(device="cpu").boot_cv() == CPU_BOOT_CV
    assert _s(device="cpu", boot_noise=0.02).boot_cv() == 0.02
