"""The hash-chained audit log in a database table: SQLite or PostgreSQL.

::

    AuditLog(SQLSink("sqlite:///.limenex/audit.db"))
    AuditLog(SQLSink("postgresql://app@db:5432/prod?schema=limenex"))

One row per record, in a table (``limenex_audit`` unless told otherwise) made on first use::

    seq   BIGINT PRIMARY KEY   the record's seq (1, 2, ...)
    hash  TEXT NOT NULL        the record's hash: the chain's head is read from here
    line  TEXT NOT NULL        the record's canonical JSON line, as a JsonlSink writes it

The records are exactly those of :class:`~limenex.audit.JsonlSink`: :func:`verify_sql` runs
the rows, in ``seq`` order, through the same :func:`~limenex.audit.verify_lines`, so an
edited, dropped, inserted or reordered row is found and named as in the file (its position,
which is the ``seq`` expected there); a row whose ``seq`` or ``hash`` column disagrees with
its line is found too.

:meth:`SQLSink.append` reads the last row and inserts the next one in ONE transaction that
holds a lock for the whole step, so threads and processes sharing the table never fork the
chain: ``BEGIN IMMEDIATE`` (SQLite's write lock) or ``pg_advisory_xact_lock`` on a key made
from the schema and table names (PostgreSQL). Commits are durable before ``append`` returns
(SQLite: WAL with ``synchronous=FULL``; PostgreSQL: ``synchronous_commit=on``). Every failure
raises :class:`~limenex.audit.AuditError`: passed to the engine, that blocks the action.

URLs: ``sqlite:///relative.db`` and ``sqlite:////absolute.db`` (the standard library's
sqlite3), ``postgresql://...`` or ``postgres://...`` (psycopg 3: ``pip install
'limenex[postgres]'``), where ``?schema=NAME`` names the schema to keep the table in (made
if missing; ``public`` by default) and any other query parameter is libpq's.
``connect_timeout`` defaults to 10 seconds. This module imports psycopg only when a
PostgreSQL URL is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import Generator, Iterator, Sequence
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from limenex.audit import GENESIS, AuditError, AuditRecord, AuditSink, VerifyResult, verify_lines

__all__ = ["DEFAULT_TABLE", "SQLSink", "tail_sql", "verify_sql"]

DEFAULT_TABLE = "limenex_audit"
"""The table a :class:`SQLSink` writes unless told otherwise."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_HASH = re.compile(r"[0-9a-f]{64}")
_LOCK_CLASS = 0x4C4D4E41  # "LMNA": the advisory lock class of audit tables
_SCHEMES = ("sqlite", "postgresql", "postgres")


def _where(url: str) -> str:
    from limenex.stores import redacted

    return redacted(url)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.lower().startswith("pg_"):
        raise AuditError(
            f"invalid audit {kind} name {name!r}: use 1 to 63 letters, digits and underscores,"
            " not starting with a digit or pg_"
        )
    return name


class _Backend:
    """One database: the locked append and the ordered reads."""

    def head_and_insert(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Chain ``records`` on the last row and insert them, in one locked transaction."""
        raise NotImplementedError

    def rows(self) -> Iterator[tuple[int, str, str]]:
        """Every ``(seq, hash, line)`` in ``seq`` order; ``AuditError`` if there is no table."""
        raise NotImplementedError

    def last(self, n: int) -> list[tuple[int, str]]:
        """The last ``n`` ``(seq, line)``, oldest first."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _chain(
    records: Sequence[AuditRecord], last: tuple[Any, Any] | None, where: str
) -> list[AuditRecord]:
    """``records`` chained on the table's last row ``(seq, hash)`` (``None``: empty table)."""
    seq, digest = (0, GENESIS) if last is None else last
    if type(seq) is not int or not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise AuditError(
            f"{where}: the last row has no valid seq/hash; run `limenex audit verify --sql`"
            " and repair it before anything is appended"
        )
    chained = []
    for record in records:
        seq += 1
        link = record.chained(seq, digest)
        digest = link.hash or GENESIS
        chained.append(link)
    return chained


# --- SQLite ---------------------------------------------------------------------------------


class _SQLite(_Backend):
    def __init__(self, url: str, path: str, table: str, timeout: float) -> None:
        self.url = url
        self.path = os.path.abspath(path)
        self.table = table
        self.timeout = timeout
        self.conn: sqlite3.Connection | None = None
        self.ready = False

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        if self.conn is not None:
            return self.conn
        if not create and not os.path.exists(self.path):
            raise AuditError(f"no audit database at {self.path} (nothing recorded yet?)")
        if create:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            if create:
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if str(mode).lower() != "wal":
                    raise AuditError(f"{self.path}: cannot use write-ahead logging ({mode!r})")
                conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def _fail(self, exc: BaseException, doing: str) -> AuditError:
        self.close()
        return AuditError(f"cannot {doing} the audit table {self.table} of {self.path}: {exc}")

    def head_and_insert(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        q = f'"{self.table}"'
        try:
            conn = self._connect(create=True)
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not self.ready:
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {q} (seq BIGINT PRIMARY KEY,"
                        " hash TEXT NOT NULL, line TEXT NOT NULL)"
                    )
                last = conn.execute(
                    f"SELECT seq, hash FROM {q} ORDER BY seq DESC LIMIT 1"  # noqa: S608
                ).fetchone()
                chained = _chain(records, last, f"{self.path} ({self.table})")
                conn.executemany(
                    f"INSERT INTO {q} (seq, hash, line) VALUES (?, ?, ?)",  # noqa: S608
                    [(link.seq, link.hash, link.line()) for link in chained],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            self.ready = True
            return chained
        except AuditError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(exc, "write") from exc

    def _exists(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self.table,)
        ).fetchone()
        if row is None:
            raise AuditError(f"no audit table {self.table} in {self.path} (nothing recorded yet?)")

    def rows(self) -> Iterator[tuple[int, str, str]]:
        try:
            conn = self._connect(create=False)
            self._exists(conn)
            cursor = conn.execute(
                f'SELECT seq, hash, line FROM "{self.table}" ORDER BY seq'  # noqa: S608
            )
            yield from cursor
        except AuditError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(exc, "read") from exc

    def last(self, n: int) -> list[tuple[int, str]]:
        try:
            conn = self._connect(create=False)
            self._exists(conn)
            rows = conn.execute(
                f'SELECT seq, line FROM "{self.table}" ORDER BY seq DESC LIMIT ?',  # noqa: S608
                (n,),
            ).fetchall()
        except AuditError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise self._fail(exc, "read") from exc
        return [(seq, line) for seq, line in reversed(rows)]

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


# --- PostgreSQL -----------------------------------------------------------------------------


class _Postgres(_Backend):
    def __init__(self, url: str, schema: str, table: str, timeout: float) -> None:
        try:
            import psycopg
            from psycopg import sql
        except ImportError as exc:
            raise AuditError(
                f"a PostgreSQL audit table needs psycopg 3 ({exc.name or exc}):"
                " pip install 'limenex[postgres]'"
            ) from exc
        self.psycopg = psycopg
        self.url = url
        self.where = _where(url)
        self.schema = schema
        self.table = table
        self.timeout = timeout
        self.qualified = sql.Identifier(schema, table)
        self.lock_key = f"{schema}.{table}"
        self.sql = sql
        self.conn: Any = None
        self.ready = False

    def _connect(self) -> Any:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        parts = urlsplit(self.url)
        names = {unquote_plus(p.partition("=")[0]) for p in parts.query.split("&") if p}
        extra: dict[str, Any] = {}
        if "connect_timeout" not in names:
            extra["connect_timeout"] = max(2, round(self.timeout))
        conn = self.psycopg.connect(self.url, autocommit=True, **extra)
        try:
            conn.execute("SET synchronous_commit = on")
            conn.execute(
                self.sql.SQL("SET statement_timeout = {}").format(
                    self.sql.Literal(int(self.timeout * 1000))
                )
            )
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def _fail(self, exc: BaseException, doing: str) -> AuditError:
        self.close()
        return AuditError(
            f"cannot {doing} the audit table {self.schema}.{self.table} at {self.where}: {exc}"
        )

    def head_and_insert(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        sql = self.sql
        try:
            conn = self._connect()
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                    (_LOCK_CLASS, self.lock_key),
                )
                if not self.ready:
                    missing = conn.execute(
                        "SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)",
                        (self.schema,),
                    ).fetchone()[0]
                    if missing:
                        conn.execute(
                            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                                sql.Identifier(self.schema)
                            )
                        )
                    conn.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} (seq BIGINT PRIMARY KEY,"
                            " hash TEXT NOT NULL, line TEXT NOT NULL)"
                        ).format(self.qualified)
                    )
                last = conn.execute(
                    sql.SQL("SELECT seq, hash FROM {} ORDER BY seq DESC LIMIT 1").format(
                        self.qualified
                    )
                ).fetchone()
                chained = _chain(records, last, f"{self.where} ({self.schema}.{self.table})")
                with conn.cursor() as cursor:
                    cursor.executemany(
                        sql.SQL("INSERT INTO {} (seq, hash, line) VALUES (%s, %s, %s)").format(
                            self.qualified
                        ),
                        [(link.seq, link.hash, link.line()) for link in chained],
                    )
            self.ready = True
            return chained
        except AuditError:
            raise
        except (self.psycopg.Error, OSError) as exc:
            raise self._fail(exc, "write") from exc

    def _exists(self, conn: Any) -> None:
        (found,) = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (self.qualified.as_string(conn),)
        ).fetchone()
        if not found:
            raise AuditError(
                f"no audit table {self.schema}.{self.table} at {self.where} (nothing recorded yet?)"
            )

    def rows(self) -> Iterator[tuple[int, str, str]]:
        sql = self.sql
        try:
            conn = self._connect()
            self._exists(conn)
            with conn.transaction(), conn.cursor(name="limenex_audit_rows") as cursor:
                cursor.itersize = 2000
                cursor.execute(
                    sql.SQL("SELECT seq, hash, line FROM {} ORDER BY seq").format(self.qualified)
                )
                yield from cursor
        except AuditError:
            raise
        except (self.psycopg.Error, OSError) as exc:
            raise self._fail(exc, "read") from exc

    def last(self, n: int) -> list[tuple[int, str]]:
        sql = self.sql
        try:
            conn = self._connect()
            self._exists(conn)
            rows = conn.execute(
                sql.SQL("SELECT seq, line FROM {} ORDER BY seq DESC LIMIT %s").format(
                    self.qualified
                ),
                (n,),
            ).fetchall()
        except AuditError:
            raise
        except (self.psycopg.Error, OSError) as exc:
            raise self._fail(exc, "read") from exc
        return [(seq, line) for seq, line in reversed(rows)]

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


# --- the sink -------------------------------------------------------------------------------


def _backend(url: str, table: str, timeout: float) -> _Backend:
    if not isinstance(url, str):
        raise AuditError(f"an audit table URL must be a string, got {type(url).__name__}")
    _check_name("table", table)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise AuditError(
            f"unknown audit table URL {_where(url)!r}; known schemes: sqlite:///,"
            " postgresql://, postgres://"
        )
    if scheme == "sqlite":
        path, _, query = rest.partition("?")
        if query:
            raise AuditError(f"audit table URL {url!r}: an SQLite URL takes no options")
        if not path.startswith("/") or path in ("/", "/:memory:"):
            raise AuditError(
                f"audit table URL {url!r}: write sqlite:///relative/path.db or"
                " sqlite:////absolute/path.db (three slashes, then the path of a file)"
            )
        return _SQLite(url, path[1:], table, timeout)
    parts = urlsplit(url)
    schema, kept = "public", []
    for piece in parts.query.split("&"):
        name, _, value = piece.partition("=")
        if unquote_plus(name) == "schema":
            schema = _check_name("schema", unquote_plus(value))
        elif piece:
            kept.append(piece)
    return _Postgres(urlunsplit(parts._replace(query="&".join(kept))), schema, table, timeout)


_sinks: weakref.WeakSet[SQLSink] = weakref.WeakSet()
_held_for_fork: list[threading.Lock] = []


class SQLSink(AuditSink):
    """Appends each chained record as one row of a table in SQLite or PostgreSQL.

    ``url``: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``postgresql://...``
    (``?schema=`` for the schema, ``public`` by default). ``table`` (letters, digits and
    underscores) is created on first append. ``timeout`` bounds, in seconds, a wait for the
    lock or a statement. The connection is opened on first use, reopened after a failure
    and closed before a ``fork`` (each side reopens its own). See the module docstring.
    """

    def __init__(self, url: str, table: str = DEFAULT_TABLE, *, timeout: float = 30.0) -> None:
        self.url = url
        self.table = table
        self.timeout = float(timeout)
        self._backend = _backend(url, table, self.timeout)
        self._lock = threading.Lock()
        _sinks.add(self)

    def __repr__(self) -> str:
        return f"SQLSink({_where(self.url)!r}, table={self.table!r})"

    def append(self, record: AuditRecord) -> AuditRecord:
        return self.append_many((record,))[0]

    def append_many(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Chain ``records`` onto the table's last row and insert them in one transaction."""
        if not records:
            return []
        with self._lock:
            return self._backend.head_and_insert(records)

    def close(self) -> None:
        with self._lock:
            self._backend.close()


def verify_sql(
    url: str, table: str = DEFAULT_TABLE, expect_head: str | None = None
) -> VerifyResult:
    """:func:`~limenex.audit.verify` for an audit table: every row, in ``seq`` order.

    ``first_bad_line`` is the position of the first bad row (1-based), which is the ``seq``
    expected there. Raises :class:`~limenex.audit.AuditError` only when the table cannot be
    read (no such database or table, server unreachable); nothing is created.
    """
    backend = _backend(url, table, 30.0)
    broken: list[tuple[int, str]] = []  # (position, hash before it) of a row whose columns lie

    def lines() -> Generator[bytes, None, None]:
        prev = GENESIS
        for number, (seq, digest, line) in enumerate(backend.rows(), start=1):
            yield (line + "\n").encode("utf-8")
            # verify_lines accepted the line: its seq and hash columns must say the same.
            data = json.loads(line)
            if seq != data["seq"] or digest != data["hash"]:
                broken.append((number, prev))
                return
            prev = digest

    reading = lines()
    try:
        result = verify_lines(reading, expect_head)
    finally:
        reading.close()  # ends the read (and its transaction) before the connection goes
        backend.close()
    if result.ok and broken:
        number, prev = broken[0]
        return VerifyResult(
            False,
            number - 1,
            number,
            "the row's seq or hash column does not match its record: the row was edited",
            prev,
        )
    return result


def tail_sql(url: str, n: int, table: str = DEFAULT_TABLE) -> list[tuple[int | None, bytes]]:
    """The last ``n`` rows, oldest first, as :func:`~limenex.audit.read_tail` gives lines.

    Each item is ``(seq, line)``: the row's ``seq`` and its line, raw. Raises
    :class:`~limenex.audit.AuditError` when the table cannot be read; nothing is created.
    """
    if n <= 0:
        return []
    backend = _backend(url, table, 30.0)
    try:
        rows = backend.last(n)
    finally:
        backend.close()
    return [(seq, line.encode("utf-8")) for seq, line in rows]


# --- fork safety: a child never uses (or closes) its parent's connection ------------------


def _before_fork() -> None:
    for sink in list(_sinks):
        if sink._lock.acquire(timeout=sink.timeout + 1.0):
            _held_for_fork.append(sink._lock)
            sink._backend.close()


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_for_fork.clear()
    for sink in list(_sinks):
        sink._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
