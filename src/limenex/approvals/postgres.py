"""Approval requests in PostgreSQL, in the schema of the PostgreSQL state store.

:class:`PostgresApprovalStore` keeps its requests in one table, ``approvals``, of the state
store's schema (``limenex`` by default). It never reads or writes the state store's tables;
it makes the schema (if missing) and its table on first use, with ``CREATE ... IF NOT
EXISTS`` under the transaction-scoped advisory lock that also serialises the state store's
migrations of that schema. The table::

    approvals  id text PRIMARY KEY, skill_id, agent_id, params (canonical JSON text),
               fingerprint, policy (JSON text or NULL), policy_index, reason,
               created_at, expires_at (float8 epoch seconds), decimals (JSON text),
               status, decided_by, decided_at, note, used_at
    approvals_waiting  index on (status, created_at, id): what ``pending`` reads

The JSON columns are ``text``, not ``jsonb``: a request's params read back exactly as they
were kept (``jsonb`` would turn ``1e300`` into an integer).

``approve``, ``deny`` and ``consume`` are one transaction each: ``SELECT ... FOR UPDATE``
locks the request's row, the transition (:func:`~limenex.approvals.store.decide`,
:func:`~limenex.approvals.store.use`) is applied in Python and the row updated before
``COMMIT``. A concurrent change of the same request waits for the lock and then reads the
committed row, so of any number of concurrent consumes, on any number of hosts, exactly one
succeeds and the others read ``used``. ``create`` is an ``INSERT ... ON CONFLICT DO
NOTHING``; an id already kept is refused.

Every failure of the server or the connection is an
:class:`~limenex.approvals.request.ApprovalStoreError` naming the server (``host:port``, never
a password); a row that does not read back as a request is a
:class:`~limenex.core.errors.CorruptStateError`. Connecting is bounded by
``connect_timeout`` (libpq counts whole seconds, at least 2), each statement by ``timeout``
(``statement_timeout``, a row lock included). Threads share at most ``max_connections``
connections; a connection that broke while idle is replaced, and the operation sent again,
once. Idle connections are closed before a ``fork`` (a child never shares one with its
parent). The async methods run the sync ones on a worker thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from limenex.approvals.request import (
    ROW_COLUMNS,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreError,
    from_row,
    to_row,
)
from limenex.approvals.store import BlockingApprovalStore
from limenex.core.errors import CorruptStateError, LimenexConfigError, LimenexError
from limenex.stores.postgres import parse_dsn

__all__ = ["PostgresApprovalStore"]

_T = TypeVar("_T")
_Connection = psycopg.Connection[tuple[Any, ...]]

_LOCK_CLASS = 0x4C4D4E58  # "LMNX": the state store's advisory lock class for its migrations
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING_STATES = frozenset({"3F000", "42P01"})  # no such schema, no such table

_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE IF NOT EXISTS {s}.approvals (
    id text PRIMARY KEY,
    skill_id text NOT NULL,
    agent_id text NOT NULL,
    params text NOT NULL,
    fingerprint text NOT NULL,
    policy text,
    policy_index bigint,
    reason text NOT NULL,
    created_at float8 NOT NULL,
    expires_at float8 NOT NULL,
    decimals text NOT NULL,
    action text NOT NULL,
    waived text NOT NULL,
    policies_digest text NOT NULL,
    status text NOT NULL,
    decided_by text,
    decided_at float8,
    note text NOT NULL,
    used_at float8
)""",
    "CREATE INDEX IF NOT EXISTS approvals_waiting ON {s}.approvals (status, created_at, id)",
)
_ADDED = {
    "decimals": "ALTER TABLE {s}.approvals ADD COLUMN decimals text NOT NULL DEFAULT '[]'",
    "action": "ALTER TABLE {s}.approvals ADD COLUMN action text NOT NULL DEFAULT ''",
    "waived": "ALTER TABLE {s}.approvals ADD COLUMN waived text NOT NULL DEFAULT '[]'",
    "policies_digest": (
        "ALTER TABLE {s}.approvals ADD COLUMN policies_digest text NOT NULL DEFAULT ''"
    ),
}
"""Columns added since the table was first made, with the value older requests have. Only a
table that lacks one is altered: ALTER TABLE locks the whole table, even when it changes
nothing."""
_COLUMNS_PRESENT = (
    "SELECT column_name FROM information_schema.columns"
    " WHERE table_schema = %s AND table_name = 'approvals'"
)
_COLUMNS = ", ".join(ROW_COLUMNS)
_SELECT = "SELECT " + _COLUMNS + " FROM {s}.approvals"  # noqa: S608 - fixed names
_VALUES = ", ".join(["%s"] * len(ROW_COLUMNS))
_INSERT = (
    f"INSERT INTO {{s}}.approvals ({_COLUMNS}) VALUES ({_VALUES})"  # noqa: S608 - fixed names
    " ON CONFLICT (id) DO NOTHING"
)
_UPDATE = (
    "UPDATE {s}.approvals SET status = %s, decided_by = %s, decided_at = %s, note = %s,"
    " used_at = %s WHERE id = %s"
)

_stores: weakref.WeakSet[PostgresApprovalStore] = weakref.WeakSet()
_held_for_fork: list[threading.Lock] = []


class PostgresApprovalStore(BlockingApprovalStore):
    """Approval requests in the ``approvals`` table of a PostgreSQL schema.

    ``dsn`` is a ``postgresql://`` URL or a libpq connection string; ``schema`` the state
    store's (letters, digits and ``_``). See the module docstring for the rest.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "limenex",
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
        max_connections: int = 10,
    ) -> None:
        if (
            not isinstance(schema, str)
            or not _SCHEMA_NAME.fullmatch(schema)
            or len(schema) > 63
            or schema.lower().startswith("pg_")
        ):
            raise LimenexConfigError(
                f"invalid PostgreSQL schema name {schema!r}: use 1 to 63 letters, digits and "
                "underscores, not starting with a digit or pg_"
            )
        for name, value in (("connect_timeout", connect_timeout), ("timeout", timeout)):
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise LimenexConfigError(f"{name} must be a positive number of seconds")
        if type(max_connections) is not int or max_connections < 1:
            raise LimenexConfigError(
                f"max_connections must be a positive integer, got {max_connections!r}"
            )
        params = parse_dsn(dsn)
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)
        self.max_connections = max_connections
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        self.where = f"{host}:{params.get('port') or 5432}"
        """``host:port`` of the server, for messages."""
        self._password = str(params.get("password") or "")

        s = sql.Identifier(schema)

        def query(text: str) -> sql.Composed:
            return sql.SQL(text).format(s=s)  # fixed text only

        self._sql_setup = [query(text) for text in _SETUP]
        self._sql_lock = sql.SQL("SELECT pg_advisory_xact_lock(%s, hashtext(%s))")
        self._lock_name = s.as_string()  # as the state store names its migration lock
        self._sql_insert = query(_INSERT)
        self._sql_get = query(_SELECT + " WHERE id = %s")
        self._sql_lock_row = query(_SELECT + " WHERE id = %s FOR UPDATE")
        self._sql_update = query(_UPDATE)
        self._sql_pending = query(
            _SELECT + " WHERE status = %s AND expires_at > %s ORDER BY created_at, id"
        )
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._slots = threading.BoundedSemaphore(max_connections)
        self._ready = False  # the table was made (or found) by this store
        _stores.add(self)

    def __repr__(self) -> str:
        return f"PostgresApprovalStore({self.where!r}, schema={self.schema!r})"

    # --- the operations -------------------------------------------------------------------

    def create(self, request: ApprovalRequest) -> None:
        row = to_row(request)

        def insert(conn: _Connection, retrying: bool) -> None:
            with conn.transaction():
                if conn.execute(self._sql_insert, row).rowcount == 1:
                    return
                kept = _load(conn.execute(self._sql_get, (request.id,)).fetchone())
            if retrying and kept is not None and kept.to_dict() == request.to_dict():
                return  # our own first attempt committed before its connection broke
            raise ApprovalStoreError(f"an approval request {request.id!r} already exists")

        self._call(insert)

    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        if not isinstance(request_id, str):
            return None
        request = self._call(
            lambda conn, _: _load(conn.execute(self._sql_get, (request_id,)).fetchone())
        )
        return None if request is None else request.at(now)

    def pending(self, now: float) -> list[ApprovalRequest]:
        def waiting(conn: _Connection, _: bool) -> list[ApprovalRequest]:
            rows = conn.execute(
                self._sql_pending, (ApprovalStatus.PENDING.value, float(now))
            ).fetchall()
            return [r for r in map(_load, rows) if r is not None]

        return self._call(waiting)

    def transition(
        self, step: Callable[[ApprovalRequest | None], ApprovalRequest], request_id: str
    ) -> ApprovalRequest:
        """Lock the request's row, apply ``step`` and write the result back: one transaction."""
        if not isinstance(request_id, str):
            return step(None)  # refused: there is no such request

        def change(conn: _Connection, _: bool) -> ApprovalRequest:
            with conn.transaction():
                done = step(_load(conn.execute(self._sql_lock_row, (request_id,)).fetchone()))
                conn.execute(
                    self._sql_update,
                    (done.status.value, done.decided_by, done.decided_at, done.note,
                     done.used_at, done.id),
                )  # fmt: skip
                return done

        return self._call(change)

    def close(self) -> None:
        """Close the idle connections; the next call opens new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    # --- connections and errors -----------------------------------------------------------

    def _call(self, run: Callable[[_Connection, bool], _T]) -> _T:
        """``run(conn, retrying)`` on a leased connection, with every error mapped.

        A connection that broke while idle is replaced and ``run`` sent again once; a missing
        table (the schema was dropped meanwhile) is made again once.
        """
        retrying = False
        remade = False
        while True:
            if not self._slots.acquire(timeout=self.timeout):
                raise ApprovalStoreError(
                    f"PostgreSQL at {self.where}: all {self.max_connections} connections of"
                    f" the approval store stayed busy for {self.timeout:g} s"
                )
            conn: _Connection | None = None
            reused = False
            try:
                with self._lock:
                    if self._idle:
                        conn, reused = self._idle.pop(), True
                if conn is None:
                    conn = self._connect()
                if not self._ready:
                    self._setup(conn)
                result = run(conn, retrying)
            except LimenexError:
                self._give_back(conn)
                raise
            except psycopg.Error as exc:
                broken = conn is not None and conn.broken
                self._give_back(conn)
                if broken and reused and not retrying:
                    retrying = True
                    continue
                if getattr(exc, "sqlstate", None) in _MISSING_STATES and not remade:
                    self._ready, remade = False, True
                    continue
                raise self._failure(exc) from None
            except Exception as exc:  # never a raw exception to the caller
                if conn is not None:
                    _close_quietly(conn)  # in an unknown state: never back to the pool
                self._slots.release()
                raise ApprovalStoreError(
                    f"PostgreSQL at {self.where} failed: {type(exc).__name__}: {exc}"
                ) from exc
            except BaseException:
                if conn is not None:
                    _close_quietly(conn)  # in an unknown state: never back to the pool
                self._slots.release()
                raise
            self._give_back(conn)
            return result

    def _give_back(self, conn: _Connection | None) -> None:
        try:
            if conn is None:
                return
            if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
                _close_quietly(conn)
                return
            with self._lock:
                self._idle.append(conn)
        finally:
            self._slots.release()

    def _connect(self) -> _Connection:
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(2, math.ceil(self.connect_timeout)),
        )
        try:
            conn.execute(  # as the state store's sessions: bounded statements, durable commits
                "SELECT set_config('statement_timeout', %s, false), "
                "CASE WHEN current_setting('synchronous_commit') = 'off' "
                "THEN set_config('synchronous_commit', 'on', false) END",
                (f"{math.ceil(self.timeout * 1000)}ms",),
            )
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _setup(self, conn: _Connection) -> None:
        """Make the schema and the table if missing: serialised with the state's migrations."""
        with conn.transaction():
            conn.execute(self._sql_lock, (_LOCK_CLASS, self._lock_name))
            for statement in self._sql_setup:
                conn.execute(statement)
            present = {row[0] for row in conn.execute(_COLUMNS_PRESENT, (self.schema,))}
            for column, alter in _ADDED.items():
                if column not in present:
                    conn.execute(sql.SQL(alter).format(s=sql.Identifier(self.schema)))
        self._ready = True

    def _failure(self, exc: psycopg.Error) -> ApprovalStoreError:
        reason = str(exc).strip() or type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        return ApprovalStoreError(f"PostgreSQL at {self.where} failed: {reason}")


def _close_quietly(conn: _Connection) -> None:
    with contextlib.suppress(Exception):  # a broken connection: nothing left to do
        conn.close()


def _load(row: tuple[Any, ...] | None) -> ApprovalRequest | None:
    if row is None:
        return None
    try:
        return from_row(row)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CorruptStateError(
            f"approval request {row[0]!r} cannot be read from its row ({type(exc).__name__}:"
            f" {exc}). The row was left as found: fix or delete it."
        ) from None


def _before_fork() -> None:
    """Close every idle connection before a fork (a child must not share one)."""
    for store in list(_stores):
        if store._lock.acquire(timeout=store.timeout + 1.0):
            _held_for_fork.append(store._lock)
            idle, store._idle = store._idle, []
            for conn in idle:
                _close_quietly(conn)


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_for_fork.clear()
    for store in list(_stores):
        store._lock = threading.Lock()
        store._idle = []
        store._slots = threading.BoundedSemaphore(store.max_connections)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
