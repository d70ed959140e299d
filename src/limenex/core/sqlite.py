"""The SQLite state store: totals in one database file, shared by threads and processes.

:class:`SQLiteStateStore` behaves exactly like :class:`~limenex.core.stores.InMemoryStateStore`
(the contract is :mod:`limenex.core.state`, the reference semantics are in
:mod:`limenex.core.stores`); the numbers simply live in a file that every process of the
host can open at once.

The database
------------

Four tables. Every statement of ``reserve``, ``commit``, ``release`` and ``peek`` is an index
search, so a call costs the same with one key or a million (only the operator's ``totals``,
``pending``, ``reset`` and refunds read whole tables)::

    counters  (dimension, scope, subject, "window") PRIMARY KEY  -- one row per CounterKey
              total   exact decimal text (str(Decimal)): the running total
              period  calendar windows: the period the total belongs to ("2026-03-10")
              head    rolling windows: the time of the oldest entry, NULL without entries
              seq     rolling windows: the number of the last entry recorded
    entries   (dimension, scope, subject, "window", seq) PRIMARY KEY, at, amount
              -- a rolling window's amounts; the counter's total is their running sum
    pending   (expires_at, id) PRIMARY KEY, created_at, owner,
              dimension, scope, subject, "window", amount, slot, more
              -- a pending reservation: its first amount in columns, any others in ``more``
              (a JSON list of [dimension, scope, subject, window, amount, slot])
    meta      key PRIMARY KEY, value  -- "uid": this database's random identity;
                                        "checkpoint": when the log was last copied back

``slot`` says where an amount went: ``NULL`` for a plain total, the calendar period, or the
rolling entry's ``seq``; a release undoes exactly that. A calendar total counts while its
period lasts: a row whose period is older than ``now``'s reads as zero and is overwritten by
the next write. A rolling counter's expired entries are pruned from the oldest (in the order
they were recorded) when ``head`` says the oldest has expired, so each entry is deleted once:
amortised constant work per call. Pending records are keyed by expiry, so dropping the expired
ones is an index range search: a reserve does it once a second, about 64 records at most.

The tables are ``WITHOUT ROWID``: a counter is found, and updated, with one B-tree search.
A successful reserve writes two pages (the counter's and the pending record's), which is
what a WAL commit and its checkpoint cost. The file carries ``PRAGMA application_id``
``0x4C4D4E58`` ("LMNX") and ``PRAGMA user_version`` 1. A file that is not an SQLite
database, an SQLite database of something else, or one written by a newer schema raises
:class:`~limenex.core.errors.CorruptStateError` on every call and is never written to.

Atomicity and concurrency
-------------------------

Each operation is one transaction. Writers start with ``BEGIN IMMEDIATE``, which takes the
database's write lock before reading anything, so read-check-write cannot interleave with
another writer in any thread or process; totals are read, compared and computed in Python
with :data:`~limenex.core.state.EXACT` inside that transaction and written back as exact text.
The database runs in WAL mode: readers never block writers, nor writers readers. Threads of
one process share one connection under a lock. A connection that finds the write lock taken
waits for it, retrying with short sleeps, up to ``timeout`` seconds, then raises
:class:`~limenex.core.errors.StateStoreError`. A process made by ``fork`` opens its own
connection: every connection is closed just before a fork (and reopened on use), since
SQLite connections, even idle ones, must not cross a fork.

Commits ride on the next transaction: :meth:`SQLiteStateStore.commit` only queues the
reservation in a :class:`~limenex.core.state.CommitQueue`, and the next transaction of this
store (usually the next reserve) first deletes their pending records, inside that same
transaction. A governed call that succeeds is therefore one transaction. The queue is sent
on its own when it is full or its oldest commit has waited a second, on
:meth:`~SQLiteStateStore.close`, and when the interpreter exits. A commit that is never sent
(the process died) leaves its record to expire with its lease, its amounts counted: what a
commit means.

Every 500 write transactions, a connection copies the log into the database (a checkpoint,
which fsyncs both files); SQLite's automatic checkpoint is turned off so that this happens
after a call, not inside one. With ``synchronous="normal"`` a background thread also
checkpoints any store whose oldest unsynced write is ``SYNC_AFTER`` (1 s) old, so a quiet
store's last calls are on disk within about a second, not only at its 500th write.

The async methods run the transaction inline on the event loop when it can start at once
(some 25 microseconds, less than a hop to a thread costs): they never wait for a lock there.
When the write lock is taken (by another thread or process), or the database is not open
yet, they hand the operation to a worker thread (:func:`asyncio.to_thread`), which waits up
to ``timeout`` seconds without blocking the loop. A checkpoint that falls due, too, runs on a
worker thread, and with ``synchronous="full"``, where every commit waits for the disk, every
async call does.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import sqlite3
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from decimal import ConversionSyntax, Decimal
from typing import Any, TypeVar

from limenex.core.errors import (
    CorruptStateError,
    LimenexConfigError,
    LimenexError,
    StateStoreError,
)
from limenex.core.state import (
    EXACT,
    OPERATORS,
    RESERVED_DIMENSION,
    Check,
    CommitQueue,
    CounterKey,
    PendingReservation,
    Reservation,
    StateBreach,
    StateStore,
    counter_window,
)
from limenex.core.window import Window

__all__ = ["SQLiteStateStore"]

APPLICATION_ID = 0x4C4D4E58
"""``PRAGMA application_id`` of a Limenex state database: "LMNX"."""
SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the layout this module reads and writes."""
PAGE_SIZE = 1024
"""Page size of a new database. A reserve writes two pages to the log, and the checkpoint's
fsync costs what was written: 1 KiB pages make a call ~7 us cheaper than the default 4 KiB."""
TABLES = frozenset({"counters", "entries", "pending", "meta"})
CHECKPOINT_EVERY = 500
SYNC_AFTER = 1.0
"""With ``synchronous="normal"``, the longest a finished write waits for the fsync that makes
it survive a power cut: a background thread checkpoints a store whose oldest unsynced write
is this old, so a quiet store is not left unsynced until its 500th write."""
"""Write transactions of one connection between checkpoints: ~1,000 log pages, SQLite's own
default, at two pages a call."""

_SCHEMA = (
    """CREATE TABLE counters (
        dimension TEXT NOT NULL,
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        "window" TEXT NOT NULL,
        total TEXT NOT NULL,
        period TEXT,
        head REAL,
        seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (dimension, scope, subject, "window")
    ) WITHOUT ROWID""",
    """CREATE TABLE entries (
        dimension TEXT NOT NULL,
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        "window" TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        amount TEXT NOT NULL,
        PRIMARY KEY (dimension, scope, subject, "window", seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE pending (
        expires_at REAL NOT NULL,
        id INTEGER NOT NULL,
        created_at REAL NOT NULL,
        owner TEXT NOT NULL,
        dimension TEXT,
        scope TEXT,
        subject TEXT,
        "window" TEXT,
        amount TEXT,
        slot,
        more TEXT,
        PRIMARY KEY (expires_at, id)
    ) WITHOUT ROWID""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)

# The statements, written out in full. ``?1``..``?4`` are a CounterKey's fields throughout.
_COUNTER = (
    "SELECT total, period, head, seq FROM counters"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4'
)
_SET_TOTAL = (
    "UPDATE counters SET total = ?5"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4'
)
_NEW_TOTAL = (
    'INSERT INTO counters (dimension, scope, subject, "window", total) VALUES (?1, ?2, ?3, ?4, ?5)'
)
_SET_ROLLING = (
    "UPDATE counters SET total = ?5, head = ?6"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4'
)
_UPSERT = (
    'INSERT INTO counters (dimension, scope, subject, "window", total, period, head, seq)'
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO UPDATE SET total = excluded.total,"
    " period = excluded.period, head = excluded.head, seq = excluded.seq"
)
_ENTRIES = (
    "SELECT seq, at, amount FROM entries"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4 ORDER BY seq'
)
_HEAD = (
    "SELECT at FROM entries"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4'
    " ORDER BY seq LIMIT 1"
)
_NEW_ENTRY = "INSERT INTO entries VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
_SET_ENTRY = (
    "UPDATE entries SET amount = ?6"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4 AND seq = ?5'
)
_DROP_ENTRY = (
    "DELETE FROM entries"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4 AND seq = ?5'
)
_DROP_ENTRY_IF = _DROP_ENTRY + " AND amount = ?6"
_DROP_ENTRIES_TO = (
    "DELETE FROM entries"
    ' WHERE dimension = ?1 AND scope = ?2 AND subject = ?3 AND "window" = ?4 AND seq <= ?5'
)
_HOLD = "INSERT INTO pending VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
_HELD = (
    'SELECT id, created_at, expires_at, owner, dimension, scope, subject, "window",'
    " amount, slot, more FROM pending"
)
_HOLD_AT = (
    'SELECT dimension, scope, subject, "window", amount, slot, more FROM pending'
    " WHERE expires_at = ?1 AND id = ?2"
)
_REHOLD = (
    'UPDATE pending SET dimension = ?3, scope = ?4, subject = ?5, "window" = ?6, amount = ?7,'
    " slot = ?8, more = ?9 WHERE expires_at = ?1 AND id = ?2"
)
_SETTLE = "DELETE FROM pending WHERE expires_at = ?1 AND id = ?2"
_EXPIRE = "DELETE FROM pending WHERE expires_at <= ?1"
# A reserve's sweep: the records expired at ?1 up to the 64th (ties with it included).
_SWEEP = (
    "DELETE FROM pending WHERE expires_at <= coalesce((SELECT expires_at FROM pending"
    " WHERE expires_at <= ?1 ORDER BY expires_at LIMIT 1 OFFSET 63), ?1)"
)
_SWEEP_SETTLE = _SWEEP + " OR (expires_at = ?2 AND id = ?3)"

_RESTART_LOG = (
    "INSERT INTO meta VALUES ('checkpoint', ?1) ON CONFLICT DO UPDATE SET value = excluded.value"
)

_SYNCHRONOUS = ("normal", "full")
_ZERO = Decimal(0)
_add = EXACT.add
_subtract = EXACT.subtract
_T = TypeVar("_T")

Execute = Callable[..., sqlite3.Cursor]
State = tuple[Decimal, bool, str | None, float | None, int]
"""A counter as a reserve sees it: ``(total, row exists, period, head, seq)``."""
Amount = tuple[CounterKey, str, "str | int | None"]
"""A pending amount: its counter, the amount as exact text, and its slot."""

_stores: weakref.WeakSet[SQLiteStateStore] = weakref.WeakSet()
_held_for_fork: list[threading.Lock] = []
"""The locks of the stores whose connection was closed for a fork, held across it."""
_abandoned: list[sqlite3.Connection] = []
"""Connections a forked child inherited: never used nor closed there (SQLite forbids it)."""
_unsafe: set[str] = set()
"""Databases this process must not open: it inherited an open connection to them (fork)."""


class _Busy(Exception):
    """The write lock is taken and the caller asked not to wait for it."""


class _Unreadable(ValueError):
    """A stored row this module cannot decode (raised as a CorruptStateError)."""


def file_size(path: str, error: type[LimenexError]) -> int | None:
    """The size of the file at ``path`` (``None``: there is none); refuses what cannot be ours.

    The file is never opened here: closing *any* descriptor of a file drops every POSIX
    lock this process holds on it, SQLite's included (another process could then checkpoint
    and remove the WAL under our connections). SQLite itself reads the header, and
    :func:`refusing_non_databases` turns its refusal into a clear error.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    if 0 < size < 100:  # shorter than the header of any SQLite database
        raise not_a_database(path)
    return size


def not_a_database(path: str) -> CorruptStateError:
    return CorruptStateError(
        f"{path} is not an SQLite database. The file was left as found: fix or move it, or"
        " point the store at another path."
    )


@contextlib.contextmanager
def refusing_non_databases(path: str) -> Iterator[None]:
    """SQLite's "file is not a database" (it wrote nothing) as :func:`not_a_database`."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_NOTADB:
            raise not_a_database(path) from exc
        raise


class SQLiteStateStore(StateStore):
    """Totals in one SQLite database file, safe across threads and processes of one host.

    ``path`` is made absolute once, its folder created, and the database created or checked
    (a file that cannot be used is reported by every call, so the engine blocks them).

    ``synchronous`` says what a finished call survives. ``"normal"`` (the default): a crash of
    the process, never a torn file; the log is fsynced at checkpoints, after 500 write
    transactions of a connection or, by a background thread, once a write has waited
    ``SYNC_AFTER`` (1 s), so a power cut or a crash of the operating system may lose the
    totals of about the last second of calls, as if they had not happened. ``"full"``: a
    power cut too, at the price of an fsync per transaction (a millisecond or more on most
    disks).

    ``timeout`` bounds, in seconds, how long a call waits for another connection's write
    lock. See the module docstring for the layout, the locking and the async behaviour.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease_seconds: float = 300.0,
        synchronous: str = "normal",
        timeout: float = 5.0,
    ) -> None:
        # Absolute once: a later chdir must not point the store at another folder's file.
        self.path = os.path.abspath(os.fspath(path))
        self.lease_seconds = _lease(lease_seconds)
        mode = synchronous.lower() if isinstance(synchronous, str) else synchronous
        if mode not in _SYNCHRONOUS:
            raise LimenexConfigError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.synchronous: str = mode
        if type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout >= 0):
            raise LimenexConfigError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self.timeout = float(timeout)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise StateStoreError(f"cannot create the folder of {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = None
        self._execute: Execute | None = None
        self._uid = ""
        self._windows: dict[str, Window | None] = {"": None}
        self._buckets: dict[str, tuple[float, float, str]] = {}
        self._swept = -math.inf  # when (callers' time) a reserve last dropped expired records
        self._writes = 0  # write transactions since the last checkpoint
        self._first_write = 0.0  # time.monotonic() of the first of them
        # With "full", every commit waits for an fsync: async calls always use a thread then.
        self._inline = mode == "normal"
        self._forked()
        _stores.add(self)
        if mode == "normal":
            _start_syncer()
        # Create (or check) the database now; a failure is raised again by every call.
        with contextlib.suppress(StateStoreError):
            self._transact(_nothing, read=True)

    def _forked(self) -> None:
        """(Re)set what belongs to one process: the lock, the queue, ids and owner."""
        self._lock = threading.Lock()
        self._queue = CommitQueue()
        # Counting from a random 62-bit start: ids of other processes and stores differ.
        self._ids = itertools.count(secrets.randbits(62))
        self._owner = _owner()

    def __repr__(self) -> str:
        return f"SQLiteStateStore({self.path!r})"

    # --- the contract -----------------------------------------------------------------------

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        return self._transact(self._reserve, checks, now, sweep=self._sweep_due(now))

    def commit(self, reservation: Reservation) -> None:
        token = reservation.token
        if type(token) is tuple and token[0] == self._uid and self._queue.add(token[1]):
            self._transact(_nothing)

    def release(self, reservation: Reservation, now: float) -> None:
        token = self._token(reservation)
        if token is not None:
            self._transact(self._release, token, now)

    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        return self._transact(self._peek, checks, now, read=True)

    def adjust(
        self, key: CounterKey, delta: Decimal, now: float, window: Window | None = None
    ) -> Decimal:
        return self._transact(self._adjust, key, delta, now, window)

    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        return self._transact(self._totals, now, read=True)

    def pending(self, now: float) -> list[PendingReservation]:
        return self._transact(self._pending, now)

    def reset(self, dimension: str | None = None) -> None:
        self._transact(self._reset, dimension)

    def close(self) -> None:
        """Send the queued commits, then close the connection (reopened on next use)."""
        if len(self._queue):
            # Unsent, they would only stay pending until their lease ends, amounts counted.
            with contextlib.suppress(StateStoreError):
                self._transact(_nothing)
        with self._lock:
            conn, self._conn, self._execute = self._conn, None, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    # --- async: inline when the lock is free, else on a worker thread ---------------------

    async def areserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        if self._inline and self._execute is not None:
            try:
                sweep = self._sweep_due(now)
                outcome = self._transact(self._reserve, checks, now, sweep=sweep, wait=False)
            except _Busy:
                pass
            else:
                if self._writes >= CHECKPOINT_EVERY:
                    await asyncio.to_thread(self._checkpoint)
                return outcome
        outcome = await asyncio.to_thread(self.reserve, checks, now)
        return outcome

    async def acommit(self, reservation: Reservation) -> None:
        token = reservation.token
        if type(token) is tuple and token[0] == self._uid and self._queue.add(token[1]):
            await self._inline_or_thread(_nothing)

    async def arelease(self, reservation: Reservation, now: float) -> None:
        token = self._token(reservation)
        if token is not None:
            await self._inline_or_thread(self._release, token, now)

    async def apeek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        totals: tuple[Decimal, ...] = await self._inline_or_thread(self._peek, checks, now)
        return totals

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def _inline_or_thread(self, operation: Callable[..., _T], *args: Any) -> _T:
        if self._inline and self._execute is not None:
            try:
                result = self._transact(operation, *args, wait=False)
            except _Busy:
                pass
            else:
                if self._writes >= CHECKPOINT_EVERY:
                    await asyncio.to_thread(self._checkpoint)
                return result
        return await asyncio.to_thread(self._transact, operation, *args)

    # --- one transaction ------------------------------------------------------------------

    def _transact(
        self,
        operation: Callable[..., _T],
        *args: Any,
        sweep: float | None = None,
        read: bool = False,
        wait: bool = True,
    ) -> _T:
        """Run ``operation(execute, *args)`` in one transaction, after the queued commits.

        ``sweep``: also drop pending records expired at that time. ``read``: a read-only
        transaction, unless commits are queued. ``wait=False`` raises :class:`_Busy` instead
        of waiting for the thread lock or the database's write lock.
        """
        lock = self._lock
        deadline = 0.0
        if not lock.acquire(False):
            if not wait:
                raise _Busy
            deadline = time.monotonic() + self.timeout
            if not lock.acquire(timeout=self.timeout):
                raise self._locked()
        try:
            delay = 0.0
            while True:
                queued = self._queue.take()
                write = queued or not read
                try:
                    execute = self._execute or self._open()
                    execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        if queued or sweep is not None:
                            self._settle(execute, queued, sweep)
                        result = operation(execute, *args)
                        execute("COMMIT")
                    except BaseException:
                        self._rollback()
                        raise
                    if write:
                        self._writes += 1
                        if self._writes == 1:
                            self._first_write = time.monotonic()
                            if self._inline and _syncer_pid != os.getpid():  # a forked child
                                _start_syncer()
                        if wait and self._writes >= CHECKPOINT_EVERY:
                            self._checkpoint_now()
                    return result
                except sqlite3.Error as exc:
                    self._queue.put_back(queued)
                    if not _busy(exc):
                        raise self._failure(exc) from exc
                    if not wait:
                        raise _Busy from exc
                    deadline, delay = self._pause(deadline, delay)
                except ArithmeticError as exc:
                    self._queue.put_back(queued)
                    if (
                        exc.args
                        and isinstance(exc.args[0], list)
                        and ConversionSyntax in exc.args[0]
                    ):
                        raise CorruptStateError(
                            f"SQLite database {self.path} holds a number it cannot read."
                            " The file was left as found: fix or move it."
                        ) from exc
                    raise StateStoreError(f"cannot keep an exact total: {exc!r}") from exc
                except _Unreadable as exc:
                    self._queue.put_back(queued)
                    raise CorruptStateError(
                        f"SQLite database {self.path} holds {exc}. The file was left as found:"
                        " fix or move it."
                    ) from exc
                except UnicodeEncodeError as exc:
                    self._queue.put_back(queued)
                    raise StateStoreError(
                        f"SQLite database {self.path} cannot store this text ({exc})"
                    ) from exc
                except (LimenexError, _Busy):
                    self._queue.put_back(queued)
                    raise
                except Exception as exc:  # never a raw exception to the caller
                    self._queue.put_back(queued)
                    raise StateStoreError(
                        f"SQLite database {self.path} failed: {type(exc).__name__}: {exc}"
                    ) from exc
                except BaseException:
                    self._queue.put_back(queued)
                    raise
        finally:
            lock.release()

    def _checkpoint(self) -> None:
        """:meth:`_checkpoint_now` from a worker thread, if still due."""
        with self._lock:
            if self._writes >= CHECKPOINT_EVERY and self._execute is not None:
                self._checkpoint_now()

    def _sync_if_stale(self, now: float) -> None:
        """Checkpoint (which fsyncs the log) if a write has waited ``SYNC_AFTER`` for it.

        Called by the syncer thread; it never waits for the store's lock: a store that is
        busy is writing, and checkpoints on its own count or on the syncer's next round.
        """
        if not self._writes or now - self._first_write < SYNC_AFTER:
            return
        if self._lock.acquire(False):
            try:
                if self._writes and self._execute is not None:
                    self._checkpoint_now()
            finally:
                self._lock.release()

    def _checkpoint_now(self) -> None:
        """Copy the log into the database, and start the log anew.

        SQLite's automatic checkpoint is off: it would run inside a commit, on the event loop
        for an async call. So would the fsync of the log's new header that the first write
        after a complete checkpoint does: writing the checkpoint's time to ``meta`` takes it
        here. A failure is left for the next checkpoint to retry.
        """
        self._writes = 0
        execute = self._execute
        if execute is None:
            return
        with contextlib.suppress(sqlite3.Error):
            busy, log, copied = execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy and log == copied:
                execute("BEGIN IMMEDIATE")
                try:
                    execute(_RESTART_LOG, (repr(time.time()),))
                    execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise

    def _settle(self, execute: Execute, queued: list[str], sweep: float | None) -> None:
        """Delete the queued commits' records and, with ``sweep``, some expired ones."""
        if sweep is None:
            for pair in map(_queued, queued):
                execute(_SETTLE, pair)
            return
        if len(queued) == 1:
            dropped = execute(_SWEEP_SETTLE, (sweep, *_queued(queued[0]))).rowcount
        else:
            for pair in map(_queued, queued):
                execute(_SETTLE, pair)
            dropped = execute(_SWEEP, (sweep,)).rowcount
        # A full sweep may have left more: sweep again on the next reserve.
        self._swept = -math.inf if dropped >= 64 else sweep

    def _sweep_due(self, now: float) -> float | None:
        """``now`` if a reserve at ``now`` should drop expired records, else ``None``.

        Once a second (of the callers' clock) is enough: an expired record is invisible
        already (``pending`` drops them, a release checks the expiry), dropping it only
        keeps the table small.
        """
        return None if 0.0 <= now - self._swept < 1.0 else now

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _pause(self, deadline: float, delay: float) -> tuple[float, float]:
        """Sleep a little before trying again; raise once ``timeout`` has passed."""
        now = time.monotonic()
        if not deadline:
            deadline = now + self.timeout
        if now >= deadline:
            raise self._locked()
        time.sleep(min(delay * (0.5 + random.random()), deadline - now))  # noqa: S311 - jitter
        return deadline, min(max(delay * 2, 5e-5), 5e-3)

    def _locked(self) -> StateStoreError:
        return StateStoreError(
            f"SQLite database {self.path} is locked: another connection kept its write lock"
            f" for more than {self.timeout:g} s"
        )

    def _failure(self, exc: sqlite3.Error) -> StateStoreError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            self._close_quietly()
            return CorruptStateError(
                f"SQLite database {self.path} cannot be read ({exc}). The file was left as"
                " found: fix or move it."
            )
        return StateStoreError(f"SQLite database {self.path} failed: {exc}")

    def _close_quietly(self) -> None:
        conn, self._conn, self._execute = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # --- opening: refuse what is not ours, create what is empty ---------------------------

    def _open(self) -> Execute:
        if self.path in _unsafe:
            raise StateStoreError(
                f"SQLite database {self.path} cannot be used in this process: it was forked"
                " while a connection to it was busy. Open the store after the fork."
            )
        if file_size(self.path, StateStoreError) is None:
            with contextlib.suppress(OSError):  # removed since the store was made
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            with refusing_non_databases(self.path):
                self._prepare(conn)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            raise
        self._conn, self._execute = conn, conn.cursor().execute
        return self._execute

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check that the database is ours (creating it when empty); set the pragmas."""
        found = _inspect(conn)
        if found == (0, 0, frozenset()):
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only before the first write
            self._wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = _inspect(conn)
                if found == (0, 0, frozenset()):  # no other process made it meanwhile
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute("INSERT INTO meta VALUES ('uid', ?)", (uuid.uuid4().hex,))
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    found = (APPLICATION_ID, SCHEMA_VERSION, TABLES)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        self._refuse_unless_ours(*found)
        self._wal(conn)
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # see _checkpoint_now
        row = conn.execute("SELECT value FROM meta WHERE key = 'uid'").fetchone()
        if row is None:
            raise self._not_ours("it has no identity (meta.uid)")
        self._uid = str(row[0])

    def _wal(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StateStoreError(
                f"SQLite database {self.path}: cannot use write-ahead logging"
                f" (journal mode stays {mode!r})"
            )

    def _refuse_unless_ours(self, application: int, version: int, tables: frozenset[str]) -> None:
        if application != APPLICATION_ID:
            names = ", ".join(sorted(tables)) or "none"
            raise self._not_ours(
                f"it is another application's database (application_id {application},"
                f" user_version {version}, tables: {names})"
            )
        if version > SCHEMA_VERSION:
            raise self._not_ours(
                f"it was written by a newer Limenex (schema version {version}; this one"
                f" reads {SCHEMA_VERSION})"
            )
        if version != SCHEMA_VERSION or not tables >= TABLES:
            missing = ", ".join(sorted(TABLES - tables)) or "none"
            raise self._not_ours(
                f"it is damaged (schema version {version}, missing tables: {missing})"
            )

    def _not_ours(self, why: str) -> CorruptStateError:
        return CorruptStateError(
            f"SQLite database {self.path} is not a Limenex state database: {why}. The file"
            " was left as found: fix or move it, or point the store at another path."
        )

    # --- the operations, each inside a transaction ----------------------------------------

    def _reserve(
        self, execute: Execute, checks: Sequence[Check], now: float
    ) -> Reservation | StateBreach:
        rid = next(self._ids)
        expires = now + self.lease_seconds
        if len(checks) == 1:  # the common case, without the bookkeeping of many keys
            check = checks[0]
            key, amount = check.key, check.amount
            if amount.is_signed() or not amount.is_finite():  # cheaper than ``< 0``
                _checked(amount)
            if check.window is None and not key[3] and key[0] != RESERVED_DIMENSION:
                # A total without a window, inline: the hottest path of all.
                row = execute(_COUNTER, key).fetchone()
                total = _ZERO if row is None else Decimal(row[0])
                projected = _add(total, amount)
                if not OPERATORS[check.op](projected, check.limit):
                    return StateBreach(0, total, projected)
                execute(_NEW_TOTAL if row is None else _SET_TOTAL, (*key, str(projected)))
                slot: str | int | None = None
            else:
                window = self._window(key, check.window)
                state = self._state(execute, key, window, now)
                total = state[0]
                projected = _add(total, amount)
                if not OPERATORS[check.op](projected, check.limit):
                    return StateBreach(0, total, projected)
                slot = self._put(execute, key, window, state, amount, projected, now)
            execute(_HOLD, (expires, rid, now, self._owner, *key, str(amount), slot, None))
            return Reservation(str(rid), (total,), (self._uid, f"{expires!r} {rid}"))
        outcome = self._reserve_many(execute, checks, now)
        if type(outcome) is StateBreach:
            return outcome
        amounts, observed = outcome  # type: ignore[misc]  # the other case of the union
        execute(_HOLD, (expires, rid, now, self._owner, *_columns(amounts)))
        return Reservation(str(rid), observed, (self._uid, f"{expires!r} {rid}"))

    def _reserve_many(
        self, execute: Execute, checks: Sequence[Check], now: float
    ) -> tuple[list[Amount], tuple[Decimal, ...]] | StateBreach:
        plans: dict[CounterKey, tuple[Window | None, State, Decimal, Decimal]] = {}
        observed = []
        for position, check in enumerate(checks):
            key = check.key
            plan = plans.get(key)
            if plan is None:
                window = self._window(key, check.window)
                state = self._state(execute, key, window, now)
                amount = _checked(check.amount)
                plan = plans[key] = (window, state, amount, _add(state[0], amount))
            total, projected = plan[1][0], plan[3]
            if not OPERATORS[check.op](projected, check.limit):
                return StateBreach(position, total, projected)
            observed.append(total)
        amounts: list[Amount] = [
            (key, str(amount), self._put(execute, key, window, state, amount, projected, now))
            for key, (window, state, amount, projected) in plans.items()
        ]
        return amounts, tuple(observed)

    def _release(self, execute: Execute, token: tuple[float, int], now: float) -> None:
        expires, rid = token
        row = execute(_HOLD_AT, (expires, rid)).fetchone()
        if row is None:
            return
        execute(_SETTLE, (expires, rid))
        if expires <= now:
            return  # expired: dropped, and its amounts stay counted
        for key, amount, slot in _amounts(row):
            with contextlib.suppress(ArithmeticError):  # cannot undo exactly: stays counted
                self._undo(execute, key, amount, slot)

    def _undo(self, execute: Execute, key: CounterKey, amount: str, slot: str | int | None) -> None:
        row = execute(_COUNTER, key).fetchone()
        if row is None:
            return
        window = self._stored(key.window)
        if window is None:
            execute(_SET_TOTAL, (*key, str(_minus(Decimal(row[0]), Decimal(amount)))))
        elif window.calendar:
            if row[1] == slot:
                execute(_SET_TOTAL, (*key, str(_minus(Decimal(row[0]), Decimal(amount)))))
        else:
            total = _subtract(Decimal(row[0]), Decimal(amount))
            if execute(_DROP_ENTRY_IF, (*key, slot, amount)).rowcount:
                head = execute(_HEAD, key).fetchone()
                execute(_SET_ROLLING, (*key, str(total), None if head is None else head[0]))

    def _peek(self, execute: Execute, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        totals = []
        for check in checks:
            key = check.key
            try:
                window = self._parsed(key.window)
            except ValueError:
                totals.append(_ZERO)  # no counter can have such a window
                continue
            totals.append(self._state(execute, key, window, now, prune=False)[0])
        return tuple(totals)

    def _adjust(
        self, execute: Execute, key: CounterKey, delta: Decimal, now: float, window: Window | None
    ) -> Decimal:
        window = self._window(key, window)
        delta = _checked(delta, refund=True)
        held: list[tuple[str | int | None, Decimal]] = []
        if delta < 0:
            execute(_EXPIRE, (now,))  # their release can undo nothing any more
            held = [
                (slot, Decimal(amount))
                for row in execute(_HELD).fetchall()
                for counter, amount, slot in _amounts(row[4:])
                if counter == key
            ]
        state = self._state(execute, key, window, now)
        total, _, period, head, _ = state
        if window is None:
            total = _adjusted(total, delta, (amount for _, amount in held))
            execute(_UPSERT, (*key, str(total), None, None, 0))
            return total
        if window.calendar:
            floor = (amount for slot, amount in held if slot == period)  # this period's only
            total = _adjusted(total, delta, floor)
            execute(_UPSERT, (*key, str(total), period, None, 0))
            return total
        if delta >= 0:
            total = _add(total, delta)
            if delta:
                self._put(execute, key, window, state, delta, total, now)
            return total
        if head is None:
            return _ZERO
        return self._refund_rolling(execute, key, total, delta, held)

    def _refund_rolling(
        self,
        execute: Execute,
        key: CounterKey,
        total: Decimal,
        delta: Decimal,
        held: list[tuple[str | int | None, Decimal]],
    ) -> Decimal:
        """Consume the oldest entries first, skipping those a pending release will remove.

        Consuming the oldest ends the refund's effect no later than the amounts it cancels
        would have stopped counting, so the total can never turn negative later on.
        """
        pending = Counter(slot for slot, _ in held)
        owed = refund = delta.copy_negate()
        head: float | None = None
        for seq, at, text in execute(_ENTRIES, key).fetchall():
            amount = Decimal(text)
            if pending[seq]:
                pending[seq] -= 1
            elif not owed:
                pass
            elif amount > owed:
                execute(_SET_ENTRY, (*key, seq, str(_subtract(amount, owed))))
                owed = _ZERO
            else:
                owed = _subtract(owed, amount)
                execute(_DROP_ENTRY, (*key, seq))
                continue
            if head is None:
                head = at
        total = _subtract(total, _subtract(refund, owed))
        execute(_SET_ROLLING, (*key, str(total), head))
        return total

    def _totals(self, execute: Execute, now: float) -> list[tuple[CounterKey, Decimal]]:
        totals = []
        for dimension, scope, subject, spec, text, period, head, _ in execute(
            'SELECT dimension, scope, subject, "window", total, period, head, seq FROM counters'
        ).fetchall():
            key = CounterKey(dimension, scope, subject, spec)
            window = self._stored(spec)
            if window is None:
                totals.append((key, Decimal(text)))
            elif window.calendar:
                if period is not None and period >= self._bucket(window, now):
                    totals.append((key, Decimal(text)))
            elif head is not None:
                live = self._live(execute, key, window, now, Decimal(text), head)
                if live is not None:
                    totals.append((key, live))
        return totals

    def _pending(self, execute: Execute, now: float) -> list[PendingReservation]:
        execute(_EXPIRE, (now,))
        return [
            PendingReservation(
                str(rid),
                created,
                expires,
                tuple((key, Decimal(amount)) for key, amount, _ in _amounts(row)),
                owner,
            )
            for rid, created, expires, owner, *row in execute(
                f"{_HELD} ORDER BY created_at, id"
            ).fetchall()
        ]

    def _reset(self, execute: Execute, dimension: str | None) -> None:
        if dimension is None:
            for table in ("counters", "entries", "pending"):
                execute(f"DELETE FROM {table}")  # noqa: S608 - a fixed table name
            return
        execute("DELETE FROM counters WHERE dimension = ?", (dimension,))
        execute("DELETE FROM entries WHERE dimension = ?", (dimension,))
        for rid, _, expires, _, *row in execute(_HELD).fetchall():
            amounts = _amounts(row)
            kept = [amount for amount in amounts if amount[0].dimension != dimension]
            if len(kept) == len(amounts):
                continue
            if kept:
                execute(_REHOLD, (expires, rid, *_columns(kept)))
            else:
                execute(_SETTLE, (expires, rid))

    # --- counters -------------------------------------------------------------------------

    def _state(
        self,
        execute: Execute,
        key: CounterKey,
        window: Window | None,
        now: float,
        *,
        prune: bool = True,
    ) -> State:
        """The counter at ``now``; ``prune``: delete a rolling window's expired entries."""
        row = execute(_COUNTER, key).fetchone()
        if window is None:
            if row is None:
                return (_ZERO, False, None, None, 0)
            return (Decimal(row[0]), True, None, None, 0)
        if window.calendar:
            bucket = self._bucket(window, now)
            if row is None:
                return (_ZERO, False, bucket, None, 0)
            period = row[1]
            if period is None or period < bucket:
                return (_ZERO, True, bucket, None, 0)
            return (Decimal(row[0]), True, period, None, 0)
        if row is None:
            return (_ZERO, False, None, None, 0)
        total, head, seq = Decimal(row[0]), row[2], row[3]
        if head is not None and head + window.seconds <= now:
            if prune:
                total, head = self._prune(execute, key, window, now, total)
            else:
                live = self._live(execute, key, window, now, total, head)
                total = _ZERO if live is None else live
        return (total, True, None, head, seq)

    def _prune(
        self, execute: Execute, key: CounterKey, window: Window, now: float, total: Decimal
    ) -> tuple[Decimal, float | None]:
        """Delete the expired entries from the oldest on; the new total and head."""
        seconds = window.seconds or 0
        expired, last, head = _ZERO, None, None
        for seq, at, amount in execute(_ENTRIES, key):
            if at + seconds > now:
                head = at
                break
            expired, last = _add(expired, Decimal(amount)), seq
        if last is not None:
            execute(_DROP_ENTRIES_TO, (*key, last))
            total = _subtract(total, expired)
            execute(_SET_ROLLING, (*key, str(total), head))
        return total, head

    def _live(
        self,
        execute: Execute,
        key: CounterKey,
        window: Window,
        now: float,
        total: Decimal,
        head: float,
    ) -> Decimal | None:
        """A rolling total at ``now`` without pruning; ``None`` when no entry counts."""
        seconds = window.seconds or 0
        if head + seconds > now:
            return total
        expired = _ZERO
        for _, at, amount in execute(_ENTRIES, key):
            if at + seconds > now:
                return _subtract(total, expired)
            expired = _add(expired, Decimal(amount))
        return None

    def _put(
        self,
        execute: Execute,
        key: CounterKey,
        window: Window | None,
        state: State,
        amount: Decimal,
        total: Decimal,
        now: float,
    ) -> str | int | None:
        """Record ``amount`` (``total`` is the new total); where it went (the slot)."""
        _, exists, period, head, seq = state
        if window is None:
            execute(_SET_TOTAL if exists else _NEW_TOTAL, (*key, str(total)))
            return None
        if window.calendar:
            execute(_UPSERT, (*key, str(total), period, None, 0))
            return period
        seq += 1
        execute(_NEW_ENTRY, (*key, seq, now, str(amount)))
        execute(_UPSERT, (*key, str(total), None, now if head is None else head, seq))
        return seq

    # --- helpers --------------------------------------------------------------------------

    def _window(self, key: CounterKey, window: Window | None) -> Window | None:
        """``key``'s window, checked as every store checks it (parsed specs cached)."""
        return counter_window(key, window, self._parsed)

    def _parsed(self, spec: str) -> Window | None:
        """``Window.parse`` with a cache (``None`` for no window); ``ValueError`` if invalid."""
        try:
            return self._windows[spec]
        except KeyError:
            window = self._windows[spec] = Window.parse(spec)
            return window

    def _stored(self, spec: str) -> Window | None:
        """:meth:`_parsed` for a window read from the database: invalid means unreadable."""
        try:
            return self._parsed(spec)
        except ValueError as exc:
            raise _Unreadable(f"a counter it cannot read ({exc})") from exc

    def _bucket(self, window: Window, now: float) -> str:
        """The calendar period containing ``now``, as ``Window.bucket`` names it."""
        cached = self._buckets.get(window.spec)
        if cached is not None and cached[0] < now < cached[1]:
            return cached[2]
        name = window.bucket(now)
        start, end = _period(window.calendar or "", now)
        # A microsecond clear of the edges, where Window.bucket's own rounding decides.
        self._buckets[window.spec] = (start + 1e-6, end - 1e-6, name)
        return name

    def _token(self, reservation: Reservation) -> tuple[float, int] | None:
        """The reservation's pending record, ``(expires_at, id)``, if this database made it.

        A reservation's token is ``(uid, "expires_at id")``: the database's identity, so that
        another database's reservation changes nothing here, and the record's primary key as
        the text the commit queue holds.
        """
        token = reservation.token
        if type(token) is tuple and token[0] == self._uid:
            return _queued(token[1])
        return None


def _nothing(execute: Execute) -> None:
    """An operation that only carries the queued commits."""


def _queued(item: str) -> tuple[float, int]:
    expires, rid = item.split(" ")
    return float(expires), int(rid)


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _inspect(conn: sqlite3.Connection) -> tuple[int, int, frozenset[str]]:
    """``(application_id, user_version, table names)`` of the database, reading only."""
    (application,) = conn.execute("PRAGMA application_id").fetchone()
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    names = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return int(application), int(version), frozenset(str(name) for (name,) in names)


def _amounts(row: Sequence[Any]) -> list[Amount]:
    """A pending record's amounts from its columns ``dimension .. more``."""
    dimension, scope, subject, spec, amount, slot, more = row
    amounts: list[Amount] = []
    if dimension is not None:
        amounts.append((CounterKey(dimension, scope, subject, spec), amount, slot))
    if more:
        try:
            amounts += [(CounterKey(d, s, j, w), a, t) for d, s, j, w, a, t in json.loads(more)]
        except (ValueError, TypeError) as exc:
            raise _Unreadable(f"a pending record it cannot read ({exc})") from exc
    return amounts


def _columns(amounts: Sequence[Amount]) -> tuple[Any, ...]:
    """A pending record's columns ``dimension .. more`` for its amounts."""
    if not amounts:
        return (None,) * 7
    (key, amount, slot), rest = amounts[0], amounts[1:]
    more = json.dumps([[*k, a, s] for k, a, s in rest]) if rest else None
    return (*key, amount, slot, more)


def _before_fork() -> None:
    """Close every connection before a fork, holding each store's lock across it.

    A child must not inherit an open connection, even one it never uses: SQLite's record of
    the locks this process holds would be copied with it, so the child's own connection
    would take none of them, and a parent closing its last connection would think the
    database unused and drop the log the child still writes to. Each side reopens on use.
    """
    for store in list(_stores):
        lock = store._lock
        if lock.acquire(timeout=store.timeout + 1.0):  # a running transaction ends first
            _held_for_fork.append(lock)
            store._close_quietly()


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_child() -> None:
    """A child starts every store afresh: its own lock, queue, ids, and connection.

    A store whose connection could not be closed before the fork makes its database
    unusable in the child (every call fails, so the engine blocks) rather than unsafe.
    """
    _held_for_fork.clear()
    for store in list(_stores):
        if store._conn is not None:
            _abandoned.append(store._conn)
            _unsafe.add(store.path)
        store._conn = store._execute = None
        store._forked()


_syncer_pid = 0
"""The process whose syncer thread runs (a forked child starts its own)."""
_syncer_lock = threading.Lock()


def _start_syncer() -> None:
    """Start this process's syncer thread, once (again in a forked child)."""
    global _syncer_pid
    if _syncer_pid == os.getpid():
        return
    with _syncer_lock:
        if _syncer_pid == os.getpid():
            return
        _syncer_pid = os.getpid()
        threading.Thread(target=_sync_stale_stores, name="limenex-sqlite-sync", daemon=True).start()


def _sync_stale_stores() -> None:
    """Every half ``SYNC_AFTER``: fsync the log of each store with an old unsynced write."""
    pid = os.getpid()
    while _syncer_pid == pid:
        time.sleep(SYNC_AFTER / 2)
        now = time.monotonic()
        with contextlib.suppress(Exception):  # a failed checkpoint is retried next round
            for store in list(_stores):
                store._sync_if_stale(now)


@atexit.register
def _send_queued_commits() -> None:
    """At a normal exit, send every store's queued commits (else they wait out their lease)."""
    for store in list(_stores):
        if len(store._queue):
            with contextlib.suppress(Exception):
                store._transact(_nothing)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


# At the end: stores.py re-exports this module's class at its own end, so importing it at the
# top would find stores.py half-initialised when this module is imported first.
from limenex.core.stores import (  # noqa: E402
    _adjusted,
    _checked,
    _lease,
    _minus,
    _owner,
    _period,
)
