"""Fixtures for engine tests: an engine built from inline YAML on a chosen state store."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from limenex.core.engine import PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import StateStore
from limenex.testing import FrozenClock

MakeEngine = Callable[..., PolicyEngine]


@pytest.fixture
def state_store(make_store: Callable[..., StateStore]) -> StateStore:
    """Each engine behaviour runs on every store (see ``tests/conftest.py``)."""
    return make_store()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(1_767_225_600.0)  # 2026-01-01T00:00:00Z


@pytest.fixture
def make_engine(state_store: StateStore, clock: FrozenClock) -> Iterator[MakeEngine]:
    engines: list[PolicyEngine] = []

    def make(yaml_text: str, **kwargs: Any) -> PolicyEngine:
        kwargs.setdefault("state_store", state_store)
        kwargs.setdefault("clock", clock)
        policies = InMemoryPolicyStore.from_yaml(textwrap.dedent(yaml_text))
        engine = PolicyEngine(policy_store=policies, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
