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
    store = from_url(f"sqlite:///{tmp_path}/s.db?lease_seconds=7&synchronous=full&timeout=0.5")
    opened.append(store)
    assert store.lease_seconds == 7.0
    assert isinstance(store, SQLiteStateStore)
    assert (store.synchronous, store.timeout) == ("full", 0.5)  # the lock wait is settable
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


@pytest.mark.parametrize(
    "url",
    [
        # libpq and redis-py both take the password as a query parameter too
        "postgresql://u@127.0.0.1/db?password=hunter2&prefix=x",
        "redis://127.0.0.1:6379/0?password=hunter2&schema=x",
        "postgresql://u@127.0.0.1/db?sslmode=require&sslpassword=hunter2&prefix=x",
        # urlsplit cannot read the port: redacting must not fail (nor show the password)
        "redis://u:hunter2@127.0.0.1:sixtythree/0?schema=x",
    ],
)
def test_no_spelling_of_a_password_appears_in_a_message(url: str) -> None:
    with pytest.raises(LimenexConfigError) as caught:
        from_url(url)
    assert "hunter2" not in str(caught.value), caught.value
    assert "127.0.0.1" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u@h/db?password=hunter2&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("redis://h/0?x=1&password=hunter2", "redis://h/0?x=1&password=***"),
        ("redis://u:hunter2@h:port/0", "redis://u:***@h:port/0"),
        ("redis://u:hun#ter2@h/0", "redis://u:***@h/0"),  # '#' and '?' left unencoded
        ("postgresql://u:hun?ter2@h/db", "postgresql://u:***@h/db"),
        ("redis://:hunter2@h", "redis://:***@h"),
        ("redis://h/0?prefix=a@b", "redis://h/0?prefix=a@b"),
        ("redis://u@h/0", "redis://u@h/0"),
        ("redis://:pw@h?password=hunter2", "redis://:***@h?password=***"),  # no path
        ("not a url user:hunter2@h", "not a url user:***@h"),
    ],
)
def test_redacted_hides_every_spelling_of_a_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize(
    "bad",
    [{"semantic_timeout": 0}, {"llm_evaluator": "not callable"}, {"audit_logger": 42}],
)
def test_a_refused_engine_opens_no_store_and_makes_no_file(
    bad: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LimenexConfigError):
        PolicyEngine(policy_store=InMemoryPolicyStore.from_yaml(POLICY), **bad)
    with pytest.raises(LimenexConfigError):
        PolicyEngine(InMemoryPolicyStore.from_yaml(POLICY), "sqlite:///url.db", **bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "module", "name", "sent", "ours"),
    [
        (
            "postgresql://u@127.0.0.1/db?options=-c%20search_path%3Dx&schema=s&application_name=a+b",
            "limenex.stores.postgres",
            "PostgresStateStore",
            "postgresql://u@127.0.0.1/db?options=-c%20search_path%3Dx&application_name=a+b",
            {"schema": "s"},
        ),
        (
            "redis://127.0.0.1:6379/0?prefix=p&client_name=a%20b&timeout=2",
            "limenex.stores.redis",
            "RedisStateStore",
            "redis://127.0.0.1:6379/0?client_name=a%20b",
            {"prefix": "p", "timeout": 2.0},
        ),
    ],
)
def test_the_drivers_query_parameters_reach_it_exactly_as_written(
    url: str,
    module: str,
    name: str,
    sent: str,
    ours: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq reads '+' as '+' and '%20' as a space: re-encoding the query changed both
    (``options=-c search_path=x`` reached the server as ``-c+search_path=x``)."""
    import importlib

    seen: list[tuple[str, dict[str, Any]]] = []

    class Recorder(InMemoryStateStore):
        def __init__(self, url: str, **options: Any) -> None:
            super().__init__()
            seen.append((url, options))

    monkeypatch.setattr(importlib.import_module(module), name, Recorder)
    from_url(url)
    assert seen == [(sent, ours)]
