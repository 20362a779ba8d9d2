"""Trials as Ray tasks on a local Ray cluster (2 CPUs, 4 fake GPUs, every listener on
127.0.0.1) booting tests/fake_vllm.py behind a `vllm` wrapper that execs it: four at once,
each on its own GPU; a Ray worker killed mid-trial, the trial run again once; no server
left alive. One cluster for the module: starting Ray costs seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # with ipykernel in the dev extra
import pytest

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.ray_executor import LOOPBACK_ENV, RayExecutor, TrialSpec
from tests.engine.conftest import wait_gone

# Read when ray is imported: keeps every listener of the local cluster on 127.0.0.1.
os.environ.update(LOOPBACK_ENV)
ray = pytest.importorskip("ray")

FAKE_VLLM = Path(__file__).resolve().parents[1] / "data" / "fake_vllm" / "vllm"
GPUS = 4
DEADLINE_S = 120.0  # a wait for another process that would mean a failure if it passed
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, num_gpus=GPUS, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


HELP = Path(__file__).resolve().parents[1] / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"


def _wrapper(folder: Path, round_size: int) -> Path:
    """A `vllm` that records its GPUs and pid, waits until `round_size` servers have
    started (so only a pool running them at once gets past it), and execs the fake; with
    `stall-once` in `folder` its streams stall and its Ray worker's pid is written."""
    script = folder / "vllm"
    script.write_text(f"""#!/bin/bash
if [ "$1" = "--version" ]; then echo "0.32.0"; exit 0; fi
if [ "$1 $2" = "serve --help=all" ]; then cat "{HELP}"; exit 0; fi
echo "wrapper: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
echo $$ >> "{folder}/servers"
waited=0
until [ "$(wc -l < "{folder}/servers")" -ge {round_size} ]; do
  sleep 0.05; waited=$((waited + 1))
  [ "$waited" -gt {int(DEADLINE_S) * 20} ] && echo "barrier: alone" && exit 1
done
if [ -f "{folder}/stall-once" ]; then
  rm -f "{folder}/stall-once"; export FAKE_VLLM_STALL_AFTER_N_TOKENS=1
  echo $PPID > "{folder}/worker.pid"
fi
[ -f "{folder}/stall" ] && export FAKE_VLLM_STALL_AFTER_N_TOKENS=1
export FAKE_VLLM_TOKEN_DELAY_S=0.001
exec "{sys.executable}" "{FAKE_VLLM}" "$@"
""")
    script.chmod(0o755)
    return script


def _executor(tmp_path: Path, workload: Path, round_size: int) -> RayExecutor:
    spec = TrialSpec(vllm_bin=str(_wrapper(tmp_path, round_size)),
                     workload=load_workload(workload), concurrency=2, repeats=1, slo=None,
                     boot_timeout_s=DEADLINE_S, request_timeout_s=DEADLINE_S,
                     log_dir=str(tmp_path))
    return RayExecutor(spec, slots=GPUS)


def _trial(exp: int) -> Trial:
    recipe = Recipe(model="fake/tiny-1b")
    return Trial(exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=1,
                 worker=f"ray{exp}")


def _servers(folder: Path) -> list[int]:
    return [int(line) for line in (folder / "servers").read_text().split()]


def test_four_trials_at_once_each_on_its_own_gpu_all_on_loopback(
        cluster: None, tmp_path: Path, small_workload: Path) -> None:
    executor = _executor(tmp_path, small_workload, GPUS)
    results = dict((t.exp, m) for t, m in executor.run_many([_trial(i)
                                                             for i in range(GPUS)]))
    assert {exp: m.status for exp, m in results.items()} == {i: "ok" for i in range(GPUS)}
    seen = set()
    for exp in range(GPUS):
        log = (tmp_path / "logs" / f"exp_{exp:03d}.log").read_text()
        assert "barrier" not in log  # every server was up while the others were
        (line,) = [ln for ln in log.splitlines() if ln.startswith("wrapper: CUDA")]
        seen.add(line.rsplit("=", 1)[1])
    assert seen == {str(i) for i in range(GPUS)}
    assert all(m.worker and m.worker.startswith("ray:") for m in results.values())
    assert wait_gone(*_servers(tmp_path))  # no server left alive
    ours = [psutil.Process(), *psutil.Process().children(recursive=True)]
    listening = [(p.pid, c.laddr) for p in ours for c in _listening(p)]
    assert listening and all(addr.ip in LOOPBACK for _, addr in listening), listening


def _listening(proc: psutil.Process) -> list[Any]:
    try:
        return [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def test_a_worker_killed_mid_trial_is_run_again_once(cluster: None, tmp_path: Path,
                                                     small_workload: Path) -> None:
    (tmp_path / "stall-once").touch()
    executor = _executor(tmp_path, small_workload, 1)
    results = executor.run_many([_trial(0)])
    worker_pid = tmp_path / "worker.pid"
    deadline = time.monotonic() + DEADLINE_S
    killed = False

    def kill_when_started() -> None:
        nonlocal killed
        while not killed and time.monotonic() < deadline:
            if worker_pid.exists() and worker_pid.read_text().strip():
                os.kill(int(worker_pid.read_text()), signal.SIGKILL)
                killed = True
            time.sleep(0.05)  # polling a file another process writes

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    ((_, m),) = list(results)
    killer.join()
    assert killed
    assert m.status == "ok" and "run again after its Ray worker died" in m.reason
    first, second = _servers(tmp_path)
    assert wait_gone(first, second)  # the dead worker's server went with it


def test_a_chosen_kernel_plugin_must_prove_itself_on_the_node(
        cluster: None, tmp_path: Path, small_workload: Path) -> None:
    """The LocalExecutor's boot check runs in the Ray task too: a recipe choosing a kernel
    plug-in whose proof line the node's server log lacks is a failed boot saying so (the
    fake never prints it), while the same spec measures a recipe choosing none."""
    from aevyra_forge.core.recipe import KernelSettings
    from aevyra_forge.space import plugins

    slot = plugins.slot([plugins.KernelCandidate(
        name="fast_attn", plugins=("fast_kernels",), proof="fast-kernels: loaded")], {})
    spec = TrialSpec(vllm_bin=str(_wrapper(tmp_path, 1)), workload=load_workload(small_workload),
                     concurrency=2, repeats=1, slo=None, boot_timeout_s=DEADLINE_S,
                     request_timeout_s=DEADLINE_S, log_dir=str(tmp_path), plugins=slot)
    executor = RayExecutor(spec, slots=GPUS)
    recipe = Recipe(model="fake/tiny-1b",
                    kernel=KernelSettings(env={"VLLM_PLUGINS": "fast_kernels"}))
    assert slot.chosen(recipe) is not None
    m = executor.run(Trial(exp=0, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=3))
    assert m.status == "boot_failed", m.reason
    assert m.reason.startswith("invalid: kernel plug-in 'fast_attn' did not load")
    assert executor.run(_trial(1)).status == "ok"
    assert wait_gone(*_servers(tmp_path))


def _four_gpus_smi(folder: Path) -> Path:
    """A fake nvidia-smi for the driver: four A100s, none holding memory."""
    bin_dir = folder / "smi"
    bin_dir.mkdir()
    info = "\n".join(f"{i}, NVIDIA A100-SXM4-80GB, 81920, 8.0, 535.129.03, GPU-{i}"
                     for i in range(GPUS))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '%s\\n' \"{info}\"\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def test_the_driver_sigkilled_leaves_no_server_and_a_resumable_run(
        cluster: None, tmp_path: Path, small_workload: Path) -> None:
    """`tune --executor ray` killed while its baseline's server stalls in the bench: Ray
    takes the dead driver's task down and the server with it; `tune resume` runs the
    baseline again and finishes the run (a round of two on the cluster)."""
    from tests.fake_provider import FakeProvider
    from tests.loop.test_scale import KEY, batch_agent, llm_options

    with FakeProvider(batch_agent([{"long_prefill_token_threshold": v} for v in (16, 32)])) as fake:
        _kill_the_driver_and_resume(tmp_path, small_workload, llm_options(fake), KEY)


def _kill_the_driver_and_resume(tmp_path: Path, small_workload: Path, llm: list[str],
                                key: str) -> None:
    vllm = _wrapper(tmp_path, 1)
    (tmp_path / "stall").touch()
    env = {**os.environ, "PATH": f"{_four_gpus_smi(tmp_path)}{os.pathsep}{os.environ['PATH']}",
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           "OPENAI_API_KEY": key}
    run_dir = tmp_path / "forge"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "aevyra_forge", "tune", "--model", "fake/tiny-1b",
           "--workload", str(small_workload), *llm, "--run-dir", str(run_dir),
           "--vllm-bin", str(vllm), "--max-experiments", "3", "--repeats", "1",
           "--patience", "20", "--executor", "ray", "--ray-address", address,
           "--parallel", "2"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        servers = tmp_path / "servers"
        deadline = time.monotonic() + DEADLINE_S
        while not (servers.exists() and servers.read_text().strip()) \
                and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)  # polling a file another process writes
        assert servers.exists(), "the baseline's server never started"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert wait_gone(*_servers(tmp_path))  # no orphan server
        (tmp_path / "stall").unlink()
        done = subprocess.run([sys.executable, "-m", "aevyra_forge", "tune", "resume",
                               "--run-dir", str(run_dir)], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        (run,) = sorted((run_dir / "runs").glob("0*"))
        records = [json.loads(x) for x in (run / "experiments.jsonl").read_text().split("\n")
                   if x.strip()]
        assert sorted(r["exp"] for r in records) == [0, 1, 2], done.stderr
        starts = [json.loads(x)["exp"] for x in (run / "trials.jsonl").read_text().split("\n")
                  if x.strip()]
        assert starts.count(0) == 2  # the baseline killed in flight ran again
        assert {r["round"] for r in records if r["exp"] > 0} == {1}  # a round of two
        assert wait_gone(*_servers(tmp_path))
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def _fake_writer(folder: Path) -> Path:
    """A stand-in for vLLM's python as the prepare phase calls it (`python rtn_script.py
    SOURCE OUT --scheme S`): writes OUT/config.json, and records its parent's command line
    (the process that ran the prepare phase) and its GPUs; with `fail` in `folder` it
    exits 3 with a last line as the real script's."""
    script = folder / "python"
    script.write_text(f"""#!/bin/bash
if [ -f "{folder}/fail" ]; then echo "missing in this environment: no torch here"; exit 3; fi
mkdir -p "$3" && echo '{{"model_type": "llama"}}' > "$3/config.json"
echo "$(tr '\\0' ' ' < /proc/$PPID/cmdline)|$CUDA_VISIBLE_DEVICES" >> "{folder}/prepared"
""")
    script.chmod(0o755)
    return script


def _layer2(tmp_path: Path, small_workload: Path) -> tuple[RayExecutor, Recipe, Path]:
    """A Ray executor whose spec carries a Preparer (the fake writer), and a recipe
    serving the checkpoint it writes."""
    from aevyra_forge.core.recipe import QuantSettings
    from aevyra_forge.engine import prepare

    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "llama"}')
    (source / "model.safetensors").write_bytes(b"\0" * 1000)
    job = prepare.job(source, "w8a8", tmp_path / "store" / "quant", {"torch": "2.13.0"})
    preparer = prepare.Preparer(str(_fake_writer(tmp_path)), {str(job.out): job})
    spec = TrialSpec(vllm_bin=str(_wrapper(tmp_path, 1)), workload=load_workload(small_workload),
                     concurrency=2, repeats=1, slo=None, boot_timeout_s=DEADLINE_S,
                     request_timeout_s=DEADLINE_S, log_dir=str(tmp_path), prepare=preparer)
    recipe = Recipe(model=str(source), quant=QuantSettings(checkpoint=str(job.out),
                                                           method="w8a8_int8"))
    return RayExecutor(spec, slots=GPUS), recipe, job.out


def test_a_layer2_checkpoint_is_written_by_the_task_that_serves_it(
        cluster: None, tmp_path: Path, small_workload: Path) -> None:
    """The prepare phase runs inside the Ray task, on its GPU, before the boot; its time
    is the trial's prepare_s and its log sits beside the server's; a second trial of the
    same checkpoint reuses it without running the writer again."""
    executor, recipe, out = _layer2(tmp_path, small_workload)
    first = executor.run(Trial(exp=1, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=2))
    assert first.status == "ok", first.reason
    assert first.prepare_s is not None and first.prepare_s > 0
    assert (out / "config.json").is_file() and (out / "manifest.json").is_file()
    ((parent, gpus),) = [line.split("|") for line in
                         (tmp_path / "prepared").read_text().splitlines()]
    assert parent.startswith("ray::run_on_node"), parent  # the task's worker, not the driver
    assert gpus in {str(i) for i in range(GPUS)}  # the GPU Ray gave the task
    assert (tmp_path / "logs" / "exp_001.prepare.log").is_file()
    log = (tmp_path / "logs" / "exp_001.log").read_text()
    assert f"serve {out}" in log or str(out) in log  # the server loaded what was written
    again = executor.run(Trial(exp=2, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=2))
    assert again.status == "ok" and again.prepare_s is not None
    assert len((tmp_path / "prepared").read_text().splitlines()) == 1  # reused
    assert wait_gone(*_servers(tmp_path))


def test_a_failed_prepare_on_the_node_is_a_row_and_boots_nothing(
        cluster: None, tmp_path: Path, small_workload: Path) -> None:
    executor, recipe, out = _layer2(tmp_path, small_workload)
    (tmp_path / "fail").touch()
    m = executor.run(Trial(exp=1, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=2))
    assert m.status == "prepare_failed"
    assert m.reason.endswith("failed with exit code 3: missing in this environment: no "
                             "torch here"), m.reason
    assert m.log == "logs/exp_001.prepare.log"
    assert not out.exists() and not (tmp_path / "servers").exists()


def test_on_ray_gives_every_task_the_runs_prepare_phase(
        cluster: None, tmp_path: Path, small_workload: Path) -> None:
    """--executor ray: the run's Preparer travels in the spec every task gets (the
    session passes what checkpoints.offer built, as it does to a local worker)."""
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.engine.prepare import Preparer
    from aevyra_forge.loop import scale

    settings = TuneSettings(model="fake/tiny-1b", workload=str(small_workload),
                            executor="ray", parallel=2)
    preparer = Preparer(sys.executable, {})
    executor = scale.on_ray(settings, str(_wrapper(tmp_path, 1)),
                            load_workload(small_workload), tmp_path, None, preparer)
    assert isinstance(executor, RayExecutor) and executor.spec.prepare is preparer
    assert executor.run(_trial(0)).status == "ok"  # a recipe without a checkpoint: no prepare
    assert not (tmp_path / "logs" / "exp_000.prepare.log").exists()
