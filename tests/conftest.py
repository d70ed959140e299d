"""Fixtures shared by the whole suite: the state-store matrix.

Every store behaviour is written once against ``store`` (or ``make_store`` when a test needs
several stores, e.g. one per Hypothesis example) and runs on each backend in ``STORES``:
memory, file, SQLite, and the real Redis and PostgreSQL servers on 127.0.0.1.

Each test run gets its own Redis key prefix and PostgreSQL schemas (``RUN``), and each store a
fresh one under it, so runs and tests cannot see each other's totals. The run's keys and
schemas are removed when it ends.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore, LocalFileStateStore
from servers import POSTGRES_URL, REDIS_URL, RUN

STORES = ["memory", "file", "sqlite", "redis", "postgres"]


_numbers = itertools.count()

MakeStore = Callable[..., StateStore]


def new_store(kind: str, tmp_path: Path, *, lease_seconds: float = 300.0) -> StateStore:
    """A fresh, empty store of ``kind``, isolated from every other store of the run."""
    n = next(_numbers)
    if kind == "memory":
        return InMemoryStateStore(lease_seconds=lease_seconds)
    if kind == "file":
        return LocalFileStateStore(
            tmp_path / f"state-{n}" / "state.json", lease_seconds=lease_seconds
        )
    if kind == "sqlite":
        from limenex.core.stores import SQLiteStateStore

        return SQLiteStateStore(tmp_path / f"state-{n}.db", lease_seconds=lease_seconds)
    if kind == "redis":
        from limenex.stores.redis import RedisStateStore

        return RedisStateStore(REDIS_URL, prefix=f"{RUN}:{n}", lease_seconds=lease_seconds)
    if kind == "postgres":
        from limenex.stores.postgres import PostgresStateStore

        return PostgresStateStore(POSTGRES_URL, schema=f"{RUN}_{n}", lease_seconds=lease_seconds)
    raise AssertionError(kind)


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path) -> Iterator[MakeStore]:
    """Make fresh, empty stores of one backend: ``make_store(lease_seconds=300.0)``."""
    made: list[StateStore] = []

    def make(*, lease_seconds: float = 300.0) -> StateStore:
        store = new_store(store_kind, tmp_path, lease_seconds=lease_seconds)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> StateStore:
    """A fresh, empty store of each backend."""
    return make_store()


@pytest.fixture(scope="session", autouse=True)
def _remove_the_runs_server_state() -> Iterator[None]:
    """Delete this run's Redis keys and PostgreSQL schemas when the run ends."""
    yield
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"*{RUN}*", count=1000):
            client.delete(key)
        client.close()
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            schemas = conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"{RUN}%",)
            ).fetchall()
            for (schema,) in schemas:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(autouse=True)
def _working_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test runs in a folder of its own: what the engine keeps by default in the working
    directory (``.limenex/audit.log``, ``.limenex/state.db``) never lands in the checkout."""
    with contextlib.chdir(tmp_path_factory.mktemp("cwd")):
        yield
