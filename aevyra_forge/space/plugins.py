"""Plug-ins through entry points (simonw/llm's pattern): an installed package can offer
kernels to layer 3 (group `aevyra_forge.kernel_generators`) and knobs of its own (group
`aevyra_forge.knobs`); forge's built-in knobs go through the same `registry.register`.

A kernel generator is called once per run with a `KernelContext` (platform, GPU and
compute capability or CPU instruction set, vLLM version, model architecture, dtype,
quantization, head dim, workload summary) and yields `KernelCandidate`s (or plain
mappings of the same fields, so a plug-in needs nothing from forge on the vLLM side). A
candidate names the vLLM general plug-ins it enables, its environment switches and serve
arguments, the distributions it needs and the log line that proves it ran. Forge checks
the needs in the vLLM environment (`probe`, importlib.metadata in vLLM's own
interpreter) and never installs anything; a candidate that cannot load there is not
offered. Because forge sets VLLM_PLUGINS on every boot (the launcher: the user's list or
none), an installed plug-in never changes the baseline; a chosen one that leaves no proof
in the server log is a failed boot, "invalid: ... did not load" (`unproven`), never a
measurement of vLLM's own kernel taken for "no gain". Not `invalid` as a status: that one
means refused before booting, is not counted and may be proposed again."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import ConfigValue, Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.space.child_env import child_env
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.placement import NO_PLUGIN, PLUGINS_ENV, PluginSlot
from aevyra_forge.space.registry import KNOBS, Knob, register
from aevyra_forge.space.vllm_flags import VllmArgs, interpreter

GENERATOR_GROUP = "aevyra_forge.kernel_generators"
KNOB_GROUP = "aevyra_forge.knobs"
VLLM_GROUP = "vllm.general_plugins"  # the vLLM side of a kernel plug-in
PROBE_TIMEOUT_S = 120.0
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_ENV_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ARG = re.compile(r"^[a-z][a-z0-9_]*$")
_ENTRY = re.compile(r"^[A-Za-z0-9_.\-]+$")

Runner = Callable[[list[str], float], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class KernelContext:
    """What a kernel generator may know about the run it is asked for."""

    platform: str  # cuda | rocm | cpu
    gpu: str | None
    compute_capability: str | None  # "8.0" on NVIDIA, the gfx arch on AMD
    cpu_isa: tuple[str, ...]  # avx2, avx512f, avx512_bf16, amx_bf16, ... (cpu)
    vllm_version: str | None  # None under --dry-run
    architecture: str | None  # config.json's architectures[0], when the model is local
    dtype: str | None
    quantization: str | None  # config.json's quantization_config.quant_method
    head_dim: int
    workload: str  # WorkloadStats.summary()


class KernelCandidate(BaseModel):
    """One kernel a generator offers: a value of the `kernel_plugin` knob."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    plugins: tuple[str, ...]  # vLLM general plug-in entry points it enables (VLLM_PLUGINS)
    env: dict[str, str] = Field(default_factory=dict)  # its switches
    serve_args: dict[str, ConfigValue] = Field(default_factory=dict)  # engine arguments
    requires: tuple[str, ...] = ()  # distributions it needs in the vLLM environment
    proof: str  # a line every server that loaded it has in its log
    note: str = ""
    speedup: float | None = Field(default=None, gt=0)  # for the simulator; None: neutral
    generator: str = ""  # the entry point that offered it (set by forge)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == NO_PLUGIN or not _NAME.match(v):
            raise ValueError(f"candidate name {v!r} must be snake_case (and not 'none')")
        return v

    @field_validator("plugins", "requires")
    @classmethod
    def _entries(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not _ENTRY.match(item):
                raise ValueError(f"{item!r} is not a plug-in or distribution name")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _ENV_KEY.match(key) or key == PLUGINS_ENV:
                raise ValueError(f"environment variable {key!r} must be UPPER_CASE and not "
                                 f"{PLUGINS_ENV} (forge sets that one)")
            if any(ord(c) < 32 for c in value):
                raise ValueError(f"{key} contains control characters")
        return v

    @field_validator("serve_args")
    @classmethod
    def _args(cls, v: dict[str, ConfigValue]) -> dict[str, ConfigValue]:
        for key, value in v.items():
            if not _ARG.match(key) or key in KNOBS:
                raise ValueError(f"serve argument {key!r} must be a snake_case vLLM engine "
                                 "argument that no forge knob tunes")
            if isinstance(value, str) and (value.startswith("-")
                                           or any(ord(c) < 32 for c in value)):
                raise ValueError(f"serve argument {key} has an unsafe value")
        return v

    @field_validator("proof")
    @classmethod
    def _proof(cls, v: str) -> str:
        if not v.strip() or "\n" in v:
            raise ValueError("proof must be one non-empty log line")
        return v


Generator = Callable[[KernelContext], Iterable[KernelCandidate | Mapping[str, Any]]]
# Built-in generators, registered as entry points are (none ship today).
BUILTIN_GENERATORS: tuple[tuple[str, Generator], ...] = ()


def _group(group: str, found: Sequence[EntryPoint] | None) -> list[EntryPoint]:
    return list(entry_points(group=group) if found is None else found)


def load_generators(found: Sequence[EntryPoint] | None = None
                    ) -> tuple[list[tuple[str, Generator]], list[str]]:
    """The built-in generators and those installed packages declare; a plug-in that fails
    to import is named in a note and skipped, never the run's end."""
    out: list[tuple[str, Generator]] = list(BUILTIN_GENERATORS)
    notes: list[str] = []
    for ep in sorted(_group(GENERATOR_GROUP, found), key=lambda e: e.name):
        try:
            gen = ep.load()
        except Exception as exc:  # a third party's import error is a note, not a crash
            notes.append(f"kernel generator '{ep.name}' did not load ({_why(exc)}); skipped")
            continue
        if not callable(gen):
            notes.append(f"kernel generator '{ep.name}' is not callable; skipped")
            continue
        out.append((ep.name, gen))
    return out, notes


def load_knobs(found: Sequence[EntryPoint] | None = None) -> list[str]:
    """Register the knobs installed packages declare (each entry point: a Knob, a sequence
    of them, or a callable returning either); notes for those refused."""
    notes: list[str] = []
    for ep in sorted(_group(KNOB_GROUP, found), key=lambda e: e.name):
        try:
            obj = ep.load()
            obj = obj() if callable(obj) and not isinstance(obj, Knob) else obj
            knobs = [obj] if isinstance(obj, Knob) else list(obj)
            for knob in knobs:
                if not isinstance(knob, Knob):
                    raise KnobError(f"{knob!r} is not an aevyra_forge Knob")
                register(knob)
        except Exception as exc:
            notes.append(f"knob plug-in '{ep.name}' refused ({_why(exc)}); skipped")
    return notes


def discover(context: KernelContext, generators: Sequence[tuple[str, Generator]]
             ) -> tuple[list[KernelCandidate], list[str]]:
    """Every valid candidate the generators offer for this context (first name wins)."""
    found: dict[str, KernelCandidate] = {}
    notes: list[str] = []
    for source, gen in generators:
        try:
            items = list(gen(context) or ())
        except Exception as exc:
            notes.append(f"kernel generator '{source}' failed ({_why(exc)}); skipped")
            continue
        for item in items:
            try:
                data = item.model_dump() if isinstance(item, KernelCandidate) else dict(item)
                cand = KernelCandidate.model_validate({**data, "generator": source})
            except (ValidationError, TypeError, ValueError) as exc:
                notes.append(f"kernel generator '{source}' offered an invalid candidate "
                             f"({_why(exc)}); skipped")
                continue
            if cand.name in found:
                notes.append(f"kernel candidate '{cand.name}' from '{source}' repeats a "
                             "name; skipped")
                continue
            found[cand.name] = cand
    return list(found.values()), notes


@dataclass(frozen=True)
class VllmEnvironment:
    """What the vLLM environment has installed: distribution versions (None: missing) and
    the names of its `vllm.general_plugins` entry points."""

    versions: Mapping[str, str | None]
    general_plugins: frozenset[str]


_PROBE = """import importlib.metadata as m, json, sys
out = {"versions": {}, "plugins": sorted({e.name for e in m.entry_points(group=GROUP)})}
for name in json.loads(sys.argv[1]):
    try:
        out["versions"][name] = m.version(name)
    except m.PackageNotFoundError:
        out["versions"][name] = None
print(json.dumps(out))
""".replace("GROUP", repr(VLLM_GROUP))


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          check=False, stdin=subprocess.DEVNULL, env=child_env(os.environ))


def probe(vllm_bin: str, distributions: Iterable[str], run: Runner = _run
          ) -> VllmEnvironment | str:
    """Ask vLLM's own interpreter (with the environment a server gets) what it has; a
    sentence saying why not when it cannot be asked."""
    python = interpreter(vllm_bin)
    if python is None:
        return f"cannot tell which Python runs {vllm_bin}"
    try:
        proc = run([*python, "-c", _PROBE, json.dumps(sorted(set(distributions)))],
                   PROBE_TIMEOUT_S)
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return VllmEnvironment(versions=dict(data["versions"]),
                               general_plugins=frozenset(data["plugins"]))
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as exc:
        return f"cannot inspect the vLLM environment ({_why(exc)})"


def loadable(candidates: Sequence[KernelCandidate], env: VllmEnvironment
             ) -> tuple[list[KernelCandidate], list[str]]:
    """The candidates the vLLM environment can load, and a note for each it cannot."""
    ok: list[KernelCandidate] = []
    notes: list[str] = []
    for cand in candidates:
        missing = [d for d in cand.requires if not env.versions.get(d)]
        absent = [p for p in cand.plugins if p not in env.general_plugins]
        if missing or absent:
            what = ", ".join([*(f"package {d}" for d in missing),
                              *(f"vLLM plug-in {p}" for p in absent)])
            notes.append(f"kernel candidate '{cand.name}' not offered: {what} not installed "
                         "in the vLLM environment (forge never installs packages)")
            continue
        ok.append(cand)
    return ok, notes


def context_for(hw: Hardware, model: str, head_dim: int, vllm_version: str | None,
                workload: str) -> KernelContext:
    """The context from what the run knows; a local model folder adds its config.json."""
    config: dict[str, Any] = {}
    path = Path(model).expanduser() / "config.json"
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            config = {}
    archs = config.get("architectures") or [None]
    quant = config.get("quantization_config")
    gpu = hw.gpu
    return KernelContext(
        platform=hw.device, gpu=gpu.name if gpu else None,
        compute_capability=gpu.compute_capability if gpu else None, cpu_isa=hw.cpu_isa,
        vllm_version=vllm_version, architecture=archs[0],
        dtype=config.get("torch_dtype") or config.get("dtype"),
        quantization=quant.get("quant_method") if isinstance(quant, dict) else None,
        head_dim=head_dim, workload=workload)


def user_plugins(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The user's own VLLM_PLUGINS list (empty when unset), which every boot keeps."""
    return tuple(p for p in environ.get(PLUGINS_ENV, "").split(",") if p)


def slot(candidates: Sequence[KernelCandidate], environ: Mapping[str, str]) -> PluginSlot:
    return PluginSlot(candidates=tuple(candidates), user_plugins=user_plugins(environ))


def unproven(plugins: PluginSlot, recipe: Recipe, log_text: str) -> str | None:
    """Why a booted server does not count, when the recipe chose a kernel plug-in whose
    proof line its log lacks; None when no plug-in was chosen or it proved itself."""
    cand = plugins.chosen(recipe)
    if cand is None:
        return None
    hits = sum(cand.proof in line for line in log_text.splitlines())
    if hits:
        return None
    return (f"invalid: kernel plug-in '{cand.name}' did not load: the server log lacks its proof "
            f"line {cand.proof!r} (VLLM_PLUGINS={recipe.kernel.env.get(PLUGINS_ENV)!r}); "
            "check that its package is installed where vLLM runs")


def boot_check(plugins: PluginSlot) -> Callable[[Recipe, Path], str | None]:
    """For the executor: `unproven` on a booted server's log file."""
    def check(recipe: Recipe, log_path: Path) -> str | None:
        if plugins.chosen(recipe) is None:
            return None
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return unproven(plugins, recipe, text)
    return check


def for_run(hw: Hardware, model: str, head_dim: int, vllm_bin: str | None,
            vllm_version: str | None, workload: str, note: Callable[[str], None],
            environ: Mapping[str, str] | None = None,
            found: Sequence[EntryPoint] | None = None
            ) -> tuple[PluginSlot, Mapping[str, str | None] | None]:
    """This run's kernel plug-in candidates, and the versions of the packages the knobs
    and candidates need in the vLLM environment (None under --dry-run, where no vLLM is
    asked and every candidate is offered, to be simulated)."""
    environ = os.environ if environ is None else environ
    generators, notes = load_generators(found)
    context = context_for(hw, model, head_dim, vllm_version, workload)
    candidates, more = discover(context, generators)
    notes += more
    packages: Mapping[str, str | None] | None = None
    if vllm_bin is not None:
        wanted = {d for c in candidates for d in c.requires}
        wanted |= {d for k in KNOBS.values() for d in k.choice_packages.values()}
        env = probe(vllm_bin, wanted)
        if isinstance(env, str):
            if candidates:
                notes.append(f"kernel plug-ins not offered: {env}")
            candidates = []
        else:
            candidates, more = loadable(candidates, env)
            notes += more
            packages = env.versions
    for text in notes:
        note(text)
    if candidates:
        note("kernel plug-in candidates for layer 3: " + ", ".join(
            f"{c.name} (from {c.generator})" for c in candidates))
    return slot(candidates, environ), packages


def knob_space(hw: Hardware, model: ModelProfile, model_name: str, summary: str,
               note: Callable[[str], None], vllm: VllmArgs | None = None,
               vllm_bin: str | None = None, concurrency: int | None = None) -> KnobSpace:
    """The run's KnobSpace with what plug-ins add: the knobs installed packages declare,
    and the kernel candidates for this hardware, model and vLLM (simulated without one)."""
    for text in load_knobs():
        note(text)
    found, packages = for_run(hw, model_name, model.head_dim, vllm_bin,
                              vllm.version if vllm else None, summary, note)
    return KnobSpace(hw, model, simulated=vllm is None, vllm=vllm, plugins=found,
                     packages=packages, concurrency=concurrency)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
