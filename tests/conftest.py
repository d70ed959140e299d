"""Fixtures shared by the whole suite: the state-store matrix.

Every store behaviour is written once against ``store`` (or ``make_store`` when a test needs
several stores, e.g. one per Hypothesis example) and runs on each backend in ``STORES``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore, LocalFileStateStore

STORES = ["memory", "file"]

MakeStore = Callable[..., StateStore]


@pytest.fixture(params=STORES)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Make fresh, empty stores of one backend: ``make_store(lease_seconds=300.0)``."""
    made: list[StateStore] = []
    numbers = itertools.count()

    def make(*, lease_seconds: float = 300.0) -> StateStore:
        store: StateStore
        if request.param == "memory":
            store = InMemoryStateStore(lease_seconds=lease_seconds)
        else:
            path = tmp_path / f"state-{next(numbers)}" / "state.json"
            store = LocalFileStateStore(path, lease_seconds=lease_seconds)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> StateStore:
    """A fresh, empty store of each backend."""
    return make_store()
