"""Tests for aevyra_forge.report.export: every format carries exactly the argv and
environment the launcher boots with (VllmLauncher.command), read back the way its consumer
reads it (bash, shlex, compose and Kubernetes variable expansion, the production-stack
chart's template), with hostile recipe text staying one argument; the Kubernetes manifest
passes the Kubernetes schema; the run folder gets deploy.sh and deploy.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import StoreError, UsageError
from aevyra_forge.core.recipe import KernelSettings, Recipe
from aevyra_forge.engine.launcher import VllmLauncher
from aevyra_forge.report import export
from aevyra_forge.report.export import PORT, Deployment
from aevyra_forge.store.run_store import RunStore
from tests.builders import MODEL_1B, full_recipe, record
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD, run_cli

HOSTILE = """it's "quoted" $(touch pwned) `id` $(HOME) ${HOME} $HOME $$; rm -rf ~ & x > y"""
BASELINE = Recipe(model=MODEL_1B)
BEST = full_recipe().child(config={**full_recipe().config, "tensor_parallel_size": 2})
EVIL = Recipe(model=MODEL_1B + " $(x)",
              config={"chat_template": HOSTILE, "max_num_seqs": 64},
              kernel=KernelSettings(compilation_config={"note": HOSTILE},
                                    env={"VLLM_CPU_KVCACHE_SPACE": HOSTILE}))
RECIPES = pytest.mark.parametrize("recipe", [BEST, EVIL, BASELINE], ids=["full", "hostile",
                                                                        "baseline"])


def launcher_command(recipe: Recipe) -> tuple[list[str], dict[str, str]]:
    """What the launcher runs after `vllm serve`, listening where a deployment does."""
    cmd, env = VllmLauncher("vllm", env={}).command(recipe, PORT)
    assert cmd[:2] == ["vllm", "serve"]
    argv = cmd[2:]
    argv[argv.index("--host") + 1] = "0.0.0.0"
    return argv, dict(sorted(env.items()))  # exports list the environment sorted


def deployment(recipe: Recipe, tmp_path: Path, version: str | None = None) -> Deployment:
    return Deployment(recipe, None, tmp_path / "001_20261122T110501Z", vllm_version=version)


def options(argv: list[str]) -> list[tuple[str, ...]]:
    """argv as its set of options (the model first), order aside."""
    return sorted(tuple(group) for group in export._option_groups(argv))


# -- the consumers' own readings --------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$(\$|\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_K8S_VAR = re.compile(r"\$(\$|\([A-Za-z_][A-Za-z0-9_]*\))")


def compose_reads(text: str) -> str:
    """docker compose's interpolation: `$$` is `$`; `$VAR` and `${...}` are substituted."""
    return _COMPOSE_VAR.sub(lambda m: "$" if m[1] == "$" else "<SUBSTITUTED>", text)


def k8s_reads(text: str) -> str:
    """The kubelet's expansion of command, args and env values: `$$` is `$`, `$(VAR)` is
    substituted."""
    return _K8S_VAR.sub(lambda m: "$" if m[1] == "$" else "<SUBSTITUTED>", text)


def bash_reads(script: str) -> list[str]:
    return shlex.split(script.replace("\\\n", ""))  # bash drops a backslash-newline


@pytest.fixture
def fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """`vllm` and `docker` on PATH that record their argv and environment."""
    bindir, dump = tmp_path / "bin", tmp_path / "called.json"
    bindir.mkdir()
    script = (f"#!{sys.executable}\nimport json, os, sys\n"
              f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
              f"open({str(dump)!r}, 'w'))\n")
    for name in ("vllm", "docker"):
        (bindir / name).write_text(script)
        (bindir / name).chmod(0o755)
    return bindir, dump


def run_bash(args: list[str], fake: tuple[Path, Path], cwd: Path) -> dict[str, Any]:
    bindir, dump = fake
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(cwd)}
    subprocess.run(["bash", *args], check=True, env=env, cwd=cwd, timeout=60)
    called: dict[str, Any] = json.loads(dump.read_text())
    return called


# -- formats ----------------------------------------------------------------------------


@RECIPES
def test_cmd_and_deploy_sh_run_the_launchers_argv_and_env(
        recipe: Recipe, tmp_path: Path, fake_bin: tuple[Path, Path]) -> None:
    dep = deployment(recipe, tmp_path)
    argv, env = launcher_command(recipe)
    line, script = export.render_cmd(dep), export.render_deploy_sh(dep)
    assert line.count("\n") == 1
    assert bash_reads(line) == [f"{k}={v}" for k, v in env.items()] + ["vllm", "serve", *argv]
    assert bash_reads(script.split("set -euo pipefail\n")[1])[-len(argv) - 3:] == [
        "exec", "vllm", "serve", *argv]
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    (tmp_path / "deploy.sh").write_text(script)
    for args in (["deploy.sh"], ["-c", line]):
        called = run_bash(args, fake_bin, tmp_path)
        assert called["argv"] == ["serve", *argv]
        assert {k: called["env"][k] for k in env} == env
    assert not (tmp_path / "pwned").exists()


@RECIPES
def test_docker_line_parses_back_to_the_launchers_argv(
        recipe: Recipe, tmp_path: Path, fake_bin: tuple[Path, Path]) -> None:
    dep = deployment(recipe, tmp_path, version="0.11.2")
    argv, env = launcher_command(recipe)
    line = export.render_docker(dep)
    words = shlex.split(line)
    image = words.index("vllm/vllm-openai:v0.11.2")
    assert words[image + 1:] == argv
    assert words[:3] == ["docker", "run", "--rm"] and "--gpus" in words
    assert f"{PORT}:{PORT}" in words
    pairs = [words[i + 1] for i in range(image) if words[i] == "-e"]
    assert pairs == ["HF_TOKEN", *(f"{k}={v}" for k, v in env.items())]
    called = run_bash(["-c", line], fake_bin, tmp_path)  # what the shell really passes
    assert called["argv"][called["argv"].index(words[image]) + 1:] == argv
    assert f"{tmp_path}/.cache/huggingface:/root/.cache/huggingface" in called["argv"]


@RECIPES
def test_compose_service_reads_back_to_the_launchers_argv(recipe: Recipe,
                                                           tmp_path: Path) -> None:
    dep = deployment(recipe, tmp_path)
    argv, env = launcher_command(recipe)
    (service,) = yaml.safe_load(export.render_compose(dep))["services"].values()
    assert [compose_reads(arg) for arg in service["command"]] == argv
    environment = {k: compose_reads(v) for k, v in service["environment"].items()}
    assert environment == {**env, "HF_TOKEN": "<SUBSTITUTED>"}  # taken from the host
    assert service["image"] == "vllm/vllm-openai:latest"
    assert service["ports"] == [f"{PORT}:{PORT}"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == (2 if recipe is BEST else 1)
    assert f"{PORT}/health" in " ".join(service["healthcheck"]["test"])


@RECIPES
def test_k8s_manifest_passes_the_schema_and_runs_the_launchers_argv(
        recipe: Recipe, tmp_path: Path) -> None:
    dep = deployment(recipe, tmp_path)
    argv, env = launcher_command(recipe)
    deploy, service = yaml.safe_load_all(export.render_k8s(dep))
    for doc in (deploy, service):  # the schemas ship with the package: no network
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(),
                                     strict=True)
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "command" not in container  # the image's entrypoint is `vllm serve`
    assert [k8s_reads(arg) for arg in container["args"]] == argv
    plain = {e["name"]: k8s_reads(e["value"]) for e in container["env"] if "value" in e}
    assert plain == env
    assert argv[argv.index("--served-model-name") + 1] == recipe.model
    gpus = 2 if recipe is BEST else 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": PORT}]
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == PORT
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", deploy["metadata"]["name"])


def test_k8s_schema_check_can_fail(tmp_path: Path) -> None:
    (deploy, _) = yaml.safe_load_all(export.render_k8s(deployment(BEST, tmp_path)))
    deploy["spec"]["template"]["spec"]["containers"][0]["args"] = "--max-num-seqs 8"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, kubernetes_validate.utils.latest_version(),
                                     strict=True)


def chart_argv(spec: dict[str, Any], container_port: int) -> list[str]:
    """What the production-stack chart's deployment template (helm/templates/
    deployment-vllm-multi.yaml) puts after `vllm serve`, for the fields we write."""
    argv = [spec["modelURL"], "--host", "0.0.0.0", "--port", str(container_port)]
    config = spec["vllmConfig"]
    if "enableChunkedPrefill" in config:
        argv.append("--enable-chunked-prefill" if config["enableChunkedPrefill"]
                    else "--no-enable-chunked-prefill")
    argv.append("--enable-prefix-caching" if config.get("enablePrefixCaching")
                else "--no-enable-prefix-caching")
    for key, flag in (("maxModelLen", "--max-model-len"), ("dtype", "--dtype"),
                      ("tensorParallelSize", "--tensor-parallel-size"),
                      ("maxNumSeqs", "--max-num-seqs"),
                      ("gpuMemoryUtilization", "--gpu-memory-utilization")):
        if key in config:
            argv += [flag, str(config[key])]
    return argv + list(config.get("extraArgs", []))


@RECIPES
def test_helm_values_render_to_the_launchers_argv(recipe: Recipe, tmp_path: Path) -> None:
    dep = deployment(recipe, tmp_path, version="0.11.2")
    argv, env = launcher_command(recipe)
    values = yaml.safe_load(export.render_helm_values(dep))["servingEngineSpec"]
    (spec,) = values["modelSpec"]
    rendered = [k8s_reads(arg) for arg in chart_argv(spec, values["containerPort"])]
    expected = argv if "--no-enable-prefix-caching" in argv else [
        *argv, "--enable-prefix-caching"]  # vLLM's default, said out loud for the chart
    assert options(rendered) == options(expected)
    assert {e["name"]: k8s_reads(e["value"]) for e in spec["env"]} == env
    assert (spec["repository"], spec["tag"]) == ("vllm/vllm-openai", "v0.11.2")
    assert spec["requestGPU"] == (2 if recipe is BEST else 1)
    assert values["startupProbe"]["httpGet"]["path"] == "/health"
    if recipe is BEST:  # dedicated fields where the chart has them
        assert spec["vllmConfig"]["maxNumSeqs"] == 128
        assert spec["vllmConfig"]["tensorParallelSize"] == 2
        assert spec["vllmConfig"]["enablePrefixCaching"] is False


_TEXT = st.text(st.characters(min_codepoint=32, exclude_characters="\x7f"), min_size=1,
                max_size=40).filter(lambda s: not s.startswith("-"))


@settings(max_examples=60, deadline=None)
@given(value=_TEXT, env_value=_TEXT)
def test_any_recipe_text_stays_one_argument(value: str, env_value: str) -> None:
    recipe = Recipe(model=MODEL_1B, config={"chat_template": value},
                    kernel=KernelSettings(env={"VLLM_CPU_KVCACHE_SPACE": env_value}))
    dep = deployment(recipe, Path("/runs"))
    argv, env = launcher_command(recipe)
    assert bash_reads(export.render_cmd(dep)) == [
        *(f"{k}={v}" for k, v in env.items()), "vllm", "serve", *argv]
    assert bash_reads(export.render_deploy_sh(dep))[-len(argv):] == argv
    assert shlex.split(export.render_docker(dep))[-len(argv):] == argv
    (service,) = yaml.safe_load(export.render_compose(dep))["services"].values()
    assert [compose_reads(arg) for arg in service["command"]] == argv
    deploy, _ = yaml.safe_load_all(export.render_k8s(dep))
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert [k8s_reads(arg) for arg in container["args"]] == argv


# -- choosing the recipe ------------------------------------------------------------------


def make_run(root: Path, records: list[Any], **config: Any) -> Path:
    with RunStore(root).create_run({"model": MODEL_1B, "settings": {"dry_run": False},
                                    **config}) as run:
        for rec in records:
            run.append(rec)
        return run.path


def rec(exp: int, recipe: Recipe, **extra: Any) -> Any:
    return record(exp, recipe=recipe.to_dict(), recipe_id=recipe.id, **extra)


def test_load_picks_the_best_record_or_the_recipe_named(tmp_path: Path) -> None:
    other = BASELINE.child(config={"max_num_seqs": 32})
    run = make_run(tmp_path / ".forge", [rec(0, BASELINE, kept=True), rec(1, BEST, kept=True),
                                         rec(2, other, score=1.5)], vllm_version="0.11.2")
    best = export.load(tmp_path / ".forge")  # the store root means its latest run
    assert best.recipe == BEST and best.record is not None and best.record.exp == 1
    assert best.image == "vllm/vllm-openai:v0.11.2" and best.run_dir == run
    assert export.load(run, other.id).recipe == other
    with pytest.raises(UsageError, match=f"known ids: {BASELINE.id}, {BEST.id}, {other.id}"):
        export.load(run, "deadbeef")


def test_cli_unknown_recipe_and_empty_run_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / ".forge", [rec(0, BASELINE, kept=True)])
    code, out, err = run_cli(["export", str(run), "--as", "k8s", "--recipe", "nope"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "--recipe nope" in err and BASELINE.id in err
    failed = make_run(tmp_path / "other", [rec(0, BASELINE, status="boot_failed",
                                               reason="CUDA out of memory")])
    code, out, err = run_cli(["export", str(failed), "--as", "cmd"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "no configuration was measured" in err and "boot_failed" in err
    code, _, err = run_cli(["export", str(run), "--as", "yaml"], capsys)
    assert code == 1 and "expected one of cmd, docker, compose, k8s, helm-values" in err


def test_cli_export_to_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / ".forge", [rec(0, BASELINE, kept=True), rec(1, BEST, kept=True)])
    target = tmp_path / "vllm.yaml"
    code, out, _ = run_cli(["export", str(run), "--as", "k8s", "--output", str(target)],
                           capsys)
    assert code == 0 and out == ""
    assert target.read_text() == export.render_k8s(export.load(run))


def test_write_artifact_is_atomic_and_refuses_paths(tmp_path: Path) -> None:
    with RunStore(tmp_path).create_run({"model": MODEL_1B}) as run:
        run.write_artifact("deploy.sh", "#!/bin/sh\n", executable=True)
        run.write_artifact("deploy.md", "# x\n")
        with pytest.raises(StoreError, match="plain file name"):
            run.write_artifact("../escape.sh", "")
        mode = (run.path / "deploy.sh").stat().st_mode
        assert mode & stat.S_IXUSR and not (run.path / "deploy.md").stat().st_mode & 0o111
    assert not (tmp_path / "runs" / "escape.sh").exists()


def test_quick_start_leaves_deploy_sh_serving_the_best_recipe(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_bin: tuple[Path, Path]
) -> None:
    code, out, err = run_cli(["tune", "--dry-run", "--model", MODEL_8B, "--workload",
                              str(SAMPLE_WORKLOAD), "--llm", "builtin", "--run-dir",
                              str(tmp_path / ".forge"), "--max-experiments", "6"], capsys)
    assert code == 0, err
    dep = export.load(tmp_path / ".forge")
    script = dep.run_dir / "deploy.sh"
    assert os.access(script, os.X_OK)
    assert f"deploy:      {export.render_cmd(dep).strip()}" in out
    # a dry run's quantized best serves a simulated checkpoint, and the run's end says so
    assert dep.caveat is not None and f"note: simulated result; {dep.caveat}" in out
    called = run_bash([str(script)], fake_bin, tmp_path)
    assert called["argv"] == ["serve", *launcher_command(dep.recipe)[0]]
    notes = (dep.run_dir / "deploy.md").read_text()
    assert dep.recipe.id in notes and "--as k8s" in notes and "Simulated run" in notes


def test_deploy_md_says_what_it_serves_and_what_to_watch(tmp_path: Path) -> None:
    quantized = Recipe(model=MODEL_1B, quant={"method": "awq", "checkpoint": "acme/1B-AWQ"})
    run = make_run(tmp_path / ".forge", [rec(0, quantized, kept=True, accuracy=0.995)],
                   settings={"dry_run": False, "device": "cpu"})
    notes = export.render_deploy_md(export.load(run))
    assert "from the checkpoint acme/1B-AWQ, served as `meta-llama/Llama-3.2-1B-Instruct`" in notes
    assert "accuracy 0.995" in notes and "1000.0 output tokens/s" in notes
    assert "measured vLLM on cpu" in notes and "Simulated" not in notes
    never = export.render_deploy_md(deployment(BASELINE, tmp_path))
    assert "never measured" in never and "measured vLLM on" not in never


def _dry_run_recipes() -> dict[str, Recipe]:
    """A dry run's best recipes on a simulated H100: layer-2 candidates as the simulator
    offers them (engine/sim/layer2.py), fp8 applied while loading, a user's own
    checkpoint, and a by-name method from a run recorded before candidates existed."""
    from aevyra_forge.engine.sim import layer2 as sim_layer2
    from aevyra_forge.space.gpu_catalogue import gpu_spec
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.model_profile import profile
    space = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)
    sim_layer2.offer(MODEL_8B, space, lambda _: None)
    base = space.baseline(MODEL_8B)
    return {
        "hub": space.apply(base, {"quant_candidate":
                                  "hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"}),
        "rtn": space.apply(base, {"quant_candidate": "rtn-w8a8"}),
        "cal": space.apply(base, {"quant_candidate": "cal-w4a16-awq"}),
        "fp8": space.apply(base, {"quant_method": "fp8"}),
        "own": Recipe(model=MODEL_8B, quant={"method": "awq", "checkpoint": "acme/8B-AWQ"}),
        "old": Recipe(model=MODEL_8B, quant={"method": "awq"}),
    }


@pytest.mark.parametrize(("kind", "serves", "caveat"), [
    ("hub", "RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8", "simulated Hub answer"),
    ("rtn", "simulated-quant/rtn-w8a8", "layer 2's rtn-w8a8, which the dry run only simulated"),
    ("cal", "simulated-quant/cal-w4a16-awq", "run this tune without --dry-run on the target"),
    ("fp8", MODEL_8B, None),
    ("own", "acme/8B-AWQ", None),
    ("old", MODEL_8B, "needs a awq checkpoint of meta-llama/Llama-3.1-8B-Instruct"),
])
def test_a_dry_runs_simulated_checkpoint_is_said_before_deploying(
        tmp_path: Path, kind: str, serves: str, caveat: str | None) -> None:
    """The deploy line serves what the dry run's best recipe serves (a Hub candidate's
    repo, the folder of one forge writes, never a method vLLM would have to be told by
    name), and deploy.md and the report say what was only simulated; a real run's
    recipe, fp8 applied while loading and a user's own checkpoint need no word."""
    from aevyra_forge.report.markdown import render_md
    from aevyra_forge.report.model import build_report
    recipe = _dry_run_recipes()[kind]
    for dry_run in (True, False):
        run = make_run(tmp_path / str(dry_run) / ".forge", [rec(0, recipe, kept=True)],
                       settings={"dry_run": dry_run})
        dep = export.load(run)
        argv, _ = dep.command()
        assert argv[0] == serves
        assert ("--quantization" in argv) == (kind in ("fp8", "old"))  # old: the caveat
        said = dep.caveat if dry_run else None
        assert (said is None) == (caveat is None or not dry_run), said
        assert caveat is None or not dry_run or caveat in str(said)
        notes = export.render_deploy_md(dep)
        report = build_report(run)
        assert report.best is not None and report.best.deploy_caveat == said
        if said is not None:
            assert f"Before deploying: {said}." in notes
            assert f"Before deploying: {said}" in " ".join(render_md(report).split())
        else:
            assert "Before deploying" not in notes and "Before deploying" not in render_md(
                report)
