"""Trials on a Ray cluster (`--executor ray`): each trial is a Ray task that requests the
GPUs its recipe needs (`num_gpus`), boots vLLM on the node it lands on (Ray pins
CUDA_VISIBLE_DEVICES there), benches it there and returns the Measurement (a frozen
pydantic model, so it crosses the wire as is); the driver's store records it. A task
whose worker or node dies mid-trial is submitted again once; dying twice is a `crash`
row that says so. The server is the task's child with a parent-death signal, and Ray
kills a dead driver's tasks, so neither a lost worker nor a killed driver leaves a
server behind. A chosen kernel plug-in must prove it loaded there as on one host (its
proof line in the server log, space/plugins.py). A layer-2 recipe's checkpoint that forge
writes (engine/prepare.py) is written by the task itself, on the node that serves it,
before the boot: see TrialSpec.prepare. Ray is an optional extra:
`pip install "aevyra-forge[ray]"`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.slo import parse_slo
from aevyra_forge.core.trial import Measurement, Trial
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine.prepare import PrepareResult
from aevyra_forge.space.placement import PluginSlot

RETRIES = 1  # submissions after a worker or node died mid-trial
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keeps a local cluster's
#                                       listeners on 127.0.0.1 (measured on Ray 2.60)


def import_ray() -> Any:
    """The ray module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError('--executor ray needs Ray: pip install "aevyra-forge[ray]" (or '
                         "tune on this host with --gpus / --parallel)") from None
    return ray


@dataclass(frozen=True)
class TrialSpec:
    """What a task needs to run a trial where it lands: how to boot and measure, the
    run's fixed measurement settings, and where server logs go (a folder the node can
    write; on one host, the run's own)."""

    vllm_bin: str
    workload: Workload
    concurrency: int
    repeats: int
    slo: str | None
    boot_timeout_s: float
    request_timeout_s: float
    log_dir: str
    plugins: PluginSlot | None = None  # this run's kernel plug-in candidates, if any
    # Writes the checkpoint a layer-2 recipe serves (engine/prepare.Preparer), run in the
    # task, on the node whose vLLM will load it: that node's disk is where the folder must
    # be (nodes need not share one), its GPU is what calibration needs (a driver often has
    # none) and its vLLM environment is what writes it, and its time is the trial's. The
    # folder is the same path on every node, like the model and the vllm executable; on a
    # shared filesystem a node finds it already written (the manifest) and reuses it.
    prepare: Callable[[Recipe, Path], PrepareResult | None] | None = None


def run_on_node(spec: TrialSpec, trial: Trial) -> Measurement:
    """The body of a Ray task: one trial with a LocalExecutor on this node, with the
    same prepare phase and boot check as on one host (a chosen kernel plug-in's proof
    line)."""
    from aevyra_forge.engine.executor import LocalExecutor
    from aevyra_forge.engine.launcher import VllmLauncher
    from aevyra_forge.engine.vllm_bench import VllmBenchmarker
    from aevyra_forge.measure.accuracy import VllmQualityProbe
    from aevyra_forge.space.plugins import boot_check

    logs = Path(spec.log_dir)
    executor = LocalExecutor(
        VllmLauncher(spec.vllm_bin, boot_timeout_s=spec.boot_timeout_s),
        VllmBenchmarker(request_timeout_s=spec.request_timeout_s),
        VllmQualityProbe(spec.workload), spec.workload, concurrency=spec.concurrency,
        repeats=spec.repeats, slo=parse_slo(spec.slo) if spec.slo else None,
        log_path=lambda exp: logs / "logs" / f"exp_{exp:03d}.log", log_root=logs,
        check_boot=boot_check(spec.plugins) if spec.plugins is not None else None,
        prepare=spec.prepare)
    where = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    m = executor.run(trial)
    return m.model_copy(update={"worker": f"ray:{os.uname().nodename}:gpu{where}"})


class RayExecutor:
    """Runs a round's trials as Ray tasks, at most `slots` at once."""

    def __init__(self, spec: TrialSpec, slots: int, address: str | None = None,
                 init: dict[str, Any] | None = None) -> None:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            self.ray.init(address=address, include_dashboard=False, log_to_driver=False,
                          **(init or {}))
        self.spec = spec
        self.slots = slots
        self._task = self.ray.remote(max_retries=0)(run_on_node)

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(f"ray{i}" for i in range(self.slots))

    def run(self, trial: Trial) -> Measurement:
        return next(iter(self.run_many([trial])))[1]

    def run_many(self, trials: Sequence[Trial]) -> Iterator[tuple[Trial, Measurement]]:
        """Submit every trial, yield each as it finishes (in the caller's thread)."""
        ray = self.ray
        pending = {self._submit(t): (t, 0) for t in trials}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            trial, retries = pending.pop(ref)
            try:
                measurement = ray.get(ref)
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError) as exc:
                if retries < RETRIES:
                    pending[self._submit(trial)] = (trial, retries + 1)
                    continue
                measurement = Measurement(
                    status="crash", reason=f"the Ray worker running it died "
                                           f"{retries + 1} times ({type(exc).__name__}); "
                                           "not retried again")
            if retries:
                measurement = measurement.model_copy(update={"reason": "; ".join(filter(
                    None, (measurement.reason, "run again after its Ray worker died")))})
            yield trial, measurement

    def _submit(self, trial: Trial) -> Any:
        gpus = int(trial.recipe.get("config", {}).get("tensor_parallel_size") or 1)
        return self._task.options(num_gpus=gpus, num_cpus=0).remote(self.spec, trial)
