"""``limenex.stores.from_url`` and ``PolicyEngine(state_store=URL)``: every scheme, options,
clear refusals, install hints, no password in any message."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from limenex.core.engine import PolicyEngine
from limenex.core.errors import LimenexConfigError
from limenex.core.policy_store import InMemoryPolicyStore, LocalFilePolicyStore
from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore, LocalFileStateStore, SQLiteStateStore
from limenex.stores import from_url, redacted
from servers import POSTGRES_URL, REDIS_URL, RUN

POLICY = """
finance.spend:
  policies:
    - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lte, value: 10,
       breach_verdict: BLOCK}
"""


@pytest.fixture
def opened() -> Iterator[list[StateStore]]:
    stores: list[StateStore] = []
    yield stores
    for store in stores:
        store.close()


def test_each_scheme_makes_its_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[StateStore]
) -> None:
    from limenex.stores.postgres import PostgresStateStore
    from limenex.stores.redis import RedisStateStore

    monkeypatch.chdir(tmp_path)
    cases: list[tuple[str, type[StateStore]]] = [
        ("memory://", InMemoryStateStore),
        ("file://state.json", LocalFileStateStore),
        ("sqlite:///relative.db", SQLiteStateStore),
        (f"sqlite:///{tmp_path}/absolute.db", SQLiteStateStore),
        (f"{REDIS_URL}?prefix={RUN}:url", RedisStateStore),
        (f"{POSTGRES_URL}?schema={RUN}_url", PostgresStateStore),
        (
            f"{POSTGRES_URL.replace('postgresql://', 'postgres://')}?schema={RUN}_url",
            PostgresStateStore,
        ),
    ]
    for url, kind in cases:
        store = from_url(url)
        opened.append(store)
        assert type(store) is kind, url
    assert (tmp_path / "relative.db").exists()
    assert (tmp_path / "absolute.db").exists()


def test_options_reach_the_store(tmp_path: Path, opened: list[StateStore]) -> None:
    store = from_url(f"sqlite:///{tmp_path}/s.db?lease_seconds=7&synchronous=full")
    opened.append(store)
    assert store.lease_seconds == 7.0
    redis_store = from_url(f"{REDIS_URL}?prefix={RUN}:opt&lease_seconds=9")
    opened.append(redis_store)
    assert redis_store.lease_seconds == 9.0
    assert from_url("memory://?lease_seconds=3").lease_seconds == 3.0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "mongodb://x",
            "known schemes: memory://, file://, sqlite://, redis://, rediss://, "
            "postgresql://, postgres://",
        ),
        ("no-scheme-at-all", "known schemes"),
        ("memory://somewhere", "memory:// takes no path"),
        ("memory://?prefix=x", "takes no 'prefix' option"),
        ("sqlite://relative.db", "three slashes"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///:memory:", "use memory://"),
        ("sqlite:///x.db?lease_seconds=soon", "lease_seconds must be a number of seconds"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous"),
        ("sqlite:///x.db?frobnicate=1", "unknown option"),
        ("redis://127.0.0.1:6379/0?schema=x", "takes no 'schema' option"),
        ("postgresql://127.0.0.1/test?prefix=x", "takes no 'prefix' option"),
        ("memory://?lease_seconds=1&lease_seconds=2", "given twice"),
        ("memory://?lease_seconds=0", "lease_seconds must be a positive number"),
    ],
)
def test_bad_urls_are_refused_clearly(
    url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LimenexConfigError, match="^.*" + message.replace("?", r"\?")):
        from_url(url)


def test_a_password_never_appears_in_a_message() -> None:
    url = "redis://user:hunter2@127.0.0.1:1/0?schema=x"
    with pytest.raises(LimenexConfigError) as caught:
        from_url(url)
    assert "hunter2" not in str(caught.value)
    assert redacted(url) == "redis://user:***@127.0.0.1:1/0?schema=x"
    assert redacted("postgresql://u:p@[::1]:5432/db") == "postgresql://u:***@[::1]:5432/db"
    assert redacted("redis://127.0.0.1/0") == "redis://127.0.0.1/0"


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("redis://127.0.0.1:6379/0", "redis", "redis"),
        ("postgresql://127.0.0.1/test", "psycopg", "postgres"),
    ],
)
def test_a_missing_client_library_gets_an_install_hint(
    url: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_client(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {module!r}", name=module)
        return real_import(name, *args, **kwargs)

    for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.delitem(sys.modules, f"limenex.stores.{extra}", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_client)
    with pytest.raises(LimenexConfigError, match=rf"pip install 'limenex\[{extra}\]'"):
        from_url(url)


def test_the_engine_takes_a_url(tmp_path: Path) -> None:
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store=f"sqlite:///{tmp_path}/engine.db",
    )
    try:
        assert type(engine.state_store) is SQLiteStateStore
    finally:
        engine.close()


def test_the_default_store_is_sqlite_beside_the_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "policies.yaml").write_text(POLICY)
    monkeypatch.chdir(tmp_path)
    engine = PolicyEngine(policy_store=LocalFilePolicyStore("rules/policies.yaml"))
    engine.execute_sync("finance.spend", "a", {"service": "s", "amount_usd": 4}, lambda: None)
    engine.close()
    assert (tmp_path / "rules" / "state.db").exists()
    again = SQLiteStateStore(tmp_path / "rules" / "state.db")
    try:
        assert [str(total) for _, total in again.totals(0.0)] == ["4"]
    finally:
        again.close()

    other = PolicyEngine(policy_store=InMemoryPolicyStore.from_yaml(POLICY))
    other.close()
    assert (tmp_path / ".limenex" / "state.db").exists()
