"""Real vLLM (the CPU build) on a tiny random Llama generated locally: boots, benches,
failure classification, teardown, and one real `aevyra-forge tune --device cpu`.

Run with `pytest -m engine` after `bash scripts/setup_vllm_cpu.sh`; FORGE_VLLM_BIN (or a
`vllm` on PATH) names the vLLM to use. Each boot takes 30-90 s on two cores."""

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

import httpx
import pytest

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.launcher import VllmLauncher, VllmServer
from aevyra_forge.engine.process import group_alive
from aevyra_forge.engine.vllm_bench import VllmBenchmarker
from aevyra_forge.measure.metrics import parse_metrics

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    system = "You are the support assistant for the Orbit storage service. " * 12
    lines = []
    for i in range(12):
        if i % 2:
            lines.append({"messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": f"Question {i}?"}],
                          "expected_output_tokens": 24})
        else:
            lines.append({"prompt": f"Story {i}: once upon a time", "expected_output_tokens":
                          16 + i})
    path = tmp_path_factory.mktemp("wl") / "workload.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module", autouse=True)
def engine_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _recipe(model: Path, **config: object) -> Recipe:
    return Recipe(model=str(model), config={"max_model_len": 1024, **config})  # type: ignore[arg-type]


def _no_process_left(server: VllmServer) -> None:
    """Nothing of the server's process group is running. Zombies (exited, waiting for
    this container's init to reap them) hold no memory and are not counted."""
    assert not group_alive(server.pgid)
    ps = subprocess.run(["ps", "-e", "-o", "pgid=,stat=,pid="], capture_output=True,
                        text=True, check=True).stdout.split("\n")
    running = [line for line in ps if line.split()[:1] == [str(server.pgid)]
               and not line.split()[1].startswith("Z")]
    assert running == []


def test_two_configs_boot_and_bench(vllm_bin: str, tiny_model: Path, workload: Path,
                                    tmp_path: Path) -> None:
    wl = load_workload(workload)
    expected = sum(r.expected_output_tokens for r in wl.requests)
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300)
    for name, recipe in (("bf16 eager", _recipe(tiny_model, enforce_eager=True)),
                         ("fp32 eager", _recipe(tiny_model, enforce_eager=True,
                                                dtype="float32"))):
        server = launcher.launch(recipe, tmp_path / f"{name}.log")
        assert not isinstance(server, LaunchFailure), server
        try:
            outcome = VllmBenchmarker().bench(server, wl, concurrency=4, passes=2)
        finally:
            launcher.stop(server)
        _no_process_left(server)
        assert outcome.status == "ok", outcome.reason
        m = outcome.metrics
        assert m is not None and len(outcome.passes) == 2
        assert m.completed == len(wl.requests) and m.failed == 0
        assert m.output_tokens == expected
        assert m.ttft_ms.mean < m.e2e_ms.mean
        for stats in (m.ttft_ms, m.tpot_ms, m.itl_ms, m.e2e_ms):
            assert stats.p99 >= stats.p50 > 0
        assert m.server["generation_tokens"] == expected
        assert m.server["prefix_cache_queries"] > 0
        FIGURES[name] = {"boot_s": round(server.boot_s, 1),
                         "output_tok_s": round(m.output_throughput, 1),
                         "ttft_p50_ms": round(m.ttft_ms.p50, 1),
                         "tpot_p50_ms": round(m.tpot_ms.p50, 2),
                         "e2e_p99_ms": round(m.e2e_ms.p99, 1),
                         "prefix_cache_hit_rate": round(
                             m.server.get("prefix_cache_hit_rate", 0.0), 3)}


def test_a_bad_flag_is_an_invalid_argument_quickly(vllm_bin: str, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    start = time.monotonic()
    failure = VllmLauncher(vllm_bin, boot_timeout_s=300).launch(
        Recipe(model=str(tiny_model), config={"frobnicate": 1}), tmp_path / "bad.log")
    assert isinstance(failure, LaunchFailure)
    assert failure.status == "boot_failed"
    assert "invalid argument" in failure.reason and "frobnicate" in failure.reason
    assert time.monotonic() - start < 90  # argparse fails before any model loads
    FIGURES["bad_flag_s"] = round(time.monotonic() - start, 1)


def test_a_server_killed_mid_bench_is_a_crash(vllm_bin: str, tiny_model: Path,
                                              tmp_path: Path) -> None:
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": f"Tale {i}", "expected_output_tokens": 600})
                            + "\n" for i in range(16)))
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300)
    server = launcher.launch(_recipe(tiny_model, enforce_eager=True), tmp_path / "k.log")
    assert not isinstance(server, LaunchFailure), server

    fired: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def kill(why: str) -> None:
        with lock:
            if not fired:
                os.kill(server.process.pid, signal.SIGKILL)
                fired.append(why)

    def kill_when_busy() -> None:
        # Mid-request when /metrics shows one running in time; a tiny model on a fast CPU
        # can finish a pass between two scrapes, so the start of pass 2 kills it at the
        # latest (still inside the bench): the test never depends on winning that race.
        while not done.is_set() and not fired:
            try:
                text = httpx.get(server.url + "/metrics", timeout=30).text
            except httpx.HTTPError:  # a busy server on two shared cores answers late
                continue
            if any(line.startswith("vllm:num_requests_running") and
                   float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines()):
                kill("a request running")
                return
            done.wait(0.2)  # a polling interval, not synchronisation

    def on_pass(k: int, n: int) -> None:
        if k == 2:
            kill("pass 2 starting")

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        outcome = VllmBenchmarker(warmup_requests=0, on_pass=on_pass).bench(
            server, load_workload(long), concurrency=4, passes=3)
    finally:
        done.set()
        killer.join()
        launcher.stop(server)
    assert fired, "the bench ended before pass 2 began"
    assert outcome.status in ("crash", "oom"), (fired, outcome)
    assert "server died during the bench" in outcome.reason
    FIGURES["killed_on"] = fired[0]
    _no_process_left(server)
    assert parse_metrics("") == {}


def test_tune_device_cpu_end_to_end(vllm_bin: str, tiny_model: Path, workload: Path,
                                    tmp_path: Path) -> None:
    run_dir = tmp_path / ".forge"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model",
         str(tiny_model), "--workload", str(workload), "--llm", "builtin",
         "--max-experiments", "3", "--concurrency", "4", "--repeats", "3",
         "--run-dir", str(run_dir), "--vllm-bin", vllm_bin],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = sorted((run_dir / "runs").glob("0*"))
    records = [json.loads(x) for x in (run / "experiments.jsonl").read_text().splitlines()]
    assert [r["exp"] for r in records] == [0, 1, 2]
    assert records[0]["status"] == "ok" and records[0]["kept"]
    assert (run / "completed.json").exists() and (run / "best_recipe.yaml").exists()
    assert all((run / r["log"]).exists() for r in records if r["log"])
    left = subprocess.run(["pgrep", "-r", "R,S,D", "-f", str(tiny_model)],
                          capture_output=True, text=True)
    assert left.stdout.strip() == "", "a vLLM process outlived the tune"
    FIGURES["tune_cpu"] = {
        "wall_s": round(time.monotonic() - start, 1),
        "rows": [(r["exp"], r["status"], r["score"], r["kept"],
                  (r["proposal"] or {}).get("changes")) for r in records]}


def test_the_baseline_measured_twice_is_not_kept(vllm_bin: str, tiny_model: Path,
                                                 workload: Path, tmp_path: Path) -> None:
    """An A/A comparison on real vLLM: two boots of one config, five passes each, judged by
    the loop's keep rule, must not look like an improvement. Each pass is a few seconds of
    work: the shared 12-request workload's passes last ~0.3 s on the tiny model, where one
    scheduler hiccup doubles a pass (CI saw two boots +113 % apart on them), which no
    night's trace looks like."""
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.decide.verdict import judge

    longer = tmp_path / "aa.jsonl"
    longer.write_text("".join(json.dumps({"prompt": f"Chapter {i}: the harbour at dawn",
                                          "expected_output_tokens": 96}) + "\n"
                              for i in range(32)))
    wl = load_workload(longer)
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300)
    boots = []
    for i in range(2):
        server = launcher.launch(_recipe(tiny_model, enforce_eager=True),
                                 tmp_path / f"aa{i}.log")
        assert not isinstance(server, LaunchFailure), server
        try:
            boots.append(VllmBenchmarker().bench(server, wl, concurrency=4, passes=5))
        finally:
            launcher.stop(server)
    first, second = boots
    assert first.status == second.status == "ok"
    settings = TuneSettings(model=str(tiny_model), workload=str(workload), device="cpu")
    verdict = judge(settings, "ok", second.passes, second.metrics, None,
                    reference=first.metrics,
                    incumbent=first.passes, incumbent_id="baseline", best_score=1.0,
                    history=[], identical=False)
    assert verdict.interval is not None
    assert not verdict.decision.kept, verdict.decision.reason
    FIGURES["a_a"] = {"decision": verdict.decision.reason,
                      "pass_tok_s": [[round(m.output_throughput, 1) for m in b.passes]
                                     for b in boots]}


def test_a_server_key_in_the_environment_is_sent(vllm_bin: str, tiny_model: Path,
                                                 workload: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """VLLM_API_KEY in the user's environment makes real vLLM refuse /v1 without it: the
    readiness check, the bench and the accuracy probe send it; the provider's key never
    reaches the server, and the server's key never reaches its log."""
    from aevyra_forge.measure.accuracy import VllmQualityProbe

    monkeypatch.setenv("VLLM_API_KEY", "engine-test-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "not-for-vllm")
    wl = load_workload(workload)
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300)
    log = tmp_path / "exp.log"
    server = launcher.launch(_recipe(tiny_model, enforce_eager=True), log)
    assert not isinstance(server, LaunchFailure), server
    try:
        refused = httpx.get(server.url + "/v1/models").status_code
        outcome = VllmBenchmarker().bench(server, wl, concurrency=2)
        reference = VllmQualityProbe(wl, samples=2).reference(server)
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    finally:
        launcher.stop(server)
    assert refused == 401
    assert outcome.status == "ok", outcome.reason
    assert outcome.metrics is not None and outcome.metrics.failed == 0
    assert reference is not None
    assert b"VLLM_API_KEY=engine-test-key" in environ
    assert not [e for e in environ if e.startswith(b"ANTHROPIC_API_KEY=")]
    assert "engine-test-key" not in log.read_text()


def test_real_vllm_honours_the_cache_salt_and_can_reset_its_cache(
        vllm_bin: str, tiny_model: Path, workload: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The facts pass isolation rests on, on the installed vLLM: per-pass prefix-cache
    counters, salted passes that do not hit each other's cache (the system prompt shared
    within a pass still hits), and POST /reset_prefix_cache in dev mode."""
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    wl = load_workload(workload)
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300)
    server = launcher.launch(_recipe(tiny_model, enforce_eager=True), tmp_path / "exp.log")
    assert not isinstance(server, LaunchFailure), server
    try:
        outcome = VllmBenchmarker().bench(server, wl, concurrency=4, passes=3)
        reset = httpx.post(server.url + "/reset_prefix_cache", timeout=30.0)
    finally:
        launcher.stop(server)
    assert outcome.status == "ok", outcome.reason
    isolation = outcome.pass_isolation
    assert isolation is not None and isolation.method in ("salt", "warm_pass"), isolation
    assert "cache_salt ignored" not in isolation.note
    rates = [m.server["prefix_cache_hit_rate"] for m in outcome.passes]
    assert all(0 < r < 0.9 for r in rates), rates  # within-pass sharing only
    assert max(rates) - min(rates) < 0.1, rates
    assert reset.status_code == 200 and reset.json() == {"success": True}
    FIGURES["pass isolation"] = {"method": isolation.method, "note": isolation.note}
