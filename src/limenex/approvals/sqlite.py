"""Approval requests in an SQLite database: the same file as the SQLite state store.

:class:`SQLiteApprovalStore` keeps its requests in one table, ``approvals``, of a Limenex
state database (``PRAGMA application_id`` "LMNX", see :mod:`limenex.core.sqlite`), so that
every process pointed at the state sees the same requests. It opens its own connection,
creates its table when missing and never reads or writes the state store's tables. A new or
empty file is first made a state database by :class:`~limenex.core.stores.SQLiteStateStore`
itself, so the state store accepts the file whichever of the two opens it first. A file that
is not an SQLite database, or is another application's database, raises
:class:`~limenex.core.errors.CorruptStateError` on every call and is never written to.

The table::

    approvals  id TEXT PRIMARY KEY, skill_id, agent_id, params (canonical JSON text),
               fingerprint, policy (JSON text or NULL), policy_index, reason,
               created_at, expires_at (REAL epoch seconds), decimals (JSON text),
               status, decided_by, decided_at, note, used_at
    approvals_waiting  index on (status, created_at, id): what ``pending`` reads

Every operation is one transaction; ``approve``, ``deny``, ``consume`` and ``create`` start
with ``BEGIN IMMEDIATE``, which takes the database's write lock before reading the request, so
the read-check-write of a consume cannot interleave with another one in any thread or
process: one wins, the others read ``used``. The database is in WAL mode (readers never block
the writer). A connection that finds the write lock taken waits for it up to ``timeout``
seconds (SQLite's busy handler), then raises :class:`~limenex.approvals.request.ApprovalStoreError`.
Threads share the connection under a lock; the connection is closed before a ``fork`` and
each side reopens its own on use. The async methods run the sync ones on a worker thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

from limenex.approvals.request import (
    ROW_COLUMNS,
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreError,
    from_row,
    to_row,
)
from limenex.approvals.store import BlockingApprovalStore
from limenex.core.errors import CorruptStateError, LimenexConfigError, LimenexError

__all__ = ["SQLiteApprovalStore"]

_T = TypeVar("_T")

_TABLE = """CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    skill_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    params TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    policy TEXT,
    policy_index INTEGER,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    decimals TEXT NOT NULL,
    action TEXT NOT NULL,
    waived TEXT NOT NULL,
    policies_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    decided_by TEXT,
    decided_at REAL,
    note TEXT NOT NULL,
    used_at REAL
) WITHOUT ROWID"""
_INDEX = "CREATE INDEX IF NOT EXISTS approvals_waiting ON approvals (status, created_at, id)"
_COLUMNS = ", ".join(ROW_COLUMNS)
_SELECT = f"SELECT {_COLUMNS} FROM approvals"  # noqa: S608 - fixed column names
_VALUES = ", ".join("?" * len(ROW_COLUMNS))
_INSERT = f"INSERT INTO approvals ({_COLUMNS}) VALUES ({_VALUES})"  # noqa: S608 - fixed names
_UPDATE = (
    "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, note = ?, used_at = ?"
    " WHERE id = ?"
)

_stores: weakref.WeakSet[SQLiteApprovalStore] = weakref.WeakSet()
_held_for_fork: list[threading.Lock] = []


class SQLiteApprovalStore(BlockingApprovalStore):
    """Approval requests in the ``approvals`` table of a Limenex SQLite state database.

    ``path`` is made absolute once and its folder created; ``timeout`` bounds, in seconds,
    how long a call waits for another connection's write lock. See the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout >= 0):
            raise LimenexConfigError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self.timeout = float(timeout)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise ApprovalStoreError(f"cannot create the folder of {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        _stores.add(self)
        # Create (or check) the table now; a failure is raised again by every call.
        with contextlib.suppress(LimenexError):
            self._transact(lambda conn: None, write=False)

    def __repr__(self) -> str:
        return f"SQLiteApprovalStore({self.path!r})"

    # --- the operations -------------------------------------------------------------------

    def create(self, request: ApprovalRequest) -> None:
        row = to_row(request)

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM approvals WHERE id = ?", (request.id,)).fetchone():
                raise ApprovalStoreError(f"an approval request {request.id!r} already exists")
            conn.execute(_INSERT, row)

        self._transact(insert)

    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        request = self._transact(lambda conn: _load(conn, request_id), write=False)
        return None if request is None else request.at(now)

    def pending(self, now: float) -> list[ApprovalRequest]:
        def waiting(conn: sqlite3.Connection) -> list[ApprovalRequest]:
            rows = conn.execute(
                f"{_SELECT} WHERE status = ? AND expires_at > ? ORDER BY created_at, id",
                (ApprovalStatus.PENDING.value, now),
            ).fetchall()
            return [from_row(row) for row in rows]

        return self._transact(waiting, write=False)

    def transition(
        self, step: Callable[[ApprovalRequest | None], ApprovalRequest], request_id: str
    ) -> ApprovalRequest:
        """Read the request, apply ``step`` and write the result back: one write transaction."""

        def change(conn: sqlite3.Connection) -> ApprovalRequest:
            done = step(_load(conn, request_id))
            conn.execute(
                _UPDATE,
                (
                    done.status.value,
                    done.decided_by,
                    done.decided_at,
                    done.note,
                    done.used_at,
                    done.id,
                ),
            )
            return done

        return self._transact(change)

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    # --- one transaction ------------------------------------------------------------------

    def _transact(self, operation: Callable[[sqlite3.Connection], _T], *, write: bool = True) -> _T:
        """Run ``operation(conn)`` in one transaction (``BEGIN IMMEDIATE`` when ``write``)."""
        if not self._lock.acquire(timeout=self.timeout):
            raise self._locked()
        try:
            try:
                conn = self._conn or self._open()
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = operation(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
                return result
            except (ApprovalRefused, LimenexError):
                raise
            except sqlite3.Error as exc:
                raise self._failure(exc) from exc
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptStateError(
                    f"SQLite database {self.path} holds an approval request it cannot read"
                    f" ({type(exc).__name__}: {exc}). The file was left as found: fix or move it."
                ) from exc
            except Exception as exc:  # never a raw exception to the caller
                raise ApprovalStoreError(
                    f"SQLite database {self.path} failed: {type(exc).__name__}: {exc}"
                ) from exc
        finally:
            self._lock.release()

    def _locked(self) -> ApprovalStoreError:
        return ApprovalStoreError(
            f"SQLite database {self.path} is locked: another connection kept its write lock"
            f" for more than {self.timeout:g} s"
        )

    def _failure(self, exc: sqlite3.Error) -> LimenexError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return self._locked()
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            self._close_quietly()
            return CorruptStateError(
                f"SQLite database {self.path} cannot be read ({exc}). The file was left as"
                " found: fix or move it."
            )
        return ApprovalStoreError(f"SQLite database {self.path} failed: {exc}")

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # --- opening: a Limenex state database, with our table ------------------------------

    def _open(self) -> sqlite3.Connection:
        from limenex.core import sqlite as state_sqlite

        size = state_sqlite.file_size(self.path, ApprovalStoreError)
        if not size or _inspect(self.path, self.timeout) == (0, 0, frozenset()):
            # Let the state store lay out its own database, so it accepts the file later.
            state_sqlite.SQLiteStateStore(self.path, timeout=self.timeout).close()
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            with state_sqlite.refusing_non_databases(self.path):
                application, version, tables = state_sqlite._inspect(conn)
            if (
                application != state_sqlite.APPLICATION_ID
                or version > state_sqlite.SCHEMA_VERSION
                or not tables >= state_sqlite.TABLES
            ):
                names = ", ".join(sorted(tables)) or "none"
                raise CorruptStateError(
                    f"SQLite database {self.path} is not a Limenex state database"
                    f" (application_id {application}, user_version {version}, tables: {names})."
                    " The file was left as found: fix or move it, or point the store at"
                    " another path."
                )
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise ApprovalStoreError(
                    f"SQLite database {self.path}: cannot use write-ahead logging"
                    f" (journal mode stays {mode!r})"
                )
            if "approvals" not in tables or _missing_columns(conn):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_TABLE)
                conn.execute(_INDEX)
                for column in _missing_columns(conn):  # a table from an earlier version
                    conn.execute(f"ALTER TABLE approvals ADD COLUMN {_ADDED[column]}")
                conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            raise
        self._conn = conn
        return conn


_ADDED = {
    "decimals": "decimals TEXT NOT NULL DEFAULT '[]'",
    "action": "action TEXT NOT NULL DEFAULT ''",
    "waived": "waived TEXT NOT NULL DEFAULT '[]'",
    "policies_digest": "policies_digest TEXT NOT NULL DEFAULT ''",
}
"""Columns added since the table was first made, with the value older requests have."""


def _missing_columns(conn: sqlite3.Connection) -> list[str]:
    present = {row[1] for row in conn.execute("PRAGMA table_info(approvals)")}
    return [] if not present else [name for name in _ADDED if name not in present]


def _inspect(path: str, timeout: float) -> tuple[int, int, frozenset[str]]:
    """``(application_id, user_version, tables)`` of the file at ``path``, read only."""
    from limenex.core import sqlite as state_sqlite

    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        with state_sqlite.refusing_non_databases(path):
            return state_sqlite._inspect(conn)
    finally:
        conn.close()


def _load(conn: sqlite3.Connection, request_id: str) -> ApprovalRequest | None:
    if not isinstance(request_id, str):
        return None
    row = conn.execute(f"{_SELECT} WHERE id = ?", (request_id,)).fetchone()
    return None if row is None else from_row(row)


def _before_fork() -> None:
    """Close every connection before a fork (a child must not inherit one); reopened on use."""
    for store in list(_stores):
        if store._lock.acquire(timeout=store.timeout + 1.0):
            _held_for_fork.append(store._lock)
            store._close_quietly()


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_for_fork.clear()
    for store in list(_stores):
        store._lock = threading.Lock()
        store._conn = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
