"""The notebooks under notebooks/ run: each is executed by a real Jupyter kernel (nbclient),
started in notebooks/ as Jupyter starts it for a reader, with no cell raising and its
charts drawn; the run explorer reads a fresh dry run named by FORGE_RUN."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from tests.conftest import MODEL_8B, ROOT, SAMPLE_WORKLOAD, run_cli

NOTEBOOKS = ROOT / "notebooks"
KERNEL_TIMEOUT_S = 300  # per cell; a hung kernel fails the test instead of hanging CI
PNG_MAGIC = b"\x89PNG"


def execute(name: str) -> NotebookNode:
    """The notebook after a kernel ran every cell; a cell that raises fails the test with
    its traceback (nbclient's CellExecutionError)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=KERNEL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def outputs(notebook: NotebookNode) -> tuple[str, list[bytes]]:
    """Every cell's printed text, and the PNG images the cells displayed."""
    text, images = [], []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            if out["output_type"] == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            if "text/plain" in data:
                text.append(data["text/plain"])
            if "image/png" in data:
                images.append(base64.b64decode(data["image/png"]))
    return "".join(text), images


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["explore_run.ipynb",
                                                                 "quickstart.ipynb"]


def test_quickstart_tunes_and_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_WORKLOAD", raising=False)  # its default: the sample workload
    text, images = outputs(execute("quickstart.ipynb"))
    # the builtin strategy stops once no move is worth a boot: 12 at most, a few at least
    found = re.search(r"(\d+) experiments in 001_", text)
    assert found is not None and 3 <= int(found[1]) <= 12, text[:300]
    assert "Deploy recipe " in text
    served = re.search(r"vllm serve (\S+) .*--served-model-name (\S+)", text)
    assert served is not None and served[2] == MODEL_8B, text
    # the model, or a checkpoint layer 2 offers in a dry run as in a real one (on the
    # simulated A100: no method vLLM would have to be told by name)
    space = KnobSpace(gpu_spec("A100-80GB").hardware(), profile(MODEL_8B), simulated=True)
    sim_layer2.offer(MODEL_8B, space, lambda _: None)
    assert served[1] in {MODEL_8B, *(c.checkpoint for c in space.quant_candidates)}
    assert "--quantization" not in served[0]
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC)


def test_the_explorer_reads_the_run_named_by_forge_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / ".forge"
    code, _, err = run_cli(["tune", "--dry-run", "--model", MODEL_8B, "--workload",
                            str(SAMPLE_WORKLOAD), "--llm", "builtin", "--max-experiments", "6",
                            "--run-dir", str(store)], capsys)
    assert code == 0, err
    monkeypatch.setenv("FORGE_RUN", str(store))
    text, images = outputs(execute("explore_run.ipynb"))
    run = next((store / "runs").glob("001_*"))
    assert f"{run}: {MODEL_8B} on " in text
    assert "6 experiments (finished: " in text
    assert "\n  5 L" in text  # the last experiment's row of the table
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC)
