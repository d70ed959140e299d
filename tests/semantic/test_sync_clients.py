"""A sync SDK client's calls run on the adapters' own threads, never the loop's default pool."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from stub import API_KEY, StubServer, new_evaluator, verdict

from limenex.core.evaluation import Intent
from limenex.semantic import Judgement


def _recording(http: Any) -> Any:
    """A real HTTP transport of ``http`` (httpx or httpx2) noting each request's thread."""

    class Recording(http.HTTPTransport):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.threads: list[str] = []

        def handle_request(self, request: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            return super().handle_request(request)

    return Recording()


def _client(kind: str, stub: StubServer) -> tuple[Any, Any, Any]:
    """The SDK client, its HTTP client (to close) and the recording transport."""
    if kind == "openai-sync":  # the OpenAI SDK speaks httpx, Anthropic's httpx2
        transport = _recording(httpx)
        http = httpx.Client(transport=transport)
        sdk: Any = openai.OpenAI(api_key=API_KEY, base_url=stub.openai_url, http_client=http)
    else:
        transport = _recording(httpx2)
        http = httpx2.Client(transport=transport)
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=stub.anthropic_url, http_client=http)
    return sdk, http, transport


@pytest.mark.parametrize("kind", ["openai-sync", "anthropic-sync"])
async def test_a_sync_client_runs_on_the_adapters_threads(kind: str) -> None:
    with StubServer(verdict("ALLOW")) as stub:
        sdk, http, transport = _client(kind, stub)
        with http:
            evaluator = new_evaluator(kind, sdk, timeout=5.0)
            intent = Intent("comms.send", "a", {"text": "hi"})
            answers = await asyncio.gather(*(evaluator(intent, f"rule {n}") for n in range(12)))
    assert all(isinstance(a, Judgement) and a.verdict.value == "ALLOW" for a in answers)
    assert len(transport.threads) == 12
    assert all(name.startswith("limenex-model") for name in transport.threads)
    assert len(set(transport.threads)) <= 8  # a bounded pool of its own
