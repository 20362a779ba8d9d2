"""A fake Hugging Face Hub on 127.0.0.1 for the Hub-lookup tests (and, serving real model
files, for vLLM downloading a quantized sibling through HF_ENDPOINT): the REST routes
huggingface_hub 2.x uses, answered as the real Hub answers them.

- `GET /api/models?filter=..&search=..&author=..&sort=downloads&limit=N&expand=..`
  (repeated `filter` means AND; only the expanded fields come back, with `id`),
- `GET /api/models/{repo}[/revision/{rev}]` (model_info / repo_info, with `siblings`),
- `GET /api/models/{repo}/tree/{rev}[/{folder}]?recursive=..&expand=..` (list_repo_tree,
  which snapshot_download and vLLM's file listing call; one page: the real Hub pages at
  1000 entries, more than a test repo holds),
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: a file kept in git answers 200 with its git
  blob id as `ETag`; a file kept in LFS (weights) answers 302 to the fake's own CDN route
  `/lfs/{sha256}` with `X-Linked-Etag` (the sha256) and `X-Linked-Size`, as the real Hub
  redirects to its CDN; both carry `X-Repo-Commit`,
- `GET /api/agent-harnesses`: the registry huggingface_hub 2.x fetches (at most daily,
  cached under HF_HOME) to tell whether an AI coding agent runs it; answered with the
  registry's shape and no harnesses,
- `GET /lfs/{sha256}` on the fake's CDN (`cdn_url`: a second listener on 127.0.0.1, another
  origin, so huggingface_hub takes the metadata from the redirect and does not follow it
  with HEAD, as with the real CDN): the bytes of an LFS file.

A revision is `main` or the repo's commit id (`sha`), else 404 `RevisionNotFound`; a
missing tree path or file is 404 `EntryNotFound`. Gated repos answer 401 with
`X-Error-Code: GatedRepo` to a request without the right token, private ones 401
`RepoNotFound` (the real Hub hides them). Every request is
recorded; one it does not know (path or query parameter) is answered 400 and kept in
`unexpected`, so tests assert the exact requests the client sends."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LIST_PARAMS = {"filter", "search", "author", "sort", "limit", "expand"}
INFO_PARAMS = {"expand", "blobs"}
TREE_PARAMS = {"recursive", "expand"}
# what the Hub's default .gitattributes stores in LFS, by file suffix
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")


def safetensors_parameters(body: bytes) -> dict[str, int]:
    """Parameters per dtype of a safetensors file, from its header (an 8-byte little-endian
    length, then JSON: tensor name -> dtype, shape, offsets)."""
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + size])
    counts: dict[str, int] = {}
    for name, tensor in header.items():
        if name != "__metadata__":
            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + math.prod(tensor["shape"])
    return counts


def git_blob_id(body: bytes) -> str:
    """The git object id of a file's bytes (what the Hub's tree calls its `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def online(monkeypatch: Any, tmp_path: Path) -> None:
    """Let huggingface_hub reach a fake Hub in this process (tests/conftest.py sets
    HF_HUB_OFFLINE for the whole suite; huggingface_hub read it at import), with no token
    from the developer's environment or login."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH",
                        str(tmp_path / "stored_tokens"))


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
        """A repo serving every file of a local model folder; its safetensors parameter
        counts read from the files' headers, as the Hub reports them, unless given."""
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        if "safetensors" not in kw and any(n.endswith(".safetensors") for n in files):
            counts: dict[str, int] = {}
            for name, body in files.items():
                if name.endswith(".safetensors"):
                    for dtype, n in safetensors_parameters(body).items():
                        counts[dtype] = counts.get(dtype, 0) + n
            kw["safetensors"] = counts
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
    # when set, the CDN answers a GET only once this is set (a download in progress)
    hold: threading.Event | None = None

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self._threads = [threading.Thread(target=server.serve_forever, daemon=True)
                         for server in self._servers]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server, thread in zip(self._servers, self._threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join()

    @property
    def url(self) -> str:
        """The Hub (HF_ENDPOINT)."""
        host, port = self._servers[0].server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def cdn_url(self) -> str:
        """Where LFS downloads are redirected to."""
        host, port = self._servers[1].server_address[:2]
        return f"http://{host!s}:{port}"

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def lfs_url(self, repo_id: str, name: str) -> str:
        """Where the fake's CDN serves an LFS file of a repo (what a download GETs)."""
        return f"/lfs/{hashlib.sha256(self.repos[repo_id].files[name]).hexdigest()}"

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

    def tree(self, repo: FakeRepo, folder: str, recursive: bool) -> list[dict[str, Any]] | None:
        """The entries under `folder` ("" for the root) as the Hub's tree route lists
        them, folders before files; None when no such folder exists."""
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        names = [n for n in sorted(repo.files) if n.startswith(prefix)]
        if prefix and not names:
            return None
        folders: set[str] = set()
        files: list[dict[str, Any]] = []
        for name in names:
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
            if len(rest) > 1 and not recursive:
                continue
            body = repo.files[name]
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_id(body),
                                     "size": len(body), "path": name}
            if is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body),
                                "pointerSize": 134}
            files.append(entry)
        dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                 "path": d} for d in sorted(folders)]
        return dirs + files

    def blob(self, sha256: str) -> bytes | None:
        return next((body for repo in self.repos.values() for name, body in repo.files.items()
                     if is_lfs(name) and hashlib.sha256(body).hexdigest() == sha256), None)


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
            return self._repo_api(path.split("/")[3:], query, authorized)
        if method == "GET" and path == "/api/agent-harnesses" and not query:
            return self._json(200, {"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}})
        if method in ("GET", "HEAD") and path.startswith("/lfs/"):
            if method == "GET" and hub.hold is not None:
                hub.hold.wait(60)  # bounded so that a broken test cannot hang the suite
            body = hub.blob(path.split("/")[2])
            if body is None:
                return self._error(404, "EntryNotFound", "Entry not found", method)
            return self._bytes(method, body, {"ETag": f'"{path.split("/")[2]}"'})
        segments = path.strip("/").split("/")
        if len(segments) >= 5 and segments[2] == "resolve":
            return self._file(method, "/".join(segments[:2]), segments[3],
                              "/".join(segments[4:]), authorized)
        return self._refuse(f"unknown route {method} {path}")

    def _repo_api(self, parts: list[str], query: Mapping[str, list[str]],
                  authorized: bool) -> None:
        """/api/models/{owner}/{name}, .../revision/{rev}, .../tree/{rev}[/{folder}]."""
        hub = self.owner
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        kind = rest[0] if rest else "info"
        if kind not in ("info", "revision", "tree") or (kind != "info" and len(rest) < 2):
            return self._refuse(f"unknown repo route {'/'.join(parts)}")
        allowed = TREE_PARAMS if kind == "tree" else INFO_PARAMS
        if set(query) - allowed:
            return self._refuse(f"unknown {kind} parameters {sorted(set(query) - allowed)}")
        repo = hub.repos.get(repo_id)
        if repo is None or not hub.visible(repo, authorized):
            return self._error(401, "RepoNotFound", "Repository not found")
        if kind != "info" and rest[1] not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
        if kind != "tree":
            return self._json(200, hub.card(repo_id, repo, query.get("expand")))
        if repo.gated and not authorized:
            return self._error(401, "GatedRepo", "Access to this model is restricted")
        recursive = query.get("recursive", ["False"])[0].lower() in ("true", "1")
        entries = hub.tree(repo, "/".join(rest[2:]), recursive)
        if entries is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        return self._json(200, entries)

    def _file(self, method: str, repo_id: str, revision: str, name: str,
              authorized: bool) -> None:
        repo = self.owner.repos.get(repo_id)
        if repo is None or not self.owner.visible(repo, authorized):
            return self._error(401, "RepoNotFound", "Repository not found", method)
        if repo.gated and not authorized:
            return self._error(401, "GatedRepo", "Access to this model is restricted",
                               method)
        if revision not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}",
                               method)
        body = repo.files.get(name)
        if body is None:
            return self._error(404, "EntryNotFound", "Entry not found", method)
        if is_lfs(name):  # the real Hub redirects LFS files to its CDN
            sha256 = hashlib.sha256(body).hexdigest()
            self.send_response(302)
            for header, value in (("Location", f"{self.owner.cdn_url}/lfs/{sha256}"),
                                  ("X-Linked-Etag", f'"{sha256}"'),
                                  ("X-Linked-Size", str(len(body))),
                                  ("X-Repo-Commit", repo.sha), ("Content-Length", "0")):
                self.send_header(header, value)
            self.end_headers()
            return None
        return self._bytes(method, body, {"ETag": f'"{git_blob_id(body)}"',
                                          "X-Repo-Commit": repo.sha})

    def _bytes(self, method: str, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(200)
        for header, value in headers.items():
            self.send_header(header, value)
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
