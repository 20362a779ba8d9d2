"""Where a run's workers come from (--parallel, --gpus): which GPUs each one gets, the
hardware one trial sees (a worker's GPUs, so a tensor-parallel recipe never asks for
more than it has), and the thread-safe wrappers a pool's workers report through."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import Device, Hardware
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine import device_lock
from aevyra_forge.engine.launcher import GroupRecorder
from aevyra_forge.engine.pool import WorkerPool, worker_name
from aevyra_forge.engine.prepare import PrepareResult
from aevyra_forge.engine.process import ServerGroup
from aevyra_forge.loop.events import Event, Observer
from aevyra_forge.loop.ports import Executor
from aevyra_forge.space.child_env import pinned
from aevyra_forge.space.placement import PluginSlot

Worker = tuple[str, tuple[int, ...]]  # a worker's name and the GPU indices it owns


def selected(settings: TuneSettings, hw: Hardware) -> Hardware:
    """`hw` narrowed to the GPUs --gpus names (each must be one this host shows)."""
    indices = settings.gpu_indices()
    if not indices or settings.dry_run:
        return hw
    shown = {g.index: g for g in hw.gpus}
    missing = [i for i in indices if i not in shown]
    if missing:
        raise UsageError(f"--gpus {settings.gpus}: no GPU {missing[0]} here (this host shows "
                         f"{', '.join(str(i) for i in sorted(shown)) or 'none'}); name GPUs "
                         "nvidia-smi / rocm-smi lists")
    return hw.model_copy(update={"gpus": tuple(shown[i] for i in indices)})


def workers(settings: TuneSettings, hw: Hardware) -> list[Worker]:
    """The workers of this run: simulated ones for --dry-run, else the --gpus groups,
    else this host's GPUs split into --parallel equal groups. One worker: []."""
    if settings.workers() <= 1 or settings.executor == "ray":  # Ray places trials itself
        return []
    if settings.dry_run:
        return [(f"sim{i}", ()) for i in range(settings.parallel)]
    if hw.device == "cpu":
        raise UsageError("--parallel: experiments side by side on one CPU distort each "
                         "other's measurements; tune one at a time on the CPU")
    groups = settings.gpu_groups()
    if not groups:
        indices = [g.index for g in hw.gpus]
        size = len(indices) // settings.parallel
        if size < 1:
            raise UsageError(f"--parallel {settings.parallel}: this host shows "
                             f"{len(indices)} GPUs; ask for at most {len(indices)}")
        groups = tuple(tuple(indices[i:i + size])
                       for i in range(0, size * settings.parallel, size))
    return [(worker_name(g), g) for g in groups]


def per_worker(hw: Hardware, gpus: tuple[int, ...]) -> Hardware:
    """The hardware one worker's trial runs on."""
    if not gpus:
        return hw
    return hw.model_copy(update={"gpus": tuple(g for g in hw.gpus if g.index in gpus)})


def busy_gpu(hw: Hardware, used_mib: Callable[[Device, Mapping[str, str]], int | None]
             ) -> str | None:
    """Why a GPU of the pool looks busy (another process holds its memory), GPU by GPU:
    one busy GPU distorts its worker's measurements whatever the others hold."""
    for gpu in hw.gpus:
        one = (gpu.index,)
        why = device_lock.busy(used_mib(hw.device, pinned(os.environ, hw.device, one)),
                               device_lock.devices(per_worker(hw, one)))
        if why:
            return why
    return None


def trial_hardware(settings: TuneSettings, hw: Hardware) -> Hardware:
    """What one trial runs on (what the knob space is built for): one worker's GPUs when
    several workers share `hw`."""
    pool = workers(settings, hw)
    return per_worker(hw, pool[0][1]) if pool else hw


def pooled(settings: TuneSettings, hw: Hardware, observer: Observer,
           worker: Callable[[Observer, tuple[int, ...], threading.Lock | None], Executor]
           ) -> Executor:
    """One worker's executor, or a pool of them (one per GPU group), built by `worker`
    from the observer it reports to, its GPUs and the lock its server records share."""
    pool = workers(settings, hw)
    if not pool:
        return worker(observer, (), None)
    shared, lock = SerializedObserver(observer), threading.Lock()
    return WorkerPool({name: worker(shared, gpus, lock) for name, gpus in pool})


def on_ray(settings: TuneSettings, vllm_bin: str, workload: Workload, run_dir: Path,
           plugins: PluginSlot | None = None,
           prepare: Callable[[Recipe, Path], PrepareResult | None] | None = None) -> Executor:
    """--executor ray: --parallel trials at once as Ray tasks (engine/ray_executor.py),
    their server logs in the run folder (a path every node of the cluster must reach),
    a chosen kernel plug-in checked for its proof line there as on one host, and a
    layer-2 checkpoint forge writes prepared by the task on the node that serves it."""
    from aevyra_forge.engine.ray_executor import RayExecutor, TrialSpec

    spec = TrialSpec(vllm_bin=vllm_bin, workload=workload, concurrency=settings.concurrency,
                     repeats=settings.repeats, slo=settings.slo,
                     boot_timeout_s=settings.boot_timeout_s,
                     request_timeout_s=settings.request_timeout_s, log_dir=str(run_dir),
                     plugins=plugins, prepare=prepare)
    return RayExecutor(spec, settings.parallel, settings.ray_address)


def recorder(inner: GroupRecorder, lock: threading.Lock | None) -> GroupRecorder:
    """`inner`, serialized by `lock` when other workers' threads share its file."""
    return inner if lock is None else SerializedRecorder(inner, lock)


class SerializedObserver:
    """An observer several worker threads may notify: one event at a time."""

    def __init__(self, inner: Observer) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def notify(self, event: Event) -> None:
        with self._lock:
            self.inner.notify(event)


class SerializedRecorder:
    """A launcher's group recorder (store/servers.py) whose file other workers' threads
    append to as well: one append at a time (`lock` is shared by all of them), each
    still on disk before the server can be benched."""

    def __init__(self, inner: GroupRecorder, lock: threading.Lock) -> None:
        self.inner = inner
        self._lock = lock

    def launched(self, group: ServerGroup, log_path: Path) -> None:
        with self._lock:
            self.inner.launched(group, log_path)

    def gone(self, group: ServerGroup) -> None:
        with self._lock:
            self.inner.gone(group)
