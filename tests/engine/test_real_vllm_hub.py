"""Real vLLM (the CPU build) and a pre-quantized sibling on the project's fake Hub
(tests/fake_hub.py, serving real model files as the real Hub does): `aevyra-forge tune
--model <hub id>` with HF_ENDPOINT pointed at it finds the W8A8 sibling by its
`base_model:quantized:` tag, offers it as `hub:<repo>`, and real vLLM downloads both the
base model and the sibling through HF_ENDPOINT and serves them; the sibling's record has
its throughput and its accuracy against the baseline.

Run with `pytest -m engine` under the engine lock (CONTRIBUTING.md); each boot takes
30-90 s on two cores, plus the quantization (~10 s) and the downloads (a few MB)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aevyra_forge.engine.prepare import SCRIPT
from tests.conftest import TRAINED_TINY
from tests.fake_hub import FakeHub, FakeRepo

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
# no size in the name: forge reads the shape of a Hub id it does not know from the Hub
BASE = "forge-test/tiny-llama"
SIBLING = f"{BASE}-W8A8"
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def folders(vllm_bin: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama (the shipped trained one, whose accuracy figures mean something,
    else the random one written here) and its round-to-nearest W8A8 copy, written by
    vLLM's environment (it has torch and compressed-tensors) with forge's own script."""
    python = Path(vllm_bin).with_name("python")
    root = tmp_path_factory.mktemp("hub-files")
    base, quantized = root / "base", root / "w8a8"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if (TRAINED_TINY / "config.json").is_file():
        shutil.copytree(TRAINED_TINY, base)
    else:
        subprocess.run([str(python), "-m", "aevyra_forge.testing.tinymodel", str(base)],
                       check=True, env=env, capture_output=True)
    FIGURES["base"] = "trained" if (TRAINED_TINY / "config.json").is_file() else "random"
    subprocess.run([str(python), str(SCRIPT), str(base), str(quantized), "--scheme", "W8A8"],
                   check=True, env=env, capture_output=True)
    return base, quantized


@pytest.fixture
def hub(folders: tuple[Path, Path]) -> Iterator[FakeHub]:
    base, quantized = folders
    tags = ("safetensors", "llama", f"base_model:{BASE}", f"base_model:quantized:{BASE}",
            "compressed-tensors")
    repos = {BASE: FakeRepo.from_dir(base, downloads=1000, tags=("safetensors", "llama")),
             SIBLING: FakeRepo.from_dir(quantized, downloads=40, tags=tags)}
    with FakeHub(repos) as server:
        yield server


@pytest.fixture
def workload(tmp_path: Path) -> Path:
    lines = [{"prompt": f"Story {i}: once upon a time " * 3, "expected_output_tokens": 24}
             for i in range(8)]
    path = tmp_path / "workload.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _downloaded(hub: FakeHub, repo: str) -> None:
    """`repo`'s config.json was fetched from /resolve (for the base, by forge itself first:
    its name names no size, so forge reads its shape from the Hub), and its weights were
    downloaded once, by forge's prepare phase into the cache vLLM then reads: HEAD on
    /resolve, answered with the redirect, then one GET on the CDN."""
    sha = hub.repos[repo].sha
    configs = {f"/{repo}/resolve/{rev}/config.json" for rev in ("main", sha)}
    assert configs & set(hub.paths("HEAD")) and configs & set(hub.paths("GET"))
    assert f"/{repo}/resolve/{sha}/model.safetensors" in hub.paths("HEAD")
    assert hub.paths("GET").count(hub.lfs_url(repo, "model.safetensors")) == 1


def test_tune_finds_downloads_and_serves_the_hub_sibling(
        vllm_bin: str, hub: FakeHub, workload: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / ".forge"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), COLUMNS="200",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("HF_HUB_CACHE", None)  # under HF_HOME
    proc = subprocess.run(
        [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model", BASE,
         "--workload", str(workload), "--llm", "builtin", "--start-layer", "2",
         "--skip-kernel", "--max-experiments", "3", "--concurrency", "4", "--repeats", "3",
         "--run-dir", str(run_dir), "--vllm-bin", vllm_bin],
        capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert hub.unexpected == []
    assert f"Hub siblings of {BASE}: {SIBLING} (w8a8_int8, 8-bit" in out, out[-3000:]
    assert f"hub:{SIBLING}" in out

    (run,) = sorted((run_dir / "runs").glob("0*"))
    lookup = json.loads((run / "hub.json").read_text())
    assert [s["repo"] for s in lookup["siblings"]] == [SIBLING]
    assert lookup["endpoint"] == hub.url
    records = [json.loads(x) for x in (run / "experiments.jsonl").read_text().splitlines()]
    base = records[0]
    assert base["status"] == "ok" and base["recipe"]["model"] == BASE
    assert base["prepare_s"] is not None  # the model's download, before the baseline boot
    assert f"exp 0: prepare model: downloading {BASE} from {hub.url}" in out
    tried = [r for r in records
             if (r["proposal"] or {}).get("changes") == {"quant_candidate": f"hub:{SIBLING}"}]
    assert len(tried) == 1, [(r["exp"], r["proposal"]) for r in records]
    sibling = tried[0]
    assert sibling["recipe"]["quant"]["checkpoint"] == SIBLING
    assert sibling["status"] == "ok", sibling["reason"]
    assert sibling["metrics"]["output_throughput"] > 0
    assert sibling["accuracy"] is not None and 0.0 <= sibling["accuracy"] <= 1.0
    assert sibling["decision"]
    log = (run / sibling["log"]).read_text(errors="replace")
    assert "compressed-tensors" in log  # vLLM read the method from the downloaded config
    # forge downloaded it in the prepare phase (its time is prepare_s, not boot_s), and
    # vLLM found it in the cache: the weights were fetched from the CDN once
    assert sibling["prepare_s"] is not None and sibling["prepare_s"] > 0
    assert f"prepare hub:{SIBLING}: downloading {SIBLING} from {hub.url}" in out
    prepared = (run / "logs" / f"exp_{sibling['exp']:03d}.prepare.log").read_text()
    assert f"downloaded {SIBLING}: " in prepared

    _downloaded(hub, BASE)
    _downloaded(hub, SIBLING)
    # what forge downloaded into HF_HOME, and vLLM served, is the sibling's
    cache = tmp_path / "hf" / "hub" / f"models--{SIBLING.replace('/', '--')}"
    snapshot = cache / "snapshots" / hub.repos[SIBLING].sha
    assert (snapshot / "config.json").read_bytes() == hub.repos[SIBLING].files["config.json"]
    weights = snapshot / "model.safetensors"
    assert (hashlib.sha256(weights.read_bytes()).hexdigest()
            == hashlib.sha256(hub.repos[SIBLING].files["model.safetensors"]).hexdigest())
    left = subprocess.run(["pgrep", "-r", "R,S,D", "-f", f"serve {BASE}"],
                          capture_output=True, text=True)
    assert left.stdout.strip() == "", "a vLLM process outlived the tune"
    FIGURES["hub_sibling"] = {
        "rows": [(r["exp"], (r["proposal"] or {}).get("changes"), r["status"],
                  round(r["metrics"]["output_throughput"], 1) if r["metrics"] else None,
                  r["accuracy"], r["logprob_shift"], r["prepare_s"], r["boot_s"], r["kept"],
                  r["decision"])
                 for r in records],
        "hub_requests": len(hub.requests)}
