"""A fake LLM provider on 127.0.0.1 for tests: a stdlib HTTP server in a thread that
speaks enough of the Anthropic Messages API (POST /v1/messages) and the OpenAI Chat
Completions API (POST /v1/chat/completions) for the official SDKs. Replies follow a
script (a good reply, an HTTP error, a hang) and then a responder; every request is
recorded so tests can read the prompt the agent sent. A hang lasts until the client gives
up, and the server says when it saw that, so a timeout test needs no sleep."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Wire = Literal["anthropic", "openai"]


@dataclass(frozen=True)
class Reply:
    """A 200 with this text. Token counts default to ~4 characters per token; usage=False
    leaves the usage block out (some OpenAI-compatible servers do)."""

    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    usage: bool = True


@dataclass(frozen=True)
class Fail:
    """An HTTP error in the wire format's error shape."""

    status: int
    message: str = "scripted failure"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hang:
    """Send nothing and hold the request open until the client gives up and closes the
    connection (or the server closes); the server then sets `FakeProvider.hung_up`."""


Step = Reply | Fail | Hang


@dataclass(frozen=True)
class Recorded:
    wire: Wire
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def system(self) -> str:
        if self.wire == "anthropic":
            return str(self.body.get("system", ""))
        return "".join(str(m["content"]) for m in self.body["messages"]
                       if m["role"] == "system")

    @property
    def turns(self) -> list[dict[str, Any]]:
        return [m for m in self.body["messages"] if m["role"] != "system"]

    @property
    def last_user(self) -> str:
        return str([m for m in self.turns if m["role"] == "user"][-1]["content"])

    @property
    def key(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth.removeprefix("Bearer ") if auth else self.headers.get("x-api-key")


def proposal(changes: Mapping[str, Any], layer: int = 1, rationale: str = "scripted",
             **extra: Any) -> str:
    """A reply body in the agent's format."""
    return json.dumps({"rationale": rationale, "layer": layer, "changes": dict(changes),
                       "expected_effect": "faster", **extra})


_LAYER = re.compile(r"## Active layer\n(\d)")


def rotating_agent(moves: Mapping[int, Sequence[Mapping[str, Any]]]
                   ) -> Callable[[Recorded], Step]:
    """An LLM stand-in that reads the active layer from the prompt and answers with the
    next move of that layer (in prose, as models do), then with "changes": {} when the
    list is used up."""
    served: dict[int, int] = {}

    def respond(rec: Recorded) -> Step:
        match = _LAYER.search(rec.last_user)
        layer = int(match.group(1)) if match else 1
        i = served.get(layer, 0)
        served[layer] = i + 1
        options = moves.get(layer, ())
        changes = dict(options[i]) if i < len(options) else {}
        body = proposal(changes, layer, rationale=f"move {i + 1} of layer {layer}")
        return Reply(f"Looking at the history, here is my proposal:\n{body}\nGood luck.")

    return respond


class FakeProvider:
    """The server. Use as a context manager; `url` is its root."""

    def __init__(self, responder: Callable[[Recorded], Step] | None = None) -> None:
        self.responder = responder
        self.requests: list[Recorded] = []
        self._script: list[Step] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._held: set[socket.socket] = set()  # connections of requests on Hang
        self.hung_up = threading.Event()  # a client gave up on a held request
        self.models_reply: Fail | None = None  # GET /v1/models: the list, or this error
        self.models_asked: list[dict[str, str]] = []  # the headers of each models-list call
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval keeps shutdown (and so each test's teardown) quick.
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def script(self, *steps: Step) -> None:
        with self._lock:
            self._script.extend(steps)

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()  # release held requests first
        with self._lock:
            held = list(self._held)
        for conn in held:
            with contextlib.suppress(OSError):  # wakes the handler blocked reading it
                conn.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, rec: Recorded) -> Step:
        with self._lock:
            self.requests.append(rec)
            if self._script:
                return self._script.pop(0)
        if self.responder is not None:
            return self.responder(rec)
        return Reply(proposal({"max_num_seqs": 512}))

    def _hold(self, conn: socket.socket) -> None:
        """Block until the client closes `conn` (it timed out) or the server closes."""
        with self._lock:
            if self._closing.is_set():
                return
            self._held.add(conn)
        try:
            conn.recv(1)  # the client sends nothing more: b"" when it hangs up
        except OSError:
            pass
        finally:
            with self._lock:
                self._held.discard(conn)
        if not self._closing.is_set():
            self.hung_up.set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out and hung up is expected here; stay quiet."""


def _handler_for(fake: FakeProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def do_GET(self) -> None:
            """The models list (both SDKs: GET /v1/models), the cheap reachability check;
            one body both SDKs parse. Not recorded with the chat requests."""
            if not self.path.split("?")[0].endswith("/models"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            fake.models_asked.append({k.lower(): v for k, v in self.headers.items()})
            fail = fake.models_reply
            if fail is not None:
                wire: Wire = "anthropic" if "x-api-key" in self.headers else "openai"
                self._send(fail.status, _error(wire, fail), fail.headers)
                return
            model = {"id": "fake-model", "object": "model", "type": "model", "created": 0,
                     "owned_by": "fake", "display_name": "Fake",
                     "created_at": "2026-01-01T00:00:00Z"}
            self._send(200, {"object": "list", "data": [model], "has_more": False,
                             "first_id": "fake-model", "last_id": "fake-model"})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.endswith("/messages"):
                wire: Wire = "anthropic"
            elif self.path.endswith("/chat/completions"):
                wire = "openai"
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            rec = Recorded(wire, self.path, {k.lower(): v for k, v in self.headers.items()},
                           body)
            step = fake._next(rec)
            if isinstance(step, Hang):
                fake._hold(self.connection)
                self.close_connection = True
                return
            if isinstance(step, Fail):
                self._send(step.status, _error(wire, step), step.headers)
                return
            self._send(200, _success(wire, rec, step))

        def _send(self, status: int, payload: dict[str, Any],
                  headers: Mapping[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _success(wire: Wire, rec: Recorded, step: Reply) -> dict[str, Any]:
    tokens_in = step.input_tokens if step.input_tokens is not None else \
        len(json.dumps(rec.body)) // 4
    tokens_out = step.output_tokens if step.output_tokens is not None else \
        len(step.text) // 4 + 1
    model = rec.body.get("model", "fake")
    if wire == "anthropic":
        return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": step.text}], "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}}
    out: dict[str, Any] = {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": step.text}}]}
    if step.usage:
        out["usage"] = {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                        "total_tokens": tokens_in + tokens_out}
    return out


def _error(wire: Wire, step: Fail) -> dict[str, Any]:
    if wire == "anthropic":
        kind = {429: "rate_limit_error", 401: "authentication_error",
                404: "not_found_error", 529: "overloaded_error"}.get(step.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": step.message}}
    return {"error": {"message": step.message, "type": "fake_error", "code": step.status}}
