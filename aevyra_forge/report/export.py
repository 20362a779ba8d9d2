"""Deploy exports: the recipe a run chose, as a shell line, deploy.sh, a `docker run`, a
compose service, a Kubernetes Deployment + Service, or values for vLLM's production-stack
Helm chart. Every format takes its argv and environment from space.rendering.serve_argv,
the function the launcher boots with, so a deployment runs exactly what was measured."""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import ExperimentRecord, best_record
from aevyra_forge.engine.launcher import BOOT_TIMEOUT_S, DEFAULT_ENV
from aevyra_forge.engine.sim.layer2 import deploy_caveat
from aevyra_forge.space.rendering import serve_argv
from aevyra_forge.store.run_store import read_config, read_records, resolve_run_dir

Format = Literal["cmd", "docker", "compose", "k8s", "helm-values"]
FORMATS: tuple[Format, ...] = get_args(Format)
HOST = "0.0.0.0"  # a deployment answers other machines; the tuner listened on 127.0.0.1
PORT = 8000  # vLLM's own default port
IMAGE = "vllm/vllm-openai"  # its entrypoint is `vllm serve`: the argv follows the image
HEALTH_PATH = "/health"
PROBE_PERIOD_S = 10
HF_CACHE = "~/.cache/huggingface:/root/.cache/huggingface"  # weights survive a restart
HF_SECRET = "hf-token"  # an optional Kubernetes Secret (key `token`) for gated models
_DNS_LABEL_MAX = 63  # characters in a Kubernetes object name (RFC 1035 label)


@dataclass(frozen=True)
class Deployment:
    """What to deploy: a recipe of one run, the record that measured it (None when it never
    was), and the vLLM version the run used when the run recorded it."""

    recipe: Recipe
    record: ExperimentRecord | None
    run_dir: Path
    vllm_version: str | None = None
    dry_run: bool = False
    device: str = "cuda"

    def command(self, host: str = HOST) -> tuple[list[str], dict[str, str]]:
        """argv after `vllm serve` and the environment, as the launcher composes them
        (its fixed variables under the recipe's), listening on `host`:PORT."""
        argv, env = serve_argv(self.recipe, host, PORT)
        return argv, dict(sorted({**DEFAULT_ENV, **env}.items()))

    @property
    def caveat(self) -> str | None:
        """What deploying needs first where a dry run only simulated what the recipe
        serves (a checkpoint forge writes, a simulated Hub repo); None: it deploys as is."""
        return deploy_caveat(self.recipe) if self.dry_run else None

    @property
    def image(self) -> str:
        tag = "latest" if self.vllm_version is None else "v" + self.vllm_version.split("+")[0]
        return f"{IMAGE}:{tag}"

    @property
    def gpus(self) -> int:
        """GPUs one server needs: tensor x pipeline parallel size (1 when unset)."""
        count = 1
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = self.recipe.config.get(key)
            if isinstance(value, int | str) and str(value).isdigit():
                count *= max(int(value), 1)
        return count

    @property
    def name(self) -> str:
        """A Kubernetes object name for the served model: `vllm-` and its slug."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.recipe.model.rsplit("/", 1)[-1].lower())
        return f"vllm-{slug}"[:_DNS_LABEL_MAX].strip("-") or "vllm"


def load(run_dir: Path, recipe_id: str | None = None) -> Deployment:
    """The best recipe of a run (core.values.best_record), or the recorded recipe
    `recipe_id` names. `run_dir` is a store root (its latest run) or one run's folder."""
    path = resolve_run_dir(run_dir)
    records = read_records(path)
    if recipe_id is not None:
        record = next((r for r in reversed(records) if r.recipe_id == recipe_id), None)
        if record is None:
            known = ", ".join(dict.fromkeys(r.recipe_id for r in records)) or "none"
            raise UsageError(f"--recipe {recipe_id}: no such recipe in {path}; known ids: "
                             f"{known}")
        measured = record if record.metrics is not None else None
        return for_recipe(path, Recipe.model_validate(record.recipe), measured)
    best = best_record(records)
    if best is None:
        why = f" ({records[0].status}: {records[0].reason[:80]})" if records else ""
        raise UsageError(f"{path}: no configuration was measured{why}, so there is nothing "
                         "to deploy; fix the baseline and run again, or pass --recipe ID")
    return for_recipe(path, Recipe.model_validate(best.recipe), best)


def for_recipe(run_dir: Path, recipe: Recipe, record: ExperimentRecord | None) -> Deployment:
    """`recipe` of the run in `run_dir`, with what its config.json says about the run. The
    image tag follows a `vllm_version` key there; runs that lack one get `latest`."""
    config = read_config(run_dir)
    settings = config.get("settings")
    settings = settings if isinstance(settings, dict) else {}
    version = config.get("vllm_version")
    return Deployment(recipe, record, Path(run_dir),
                      vllm_version=version if isinstance(version, str) else None,
                      dry_run=bool(settings.get("dry_run")),
                      device=str(settings.get("device") or "cuda"))


def check_format(fmt: str) -> Format:
    for known in FORMATS:
        if fmt == known:
            return known
    raise UsageError(f"--as {fmt}: expected one of {', '.join(FORMATS)}")


def export(dep: Deployment, fmt: str) -> str:
    """The deployment in one of FORMATS."""
    renderers: dict[Format, Callable[[Deployment], str]] = {
        "cmd": render_cmd, "docker": render_docker, "compose": render_compose,
        "k8s": render_k8s, "helm-values": render_helm_values}
    return renderers[check_format(fmt)](dep)


# -- shell ------------------------------------------------------------------------------


def render_cmd(dep: Deployment) -> str:
    """One shell line: the environment as a prefix, every value quoted."""
    argv, env = dep.command()
    prefix = [f"{key}={shlex.quote(value)}" for key, value in env.items()]
    return " ".join([*prefix, shlex.join(["vllm", "serve", *argv])]) + "\n"


def render_deploy_sh(dep: Deployment) -> str:
    """An executable script that serves the recipe; nothing in it is left to the shell."""
    argv, env = dep.command()
    lines = ["#!/usr/bin/env bash",
             f"# Serves recipe {dep.recipe.id} of {dep.run_dir.name} ({dep.recipe.model}) on "
             f"port {PORT}; written by aevyra-forge.",
             "set -euo pipefail",
             *(f"export {key}={shlex.quote(value)}" for key, value in env.items())]
    groups = [" ".join(map(shlex.quote, group)) for group in _option_groups(argv)]
    lines.append(" \\\n    ".join([shlex.join(["exec", "vllm", "serve"]), *groups]))
    return "\n".join(lines) + "\n"


def render_docker(dep: Deployment) -> str:
    argv, env = dep.command()
    parts = ["docker", "run", "--rm", "--gpus", "all", "--ipc=host",
             "-p", f"{PORT}:{PORT}", "-e", "HF_TOKEN"]
    for key, value in env.items():
        parts += ["-e", f"{key}={value}"]
    quoted = " ".join(map(shlex.quote, parts))
    # The cache path stays unquoted so that the shell expands its `~`.
    return f"{quoted} -v {HF_CACHE} {shlex.join([dep.image, *argv])}\n"


def _option_groups(argv: Sequence[str]) -> list[list[str]]:
    """The model, then each `--flag` with its values. No value starts with `--`: the
    recipe refuses text with a leading dash."""
    groups: list[list[str]] = []
    for arg in argv:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


# -- containers -------------------------------------------------------------------------


def _dollars(text: str) -> str:
    """`$` doubled: compose interpolates `$VAR` and Kubernetes expands `$(VAR)` in
    command, args and env values; `$$` is a literal `$` in both."""
    return text.replace("$", "$$")


class _Dumper(yaml.SafeDumper):
    """Writes a value shared by two keys twice: no `&id001` anchors in a manifest."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=1000)


def render_compose(dep: Deployment) -> str:
    argv, env = dep.command()
    probe = (f"import urllib.request; urllib.request.urlopen("
             f"'http://127.0.0.1:{PORT}{HEALTH_PATH}', timeout=5)")
    service = {
        "image": dep.image,
        "command": [_dollars(arg) for arg in argv],
        "environment": {**{k: _dollars(v) for k, v in env.items()},
                        "HF_TOKEN": "${HF_TOKEN:-}"},  # from the host, never written here
        "ports": [f"{PORT}:{PORT}"],
        "ipc": "host",
        "volumes": [HF_CACHE],
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": dep.gpus, "capabilities": ["gpu"]}]}}},
        "healthcheck": {"test": ["CMD", "python3", "-c", probe], "interval": "30s",
                        "timeout": "10s", "retries": 3,
                        "start_period": f"{BOOT_TIMEOUT_S:.0f}s"},
    }
    return _header(dep) + _yaml({"services": {dep.name: service}})


def render_k8s(dep: Deployment) -> str:
    """A Deployment and a ClusterIP Service; `kubectl apply -f` takes both."""
    argv, env = dep.command()
    labels = {"app": dep.name}

    def probe(period_s: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": HEALTH_PATH, "port": "http"},
                "periodSeconds": period_s, "failureThreshold": failures}

    gpus = {"nvidia.com/gpu": dep.gpus}
    container = {
        "name": "vllm",
        "image": dep.image,
        "args": [_dollars(arg) for arg in argv],
        "env": [*({"name": k, "value": _dollars(v)} for k, v in env.items()),
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                    "name": HF_SECRET, "key": "token", "optional": True}}}],
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": {"limits": gpus, "requests": gpus},
        # the first boot compiles: the startup probe allows as long as the tuner did
        "startupProbe": probe(PROBE_PERIOD_S, math.ceil(BOOT_TIMEOUT_S / PROBE_PERIOD_S)),
        "readinessProbe": probe(5, 3),
        "livenessProbe": probe(PROBE_PERIOD_S, 3),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": dep.name, "labels": labels,
                     "annotations": {"aevyra-forge/recipe-id": dep.recipe.id,
                                     "aevyra-forge/served-model-name": dep.recipe.model}},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "containers": [container],
                     # tensor parallel workers share memory through /dev/shm
                     "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": dep.name, "labels": labels},
        "spec": {"selector": labels, "ports": [
            {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    return _header(dep) + _yaml(deployment) + "---\n" + _yaml(service)


# The production-stack chart (vllm-project/production-stack, helm/) renders
# `vllm serve <modelURL> --host 0.0.0.0 --port <containerPort>`, then these vllmConfig
# fields, then vllmConfig.extraArgs; whatever has no field here goes to extraArgs.
_HELM_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--max-model-len": ("maxModelLen", int),
    "--dtype": ("dtype", str),
    "--tensor-parallel-size": ("tensorParallelSize", int),
    "--max-num-seqs": ("maxNumSeqs", int),
    "--gpu-memory-utilization": ("gpuMemoryUtilization", float),
}
_HELM_SWITCHES = {"--enable-prefix-caching": "enablePrefixCaching",
                  "--enable-chunked-prefill": "enableChunkedPrefill"}


def render_helm_values(dep: Deployment) -> str:
    """values.yaml for the production-stack chart: one modelSpec entry."""
    argv, env = dep.command()
    model, *options = _option_groups(argv)
    # The chart passes --no-enable-prefix-caching unless told otherwise; vLLM's own
    # default (what the tuner measured when the recipe is silent) is on.
    config: dict[str, Any] = {"enablePrefixCaching": True}
    extra: list[str] = []
    for flag, *values in options:
        if flag in ("--host", "--port"):
            continue  # the chart sets both: 0.0.0.0 and containerPort
        switch = flag.replace("--no-", "--", 1)
        if switch in _HELM_SWITCHES and not values:
            config[_HELM_SWITCHES[switch]] = flag == switch
        elif flag in _HELM_FIELDS and len(values) == 1 and _converts(flag, values[0]):
            key, kind = _HELM_FIELDS[flag]
            config[key] = kind(_dollars(values[0]))
        else:
            extra += [flag, *values]
    config["extraArgs"] = [_dollars(arg) for arg in extra]
    spec = {
        "name": dep.name, "repository": IMAGE, "tag": dep.image.rsplit(":", 1)[1],
        "modelURL": _dollars(model[0]), "replicaCount": 1,
        "requestCPU": 4, "requestMemory": "16Gi", "requestGPU": dep.gpus,
        "vllmConfig": config,
        "env": [{"name": k, "value": _dollars(v)} for k, v in env.items()],
    }
    probe = {"initialDelaySeconds": 15, "periodSeconds": PROBE_PERIOD_S,
             "failureThreshold": math.ceil(BOOT_TIMEOUT_S / PROBE_PERIOD_S),
             "httpGet": {"path": HEALTH_PATH, "port": PORT}}
    engine = {"containerPort": PORT, "startupProbe": probe, "modelSpec": [spec]}
    return _header(dep) + _yaml({"servingEngineSpec": engine})


def _converts(flag: str, value: str) -> bool:
    try:
        _HELM_FIELDS[flag][1](value)
    except ValueError:
        return False
    return True


def _header(dep: Deployment) -> str:
    return (f"# recipe {dep.recipe.id} of {dep.run_dir.name}, served as "
            f"{dep.recipe.model!r} on port {PORT}; written by aevyra-forge\n")


def render_deploy_md(dep: Deployment) -> str:
    """deploy.md: what deploy.sh serves, how it measured, and how to run each export."""
    recipe, rec = dep.recipe, dep.record
    source = (f" from the checkpoint {recipe.serve_model}" if recipe.quant.checkpoint
              else "")
    lines = [f"# Deploy recipe {recipe.id}", "",
             f"Run `{dep.run_dir.name}` chose recipe {recipe.id} (generation "
             f"{recipe.generation}): {recipe.model}{source}, served as `{recipe.model}` on "
             f"port {PORT}.", ""]
    if rec is not None and rec.metrics is not None:
        accuracy = f", accuracy {rec.accuracy:.3f}" if rec.accuracy is not None else ""
        lines.append(f"Measured in experiment {rec.exp}: {rec.metrics.output_throughput:.1f} "
                     f"output tokens/s, p99 end-to-end latency {rec.metrics.e2e_ms.p99:.0f} "
                     f"ms, score {rec.score or 0:.3f}{accuracy}.")
    else:
        lines.append("This recipe was never measured: no configuration could be; fix the "
                     "baseline (see the run's logs/) before deploying it.")
    if dep.dry_run:
        lines.append("Simulated run (--dry-run): the figures come from the simulator, not "
                     "a GPU; measure on the target before relying on them.")
    if dep.caveat:
        lines.append(f"Before deploying: {dep.caveat}.")
    if dep.device != "cuda":
        lines.append(f"The run measured vLLM on {dep.device}; the container exports name the "
                     f"NVIDIA image {IMAGE} and `nvidia.com/gpu`: swap in your platform's "
                     "vLLM image and device resource.")
    run = shlex.quote(str(dep.run_dir))
    lines += ["", "## Run it here", "", "`bash deploy.sh`, which runs:", "", "```bash",
              render_cmd(dep).rstrip("\n"), "```", "",
              f"Check it with `curl http://localhost:{PORT}{HEALTH_PATH}` and "
              f"`curl http://localhost:{PORT}/v1/models`. Gated models need `HF_TOKEN` in "
              "the environment.", "", "## Containers and clusters", "",
              "```bash",
              f"aevyra-forge export {run} --as docker       # a docker run line ({dep.image})",
              f"aevyra-forge export {run} --as compose > compose.yaml && "
              "docker compose up -d",
              f"aevyra-forge export {run} --as k8s > vllm.yaml && kubectl apply -f vllm.yaml",
              f"aevyra-forge export {run} --as helm-values > values.yaml && "
              "helm install vllm vllm/vllm-stack -f values.yaml",
              "```", "",
              f"The Kubernetes manifest requests {dep.gpus} `nvidia.com/gpu` and reads "
              f"`HF_TOKEN` from the optional Secret `{HF_SECRET}` (key `token`); the Helm "
              "values follow the vLLM production-stack chart "
              "(`helm repo add vllm https://vllm-project.github.io/production-stack`).",
              ""]
    return "\n".join(lines)
