"""PostgresStateStore: what is specific to PostgreSQL. The contract itself runs on every store
in ``tests/core`` (``-k postgres``).

Every test talks to the real server of the suite (``servers.POSTGRES_URL``) in a schema of its
own, dropped afterwards. Round trips are counted on the wire: libpq's protocol trace of the
store's own connection records every message sent and received, and each statement ends
with one ``ReadyForQuery`` from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.pq import Trace

from limenex.core.errors import LimenexConfigError, StateStoreError
from limenex.core.state import Check, CounterKey, Reservation, StateBreach
from limenex.core.window import Window
from limenex.stores.postgres import FUNCTIONS_DIGEST, SCHEMA_VERSION, PostgresStateStore
from servers import POSTGRES_URL, RUN

T0 = 1_773_144_000.0  # 2026-03-10T12:00:00Z


def check(
    amount: str = "10",
    limit: str = "1000",
    *,
    dimension: str = "spend_usd",
    subject: str = "agent-1",
    window: str = "",
) -> Check:
    key = CounterKey(dimension, "agent", subject, window)
    parsed = Window.parse(window) if window else None
    return Check(0, key, parsed, Decimal(amount), "lte", Decimal(limit))


def reserved(store: PostgresStateStore, checks: list[Check], now: float = T0) -> Reservation:
    outcome = store.reserve(checks, now)
    assert isinstance(outcome, Reservation), outcome
    return outcome


def total(store: PostgresStateStore, of: Check, now: float = T0) -> Decimal:
    return store.peek([of], now)[0]


def admin() -> psycopg.Connection[Any]:
    return psycopg.connect(POSTGRES_URL, autocommit=True)


def in_schema(schema: str, text: str) -> sql.Composed:
    """``text`` with ``{}`` replaced by the quoted schema name."""
    return sql.SQL(text).format(sql.Identifier(schema))


def url_named(application: str) -> str:
    """The suite's server, with connections that ``pg_stat_activity`` can tell apart."""
    return f"{POSTGRES_URL}?application_name={application}"


def terminate(application: str) -> int:
    """Kill the server side of every connection of ``application``; how many there were."""
    with admin() as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application,),
        ).fetchall()
    return len(rows)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema name of this test's own; the schema is dropped afterwards."""
    name = f"{RUN}_pg_{uuid.uuid4().hex[:10]}"
    yield name
    with admin() as conn:
        conn.execute(in_schema(name, "DROP SCHEMA IF EXISTS {} CASCADE"))


@pytest.fixture
def make_store(schema: str) -> Iterator[Callable[..., PostgresStateStore]]:
    """``make_store(**options)``: a store on this test's schema, closed afterwards."""
    made: list[PostgresStateStore] = []

    def make(dsn: str = POSTGRES_URL, **options: Any) -> PostgresStateStore:
        options.setdefault("schema", schema)
        store = PostgresStateStore(dsn, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# --- the wire: one round trip per governed call ----------------------------------------------


class Wire:
    """The messages of one connection, from libpq's trace: ``F``rontend and ``B``ackend."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def messages(self) -> list[tuple[str, str]]:
        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and fields[0] in ("F", "B"):
                found.append((fields[0], fields[2].split(" ")[0]))
        return found

    def round_trips(self) -> int:
        """Statements answered: the server ends each with ReadyForQuery."""
        return self.messages().count(("B", "ReadyForQuery"))

    def executes(self) -> int:
        return sum(1 for sender, kind in self.messages() if sender == "F" and kind == "Execute")


@contextlib.contextmanager
def traced(conn: psycopg.BaseConnection[Any], path: Path) -> Iterator[Wire]:
    with open(path, "w") as out:
        conn.pgconn.trace(out.fileno())
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        try:
            yield Wire(path)
        finally:
            conn.pgconn.untrace()


def test_a_successful_reserve_and_commit_is_one_round_trip(
    make_store: Callable[..., PostgresStateStore], tmp_path: Path
) -> None:
    store = make_store(max_connections=1)  # its one connection is the one traced
    spend = check("1.5")
    for _ in range(10):  # the schema is made and the statement prepared
        store.commit(reserved(store, [spend]))
    pool = store._sync_pool()
    conn = pool.getconn()
    pool.putconn(conn)
    with traced(conn, tmp_path / "wire.txt") as wire:
        for _ in range(25):
            store.commit(reserved(store, [spend]))
    assert wire.round_trips() == 25  # each reserve carried the commit before it
    assert wire.executes() == 25
    assert total(store, spend) == Decimal("52.5")
    assert store.pending(T0) == []  # the last commit went with peek


async def test_concurrent_async_reserves_share_round_trips(
    make_store: Callable[..., PostgresStateStore], tmp_path: Path
) -> None:
    """50 tasks x 4 calls against a limit of 120: batched, each judged exactly once."""
    store = make_store(max_connections=1)
    calls = check("1", "120", dimension="calls")
    await store.acommit(await store.areserve([calls], T0))  # schema made, connection open
    conn = await store._side().pool.getconn()
    await store._side().pool.putconn(conn)
    won: list[Reservation] = []

    async def task() -> None:
        for _ in range(4):
            outcome = await store.areserve([calls], T0)
            if isinstance(outcome, Reservation):
                won.append(outcome)
                await store.acommit(outcome)

    with traced(conn, tmp_path / "wire.txt") as wire:
        await asyncio.gather(*(task() for _ in range(50)))
    assert len(won) == 119  # the limit, less the first call's
    assert len({r.id for r in won}) == 119
    assert sorted(r.observed[0] for r in won) == [Decimal(n) for n in range(1, 120)]
    assert wire.round_trips() < 200 / 4  # batched: far fewer statements than calls
    assert await store.apeek([calls], T0) == (Decimal(120),)
    await store.aclose()
    assert store.pending(T0) == []


def test_a_retried_reserve_is_counted_once(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    """A reserve whose reply was lost is sent again: it finds its first attempt."""
    store = make_store()
    spend = check("30")
    store.commit(reserved(store, [spend]))
    items = [store._item([spend], T0)]
    pool = store._sync_pool()
    with pool.connection() as conn:
        first = store._reserve(conn, items, False)
        again = store._reserve(conn, items, True)  # same id: the reply of the first was lost
    assert isinstance(first[0], Reservation)
    assert isinstance(again[0], Reservation)
    assert (again[0].id, again[0].observed) == (first[0].id, first[0].observed)
    assert (first[0].id, first[0].observed) == (items[0].rid, (Decimal(30),))
    assert total(store, spend) == Decimal(60)
    assert len(store.pending(T0)) == 1


# --- the schema --------------------------------------------------------------------------------


def _migrate_in_a_process(schema: str, start: Any, results: Any) -> None:
    store = PostgresStateStore(POSTGRES_URL, schema=schema)
    try:
        start.wait()
        store.migrate()
        outcome = store.reserve([check("1", dimension="migrated")], T0)
        assert isinstance(outcome, Reservation)
        store.commit(outcome)
        results.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()


@pytest.mark.slow
def test_concurrent_migrations_from_several_processes_make_the_schema_once(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [
        context.Process(target=_migrate_in_a_process, args=(schema, start, results))
        for _ in range(4)
    ]
    for process in workers:
        process.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in workers]
    for process in workers:
        process.join(timeout=60)
    assert outcomes == ["ok"] * 4

    store = make_store()
    assert total(store, check(dimension="migrated")) == 4
    with admin() as conn:
        version = conn.execute(
            in_schema(schema, "SELECT value FROM {}.meta WHERE name = 'version'")
        ).fetchall()
        reserve = f'"{schema}".reserve'
        oid = conn.execute(
            "SELECT xmin::text FROM pg_proc WHERE oid = %s::regproc", (reserve,)
        ).fetchone()
        store.migrate()  # up to date: changes nothing, not even the functions
        assert (
            conn.execute(
                "SELECT xmin::text FROM pg_proc WHERE oid = %s::regproc", (reserve,)
            ).fetchone()
            == oid
        )
    assert version == [(str(SCHEMA_VERSION),)]


def test_a_store_brings_functions_that_differ_from_its_own_up_to_date_on_first_use(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    """Same version, other functions (an older build): the first call re-creates them."""
    first = make_store()
    first.commit(reserved(first, [check("1")]))
    reserve = f'"{schema}".reserve'
    with admin() as conn:
        conn.execute(
            in_schema(schema, "UPDATE {}.meta SET value = 'older' WHERE name = 'functions'")
        )
        before = conn.execute(
            "SELECT xmin::text FROM pg_proc WHERE oid = %s::regproc", (reserve,)
        ).fetchone()
    second = make_store()
    assert total(second, check()) == 1  # its first call checks the schema
    with admin() as conn:
        digest = conn.execute(
            in_schema(schema, "SELECT value FROM {}.meta WHERE name = 'functions'")
        ).fetchone()
        after = conn.execute(
            "SELECT xmin::text FROM pg_proc WHERE oid = %s::regproc", (reserve,)
        ).fetchone()
    assert digest == (FUNCTIONS_DIGEST,)
    assert after != before  # re-created


def test_the_schema_is_made_on_first_use(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    store = make_store()
    with admin() as conn:
        assert not conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchall()
    assert total(store, check()) == 0
    with admin() as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,)
        ).fetchall()
    assert tables == [("counters",), ("entries",), ("meta",), ("pending",)]


def test_a_schema_made_by_a_newer_version_is_refused(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    store = make_store()
    store.migrate()
    with admin() as conn:
        conn.execute(in_schema(schema, "UPDATE {}.meta SET value = '99' WHERE name = 'version'"))
    with pytest.raises(StateStoreError, match="version 99, made by a newer Limenex"):
        make_store().migrate()


@pytest.mark.parametrize(
    "name",
    [
        'x"; DROP SCHEMA public CASCADE; --',
        "x; DROP SCHEMA public",
        "pg_catalog",
        "PG_temp",
        "1starts_with_a_digit",
        "has space",
        "has-dash",
        "",
        "a" * 64,
        "schéma",
    ],
)
def test_a_schema_name_that_is_not_a_plain_identifier_is_refused(name: str) -> None:
    with pytest.raises(LimenexConfigError, match="invalid PostgreSQL schema name"):
        PostgresStateStore(POSTGRES_URL, schema=name)


def test_two_schemas_are_two_stores(make_store: Callable[..., PostgresStateStore]) -> None:
    first = make_store()
    second = make_store(schema=f"{first.schema}_b")
    try:
        spend = check("30")
        mine = reserved(first, [spend])
        reserved(second, [check("5")])
        second.release(mine, T0)  # not second's: changes nothing anywhere
        second.commit(mine)
        assert (total(first, spend), total(second, spend)) == (30, 5)
        second.reset()
        assert total(first, spend) == 30
        assert [p.id for p in first.pending(T0)] == [mine.id]
        assert second.pending(T0) == []
        assert second.totals(T0) == []
    finally:
        with admin() as conn:
            conn.execute(in_schema(second.schema, "DROP SCHEMA IF EXISTS {} CASCADE"))


# --- failures ----------------------------------------------------------------------------------


def test_a_closed_port_is_reported_quickly_with_host_and_port(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    port = free_port()  # nothing listens there any more
    store = make_store(f"postgresql://postgres:hunter2@127.0.0.1:{port}/test")
    started = time.monotonic()
    with pytest.raises(StateStoreError) as caught:
        store.reserve([check()], T0)
    assert time.monotonic() - started < 3.0
    message = str(caught.value)
    assert f"PostgreSQL at 127.0.0.1:{port} is unreachable" in message
    assert "refused" in message.lower()
    assert "hunter2" not in message + repr(store)


async def test_a_closed_port_is_reported_quickly_from_async_code(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    port = free_port()
    store = make_store(f"postgresql://postgres:hunter2@127.0.0.1:{port}/test")
    started = time.monotonic()
    with pytest.raises(StateStoreError, match=f"127.0.0.1:{port} is unreachable") as caught:
        await store.areserve([check()], T0)
    assert time.monotonic() - started < 3.0
    assert "hunter2" not in str(caught.value)
    await store.aclose()


def test_a_statement_that_cannot_finish_in_time_fails_in_bounded_time(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    store = make_store(timeout=0.5)
    spend = check()
    store.commit(reserved(store, [spend]))
    with admin() as blocker:
        blocker.autocommit = False
        blocker.execute(in_schema(schema, "LOCK TABLE {}.counters IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        with pytest.raises(StateStoreError, match=r"did not answer within 0\.5 s"):
            store.reserve([spend], T0)
        assert time.monotonic() - started < 2.0
        blocker.rollback()
    store.commit(reserved(store, [spend]))  # and then it works again
    assert total(store, spend) == 20


def test_the_store_reconnects_after_its_connections_are_terminated(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    application = f"lxt-{uuid.uuid4().hex[:8]}"
    store = make_store(url_named(application))
    spend = check("30")
    store.commit(reserved(store, [spend]))
    threads = [threading.Thread(target=lambda: store.peek([spend], T0)) for _ in range(4)]
    for thread in threads:  # a few connections in the pool
        thread.start()
    for thread in threads:
        thread.join()
    assert terminate(application) >= 1
    # No error: the dead connections are replaced, the reserve is sent again, once.
    store.commit(reserved(store, [spend]))
    assert total(store, spend) == 60
    assert store.pending(T0) == []


async def test_the_async_side_reconnects_after_its_connections_are_terminated(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    application = f"lxt-{uuid.uuid4().hex[:8]}"
    store = make_store(url_named(application))
    spend = check("30")
    for _ in range(3):
        await store.acommit(await store.areserve([spend], T0))
    assert await asyncio.to_thread(terminate, application) >= 1
    outcomes = await asyncio.gather(*(store.areserve([spend], T0) for _ in range(5)))
    assert all(isinstance(outcome, Reservation) for outcome in outcomes)
    assert await store.apeek([spend], T0) == (Decimal(240),)
    await store.aclose()


def test_commits_are_durable_even_if_the_session_asks_otherwise(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    store = make_store(f"{POSTGRES_URL}?options=-c%20synchronous_commit%3Doff")
    store.commit(reserved(store, [check()]))
    with store._sync_pool().connection() as conn:
        setting = conn.execute("SHOW synchronous_commit").fetchone()
    assert setting == ("on",)


# --- concurrency -------------------------------------------------------------------------------


def _spend_in_a_process(schema: str, worker: int, start: Any, results: Any) -> None:
    """3 threads and 5 tasks, 10 attempts each; every 4th success is released instead."""
    store = PostgresStateStore(POSTGRES_URL, schema=schema)
    calls = check("1", "150", dimension="calls")
    lock = threading.Lock()
    counts = {"committed": 0, "released": 0}

    def settled(how: str) -> None:
        with lock:
            counts[how] += 1

    def thread() -> None:
        for n in range(10):
            outcome = store.reserve([calls], T0)
            if isinstance(outcome, Reservation):
                if n % 4 == 3:
                    store.release(outcome, T0)
                    settled("released")
                else:
                    store.commit(outcome)
                    settled("committed")

    async def task() -> None:
        for n in range(10):
            outcome = await store.areserve([calls], T0)
            if isinstance(outcome, Reservation):
                if n % 4 == 3:
                    await store.arelease(outcome, T0)
                    settled("released")
                else:
                    await store.acommit(outcome)
                    settled("committed")

    async def run() -> None:
        threads = [threading.Thread(target=thread) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.gather(*(task() for _ in range(5)))
        for t in threads:
            t.join()
        await store.aclose()

    try:
        start.wait()
        asyncio.run(run())
        results.put((worker, counts["committed"], counts["released"]))
    except Exception as exc:
        results.put((worker, f"{type(exc).__name__}: {exc}", 0))
    finally:
        store.close()


@pytest.mark.slow
def test_four_processes_never_pass_the_limit_and_the_total_is_what_ran(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    """4 processes x 8 connections' worth of callers x 10 attempts = 320 for a limit of 150."""
    make_store().migrate()
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [
        context.Process(target=_spend_in_a_process, args=(schema, n, start, results))
        for n in range(4)
    ]
    for process in workers:
        process.start()
    start.set()
    reports = [results.get(timeout=120) for _ in workers]
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert all(isinstance(committed, int) for _, committed, _ in reports), reports
    committed = sum(report[1] for report in reports)
    store = make_store()
    recorded = total(store, check(dimension="calls"))
    assert recorded == committed  # every commit counted, every release undone
    assert committed <= 150
    assert committed >= 150 - sum(report[2] for report in reports)  # nothing left unused
    assert store.pending(T0) == []


def test_opposite_key_orders_never_deadlock(
    make_store: Callable[..., PostgresStateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the threads name keys A, B; the other half B, A. Locks are taken in one order,
    so the server never has to break a deadlock (the store would retry it unseen)."""
    store = make_store()
    a, b = check("1", dimension="a_first"), check("1", dimension="b_second")
    store.commit(reserved(store, [a, b]))
    seen: list[str | None] = []
    triage = store._triage

    def recording(exc: psycopg.Error, *args: Any) -> str:
        seen.append(exc.sqlstate)
        return triage(exc, *args)

    monkeypatch.setattr(store, "_triage", recording)
    errors: list[BaseException] = []

    def spend(checks: list[Check]) -> None:
        try:
            for _ in range(40):
                store.commit(reserved(store, checks))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=spend, args=([a, b] if n % 2 else [b, a],)) for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert seen == []  # not one statement failed, deadlock (40P01) or other
    assert (total(store, a), total(store, b)) == (321, 321)


def test_each_reserve_drops_a_bounded_number_of_expired_records(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    store = make_store(lease_seconds=10.0)
    for _ in range(100):
        reserved(store, [check("1")], T0)  # never settled: their owner "died"

    def records() -> int:
        with admin() as conn:
            row = conn.execute(in_schema(schema, "SELECT count(*) FROM {}.pending")).fetchone()
        assert row is not None
        return int(row[0])

    store.commit(reserved(store, [check("1")], T0 + 60))  # all 100 have expired
    assert 100 - 20 <= records() < 100  # some went with this reserve, not all at once
    assert len(store.pending(T0 + 60)) == 0  # the listing drops every expired one
    assert records() == 0
    assert total(store, check(), T0 + 60) == 101  # their amounts stay counted


def test_rolling_entries_are_pruned_as_they_expire(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    store = make_store()
    spend = check("1", window="10s")
    for second in range(100):
        store.commit(reserved(store, [spend], T0 + second))
    with admin() as conn:
        row = conn.execute(in_schema(schema, "SELECT count(*) FROM {}.entries")).fetchone()
    assert row == (10,)  # the ten of the last ten seconds; older ones deleted on the way
    assert total(store, spend, T0 + 99) == 10


def test_a_breach_from_a_batch_does_not_spoil_the_others(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    """Reservations sent together are judged in order, each on its own."""
    store = make_store()
    store.migrate()
    spend = check("40", "100")
    items = [store._item([spend], T0) for _ in range(4)]
    with store._sync_pool().connection() as conn:
        outcomes = store._reserve(conn, items, False)
    assert [type(o) for o in outcomes] == [Reservation, Reservation, StateBreach, StateBreach]
    assert [o.observed for o in outcomes[:2]] == [(0,), (40,)]  # type: ignore[union-attr]
    assert total(store, spend) == 80
    assert sorted(p.id for p in store.pending(T0)) == sorted(i.rid for i in items[:2])


@pytest.fixture
async def loop_store(
    make_store: Callable[..., PostgresStateStore],
) -> AsyncIterator[PostgresStateStore]:
    store = make_store()
    yield store
    await store.aclose()


async def test_a_total_past_96_digits_fails_only_its_own_call_in_a_batch(
    loop_store: PostgresStateStore,
) -> None:
    store = loop_store
    huge = Decimal("1E+95")
    await store.acommit(await store.areserve([check(str(huge), "1E+300")], T0))
    outcomes = await asyncio.gather(
        store.areserve([check("1", "1E+300")], T0),
        store.areserve([check("0.5", "1E+300")], T0),  # 97 digits: refused, not rounded
        store.areserve([check("2", "1E+300")], T0),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], Reservation)
    assert isinstance(outcomes[2], Reservation)
    assert isinstance(outcomes[1], StateStoreError)
    assert "exact" in str(outcomes[1])
    assert await store.apeek([check()], T0) == (Decimal(10**95 + 3),)


def _reserve_after_fork(store: PostgresStateStore, results: Any) -> None:
    try:
        outcome = store.reserve([check("1")], T0)
        assert isinstance(outcome, Reservation)
        store.commit(outcome)
        store.close()
        results.put(outcome.id)
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_gets_connections_and_ids_of_its_own(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    store = make_store()
    mine = reserved(store, [check("1")])
    store.commit(mine)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [
        context.Process(target=_reserve_after_fork, args=(store, results)) for _ in range(3)
    ]
    for child in children:
        child.start()
    ids = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert all(re.fullmatch(r"[0-9a-f]{16}-[0-9]+", rid) for rid in ids), ids  # no error
    assert len({mine.id, *ids}) == 4
    store.commit(reserved(store, [check("1")]))  # the parent's pool still works
    assert total(store, check()) == 5


# --- review: defects found and fixed ------------------------------------------------------------


def test_a_loop_that_ends_without_aclose_is_not_held_by_a_hung_server(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    """A server that accepts connections and never answers (a SIGSTOPped one): the call fails
    in time, and so does ``asyncio.run`` that made it, though nobody called ``aclose``.

    psycopg_pool's workers take the cancellation ``asyncio.run`` sends them at shutdown, while
    they are connecting, for a failed connect, and then wait for more work: the loop waited
    for them for ever.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # connections complete in the backlog; nothing ever answers
        port = listener.getsockname()[1]
        store = make_store(f"postgresql://postgres@127.0.0.1:{port}/test", timeout=1.0)
        failures: list[BaseException] = []

        async def use() -> None:
            with pytest.raises(StateStoreError, match=f"127.0.0.1:{port}"):
                await store.areserve([check()], T0)

        def run() -> None:
            try:
                asyncio.run(use())
            except BaseException as exc:  # reported by the test below
                failures.append(exc)

        started = time.monotonic()
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(timeout=20)
        assert not runner.is_alive(), "asyncio.run never returned: the loop hangs on exit"
        assert failures == []
        assert time.monotonic() - started < 12


def test_short_event_loops_of_many_threads_all_end(
    make_store: Callable[..., PostgresStateStore],
) -> None:
    """As above, with a live server under load: a loop that ended while its pool was still
    opening a connection never returned from ``asyncio.run``."""
    store = make_store(max_connections=4)
    calls = check("1", "1E+6", dimension="calls")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    async def once() -> None:
        outcome = await store.areserve([calls], T0)
        assert isinstance(outcome, Reservation), outcome
        await store.acommit(outcome)

    def loops() -> None:
        start.wait()
        for _ in range(12):
            try:
                asyncio.run(once())
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

    threads = [threading.Thread(target=loops, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0))
    assert not any(thread.is_alive() for thread in threads), "an asyncio.run never returned"
    assert errors == []
    assert total(store, calls) == 8 * 12


@pytest.mark.parametrize("op", ["lt", "lte", "gt", "gte"])
def test_a_nan_limit_is_never_held(make_store: Callable[..., PostgresStateStore], op: str) -> None:
    """PostgreSQL sorts NaN above every number, so ``total <= NaN`` was true: an ALLOW where
    Python's Decimal (and so the reference store) refuses to compare."""
    store = make_store()
    spend = Check(0, check().key, None, Decimal("5"), op, Decimal("NaN"))
    with pytest.raises(StateStoreError, match="NaN"):
        store.reserve([spend], T0)
    assert total(store, check()) == 0
    assert store.pending(T0) == []


async def test_a_subject_the_server_cannot_store_fails_only_its_own_call_in_a_batch(
    loop_store: PostgresStateStore,
) -> None:
    """A NUL byte (PostgreSQL text cannot hold it) or a lone surrogate (no encoding has it) in
    an agent id failed the whole statement, so every reservation batched with it was refused."""
    store = loop_store
    subjects = ["agent-a", "bad\x00", "agent-c", "bad\ud800", "agent-e"]
    outcomes = await asyncio.gather(
        *(store.areserve([check("1", subject=subject)], T0) for subject in subjects),
        return_exceptions=True,
    )
    assert [type(outcome) for outcome in outcomes] == [
        Reservation,
        StateStoreError,
        Reservation,
        StateStoreError,
        Reservation,
    ]
    assert await store.apeek([check(subject="agent-c")], T0) == (Decimal(1),)
    assert len(await asyncio.to_thread(store.pending, T0)) == 3


def test_peeks_do_not_read_the_same_expired_entries_again_and_again(
    schema: str, make_store: Callable[..., PostgresStateStore]
) -> None:
    """``peek`` (the engine's dry run, and its path for a call refused before the store) read
    a rolling key's expired entries on every call until some reserve pruned them: its cost
    grew with the key's history. Now the first peek prunes them, as a reserve would."""
    store = make_store()
    spend = check("1", "1E+6", window="10s")
    for n in range(200):
        store.commit(reserved(store, [spend], T0 + n * 0.01))

    def entries() -> int:
        with admin() as conn:
            row = conn.execute(in_schema(schema, "SELECT count(*) FROM {}.entries")).fetchone()
        assert row is not None
        return int(row[0])

    assert entries() == 200
    assert total(store, spend, T0 + 10.995) == 100  # those recorded at T0 + 1.00 ... + 1.99
    assert entries() == 100  # pruned: the next peek starts at the first live entry
    assert store.peek([spend], T0 + 30) == (0,)
    assert entries() == 0
    # A counter a reserve holds is read, not waited for (nor locked out of lock order).
    for n in range(5):
        store.commit(reserved(store, [spend], T0 + 40 + n))
    with admin() as blocker:
        blocker.autocommit = False
        blocker.execute(in_schema(schema, "SELECT 1 FROM {}.counters FOR UPDATE"))
        started = time.monotonic()
        assert total(store, spend, T0 + 52) == 2
        assert time.monotonic() - started < 1.0
        blocker.rollback()
    assert entries() == 5
