"""A fake Hugging Face Hub on 127.0.0.1 for the Hub-lookup tests (and, serving real model
files, for vLLM downloading a quantized sibling through HF_ENDPOINT): the REST routes
huggingface_hub 2.x uses, answered as the real Hub answers them.

- `GET /api/models?filter=..&search=..&author=..&sort=downloads&limit=N&expand=..`
  (repeated `filter` means AND; only the expanded fields come back, with `id`),
- `GET /api/models/{repo}[/revision/{rev}]` (model_info, with `siblings`),
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (`ETag`, `X-Repo-Commit`, `Content-Length`).

Gated repos answer 401 with `X-Error-Code: GatedRepo` to a request without the right
token, private ones 401 `RepoNotFound` (the real Hub hides them). Every request is
recorded; one it does not know (path or query parameter) is answered 400 and kept in
`unexpected`, so tests assert the exact requests the client sends."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LIST_PARAMS = {"filter", "search", "author", "sort", "limit", "expand"}
INFO_PARAMS = {"expand", "blobs"}


@dataclass
class FakeRepo:
    """One model repository: its files, and what the Hub knows about it."""

    files: dict[str, bytes]
    downloads: int = 0
    tags: tuple[str, ...] = ()
    gated: bool = False
    private: bool = False
    # parameter count per safetensors dtype, as the Hub reports it (None: no safetensors)
    safetensors: dict[str, int] | None = None
    sha: str = ""

    def __post_init__(self) -> None:
        if not self.sha:  # a stable fake commit id: the hash of the files
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.sha = digest.hexdigest()

    @classmethod
    def from_dir(cls, folder: Path, **kw: Any) -> FakeRepo:
        """A repo serving every file of a local model folder."""
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files=files, **kw)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, tuple[str, ...]]
    authorized: bool  # it carried the fake's token


@dataclass
class FakeHub:
    """`with FakeHub({"org/name": FakeRepo(...)}) as hub: hub.url`."""

    repos: dict[str, FakeRepo]
    token: str | None = None  # the one token that opens gated and private repos
    requests: list[Request] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    # -- answers -----------------------------------------------------------------------
    def visible(self, repo: FakeRepo, authorized: bool) -> bool:
        return not repo.private or authorized

    def card(self, repo_id: str, repo: FakeRepo, expand: list[str] | None) -> dict[str, Any]:
        full: dict[str, Any] = {
            "_id": repo.sha[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": repo.sha, "downloads": repo.downloads, "tags": list(repo.tags),
            "gated": "manual" if repo.gated else False, "private": repo.private,
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        }
        if repo.safetensors is not None:
            full["safetensors"] = {"parameters": dict(repo.safetensors),
                                   "total": sum(repo.safetensors.values())}
        if expand is None:
            return full
        return {k: v for k, v in full.items() if k in ("_id", "id", *expand)}

    def list_models(self, query: Mapping[str, list[str]], authorized: bool
                    ) -> list[dict[str, Any]]:
        filters, search = query.get("filter", []), query.get("search", [""])[0].lower()
        author = query.get("author", [None])[0]
        found = [(rid, r) for rid, r in self.repos.items()
                 if self.visible(r, authorized) and all(f in r.tags for f in filters)
                 and search in rid.lower()
                 and (author is None or rid.split("/")[0] == author)]
        if query.get("sort") == ["downloads"]:
            found.sort(key=lambda item: -item[1].downloads)
        limit = int(query.get("limit", ["1000"])[0])
        return [self.card(rid, r, query.get("expand")) for rid, r in found[:limit]]


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def _answer(self, method: str) -> None:
        hub = self.owner
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        token = self.headers.get("Authorization", "")
        authorized = hub.token is not None and token == f"Bearer {hub.token}"
        hub.requests.append(Request(method, path, {k: tuple(v) for k, v in query.items()},
                                    authorized))
        if method == "GET" and path == "/api/models":
            if set(query) - LIST_PARAMS:
                return self._refuse(f"unknown list parameters {sorted(set(query) - LIST_PARAMS)}")
            return self._json(200, hub.list_models(query, authorized))
        if method == "GET" and path.startswith("/api/models/"):
            if set(query) - INFO_PARAMS:
                return self._refuse(f"unknown info parameters {sorted(set(query) - INFO_PARAMS)}")
            repo_id = "/".join(path.split("/")[3:5])
            repo = hub.repos.get(repo_id)
            if repo is None or not hub.visible(repo, authorized):
                return self._error(401, "RepoNotFound", "Repository not found")
            return self._json(200, hub.card(repo_id, repo, query.get("expand")))
        segments = path.strip("/").split("/")
        if len(segments) >= 5 and segments[2] == "resolve":
            return self._file(method, "/".join(segments[:2]), "/".join(segments[4:]),
                              authorized)
        return self._refuse(f"unknown route {method} {path}")

    def _file(self, method: str, repo_id: str, name: str, authorized: bool) -> None:
        repo = self.owner.repos.get(repo_id)
        if repo is None or not self.owner.visible(repo, authorized):
            return self._error(401, "RepoNotFound", "Repository not found", method)
        if repo.gated and not authorized:
            return self._error(401, "GatedRepo", "Access to this model is restricted",
                               method)
        body = repo.files.get(name)
        if body is None:
            return self._error(404, "EntryNotFound", "Entry not found", method)
        self.send_response(200)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, method: str = "GET") -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def _refuse(self, why: str) -> None:
        self.owner.unexpected.append(why)
        self._error(400, "BadRequest", why)


def quantization_config(scheme: str = "W8A8") -> dict[str, Any]:
    """A compressed-tensors quantization_config as the fast path writes it (the shape
    llm-compressor writes too), for configs served without real weights."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "channel", "group_size": None}
    weights, activations, fmt = dict(int8), None, "int-quantized"
    if scheme == "W8A8":
        activations = {**int8, "dynamic": True, "strategy": "token"}
    elif scheme == "W4A16":
        weights.update(num_bits=4, strategy="group", group_size=128)
        fmt = "pack-quantized"
    elif scheme == "FP8_DYNAMIC":
        weights.update(type="float")
        activations = {**weights, "dynamic": True, "strategy": "token"}
        fmt = "float-quantized"
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations,
                                          "format": fmt}}}


def model_files(config: Mapping[str, Any]) -> dict[str, bytes]:
    """config.json (and a stand-in weights file) of a model repo."""
    return {"config.json": json.dumps(config).encode(),
            "model.safetensors": b"\0" * 64}



def speculator_config(verifier: str, vocab_size: int, method: str = "eagle3"
                      ) -> dict[str, Any]:
    """config.json of a head in the speculators format (RedHatAI's `*-speculator.eagle3`):
    the model it verifies, and its one transformer layer with the vocabulary."""
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": method,
            "draft_vocab_size": 8192,
            "speculators_config": {"algorithm": method, "verifier": {
                "name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}]},
            "transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 1,
                                         "vocab_size": vocab_size}}
