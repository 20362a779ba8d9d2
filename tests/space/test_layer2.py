"""Tests for aevyra_forge.space.layer2: layer 2's concrete candidates (Hub siblings and
checkpoints forge writes), gated by the quant-facts table, chosen by name through the
quant_candidate knob of a run's KnobSpace, and a candidate this host refused at boot
remembered for the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.space import layer2
from aevyra_forge.space.hub import HubLookup, Sibling
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.rendering import render

AVX512 = Hardware(device="cpu", cpu_cores=2, memory_gib=8,
                  cpu_isa=("avx2", "avx512f", "avx512_bf16"))
AVX2 = Hardware(device="cpu", cpu_cores=2, memory_gib=8, cpu_isa=("avx2",))
MODEL = "meta-llama/Llama-3.2-1B-Instruct"
SIBLING = Sibling(repo="RedHatAI/Llama-3.2-1B-Instruct-quantized.w8a8", method="w8a8_int8",
                  quant_method="compressed-tensors", bits=8, size_bytes=3 * 2**29,
                  downloads=1234)


def source(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


def outputs(tmp_path: Path) -> list[tuple[str, Path]]:
    return [(scheme, tmp_path / "quant" / f"{scheme}-0123") for scheme in layer2.RTN]


def candidates(tmp_path: Path, hw: Hardware) -> list[layer2.QuantCandidate]:
    return [*layer2.hub_candidates(HubLookup(base=MODEL, siblings=(SIBLING,))),
            *layer2.rtn_candidates(outputs(tmp_path), source(tmp_path), hw)]


def space(tmp_path: Path, hw: Hardware = AVX512) -> KnobSpace:
    sp = KnobSpace(hw, profile(MODEL))
    sp.offer_quant(candidates(tmp_path, hw))
    return sp


@pytest.mark.parametrize(("hw", "names"), [
    (AVX512, ["hub:" + SIBLING.repo, "rtn-w8a8", "rtn-w4a16", "rtn-fp8"]),
    (AVX2, ["hub:" + SIBLING.repo, "rtn-w8a8", "rtn-fp8"]),  # no 4-bit kernel on AVX2
])
def test_candidates_are_what_this_cpu_serves(tmp_path: Path, hw: Hardware,
                                             names: list[str]) -> None:
    assert [c.name for c in candidates(tmp_path, hw)] == names


def test_each_candidate_says_what_it_costs(tmp_path: Path) -> None:
    hub, w8a8 = candidates(tmp_path, AVX512)[:2]
    assert hub.checkpoint == SIBLING.repo and hub.download_bytes == 3 * 2**29
    assert hub.describe().startswith(f"hub:{SIBLING.repo}: w8a8_int8, 8-bit; download "
                                     "~1.50 GiB. pre-quantized on the Hub")
    assert w8a8.checkpoint == str(tmp_path / "quant" / "w8a8-0123")
    assert w8a8.prepare_s == pytest.approx(layer2.RTN_FIXED_S, abs=0.01)
    assert "min to write before its boot" in w8a8.describe()


def test_what_this_hardware_refuses_is_said_once_each() -> None:
    assert layer2.refused_here(AVX512) == [
        "fp8 applied while loading (quant_method=fp8): --quantization fp8 fails on every "
        "CPU (static_scaled_fp8_quant)"]
    avx2 = layer2.refused_here(AVX2)
    assert avx2[0].startswith("w4a16 checkpoints: this CPU lacks avx512_bf16 + avx512f")
    assert avx2[-1].startswith("fp8 KV cache: this CPU lacks avx512f")


def test_choosing_a_candidate_serves_its_checkpoint_and_forces_no_method(
        tmp_path: Path) -> None:
    sp = space(tmp_path)
    knob = sp.get("quant_candidate")
    assert sp.available(knob) and knob in sp.knobs(2)
    assert sp.choices(knob)[0] == layer2.NO_CANDIDATE
    base = sp.baseline(MODEL)
    chosen = sp.apply(base, sp.validate({"quant_candidate": "rtn-w8a8"}, layer=2))
    assert chosen.quant == QuantSettings(checkpoint=str(tmp_path / "quant" / "w8a8-0123"),
                                         method="w8a8_int8")
    argv, env = render(chosen)
    assert argv == [str(tmp_path / "quant" / "w8a8-0123")] and env == {}
    assert sp.value(chosen, knob) == "rtn-w8a8"
    assert sp.check_recipe(chosen).id == chosen.id  # a logged recipe checks on resume
    back = sp.apply(chosen, {"quant_candidate": layer2.NO_CANDIDATE})
    assert back.quant == QuantSettings() and render(back)[0] == [MODEL]


@pytest.mark.parametrize("value", ["/tmp/some/path", "org/any-repo", "rtn-int3", 3])
def test_nothing_but_a_listed_candidate_is_accepted(tmp_path: Path, value: object) -> None:
    with pytest.raises(KnobError, match="quant_candidate must be one of none, hub:"):
        space(tmp_path).validate({"quant_candidate": value}, layer=2)


def test_a_users_own_checkpoint_is_left_alone(tmp_path: Path) -> None:
    sp = space(tmp_path)
    own = Recipe(model=MODEL, quant=QuantSettings(checkpoint="me/my-AWQ", method="awq"))
    assert sp.check_recipe(own).quant.checkpoint == "me/my-AWQ"
    assert sp.value(own, sp.get("quant_candidate")) == layer2.NO_CANDIDATE


def test_without_candidates_the_knob_is_not_offered(tmp_path: Path) -> None:
    sp = KnobSpace(AVX512, profile(MODEL))
    assert "quant_candidate" not in {k.name for k in sp.knobs(2)}
    with pytest.raises(KnobError, match="not available"):
        sp.validate({"quant_candidate": "rtn-w8a8"}, layer=2)


def test_a_candidate_refused_at_boot_is_not_offered_again(tmp_path: Path) -> None:
    sp = space(tmp_path)
    recipe = sp.apply(sp.baseline(MODEL), {"quant_candidate": "rtn-w4a16"})
    assert sp.refuse_quant(recipe, "unsupported on this hardware: ...") == "rtn-w4a16"
    assert "rtn-w4a16" not in sp.choices(sp.get("quant_candidate"))
    assert sp.quant_refused == {"rtn-w4a16": "unsupported on this hardware: ..."}
    assert sp.refuse_quant(sp.baseline(MODEL), "whatever") is None
    sp.offer_quant(sp.quant_candidates)  # offering again keeps what was learned
    assert "rtn-w4a16" not in sp.choices(sp.get("quant_candidate"))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # 2 shared cores
@given(st.lists(st.sampled_from(list(layer2.RTN)), unique=True))
def test_every_listed_candidate_round_trips_through_a_recipe(schemes: list[str]) -> None:
    """Whatever the run lists, choosing a candidate and reading the recipe back names it."""
    sp = KnobSpace(AVX512, profile(MODEL))
    sp.offer_quant([layer2.QuantCandidate(name=f"rtn-{s}", kind="rtn",
                                          method=layer2.RTN[s][0], checkpoint=f"/q/{s}")
                    for s in schemes])
    for name in sp.choices(sp.get("quant_candidate")):
        recipe = sp.apply(sp.baseline(MODEL), {"quant_candidate": name})
        assert sp.value(recipe, sp.get("quant_candidate")) == name
