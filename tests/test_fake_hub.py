"""The fake Hub (tests/fake_hub.py) answers huggingface_hub's own downloads as the real Hub
does: snapshot_download (what vLLM calls) resolves the revision, lists the tree, fetches
git files from /resolve and LFS weights through the redirect to the CDN, and the errors
come back as huggingface_hub's own exception classes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RevisionNotFoundError,
)

from tests.fake_hub import FakeHub, FakeRepo, git_blob_id, online, safetensors_parameters


def _safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = {"BF16": 2, "I8": 1}[dtype] * int.__mul__(*shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\1" * offset


WEIGHTS = _safetensors({"a.weight": ("I8", [4, 8]), "b.weight": ("BF16", [2, 3])})
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS,
         "sub/extra.json": b"{}"}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    online(monkeypatch, tmp_path)
    folder = tmp_path / "repo"
    for name, body in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
    repos = {"org/m": FakeRepo.from_dir(folder),
             "org/gated": FakeRepo(dict(FILES), gated=True)}
    with FakeHub(repos) as server:
        yield server


def test_snapshot_download_fetches_git_files_and_lfs_weights_through_the_cdn(
        hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.repos["org/m"].sha
    folder = Path(snapshot_download("org/m", endpoint=hub.url, cache_dir=tmp_path / "c"))
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()} == FILES
    assert folder.name == sha
    assert hub.unexpected == []
    calls = [(r.method, r.path) for r in hub.requests]
    assert calls[:2] == [("GET", "/api/models/org/m/revision/main"),
                         ("GET", f"/api/models/org/m/tree/{sha}")]
    assert dict(hub.requests[1].query) == {"recursive": ("true",), "expand": ("false",)}
    resolve = f"/org/m/resolve/{sha}/"
    assert sorted(calls[2:]) == sorted(
        [("HEAD", resolve + name) for name in FILES]
        + [("GET", resolve + "config.json"), ("GET", resolve + "sub/extra.json"),
           ("GET", hub.lfs_url("org/m", "model.safetensors"))])
    assert hub.lfs_url("org/m", "model.safetensors") == (
        f"/lfs/{hashlib.sha256(WEIGHTS).hexdigest()}")


def test_the_tree_lists_as_the_hub_does(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    entries = {e.path: e for e in api.list_repo_tree("org/m", recursive=True)}
    assert set(entries) == {"config.json", "model.safetensors", "sub", "sub/extra.json"}
    weights = entries["model.safetensors"]
    assert weights.blob_id == git_blob_id(WEIGHTS)  # type: ignore[union-attr]
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(  # type: ignore[union-attr]
        WEIGHTS).hexdigest()
    assert entries["config.json"].lfs is None  # type: ignore[union-attr]
    top = [e.path for e in api.list_repo_tree("org/m")]
    assert top == ["sub", "config.json", "model.safetensors"]
    assert [e.path for e in api.list_repo_tree("org/m", path_in_repo="sub")] == [
        "sub/extra.json"]
    assert api.list_repo_files("org/m") == sorted(FILES)
    assert hub.unexpected == []


def test_errors_are_the_hubs(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/m", "missing.json", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=hub.url).model_info("org/m", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/m", "config.json", revision="v9", endpoint=hub.url,
                        cache_dir=tmp_path)
    with pytest.raises(GatedRepoError):
        list(HfApi(endpoint=hub.url).list_repo_tree("org/gated"))
    with pytest.raises(EntryNotFoundError):
        list(HfApi(endpoint=hub.url).list_repo_tree("org/m", path_in_repo="nope"))
    assert hub.unexpected == []


def test_parameter_counts_come_from_the_safetensors_header(hub: FakeHub) -> None:
    assert safetensors_parameters(WEIGHTS) == {"I8": 32, "BF16": 6}
    assert hub.repos["org/m"].safetensors == {"I8": 32, "BF16": 6}
    info = HfApi(endpoint=hub.url).model_info("org/m", expand=["safetensors"])
    assert info.safetensors is not None and info.safetensors.total == 38
