"""Tests for aevyra_forge.space.plugins: kernel generators and knobs found through entry
points (the sample plug-in examples/forge_kernel_demo, installed into a temporary folder,
never into an environment), candidates checked against what the vLLM environment has,
chosen through the `kernel_plugin` knob, proven from the server log; and an installed
plug-in that is not chosen leaves the baseline's argv and environment byte-identical."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aevyra_forge.core.errors import KnobError, RecipeError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.engine.launcher import VllmLauncher
from aevyra_forge.space import plugins
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.placement import EngineArg
from aevyra_forge.space.registry import ANY, Knob
from aevyra_forge.space.rendering import render
from aevyra_forge.space.vllm_flags import VllmArgs, parse_help
from tests.builders import install_demo_plugin

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
PROFILE = profile(MODEL)
CPU = Hardware(device="cpu", cpu_cores=2, memory_gib=24, cpu_isa=("avx2", "avx512f"))
HELP = Path(__file__).parent.parent / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"
VLLM = VllmArgs(version="0.32.0+cpu", args=parse_help(HELP.read_text()))
DEMO_PROOF = "forge-kernel-demo: attention kernel ran"


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_demo_plugin(tmp_path_factory.mktemp("plugin") / "site")


@pytest.fixture
def installed(demo_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo visible to this process (sys.path) and to the processes it starts."""
    monkeypatch.syspath_prepend(str(demo_site))
    monkeypatch.setenv("PYTHONPATH", str(demo_site))
    return demo_site


@pytest.fixture
def fake_vllm_bin(tmp_path: Path) -> str:
    """A `vllm` launcher script run by this interpreter: plugins.probe asks the Python
    named in its shebang, as it does for a real vLLM install."""
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nraise SystemExit('not a server')\n")
    script.chmod(0o755)
    return str(script)


def candidate(**over: Any) -> plugins.KernelCandidate:
    data: dict[str, Any] = {"name": "fast_attn", "plugins": ("fast_kernels",),
                            "env": {"FAST_KERNELS": "1"}, "proof": "fast-kernels: loaded",
                            "requires": ("fast-kernels",)}
    return plugins.KernelCandidate.model_validate({**data, **over})


def space_with(*cands: plugins.KernelCandidate, user: str | None = None) -> KnobSpace:
    environ = {} if user is None else {"VLLM_PLUGINS": user}
    return KnobSpace(CPU, PROFILE, vllm=VLLM, plugins=plugins.slot(cands, environ))


# -- discovery through entry points ----------------------------------------------------------

def test_the_installed_demo_is_discovered_and_offered(installed: Path,
                                                      fake_vllm_bin: str) -> None:
    notes: list[str] = []
    sp = plugins.knob_space(CPU, PROFILE, MODEL, "12 requests", notes.append, VLLM,
                            fake_vllm_bin)
    (cand,) = sp.plugins.candidates
    assert cand.name == "demo_cpu_attn" and cand.generator == "forge_kernel_demo"
    assert cand.proof == DEMO_PROOF and cand.env == {"FORGE_KERNEL_DEMO": "1"}
    assert [k.name for k in sp.knobs(3)].count("kernel_plugin") == 1
    assert sp.choices(KNOBS["kernel_plugin"]) == ("none", "demo_cpu_attn")
    assert any("demo_cpu_attn (from forge_kernel_demo)" in n for n in notes)


def test_without_the_demo_installed_nothing_is_offered(fake_vllm_bin: str) -> None:
    assert not entry_points(group=plugins.GENERATOR_GROUP)  # this environment has none
    sp = plugins.knob_space(CPU, PROFILE, MODEL, "", lambda _: None, VLLM, fake_vllm_bin)
    assert sp.plugins.candidates == ()
    assert "kernel_plugin" not in [k.name for k in sp.knobs()]


def test_a_gpu_gets_no_candidate_from_a_cpu_only_plugin(installed: Path) -> None:
    h100 = Hardware(device="cuda", gpus=(), cpu_cores=8)
    gens, _ = plugins.load_generators()
    found, _ = plugins.discover(plugins.context_for(h100, MODEL, 64, None, ""), gens)
    assert found == []


def test_a_candidate_vllm_cannot_load_is_not_offered(installed: Path, fake_vllm_bin: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONPATH")  # forge sees the plug-in, vLLM's interpreter does not
    notes: list[str] = []
    sp = plugins.knob_space(CPU, PROFILE, MODEL, "", notes.append, VLLM, fake_vllm_bin)
    assert sp.plugins.candidates == ()
    assert any("'demo_cpu_attn' not offered: package forge-kernel-demo, vLLM plug-in "
               "forge_kernel_demo not installed in the vLLM environment" in n for n in notes)


def test_the_dry_run_offers_every_candidate_without_asking_vllm(installed: Path) -> None:
    sp = plugins.knob_space(CPU, PROFILE, MODEL, "", lambda _: None)
    assert sp.simulated and [c.name for c in sp.plugins.candidates] == ["demo_cpu_attn"]


def test_probe_reads_versions_and_vllm_plugins_in_the_vllm_environment(
        installed: Path, fake_vllm_bin: str) -> None:
    env = plugins.probe(fake_vllm_bin, ["forge-kernel-demo", "no-such-dist"])
    assert isinstance(env, plugins.VllmEnvironment)
    assert env.versions == {"forge-kernel-demo": "0.1.0", "no-such-dist": None}
    assert "forge_kernel_demo" in env.general_plugins


def test_probe_of_a_non_python_vllm_says_why(tmp_path: Path) -> None:
    binary = tmp_path / "vllm"
    binary.write_bytes(b"\x7fELF")
    assert "cannot tell which Python runs" in str(plugins.probe(str(binary), []))


def test_a_broken_generator_is_a_note_not_a_crash() -> None:
    broken = [EntryPoint("broken", "no_such_module_xyz:gen", plugins.GENERATOR_GROUP)]
    gens, notes = plugins.load_generators(broken)
    assert gens == list(plugins.BUILTIN_GENERATORS)
    assert notes == ["kernel generator 'broken' did not load (ModuleNotFoundError: No module "
                     "named 'no_such_module_xyz'); skipped"]


def _raises(ctx: plugins.KernelContext) -> list[dict[str, Any]]:
    raise RuntimeError("boom")


def _offers(ctx: plugins.KernelContext) -> list[Any]:
    return [candidate(), {"name": "Bad Name", "plugins": ["x"], "proof": "p"},
            {"name": "fast_attn", "plugins": ["y"], "proof": "q"},
            {"name": "env_clash", "plugins": ["x"], "proof": "p",
             "env": {"VLLM_PLUGINS": "x"}},
            {"name": "knob_clash", "plugins": ["x"], "proof": "p",
             "serve_args": {"max_num_seqs": 4}}]


def test_discover_keeps_valid_unique_candidates_and_names_the_rest() -> None:
    ctx = plugins.context_for(CPU, MODEL, 64, "0.32.0+cpu", "")
    found, notes = plugins.discover(ctx, [("bad", _raises), ("mixed", _offers)])
    assert [c.name for c in found] == ["fast_attn"] and found[0].generator == "mixed"
    assert notes[0] == "kernel generator 'bad' failed (RuntimeError: boom); skipped"
    assert len(notes) == 5
    assert "repeats a name" in notes[2]


def test_the_context_reads_a_local_models_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", '
        '"quantization_config": {"quant_method": "compressed-tensors"}}')
    ctx = plugins.context_for(CPU, str(tmp_path), 64, "0.32.0+cpu", "50 requests")
    assert (ctx.platform, ctx.architecture, ctx.dtype, ctx.quantization, ctx.cpu_isa) == (
        "cpu", "LlamaForCausalLM", "bfloat16", "compressed-tensors", ("avx2", "avx512f"))
    assert plugins.context_for(CPU, MODEL, 64, None, "").architecture is None


# -- third-party knobs through the same registry ---------------------------------------------

THIRD_PARTY = Knob("num_scheduler_lookahead", 1, "int", EngineArg(), "a third party's",
                   {ANY: 0}, low=0, high=8)


@pytest.fixture
def knob_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    mod = type(sys)("forge_test_knobs")
    mod.KNOB = THIRD_PARTY  # type: ignore[attr-defined]
    mod.CLASH = Knob("max_num_seqs", 1, "int", EngineArg(), "clash", {ANY: 1})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "forge_test_knobs", mod)
    yield [EntryPoint("good", "forge_test_knobs:KNOB", plugins.KNOB_GROUP),
           EntryPoint("clash", "forge_test_knobs:CLASH", plugins.KNOB_GROUP)]
    KNOBS.pop(THIRD_PARTY.name, None)


def test_a_third_party_knob_registers_and_renders(knob_group: list[EntryPoint]) -> None:
    notes = plugins.load_knobs(knob_group)
    assert notes == ["knob plug-in 'clash' refused (KnobError: knob 'max_num_seqs' is "
                     "already registered); skipped"]
    sp = KnobSpace(CPU, PROFILE, simulated=True)
    recipe = sp.apply(sp.baseline(MODEL), {"num_scheduler_lookahead": 2})
    assert render(recipe) == ([MODEL, "--num-scheduler-lookahead", "2"], {})
    assert plugins.load_knobs(knob_group[:1]) == []  # the same knob again: a no-op


# -- the kernel_plugin knob ------------------------------------------------------------------

def test_choosing_a_candidate_writes_its_settings_and_reads_back() -> None:
    sp = space_with(candidate(serve_args={"num_gpu_blocks_override": 64}), user="lora_x")
    base = sp.baseline(MODEL)
    chosen = sp.apply(base, {"kernel_plugin": "fast_attn"})
    assert chosen.kernel.env == {"VLLM_PLUGINS": "lora_x,fast_kernels", "FAST_KERNELS": "1"}
    assert render(chosen) == ([MODEL, "--num-gpu-blocks-override", "64"], chosen.kernel.env)
    assert sp.value(chosen, KNOBS["kernel_plugin"]) == "fast_attn"
    assert sp.check_recipe(chosen).id == chosen.id  # a saved recipe (resume) reads back
    back = sp.apply(chosen, {"kernel_plugin": "none"})
    assert back.id == base.id and render(back) == ([MODEL], {})


def test_a_recipe_naming_a_plugin_this_run_lacks_is_refused() -> None:
    recipe = Recipe(model=MODEL, kernel={"env": {"VLLM_PLUGINS": "evil", "FAST_KERNELS": "1"}})
    with pytest.raises(RecipeError, match="kernel_plugin must be one of none, fast_attn; "
                                          "got 'evil'"):
        space_with(candidate()).check_recipe(recipe)
    with pytest.raises(RecipeError, match="not available on this hardware or vLLM"):
        space_with().check_recipe(recipe)


def test_a_candidate_is_proposed_by_name_only() -> None:
    sp = space_with(candidate())
    assert sp.validate({"kernel_plugin": "fast_attn"}, 3) == {"kernel_plugin": "fast_attn"}
    with pytest.raises(KnobError, match="must be one of none, fast_attn"):
        sp.validate({"kernel_plugin": "fast_kernels"}, 3)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda n: n != "none"), min_size=1, max_size=4, unique=True),
       switches=st.lists(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True).filter(
           lambda n: n != "VLLM_PLUGINS"), min_size=1, max_size=4, unique=True),
       pick=st.integers(min_value=0, max_value=3), other=st.integers(min_value=0, max_value=3))
def test_any_candidate_round_trips_and_switching_leaves_no_trace(
        names: list[str], switches: list[str], pick: int, other: int) -> None:
    cands = [candidate(name=n, plugins=(f"p_{n}",), env={switches[i % len(switches)]: n})
             for i, n in enumerate(names)]
    sp = space_with(*cands)
    base = sp.baseline(MODEL)
    first, second = names[pick % len(names)], names[other % len(names)]
    one = sp.apply(base, {"kernel_plugin": first})
    two = sp.apply(one, {"kernel_plugin": second})
    assert sp.value(two, KNOBS["kernel_plugin"]) == second
    assert two.id == sp.apply(base, {"kernel_plugin": second}).id
    assert sp.check_recipe(two).id == two.id
    assert sp.apply(two, {"kernel_plugin": "none"}).id == base.id


@pytest.mark.parametrize("bad", [
    {"name": "none"}, {"name": "Fast"}, {"env": {"VLLM_PLUGINS": "x"}},
    {"env": {"lower": "1"}}, {"serve_args": {"max_num_seqs": 8}},
    {"serve_args": {"tokenizer": "--trust-remote-code"}}, {"plugins": ("a,b",)},
    {"proof": "two\nlines"}, {"speedup": 0},
])
def test_an_unsafe_candidate_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        candidate(**bad)


# -- proof that it ran -----------------------------------------------------------------------

def test_a_chosen_plugin_without_its_proof_line_is_unproven() -> None:
    sp = space_with(candidate())
    chosen = sp.apply(sp.baseline(MODEL), {"kernel_plugin": "fast_attn"})
    why = plugins.unproven(sp.plugins, chosen, "INFO starting\nINFO ready\n")
    assert why is not None and "kernel plug-in 'fast_attn' did not load" in why
    assert plugins.unproven(sp.plugins, chosen, "x\nfast-kernels: loaded (pid 7)\n") is None
    assert plugins.unproven(sp.plugins, sp.baseline(MODEL), "") is None  # nothing chosen


def test_boot_check_reads_the_server_log(tmp_path: Path) -> None:
    sp = space_with(candidate())
    chosen = sp.apply(sp.baseline(MODEL), {"kernel_plugin": "fast_attn"})
    check = plugins.boot_check(sp.plugins)
    log = tmp_path / "server.log"
    assert check(chosen, log) is not None  # no log at all
    log.write_text("fast-kernels: loaded (pid 1)\n")
    assert check(chosen, log) is None


# -- the baseline does not change -------------------------------------------------------------

def _baseline_command(site: Path, fake_vllm_bin: str) -> tuple[list[str], dict[str, str]]:
    sp = plugins.knob_space(CPU, PROFILE, MODEL, "", lambda _: None, VLLM, fake_vllm_bin)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    launcher = VllmLauncher(fake_vllm_bin, env={**env, "PYTHONPATH": str(site)})
    return launcher.command(sp.baseline(MODEL), 8123)


def test_an_installed_plugin_leaves_the_baseline_byte_identical(
        tmp_path: Path, fake_vllm_bin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    without = _baseline_command(site, fake_vllm_bin)
    install_demo_plugin(site)
    assert [ep.name for ep in entry_points(group=plugins.GENERATOR_GROUP)] == [
        "forge_kernel_demo"]
    with_it = _baseline_command(site, fake_vllm_bin)
    assert with_it == without
    assert with_it[1]["VLLM_PLUGINS"] == ""  # set explicitly: no installed plug-in loads
    assert "FORGE_KERNEL_DEMO" not in with_it[1]


def test_the_users_own_plugin_list_is_kept_in_every_boot(fake_vllm_bin: str) -> None:
    sp = space_with(candidate(), user="my_resolver")
    env = {**os.environ, "VLLM_PLUGINS": "my_resolver"}
    launcher = VllmLauncher(fake_vllm_bin, env=env)
    assert launcher.command(sp.baseline(MODEL), 1)[1]["VLLM_PLUGINS"] == "my_resolver"
    chosen = sp.apply(sp.baseline(MODEL), {"kernel_plugin": "fast_attn"})
    assert launcher.command(chosen, 1)[1]["VLLM_PLUGINS"] == "my_resolver,fast_kernels"
