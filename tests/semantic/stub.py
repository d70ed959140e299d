"""A real, local HTTP server that speaks just enough OpenAI and Anthropic for the adapters.

``StubServer`` listens on 127.0.0.1 (a free port) in a background thread and answers
``POST /v1/chat/completions`` (OpenAI Chat Completions) and ``POST /v1/messages`` (Anthropic
Messages). It records every request it got (``requests``) and answers each one with a
scripted behaviour: a function ``(Request) -> Reply``. The helpers below make the usual
ones — a verdict, raw answer text, an HTTP error, a hang, a malformed body, an echo of the
user's content — each answering in the shape of whichever API was called.

Point the real SDK clients at it: ``openai.AsyncOpenAI(base_url=stub.openai_url, ...)``,
``anthropic.AsyncAnthropic(base_url=stub.anthropic_url, ...)``; :func:`new_client` and
:func:`new_evaluator` at the end make them (and the adapters) for each ``KINDS`` entry.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import openai

from limenex.semantic.anthropic import AnthropicEvaluator
from limenex.semantic.openai import OpenAIEvaluator

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
REPORTED_MODEL = "stub-model-2026-01-01"
"""The model name the stub reports in its answers (unlike the name the client asked for)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the stub got: its path, headers and JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def api(self) -> str:
        return "anthropic" if self.path.startswith(ANTHROPIC_PATH) else "openai"

    @property
    def system(self) -> str:
        """The instructions: OpenAI's system/developer messages, Anthropic's ``system``."""
        if self.api == "anthropic":
            system = self.body.get("system", "")
            if isinstance(system, list):
                return "\n".join(block.get("text", "") for block in system)
            return str(system)
        return "\n".join(
            _text(m.get("content"))
            for m in self.body.get("messages", [])
            if m.get("role") in ("system", "developer")
        )

    @property
    def user(self) -> str:
        """The text of every user message."""
        return "\n".join(
            _text(m.get("content")) for m in self.body.get("messages", []) if m["role"] == "user"
        )


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content)
    return "" if content is None else str(content)


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the stub sends back: a status, a raw body, after an optional delay."""

    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    content_type: str = "application/json"


Behaviour = Callable[[Request], Reply]


class StubServer:
    """The stub server; use as a context manager or call :meth:`close`."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.requests: list[Request] = []
        self.behaviour: Behaviour = behaviour or verdict("ALLOW")
        self._lock = threading.Lock()
        self._closing = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_unparsable": raw.decode("utf-8", "replace")}
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with stub._lock:
                    stub.requests.append(request)
                    behaviour = stub.behaviour
                if request.path.split("?")[0] not in (OPENAI_PATH, ANTHROPIC_PATH):
                    reply = Reply(404, b'{"error": {"message": "no such path"}}')
                else:
                    reply = behaviour(request)
                if reply.delay and stub._closing.wait(reply.delay):
                    self.close_connection = True  # the server is closing: drop the request
                    return
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (a timeout): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_url(self) -> str:
        return self.url

    def answer(self, behaviour: Behaviour) -> None:
        """Answer every request from now on with ``behaviour``."""
        with self._lock:
            self.behaviour = behaviour

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> StubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- behaviours -------------------------------------------------------------------------------


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _openai(content: str | None, *, refusal: str | None = None, finish: str = "stop") -> bytes:
    return _json(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 1_767_225_600,
            "model": REPORTED_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def _anthropic(content: list[dict[str, Any]], *, stop: str = "tool_use") -> bytes:
    return _json(
        {
            "id": "msg_stub",
            "type": "message",
            "role": "assistant",
            "model": REPORTED_MODEL,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )


def _tool_name(request: Request) -> str:
    choice = request.body.get("tool_choice") or {}
    return str(choice.get("name", "verdict"))


def _tool_use(request: Request, value: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_stub", "name": _tool_name(request), "input": value}


def answer(value: Any) -> Behaviour:
    """Answer the JSON ``value``: OpenAI's message content, Anthropic's tool input."""

    def behave(request: Request) -> Reply:
        if request.api == "anthropic":
            return Reply(body=_anthropic([_tool_use(request, value)]))
        return Reply(body=_openai(json.dumps(value)))

    return behave


def verdict(word: str, reason: str = "scripted") -> Behaviour:
    """Answer ``{"verdict": word, "reason": reason}``."""
    return answer({"verdict": word, "reason": reason})


def text(raw: str) -> Behaviour:
    """Answer ``raw`` as text: OpenAI's message content, an Anthropic text block (no tool)."""

    def behave(request: Request) -> Reply:
        if request.api == "anthropic":
            return Reply(body=_anthropic([{"type": "text", "text": raw}], stop="end_turn"))
        return Reply(body=_openai(raw))

    return behave


def echo() -> Behaviour:
    """Answer with the user's content, as if the model obeyed what the action says."""

    def behave(request: Request) -> Reply:
        return text(request.user)(request)

    return behave


def refusal(message: str = "I can't help with that.") -> Behaviour:
    """A model refusal: OpenAI's ``message.refusal``, Anthropic's ``stop_reason: refusal``."""

    def behave(request: Request) -> Reply:
        if request.api == "anthropic":
            return Reply(body=_anthropic([{"type": "text", "text": message}], stop="refusal"))
        return Reply(body=_openai(None, refusal=message))

    return behave


def truncated(value: Any) -> Behaviour:
    """A complete-looking answer the server says was cut off at the token limit."""

    def behave(request: Request) -> Reply:
        if request.api == "anthropic":
            return Reply(body=_anthropic([_tool_use(request, value)], stop="max_tokens"))
        return Reply(body=_openai(json.dumps(value), finish="length"))

    return behave


def raw_body(body: bytes, status: int = 200) -> Behaviour:
    """Answer exactly ``body`` (for malformed JSON and odd shapes)."""
    return lambda request: Reply(status, body)


def status(code: int) -> Behaviour:
    """An HTTP error with an error body in the API's shape."""
    body = _json({"type": "error", "error": {"type": "api_error", "message": f"stub {code}"}})
    return lambda request: Reply(code, body)


def hang(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Wait ``seconds`` (or until the server closes), then answer ``then`` (ALLOW)."""
    after = then or verdict("ALLOW")

    def behave(request: Request) -> Reply:
        reply = after(request)
        return dataclasses.replace(reply, delay=seconds)

    return behave


def sequence(*behaviours: Behaviour) -> Behaviour:
    """Each request gets the next behaviour; the last one answers every request after."""
    pending: Iterator[Behaviour] = iter(behaviours)
    lock = threading.Lock()

    def behave(request: Request) -> Reply:
        with lock:
            current = next(pending, behaviours[-1])
        return current(request)

    return behave


# --- clients pointed at the stub ------------------------------------------------------------

API_KEY = "sk-test-DO-NOT-LOG-0123456789"  # a dummy key: the stub accepts anything
MODEL = "judge-model"
"""The model the adapters ask for (the stub reports another name: ``stub.REPORTED_MODEL``)."""

KINDS = ["openai", "openai-sync", "anthropic", "anthropic-sync"]

Adapter = OpenAIEvaluator | AnthropicEvaluator
MakeEvaluator = Callable[..., Adapter]


def new_client(kind: str, stub: StubServer) -> Any:
    """A real SDK client of ``kind`` whose requests go to ``stub``."""
    if kind == "openai":
        return openai.AsyncOpenAI(api_key=API_KEY, base_url=stub.openai_url)
    if kind == "openai-sync":
        return openai.OpenAI(api_key=API_KEY, base_url=stub.openai_url)
    if kind == "anthropic":
        return anthropic.AsyncAnthropic(api_key=API_KEY, base_url=stub.anthropic_url)
    if kind == "anthropic-sync":
        return anthropic.Anthropic(api_key=API_KEY, base_url=stub.anthropic_url)
    raise AssertionError(kind)


def new_evaluator(kind: str, client: Any, **kwargs: Any) -> Adapter:
    kwargs.setdefault("model", MODEL)
    if kind.startswith("openai"):
        return OpenAIEvaluator(client, **kwargs)
    return AnthropicEvaluator(client, **kwargs)
