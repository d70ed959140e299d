"""Fixtures for the semantic adapters: the local stub server and adapters pointed at it.

The adapters drive the real ``openai`` and ``anthropic`` SDK clients over real HTTP to
:class:`stub.StubServer` on 127.0.0.1; nothing is mocked and nothing leaves the machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest
from stub import KINDS, Adapter, MakeEvaluator, StubServer, new_client, new_evaluator


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each adapter, over its SDK's async client and its sync client."""
    return str(request.param)


@pytest.fixture
async def make_evaluator(kind: str, stub: StubServer) -> AsyncIterator[MakeEvaluator]:
    """``make_evaluator(timeout=..., cache_ttl=..., ...)``: an adapter of ``kind`` on ``stub``."""
    clients: list[Any] = []

    def make(**kwargs: Any) -> Adapter:
        client = new_client(kind, stub)
        clients.append(client)
        return new_evaluator(kind, client, **kwargs)

    yield make
    for client in clients:
        if isinstance(client, openai.AsyncOpenAI | anthropic.AsyncAnthropic):
            await client.close()
        else:
            client.close()
