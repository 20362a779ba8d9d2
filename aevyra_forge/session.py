"""Puts a tuning session together: loads the inputs, resolves the hardware, builds the
engine (the simulator for --dry-run), opens the run store, and hands a Tuner to the CLI.
A new run and a resumed run end in the same Tuner; only where the settings come from
differs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from aevyra_forge import __version__
from aevyra_forge.agent import make_proposer
from aevyra_forge.errors import StoreError, UsageError
from aevyra_forge.hardware import detect, gpu_spec, try_detect_gpu
from aevyra_forge.knobs import KnobSpace
from aevyra_forge.modelinfo import profile
from aevyra_forge.models import Hardware
from aevyra_forge.orchestrator import Engine, Observer, Tuner
from aevyra_forge.playbook import Playbook, ensure_valid, load_playbook
from aevyra_forge.recipe import load_recipe
from aevyra_forge.settings import TuneSettings
from aevyra_forge.simulate import SimulatedEngine
from aevyra_forge.store import Run, RunStore, read_config, resolve_run_dir
from aevyra_forge.workload import Workload, load_workload

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


def _engine(settings: TuneSettings, hw: Hardware, space: KnobSpace) -> Engine:
    if not settings.dry_run:
        raise UsageError("tuning a real vLLM server is not yet available in this release "
                         "(tracked in issue #3); use --dry-run to run the tuner on the "
                         "built-in simulator")
    assert hw.gpu is not None
    sim = SimulatedEngine(hw, gpu_spec(hw.gpu.name), space.model, space, seed=settings.seed)
    return Engine(launcher=sim, benchmarker=sim, quality=sim)


def _inputs(settings: TuneSettings) -> tuple[Workload, Playbook]:
    workload = load_workload(Path(settings.workload))
    playbook = ensure_valid(
        load_playbook(Path(settings.playbook) if settings.playbook else None))
    return workload, playbook


def _tuner(settings: TuneSettings, hw: Hardware, run: Run, workload: Workload,
           playbook: Playbook, observer: Observer) -> Tuner:
    space = KnobSpace(hw, profile(settings.model), simulated=settings.dry_run)
    baseline = (space.check_recipe(load_recipe(Path(settings.recipe)), settings.recipe)
                if settings.recipe else space.baseline(settings.model))
    return Tuner(settings, hw, workload, space, playbook,
                 make_proposer(settings.llm, settings.seed),
                 _engine(settings, hw, space), run, baseline, observer)


def start(settings: TuneSettings, observer: Observer) -> Tuner:
    """A new run: everything is checked before the run folder is created."""
    workload, playbook = _inputs(settings)
    make_proposer(settings.llm, settings.seed)
    notes: list[str] = []  # shown once every input has been checked
    hw = resolve_hardware(settings, notes.append)
    space = KnobSpace(hw, profile(settings.model), simulated=settings.dry_run)
    if settings.recipe:
        space.check_recipe(load_recipe(Path(settings.recipe)), settings.recipe)
    _engine(settings, hw, space)
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
    for text in notes:
        observer.event("note", text=text)
    return _tuner(settings, hw, run, workload, playbook, observer)


def resume(run_dir: Path, observer: Observer) -> Tuner:
    """Resume the newest interrupted run under a store root, or the given run folder."""
    target = _resumable(run_dir)
    config = read_config(target)
    settings = TuneSettings.model_validate(config["settings"])
    workload, playbook = _inputs(settings)
    if workload.sha256 != config["workload"]["sha256"]:
        raise UsageError(f"{settings.workload}: the workload changed since run "
                         f"{target.name} started; restore it or start a new run")
    hw = Hardware.model_validate(config["hardware_detail"])
    run = RunStore(target.parent.parent).open_run(target)
    observer.event("note", text=f"resuming {target} ({len(run.records())} experiments "
                                "recorded)")
    return _tuner(settings, hw, run, workload, playbook, observer)


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
