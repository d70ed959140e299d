"""What only the SQLite store promises: its file, its durability setting, one transaction per
successful call, refusing files that are not its own, and safety across processes. The
behaviour shared by every store is in test_stores.py (run it with ``-k sqlite``)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from limenex.core import sqlite as sqlite_module
from limenex.core.engine import BlockedError, PolicyEngine
from limenex.core.errors import CorruptStateError, LimenexConfigError, StateStoreError
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import Check, CounterKey, Reservation, StateBreach
from limenex.core.stores import SQLiteStateStore
from limenex.core.window import Window

T0 = 1_773_144_000.0  # 2026-03-10T12:00:00Z

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 250
      breach_verdict: BLOCK
"""


def spend(amount: str, op: str = "lte", limit: str = "100", *, window: str = "") -> Check:
    key = CounterKey("spend_usd", "agent", "agent-1", window)
    return Check(
        0, key, Window.parse(window) if window else None, Decimal(amount), op, Decimal(limit)
    )


def reserved(store: SQLiteStateStore, *checks: Check, now: float = T0) -> Reservation:
    outcome = store.reserve(checks, now)
    assert isinstance(outcome, Reservation), outcome
    return outcome


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStateStore]:
    store = SQLiteStateStore(path)
    yield store
    store.close()


def statements(store: SQLiteStateStore) -> list[str]:
    """Record every SQL statement the store's connection runs from now on."""
    conn = store._conn
    assert conn is not None
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    return seen


# --- the file -------------------------------------------------------------------------------


def test_the_path_is_made_absolute_and_the_database_created_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStateStore(os.path.join("deep", "er", "state.db"))
    assert store.path == str(tmp_path / "deep" / "er" / "state.db")
    assert (tmp_path / "deep" / "er" / "state.db").exists()  # made, and checked, at once
    monkeypatch.chdir("/")
    store.commit(reserved(store, spend("5")))
    store.close()
    again = SQLiteStateStore(store.path)
    assert again.peek([spend("0")], T0) == (Decimal(5),)
    again.close()


def test_the_database_is_in_wal_mode_and_says_it_is_ours(
    store: SQLiteStateStore, path: Path
) -> None:
    store.commit(reserved(store, spend("5")))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA application_id").fetchone() == (0x4C4D4E58,)
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        assert conn.execute("SELECT dimension, subject, total FROM counters").fetchall() == [
            ("spend_usd", "agent-1", "5")
        ]
    conn.close()


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2), ("FULL", 2)])
def test_the_durability_setting_is_applied_to_the_connection(
    path: Path, synchronous: str, level: int
) -> None:
    store = SQLiteStateStore(path, synchronous=synchronous)
    store.peek([spend("0")], T0)  # opens the database
    assert store._conn is not None
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (level,)
    store.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [("synchronous", "off"), ("synchronous", "extra"), ("synchronous", 1), ("timeout", -1.0)],
)
def test_other_settings_are_refused(path: Path, option: str, value: object) -> None:
    with pytest.raises(LimenexConfigError, match=option):
        SQLiteStateStore(path, **{option: value})


def test_a_reopened_file_has_every_total_and_pending_reservation(path: Path) -> None:
    first = SQLiteStateStore(path)
    plain, rolling, daily = spend("1.10"), spend("2", window="10m"), spend("3", window="day")
    first.commit(reserved(first, plain, rolling, daily))
    open_ = reserved(first, spend("0.5"))
    first.close()

    again = SQLiteStateStore(path)
    assert again.peek([plain, rolling, daily], T0 + 60) == (
        Decimal("1.60"),
        Decimal(2),
        Decimal(3),
    )
    assert [p.id for p in again.pending(T0)] == [open_.id]
    again.release(open_, T0)  # the same database: the reservation is still its to undo
    assert again.peek([plain], T0) == (Decimal("1.10"),)
    assert dict(again.totals(T0 + 601)) == {plain.key: Decimal("1.10"), daily.key: Decimal(3)}
    again.close()


def test_two_store_objects_on_one_file_see_each_others_reservations(path: Path) -> None:
    one, two = SQLiteStateStore(path), SQLiteStateStore(path)
    mine = reserved(one, spend("30"))
    assert two.peek([spend("0")], T0) == (Decimal(30),)
    assert [p.id for p in two.pending(T0)] == [mine.id]
    theirs = reserved(two, spend("60"))
    assert theirs.observed == (Decimal(30),)
    assert isinstance(one.reserve([spend("20")], T0), StateBreach)  # 90 + 20 > 100
    one.commit(mine)
    one.close()  # sends the queued commit
    assert [p.id for p in two.pending(T0)] == [theirs.id]
    two.release(theirs, T0)
    assert two.peek([spend("0")], T0) == (Decimal(30),)
    two.close()


# --- refusing files that are not ours -------------------------------------------------------


def _engine(state: SQLiteStateStore) -> PolicyEngine:
    return PolicyEngine(policy_store=InMemoryPolicyStore.from_yaml(POLICY), state_store=state)


def _assert_refused(path: Path, match: str) -> None:
    """Every call raises CorruptStateError, the engine fails closed, the file stays as is."""
    content = path.read_bytes()
    store = SQLiteStateStore(path)
    for _ in range(2):  # refused again, not remembered as fine
        with pytest.raises(CorruptStateError, match=match) as caught:
            store.reserve([spend("1")], T0)
        assert str(path) in str(caught.value)
    with pytest.raises(CorruptStateError):
        store.peek([spend("1")], T0)
    ran: list[int] = []
    engine = _engine(store)
    with pytest.raises(BlockedError) as blocked:
        engine.execute_sync("finance.spend", "agent-1", {"amount_usd": 1}, lambda: ran.append(1))
    assert blocked.value.decision.fail_closed
    assert isinstance(blocked.value.__cause__, CorruptStateError)
    assert ran == []
    engine.close()  # closes the store and flushes the audit log
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"spend_usd": {"agent-1": 30.0}}\n', "not an SQLite database"),  # JSON, wrong name
        (b"SQLite format 3\0", "not an SQLite database"),  # a header and nothing else
        (b"\0" * 4096, "not an SQLite database"),
        (b"SQLite format 3\0" + b"\xff" * 4096, "not an SQLite database"),  # SQLite says so
    ],
    ids=["json", "truncated", "zeros", "garbage"],
)
def test_a_file_that_is_not_an_sqlite_database_is_refused_and_kept(
    path: Path, content: bytes, match: str
) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    _assert_refused(path, match)
    # Nothing beside it but the engine's audit log, which says the call was blocked.
    assert sorted(os.listdir(path.parent)) == ["audit.log", "state.db"]
    assert '"event":"blocked"' in (path.parent / "audit.log").read_text()


def test_another_applications_database_is_refused_and_kept(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, total INTEGER)")
    conn.execute("INSERT INTO counters VALUES ('visits', 41)")
    conn.commit()
    conn.close()
    _assert_refused(path, "another application's database")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT * FROM counters").fetchall() == [("visits", 41)]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


def test_a_database_of_a_newer_schema_is_refused_and_kept(path: Path) -> None:
    store = SQLiteStateStore(path)
    store.commit(reserved(store, spend("5")))
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    _assert_refused(path, "newer Limenex")


def test_an_empty_file_becomes_a_new_database(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    store = SQLiteStateStore(path)
    store.commit(reserved(store, spend("5")))
    assert store.peek([spend("0")], T0) == (Decimal(5),)
    store.close()


# --- one transaction per successful call ----------------------------------------------------


def test_a_successful_reserve_and_commit_is_one_transaction(store: SQLiteStateStore) -> None:
    """Counted for real: the statements SQLite runs, via the connection's trace callback."""
    store.commit(reserved(store, spend("1")))  # opens the database, creates the counter
    seen = statements(store)
    for n in range(5):
        reservation = reserved(store, spend("1"), now=T0 + n)
        store.commit(reservation)  # queued: no statement of its own
    begins = [s for s in seen if s.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE"] * 5
    assert seen.count("COMMIT") == 5
    # Each reserve deleted the previous call's pending record in its own transaction.
    assert sum("DELETE FROM pending" in s for s in seen) == 5
    assert store.pending(T0 + 5) == []  # the last queued commit, sent with this call
    assert store.peek([spend("0")], T0) == (Decimal(6),)


def test_the_hot_statements_are_index_searches_whatever_the_number_of_keys(
    store: SQLiteStateStore,
) -> None:
    """No statement a call runs scans a table: its cost does not grow with the keys."""
    store.peek([spend("0")], T0)
    assert store._conn is not None
    hot = [
        sqlite_module._COUNTER,
        sqlite_module._SET_TOTAL,
        sqlite_module._NEW_TOTAL,
        sqlite_module._SET_ROLLING,
        sqlite_module._UPSERT,
        sqlite_module._ENTRIES,
        sqlite_module._HEAD,
        sqlite_module._NEW_ENTRY,
        sqlite_module._DROP_ENTRY,
        sqlite_module._DROP_ENTRY_IF,
        sqlite_module._DROP_ENTRIES_TO,
        sqlite_module._HOLD,
        sqlite_module._HOLD_AT,
        sqlite_module._SETTLE,
        sqlite_module._SWEEP,
        sqlite_module._SWEEP_SETTLE,
    ]
    for sql in hot:
        arguments = sql.count("?") and max(
            int(part.split()[0].rstrip(",);")) for part in sql.split("?")[1:]
        )
        plan = store._conn.execute(f"EXPLAIN QUERY PLAN {sql}", (1,) * arguments).fetchall()
        assert not [step for step in plan if "SCAN" in step[3]], (sql, plan)


def test_a_reserve_drops_expired_records_a_bounded_number_at_a_time(
    path: Path,
) -> None:
    store = SQLiteStateStore(path, lease_seconds=10.0)
    for n in range(150):
        reserved(store, spend("0"), now=T0 + n * 1e-3)
    seen = statements(store)
    reserved(store, spend("0"), now=T0 + 20)
    assert store._conn is not None
    left = store._conn.execute("SELECT count(*) FROM pending").fetchone()[0]
    assert 150 - 64 <= left <= 150  # at most ~64 dropped, and the new record added
    assert sum(s.startswith("DELETE FROM pending") for s in seen) == 1
    assert store.pending(T0 + 20) != []  # the live one only
    assert len(store.pending(T0 + 20)) == 1
    assert store.peek([spend("0")], T0 + 20) == (Decimal(0),)
    store.close()


def test_expired_rolling_entries_are_pruned_as_calls_go(store: SQLiteStateStore) -> None:
    for n in range(100):
        store.commit(reserved(store, spend("1", window="10s"), now=T0 + n))
    assert store._conn is not None
    count = store._conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    assert count <= 11  # the entries of the last 10 seconds, and the one just made
    assert store.peek([spend("0", window="10s")], T0 + 99) == (Decimal(10),)


# --- locking, threads, async ----------------------------------------------------------------


def _hold_the_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection takes the write lock now and keeps it for ``seconds``."""
    taken = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait()
    return thread


def test_a_locked_database_fails_after_the_timeout_with_a_clear_message(path: Path) -> None:
    store = SQLiteStateStore(path, timeout=0.2)
    store.peek([spend("0")], T0)
    holder = _hold_the_write_lock(path, 1.0)
    started = time.monotonic()
    with pytest.raises(StateStoreError, match="is locked") as caught:
        store.reserve([spend("1")], T0)
    assert 0.15 < time.monotonic() - started < 0.8
    assert str(path) in str(caught.value)
    holder.join()
    assert isinstance(store.reserve([spend("1")], T0), Reservation)  # usable again
    store.close()


def test_a_call_waits_for_a_short_lock(store: SQLiteStateStore, path: Path) -> None:
    store.peek([spend("0")], T0)
    holder = _hold_the_write_lock(path, 0.2)
    assert isinstance(store.reserve([spend("1")], T0), Reservation)
    holder.join()


async def test_async_calls_run_inline_when_uncontended(store: SQLiteStateStore) -> None:
    await store.apeek([spend("0")], T0)  # opens the database (on a worker thread)
    threads: set[int] = set()
    assert store._conn is not None
    store._conn.set_trace_callback(lambda _: threads.add(threading.get_ident()))
    outcome = await store.areserve([spend("5")], T0)
    assert isinstance(outcome, Reservation)
    await store.acommit(outcome)
    await store.arelease(outcome, T0)  # already committed: carries the commit only
    assert await store.apeek([spend("0")], T0) == (Decimal(5),)
    assert threads == {threading.get_ident()}


async def test_async_calls_do_not_block_the_loop_while_another_process_writes(
    store: SQLiteStateStore, path: Path
) -> None:
    await store.apeek([spend("0")], T0)
    holder = _hold_the_write_lock(path, 0.3)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    outcome = await store.areserve([spend("5")], T0)
    ticker.cancel()
    holder.join()
    assert isinstance(outcome, Reservation)
    assert len(gaps) > 20  # the loop kept running while the reserve waited
    assert max(gaps) < 0.1


def test_the_log_is_checkpointed_and_stays_small(store: SQLiteStateStore, path: Path) -> None:
    for n in range(3000):
        store.commit(reserved(store, spend("0"), now=T0 + n * 1e-3))
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size < 1_500_000  # ~1,000 pages of 1 KiB at most, reused
    assert store._conn is not None
    (stamp,) = store._conn.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()
    assert abs(float(stamp) - time.time()) < 60


def test_a_quiet_store_fsyncs_its_log_about_a_second_after_a_write(
    store: SQLiteStateStore,
) -> None:
    """``normal`` mode: one write, then silence; the syncer thread checkpoints it anyway."""
    store.commit(reserved(store, spend("1")))
    ran = statements(store)
    started = time.monotonic()
    while not any("wal_checkpoint" in sql for sql in ran):
        assert time.monotonic() - started < 5, "the write was never synced"
        time.sleep(0.05)
    assert time.monotonic() - started >= sqlite_module.SYNC_AFTER / 2  # not before it was due
    assert store._writes == 0


async def test_async_calls_leave_checkpoints_to_a_worker_thread(
    store: SQLiteStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 5)
    await store.apeek([spend("0")], T0)
    ran: list[tuple[int, str]] = []
    assert store._conn is not None
    store._conn.set_trace_callback(lambda sql: ran.append((threading.get_ident(), sql)))
    for n in range(12):
        outcome = await store.areserve([spend("1")], T0 + n)
        assert isinstance(outcome, Reservation)
        await store.acommit(outcome)
    loop = threading.get_ident()
    checkpoints = [thread for thread, sql in ran if "wal_checkpoint" in sql]
    assert len(checkpoints) == 2
    assert loop not in checkpoints
    assert {thread for thread, sql in ran if sql.startswith("INSERT INTO pending")} == {loop}


async def test_with_full_durability_async_calls_wait_on_a_worker_thread(path: Path) -> None:
    store = SQLiteStateStore(path, synchronous="full")
    await store.apeek([spend("0")], T0)
    threads: set[int] = set()
    assert store._conn is not None
    store._conn.set_trace_callback(lambda _: threads.add(threading.get_ident()))
    outcome = await store.areserve([spend("5")], T0)
    assert isinstance(outcome, Reservation)
    assert threads
    assert threading.get_ident() not in threads
    await store.aclose()


async def test_async_close_sends_the_queued_commits(path: Path) -> None:
    store = SQLiteStateStore(path)
    outcome = await store.areserve([spend("5")], T0)
    assert isinstance(outcome, Reservation)
    await store.acommit(outcome)
    await store.aclose()
    other = SQLiteStateStore(path)
    assert other.pending(T0) == []
    other.close()


# --- processes ------------------------------------------------------------------------------


def _spend_worker(path: str, log: str, attempts: int, start: object) -> None:
    engine = _engine(SQLiteStateStore(path))

    def pay() -> None:
        with open(log, "a") as file:
            file.write("2.5\n")

    start.wait()  # type: ignore[attr-defined]
    for _ in range(attempts):
        try:
            engine.execute_sync("finance.spend", "agent-1", {"amount_usd": 2.5}, pay)
        except BlockedError as exc:
            if exc.decision.fail_closed:  # a failure, not the limit: the worker fails
                raise
    engine.state_store.close()


@pytest.mark.slow
def test_four_processes_sharing_a_file_never_exceed_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SQLiteStateStore(path).peek([spend("0")], T0)  # one creates it; the others open it
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    logs = [tmp_path / f"executed-{n}.log" for n in range(4)]
    workers = [
        context.Process(target=_spend_worker, args=(str(path), str(log), 60, start)) for log in logs
    ]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0

    ran = [Decimal(line) for log in logs if log.exists() for line in log.read_text().split()]
    assert len(ran) == 100  # 100 x $2.50 == $250, the limit; 240 attempts in all
    store = SQLiteStateStore(path)
    key = CounterKey("spend_usd", "agent", "agent-1", "")
    assert dict(store.totals(T0)) == {key: sum(ran)}
    assert sum(ran) == 250
    store.close()


def _die_with_a_queued_commit(path: str) -> None:
    store = SQLiteStateStore(path)
    outcome = store.reserve([spend("7")], T0)
    assert isinstance(outcome, Reservation)
    store.commit(outcome)  # queued only
    os._exit(0)  # no close(): the commit is never sent


@pytest.mark.slow
def test_a_process_that_dies_with_a_queued_commit_leaves_its_amount_counted(
    path: Path,
) -> None:
    path.parent.mkdir(parents=True)
    child = multiprocessing.get_context("spawn").Process(
        target=_die_with_a_queued_commit, args=(str(path),)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    store = SQLiteStateStore(path)
    assert store.peek([spend("0")], T0) == (Decimal(7),)
    assert len(store.pending(T0)) == 1  # until its lease ends
    assert store.pending(T0 + store.lease_seconds) == []
    assert store.peek([spend("0")], T0 + store.lease_seconds) == (Decimal(7),)
    store.close()


def _reserve_in_child(store: SQLiteStateStore, amount: str) -> None:
    outcome = store.reserve([spend(amount)], T0)
    assert isinstance(outcome, Reservation)
    store.commit(outcome)
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_its_own_connection(store: SQLiteStateStore) -> None:
    store.commit(reserved(store, spend("1")))  # the parent's connection is open
    child = multiprocessing.get_context("fork").Process(target=_reserve_in_child, args=(store, "2"))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    store.commit(reserved(store, spend("4")))  # the parent's connection still works
    assert store.peek([spend("0")], T0) == (Decimal(7),)


def _in_child(job: Callable[[], None]) -> int:
    """Run ``job`` in a forked child; its pid. The child never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            job()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_parent_closing_after_a_fork_cannot_hide_the_childs_spend(
    store: SQLiteStateStore, path: Path
) -> None:
    """The child's connection must hold its own locks: when the parent closes what was its
    last connection, SQLite must not think the database unused and drop the log the child
    still writes to (the next process would then miss the child's spend and overspend)."""
    store.peek([spend("0")], T0)  # the parent's connection is open when it forks
    (ready, tell), (wait, go) = os.pipe(), os.pipe()  # child -> parent, parent -> child

    def child() -> None:
        os.close(ready)
        os.close(go)
        store.commit(reserved(store, spend("1")))  # the child's own connection
        os.write(tell, b"1")
        os.read(wait, 1)  # the parent has closed its connection meanwhile
        store.commit(reserved(store, spend("2")))
        os.write(tell, b"2")
        os.read(wait, 1)  # stays alive, connection open, until the parent has looked

    pid = _in_child(child)
    os.close(tell)  # so that a child that died reads as EOF here, not as a hang
    os.close(wait)
    try:
        assert os.read(ready, 1) == b"1"
        store.close()
        os.write(go, b"g")
        assert os.read(ready, 1) == b"2"
        other = SQLiteStateStore(path)
        try:
            assert other.peek([spend("0")], T0) == (Decimal(3),)
            assert isinstance(other.reserve([spend("98")], T0), StateBreach)  # 3 + 98 > 100
        finally:
            other.close()
    finally:
        os.close(go)  # the child's last read ends
        os.close(ready)
        assert _exit_code(pid) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_long_call_fails_closed_on_that_database(path: Path) -> None:
    """When a connection cannot be closed before the fork (a call kept the store busy past
    its timeout), the child refuses that database instead of sharing the connection's locks."""
    store = SQLiteStateStore(path, timeout=0.0)
    store.peek([spend("0")], T0)
    taken, done = threading.Event(), threading.Event()

    def busy() -> None:
        with store._lock:  # a call in progress on another thread
            taken.set()
            done.wait(10)

    thread = threading.Thread(target=busy)
    thread.start()
    taken.wait()

    def child() -> None:
        for make in (lambda: store, lambda: SQLiteStateStore(path)):
            with pytest.raises(StateStoreError, match="forked"):
                make().reserve([spend("1")], T0)

    try:
        pid = _in_child(child)
    finally:
        done.set()
        thread.join()
    assert _exit_code(pid) == 0
    assert isinstance(store.reserve([spend("1")], T0), Reservation)  # the parent goes on
    store.close()


# --- failures are StateStoreErrors, never raw exceptions ---------------------------------------


def test_text_sqlite_cannot_store_is_a_state_store_error_and_the_engine_blocks(
    store: SQLiteStateStore,
) -> None:
    """An agent id with a lone surrogate (JSON "\\ud800" decodes to one) cannot be UTF-8."""
    odd = Check(0, CounterKey("spend_usd", "agent", "a\ud800", ""), None, Decimal(1), "lte",
                Decimal(5))  # fmt: skip
    with pytest.raises(StateStoreError, match="cannot store this text"):
        store.reserve([odd], T0)
    ran: list[int] = []
    with pytest.raises(BlockedError) as blocked:
        _engine(store).execute_sync(
            "finance.spend", "a\ud800", {"amount_usd": 1}, lambda: ran.append(1)
        )
    assert blocked.value.decision.fail_closed
    assert isinstance(blocked.value.__cause__, StateStoreError)
    assert ran == []
    assert isinstance(store.reserve([spend("1")], T0), Reservation)  # the store goes on


@pytest.mark.parametrize(
    ("damage", "call"),
    [
        ("UPDATE pending SET more = '[1, 2'", "pending"),
        ("UPDATE pending SET more = '[[1, 2]]'", "pending"),
        ("UPDATE counters SET \"window\" = 'fortnight'", "totals"),
        ("UPDATE counters SET total = 'lots'", "peek"),
    ],
)
def test_a_damaged_row_is_reported_as_corrupt_state(
    store: SQLiteStateStore, path: Path, damage: str, call: str
) -> None:
    other = CounterKey("spend_usd", "agent", "agent-2", "")
    reserved(store, spend("1"), Check(0, other, None, Decimal(1), "lte", Decimal(5)))
    with sqlite3.connect(path) as conn:
        conn.execute(damage)
    conn.close()
    operation = {
        "pending": lambda: store.pending(T0),
        "totals": lambda: store.totals(T0),
        "peek": lambda: store.peek([spend("0")], T0),
    }[call]
    with pytest.raises(CorruptStateError, match=str(path)):
        operation()


def _spend_in_another_process(path: str) -> None:
    store = SQLiteStateStore(path)
    store.commit(store.reserve([spend("1")], T0))  # type: ignore[arg-type]
    store.close()  # the last connection of that process: it may checkpoint and drop the WAL


def test_opening_more_stores_on_a_file_keeps_this_process_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it.

    Were a store to read the header with ``open()``, a second store (or an approval store)
    opened on the same database would silently drop the first one's SQLite locks; another
    process closing its connection would then checkpoint and delete the WAL under the first
    connection, which would stop seeing new writes and could lose its own.
    """
    from limenex.approvals import SQLiteApprovalStore

    path = str(tmp_path / "state.db")
    first = SQLiteStateStore(path)
    first.commit(first.reserve([spend("1")], T0))  # type: ignore[arg-type]
    fork = multiprocessing.get_context("spawn")
    for opener in (lambda: SQLiteStateStore(path), lambda: SQLiteApprovalStore(path)):
        other = opener()
        other.pending(T0) if isinstance(other, SQLiteApprovalStore) else other.peek([], T0)
        other.close()
        worker = fork.Process(target=_spend_in_another_process, args=(path,))
        worker.start()
        worker.join(60)
        assert worker.exitcode == 0
        assert os.path.exists(path + "-wal")  # our connection still holds the database
    (total,) = first.peek([spend("0")], T0)
    assert total == 3  # ours and both of the other process's spends are visible
    first.close()
