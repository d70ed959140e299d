"""State stores that live in one process or one file: :class:`InMemoryStateStore` and
:class:`LocalFileStateStore`. The contract they implement is :mod:`limenex.core.state`.

Both keep their numbers in a :class:`Ledger`: pure bookkeeping of running totals, calendar
periods, rolling-window entries and pending reservations, with no locks and no I/O. The
stores add a lock around it, and the file store the persistence.

``adjust`` never takes a total below zero: a refund larger than the total leaves zero, and
a refund on a rolling window consumes its oldest entries first, so that it cannot surface as
a negative total once the entries it offset have expired.

Nor does a refund take a total below the amounts still pending on it (for a calendar window:
those recorded in the current period): it is clamped to that floor, since each of those
amounts is undone by its own release, and a refund that took them too would let that
release erase someone else's spend. A rolling refund leaves the pending entries themselves
in place and consumes the others, oldest first. Reservations whose lease has expired are
dropped first (a release can no longer undo them), so their amounts can be refunded. Only
``adjust`` looks at the pending reservations: ``reserve`` and ``commit`` do no more work.

A release at or after its reservation's expiry drops the pending record and undoes nothing,
whether or not another call expired the record first.

The files
---------

``state.json`` holds the totals. It keeps the seed's layout, ``{dimension: {agent_id: total}}``,
for every total scoped to the agent without a window. Every other total lives under one
reserved key, present only when there is something to keep::

    {"spend_usd": {"agent-1": 30.0},
     "__limenex__": {
       "version": 1,
       "tables": [
         {"dimension": "spend_usd", "scope": "global", "window": "", "subjects": {"": 30.0}},
         {"dimension": "spend_calls", "scope": "agent", "window": "day",
          "subjects": {"agent-1": ["2025-11-24", 3]}},
         {"dimension": "spend_usd", "scope": "agent", "window": "24h",
          "subjects": {"agent-1": [[1764000000.5, 30.0]]}}]}}

A calendar subject holds its period and total, a rolling subject its ``[time, amount]``
entries. The pending reservations live beside it in ``state.json.pending``, a file that
exists only while one does::

    {"version": 1,
     "pending": {"<id>": {"created_at": 1764000000.5, "expires_at": 1764000300.5,
                          "owner": "host:4242",
                          "amounts": [["spend_usd", "agent", "agent-1", "", 30.0, null]]}}}

A pending amount ends with where it was added (``null``, the period, or the entry's time).
Amounts are exact decimal literals (``str(Decimal)``, read back with ``parse_float=Decimal``);
times are ``repr(float)``.

Every operation reads both files, changes them and writes back the ones whose content
changed, under an exclusive ``flock`` of ``state.json.lock`` (never removed) and the store's
thread lock. A file that is not ours (not JSON, a wrong shape, a negative total, an unknown
version, a ``pending`` key in ``state.json`` as development versions of 0.2 wrote it...)
raises :class:`~limenex.core.errors.CorruptStateError` on every call and is never overwritten.

Crashes and durability
----------------------

A file is written to its own temporary file (``state.json.tmp``, ``state.json.pending.tmp``;
a crashed writer's leftover is removed first), which is fdatasynced before ``os.replace``
renames it over the file: a crash shows the old file or the new one, never a torn one, on
any filesystem. A sidecar left with no record is removed instead.

Whatever the crash, every pending amount stays included in the totals. A pending record is
what a release subtracts, so a record whose amounts were not counted would let a release
take someone else's spend; amounts without their record merely stay counted, as if its lease
had expired. Hence the order of the writes:

* ``reserve`` writes ``state.json`` first, then the sidecar with the new record;
* ``commit`` (and dropping an expired record) rewrites only the sidecar: at 10,000 agents a
  call writes the ~190 KB of totals once, not twice;
* ``release``, ``adjust`` and ``reset`` write the sidecar first, without the records they
  drop, then the totals.

Every rename of ``state.json`` is made durable by an fsync of the folder before the
operation returns and before any later rename: ``reserve`` renames the sidecar only once the
new totals are durable (it syncs the sidecar's data before that fsync, which on a journaling
filesystem does most of the folder's work). So a power cut never leaves a record whose
amounts are not counted, and the totals survive it once ``reserve``, ``release``, ``adjust``
or ``reset`` has returned. A change of the sidecar that no rename of ``state.json`` follows
(a commit, a dropped expired record, a reservation's new record) skips the fsync, and a power
cut may undo it, harmlessly: a record lost leaves its amounts counted, and a record that
comes back belongs to a process the power cut ended, so nothing can release it any more: it
expires with its lease, its amounts counted, which is what a commit means.

To keep the CPU cost of a write small, the store keeps each file's bytes as it last read or
wrote them (it re-parses a file only when they differ) and the JSON of every subject,
re-encoding only what an operation touched.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import secrets
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import reduce
from json import loads
from json.encoder import encode_basestring_ascii
from typing import Any, NoReturn, TypeVar, cast

from limenex.core.errors import CorruptStateError, LimenexConfigError, StateStoreError
from limenex.core.state import (
    EXACT,
    OPERATORS,
    RESERVED_DIMENSION,
    Check,
    CounterKey,
    PendingReservation,
    Reservation,
    StateBreach,
    StateStore,
    counter_window,
    run_blocking,
)
from limenex.core.window import Window

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None  # type: ignore[assignment]  # LocalFileStateStore refuses to start then

__all__ = ["InMemoryStateStore", "LocalFileStateStore", "SQLiteStateStore", "StateStore"]

RESERVED = RESERVED_DIMENSION
"""The state file's top-level key for everything beyond the seed layout."""
SIDECAR = ".pending"
"""The suffix of the file beside the state file that holds the pending reservations."""

TableKey = tuple[str, str, str]
"""``(dimension, scope, window)``: one policy dimension's totals, by subject."""
Where = str | float | None
"""Where an amount was put: a plain total, a calendar period, a rolling entry's time."""
Undo = tuple[CounterKey, Where, Decimal]
Pending = tuple[Where, Decimal]
"""Where a pending reservation put an amount on a counter, and how much."""
Hold = tuple[float, float, str, tuple[Undo, ...]]
"""A pending reservation: ``(expires_at, created_at, owner, amounts)``."""

_ZERO = Decimal(0)
_add = EXACT.add
_subtract = EXACT.subtract
_T = TypeVar("_T")


def _minus(total: Decimal, amount: Decimal) -> Decimal:
    """``total - amount``, never below zero."""
    rest = _subtract(total, amount)
    return rest if rest > 0 else _ZERO


def _adjusted(total: Decimal, delta: Decimal, held: Iterable[Decimal]) -> Decimal:
    """``total + delta``; a refund stops at the ``held`` amounts (and so at zero)."""
    adjusted = _add(total, delta)
    if delta >= 0:
        return adjusted
    floor = min(total, reduce(_add, held, _ZERO))  # a refund never raises a total
    return adjusted if adjusted > floor else floor


def _checked(amount: Decimal, *, refund: bool = False) -> Decimal:
    """``amount`` if it is finite and, unless a refund, not negative; else StateStoreError."""
    if not amount.is_finite() or (amount < 0 and not refund):
        kind = "finite number" if refund else "finite, non-negative number"
        raise StateStoreError(f"amount {amount} is not a {kind}")
    return amount


def _lease(seconds: float) -> float:
    if type(seconds) not in (int, float) or not (math.isfinite(seconds) and seconds > 0):
        raise LimenexConfigError(f"lease_seconds must be a positive number, got {seconds!r}")
    return float(seconds)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _json(text: str) -> bytes:
    return encode_basestring_ascii(text).encode()


# --- tables: one (dimension, scope, window)'s totals, by subject --------------------------


class _Table(ABC):
    """One ``TableKey``'s totals. The kinds differ in how time makes an amount stop counting.

    ``put``/``take``/``adjust`` get amounts that the ledger has checked. ``dump`` and each
    kind's ``load`` class method are the table's JSON form (``load`` raises ``_Corrupt``).
    """

    __slots__ = ()

    @abstractmethod
    def total(self, subject: str, now: float) -> Decimal:
        """The subject's total at ``now`` (dead data may be pruned on the way)."""

    @abstractmethod
    def put(self, subject: str, amount: Decimal, total: Decimal, now: float) -> Where:
        """Record ``amount``; ``total`` is the new total, already computed by the caller."""

    @abstractmethod
    def take(self, subject: str, amount: Decimal, where: Where) -> None:
        """Undo a ``put``; nothing if that amount no longer counts."""

    @abstractmethod
    def adjust(self, subject: str, delta: Decimal, now: float, held: Sequence[Pending]) -> Decimal:
        """Add ``delta`` (negative: a refund); the new total.

        A refund never goes below zero, nor below the amounts of ``held`` (the subject's live
        pending amounts, as ``(where, amount)``) that still count in the total: a release
        will undo those.
        """

    @abstractmethod
    def live(self, now: float) -> Iterator[tuple[str, Decimal]]:
        """Each subject's total at ``now`` (none for dead ones), changing nothing."""

    @abstractmethod
    def subjects(self) -> Iterable[str]:
        """Every stored subject."""

    @abstractmethod
    def dump(self, subject: str) -> bytes | None:
        """The subject's value as JSON, ``None`` when nothing is stored for it."""


class _Totals(_Table):
    """Totals that never expire, as a plain ``{subject: total}`` (the seed's layout)."""

    __slots__ = ("values",)

    def __init__(self, values: dict[str, Decimal] | None = None) -> None:
        self.values: dict[str, Decimal] = {} if values is None else values

    @classmethod
    def load(cls, subjects: dict[str, Any], where: str) -> _Totals:
        for subject, total in subjects.items():
            if type(total) is not Decimal or total < 0:  # the message only when it is needed
                _amount(total, f"{where}[{subject!r}]")
        return cls(subjects)

    def total(self, subject: str, now: float) -> Decimal:
        return self.values.get(subject, _ZERO)

    def put(self, subject: str, amount: Decimal, total: Decimal, now: float) -> Where:
        self.values[subject] = total
        return None

    def take(self, subject: str, amount: Decimal, where: Where) -> None:
        total = self.values.get(subject)
        if total is not None:
            self.values[subject] = _minus(total, amount)

    def adjust(self, subject: str, delta: Decimal, now: float, held: Sequence[Pending]) -> Decimal:
        floor = (amount for _, amount in held)
        total = self.values[subject] = _adjusted(self.values.get(subject, _ZERO), delta, floor)
        return total

    def live(self, now: float) -> Iterator[tuple[str, Decimal]]:
        return iter(self.values.items())

    def subjects(self) -> Iterable[str]:
        return self.values.keys()

    def dump(self, subject: str) -> bytes | None:
        total = self.values.get(subject)
        return None if total is None else str(total).encode()


def _period(unit: str, now: float) -> tuple[float, float]:
    """The ``[start, end)`` epoch seconds of the calendar period (UTC) containing ``now``."""
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(minute=0, second=0, microsecond=0)
    if unit == "hour":
        return start.timestamp(), (start + timedelta(hours=1)).timestamp()
    start = start.replace(hour=0)
    if unit == "day":
        end = start + timedelta(days=1)
    elif unit == "week":
        start -= timedelta(days=start.weekday())
        end = start + timedelta(days=7)
    else:
        start = start.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


class _Calendar(_Table):
    """``{subject: (period, total)}``: a total counts until its period ends.

    A subject recorded in a later period than ``now``'s (another process's clock ran ahead)
    keeps that period: the later one wins, the safe side.
    """

    __slots__ = ("_cached", "unit", "values", "window")

    def __init__(
        self, window: Window, values: dict[str, tuple[str, Decimal]] | None = None
    ) -> None:
        if window.calendar is None:
            raise StateStoreError(f"{window} is not a calendar window")
        self.window, self.unit = window, window.calendar
        self.values: dict[str, tuple[str, Decimal]] = {} if values is None else values
        self._cached = (0.0, 0.0, "")  # (start, end, name) of the last period seen

    @classmethod
    def load(cls, window: Window, subjects: dict[str, Any], where: str) -> _Calendar:
        values = {}
        for subject, value in subjects.items():
            at = f"{where}[{subject!r}]"
            period, total = _array(value, at, 2)
            values[subject] = (_text(period, f"{at}[0]"), _amount(total, f"{at}[1]"))
        return cls(window, values)

    def _bucket(self, now: float) -> str:
        start, end, name = self._cached
        if start < now < end:
            return name
        name = self.window.bucket(now)
        start, end = _period(self.unit, now)
        # A microsecond clear of the edges, where Window.bucket's own rounding decides.
        self._cached = (start + 1e-6, end - 1e-6, name)
        return name

    def _current(self, subject: str, now: float) -> tuple[str, Decimal]:
        bucket = self._bucket(now)
        held = self.values.get(subject)
        if held is None:
            return bucket, _ZERO
        if held[0] < bucket:
            del self.values[subject]
            return bucket, _ZERO
        return held

    def total(self, subject: str, now: float) -> Decimal:
        return self._current(subject, now)[1]

    def put(self, subject: str, amount: Decimal, total: Decimal, now: float) -> Where:
        bucket = self._current(subject, now)[0]
        self.values[subject] = (bucket, total)
        return bucket

    def take(self, subject: str, amount: Decimal, where: Where) -> None:
        held = self.values.get(subject)
        if held is not None and held[0] == where:
            self.values[subject] = (held[0], _minus(held[1], amount))

    def adjust(self, subject: str, delta: Decimal, now: float, held: Sequence[Pending]) -> Decimal:
        bucket, total = self._current(subject, now)
        floor = (amount for where, amount in held if where == bucket)  # this period's only
        total = _adjusted(total, delta, floor)
        self.values[subject] = (bucket, total)
        return total

    def live(self, now: float) -> Iterator[tuple[str, Decimal]]:
        bucket = self._bucket(now)
        return ((s, total) for s, (b, total) in self.values.items() if b >= bucket)

    def subjects(self) -> Iterable[str]:
        return self.values.keys()

    def dump(self, subject: str) -> bytes | None:
        held = self.values.get(subject)
        return None if held is None else b"[%s, %s]" % (_json(held[0]), str(held[1]).encode())


class _Series:
    """One subject's rolling entries ``(time, amount)``, oldest first, and their exact sum."""

    __slots__ = ("entries", "total")

    def __init__(self, entries: Iterable[tuple[float, Decimal]] = ()) -> None:
        self.entries: deque[tuple[float, Decimal]] = deque(entries)
        self.total: Decimal = reduce(_add, (amount for _, amount in self.entries), _ZERO)


class _Rolling(_Table):
    """``{subject: series}``: an amount recorded at ``t`` counts in ``[t, t + seconds)``.

    Entries are pruned from the left. One recorded with an earlier time than the last (a
    clock that went back) waits behind it and so counts a little longer: the safe side.
    """

    __slots__ = ("seconds", "values")

    def __init__(self, window: Window, values: dict[str, _Series] | None = None) -> None:
        if window.seconds is None:
            raise StateStoreError(f"{window} is not a rolling window")
        self.seconds = window.seconds
        self.values: dict[str, _Series] = {} if values is None else values

    @classmethod
    def load(cls, window: Window, subjects: dict[str, Any], where: str) -> _Rolling:
        values = {}
        for subject, value in subjects.items():
            at = f"{where}[{subject!r}]"
            entries = []
            for n, entry in enumerate(_array(value, at)):
                time, amount = _array(entry, f"{at}[{n}]", 2)
                entries.append((_time(time, f"{at}[{n}][0]"), _amount(amount, f"{at}[{n}][1]")))
            values[subject] = _Series(entries)
        return cls(window, values)

    def _series(self, subject: str, now: float) -> _Series | None:
        series = self.values.get(subject)
        if series is None:
            return None
        entries, seconds = series.entries, self.seconds
        while entries and entries[0][0] + seconds <= now:
            series.total = _subtract(series.total, entries.popleft()[1])
        if not entries:
            del self.values[subject]
            return None
        return series

    def total(self, subject: str, now: float) -> Decimal:
        series = self._series(subject, now)
        return _ZERO if series is None else series.total

    def put(self, subject: str, amount: Decimal, total: Decimal, now: float) -> Where:
        series = self._series(subject, now)
        if series is None:
            series = self.values[subject] = _Series()
        series.entries.append((now, amount))
        series.total = total
        return now

    def take(self, subject: str, amount: Decimal, where: Where) -> None:
        series = self.values.get(subject)
        if series is None:
            return
        try:
            series.entries.remove((cast(float, where), amount))  # a rolling entry's time
        except ValueError:
            return  # expired, or consumed by a refund: it stays counted as it is
        series.total = _subtract(series.total, amount)
        if not series.entries:
            del self.values[subject]

    def adjust(self, subject: str, delta: Decimal, now: float, held: Sequence[Pending]) -> Decimal:
        """A positive delta is a new entry; a refund consumes the oldest entries first.

        Consuming the oldest ends the refund's effect no later than the amounts it cancels
        would have stopped counting, so the total can never turn negative later on. The
        entries of ``held`` are skipped, left for their release to remove: the refund stops
        at the sum of the others.
        """
        total = self.total(subject, now)
        if delta >= 0:
            total = _add(total, delta)
            if delta:
                self.put(subject, delta, total, now)
            return total
        series = self.values.get(subject)
        if series is None:
            return _ZERO
        pending = Counter(held)  # an entry a release will look for, as many times as held
        kept: deque[tuple[float, Decimal]] = deque()
        owed = refund = delta.copy_negate()
        for entry in series.entries:
            if pending[entry]:
                pending[entry] -= 1
                kept.append(entry)
            elif not owed:
                kept.append(entry)
            elif entry[1] > owed:
                kept.append((entry[0], _subtract(entry[1], owed)))
                owed = _ZERO
            else:
                owed = _subtract(owed, entry[1])
        total = _subtract(total, _subtract(refund, owed))
        series.entries, series.total = kept, total
        if not kept:
            del self.values[subject]
        return total

    def live(self, now: float) -> Iterator[tuple[str, Decimal]]:
        def expired(entry: tuple[float, Decimal]) -> bool:
            return entry[0] + self.seconds <= now

        for subject, series in self.values.items():
            counted = [amount for _, amount in itertools.dropwhile(expired, series.entries)]
            if counted:  # the entries that ``total`` would keep after pruning
                yield subject, reduce(_add, counted, _ZERO)

    def subjects(self) -> Iterable[str]:
        return self.values.keys()

    def dump(self, subject: str) -> bytes | None:
        series = self.values.get(subject)
        if series is None:
            return None
        return ("[" + ", ".join(f"[{at!r}, {a}]" for at, a in series.entries) + "]").encode()


def _new_table(key: CounterKey, window: Window | None) -> _Table:
    window = counter_window(key, window)
    if window is None:
        return _Totals()
    if window.calendar:
        return _Calendar(window)
    return _Rolling(window)


# --- the ledger ------------------------------------------------------------------------------


class Ledger:
    """Every total and pending reservation of one store, as plain Python data.

    Not thread-safe and without I/O: a store serialises calls and persists it. ``tables``
    maps ``(dimension, scope, window)`` to that dimension's totals by subject (a plain dict
    of decimals for unwindowed ones, so a million agents fit in a few hundred MB);
    ``holds`` maps a reservation id to its pending record, oldest first. With
    ``track=True``, ``touched`` collects every ``(table key, subject)`` that may have
    changed, for a store that re-encodes only those.
    """

    __slots__ = ("holds", "tables", "touched")

    def __init__(self, *, track: bool = False) -> None:
        self.tables: dict[TableKey, _Table] = {}
        self.holds: dict[str, Hold] = {}
        self.touched: set[tuple[TableKey, str]] | None = set() if track else None

    def table(self, key: CounterKey, window: Window | None) -> _Table:
        """The table of ``key``, created on first use (and marked touched)."""
        tkey = (key[0], key[1], key[3])
        table = self.tables.get(tkey)
        if table is None:
            table = self.tables[tkey] = _new_table(key, window)
        if self.touched is not None:
            self.touched.add((tkey, key[2]))
        return table

    def existing(self, key: CounterKey) -> _Table | None:
        """The table of ``key`` if there is one (marked touched: reading may prune it)."""
        tkey = (key[0], key[1], key[3])
        table = self.tables.get(tkey)
        if table is not None and self.touched is not None:
            self.touched.add((tkey, key[2]))
        return table

    def reserve(
        self, checks: Sequence[Check], now: float, rid: str, owner: str, lease: float
    ) -> Reservation | StateBreach:
        """Test every check and, if all hold, add each key's amount once (the contract)."""
        holds = self.holds
        if holds:
            self._expire_head(now)
        try:
            if len(checks) == 1:  # the common case, without the bookkeeping of many keys
                check = checks[0]
                key, amount = check.key, check.amount
                if amount.is_signed() or not amount.is_finite():  # cheaper than ``< 0``
                    _checked(amount)
                table = self.tables.get((key[0], key[1], key[3]))
                if table is None or self.touched is not None:
                    table = self.table(key, check.window)
                if type(table) is _Totals:  # inline: the hottest path of all
                    values = table.values
                    total = values.get(key[2], _ZERO)
                    projected = _add(total, amount)
                    if not OPERATORS[check.op](projected, check.limit):
                        return StateBreach(0, total, projected)
                    values[key[2]] = projected
                    undo: tuple[Undo, ...] = ((key, None, amount),)
                else:
                    total = table.total(key[2], now)
                    projected = _add(total, amount)
                    if not OPERATORS[check.op](projected, check.limit):
                        return StateBreach(0, total, projected)
                    undo = ((key, table.put(key[2], amount, projected, now), amount),)
                observed: tuple[Decimal, ...] = (total,)
            else:
                outcome = self._reserve_many(checks, now)
                if isinstance(outcome, StateBreach):
                    return outcome
                undo, observed = outcome
        except ArithmeticError as exc:
            raise StateStoreError(f"cannot keep an exact total: {exc!r}") from exc
        holds[rid] = (now + lease, now, owner, undo)
        return Reservation(rid, observed, None)

    def _reserve_many(
        self, checks: Sequence[Check], now: float
    ) -> tuple[tuple[Undo, ...], tuple[Decimal, ...]] | StateBreach:
        plans: dict[CounterKey, tuple[_Table, Decimal, Decimal, Decimal]] = {}
        observed = []
        for position, check in enumerate(checks):
            key = check.key
            plan = plans.get(key)
            if plan is None:
                table = self.table(key, check.window)
                total = table.total(key.subject, now)
                amount = _checked(check.amount)
                plan = plans[key] = (table, amount, total, _add(total, amount))
            total, projected = plan[2], plan[3]
            if not OPERATORS[check.op](projected, check.limit):
                return StateBreach(position, total, projected)
            observed.append(total)
        undo = tuple(
            (key, table.put(key.subject, amount, projected, now), amount)
            for key, (table, amount, _, projected) in plans.items()
        )
        return undo, tuple(observed)

    def commit(self, reservation: Reservation) -> bool:
        """Drop a pending reservation: its amounts stay counted. ``False`` if it was gone."""
        return self.holds.pop(reservation.id, None) is not None

    def release(self, reservation: Reservation, now: float) -> bool:
        """Drop a pending reservation and undo its amounts; ``True`` if they were undone.

        ``False`` if it was gone or its lease has expired at ``now``: an expired reservation
        is dropped all the same and stays counted, whether or not anything dropped it before.
        """
        hold = self.holds.pop(reservation.id, None)
        if hold is None or hold[0] <= now:
            return False
        for key, where, amount in hold[3]:
            table = self.existing(key)
            if table is not None:
                with contextlib.suppress(ArithmeticError):  # cannot undo exactly: stays counted
                    table.take(key.subject, amount, where)
        return True

    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        totals = []
        for check in checks:
            key = check.key
            table = self.existing(key)
            totals.append(_ZERO if table is None else table.total(key.subject, now))
        return tuple(totals)

    def adjust(self, key: CounterKey, delta: Decimal, now: float, window: Window | None) -> Decimal:
        """Add ``delta`` to a total; a refund stops at the amounts still pending on it.

        A refund first drops the expired pending records (their release can undo nothing
        any more), then finds ``key``'s amounts in the live ones: the operator's path, where
        going through every pending reservation is affordable.
        """
        table = self.table(key, window)
        delta = _checked(delta, refund=True)
        held: list[Pending] = []
        if delta < 0:
            self._expire(now)
            held = [
                (where, amount)
                for hold in self.holds.values()
                for counter, where, amount in hold[3]
                if counter == key
            ]
        try:
            return table.adjust(key.subject, delta, now, held)
        except ArithmeticError as exc:
            raise StateStoreError(f"cannot keep an exact total: {exc!r}") from exc

    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        return [
            (CounterKey(tkey[0], tkey[1], subject, tkey[2]), total)
            for tkey, table in self.tables.items()
            for subject, total in table.live(now)
        ]

    def pending(self, now: float) -> list[PendingReservation]:
        self._expire(now)
        return [
            PendingReservation(rid, created, expires, tuple((k, a) for k, _, a in undo), owner)
            for rid, (expires, created, owner, undo) in self.holds.items()
        ]

    def reset(self, dimension: str | None) -> None:
        """Forget the totals of ``dimension`` (all when ``None``) and its pending amounts."""
        if dimension is None:
            self.tables.clear()
            self.holds.clear()
            return
        for tkey in [tkey for tkey in self.tables if tkey[0] == dimension]:
            del self.tables[tkey]
        for rid, (expires, created, owner, undo) in list(self.holds.items()):
            kept = tuple(entry for entry in undo if entry[0].dimension != dimension)
            if not kept:
                del self.holds[rid]
            elif len(kept) < len(undo):
                self.holds[rid] = (expires, created, owner, kept)

    def _expire(self, now: float) -> None:
        """Drop every expired pending record: their amounts stay counted."""
        for rid in [rid for rid, hold in self.holds.items() if hold[0] <= now]:
            del self.holds[rid]

    def _expire_head(self, now: float) -> None:
        """Drop expired pending records from the oldest on: their amounts stay counted."""
        holds = self.holds
        while holds:
            rid, hold = next(iter(holds.items()))
            if hold[0] > now:
                return
            del holds[rid]


# --- the stores ------------------------------------------------------------------------------


class InMemoryStateStore(StateStore):
    """Totals in this process's memory: the fastest store, and gone when the process ends."""

    def __init__(self, *, lease_seconds: float = 300.0) -> None:
        self.lease_seconds = _lease(lease_seconds)
        self._ledger = Ledger()
        self._holds = self._ledger.holds
        lock = threading.Lock()
        self._enter, self._leave = lock.acquire, lock.release
        # Counting from a random 62-bit start: another store's reservation ids are not ours.
        self._ids = map(str, itertools.count(secrets.randbits(62)))
        self._owner = _owner()

    # ``acquire``/``try``/``finally`` rather than ``with``: half the cost on this hot path.

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        self._enter()
        try:
            rid = next(self._ids)
            return self._ledger.reserve(checks, now, rid, self._owner, self.lease_seconds)
        finally:
            self._leave()

    def commit(self, reservation: Reservation) -> None:
        self._enter()
        try:
            self._holds.pop(reservation.id, None)  # Ledger.commit, inline: the hot path
        finally:
            self._leave()

    def release(self, reservation: Reservation, now: float) -> None:
        self._locked(lambda: self._ledger.release(reservation, now))

    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        return self._locked(lambda: self._ledger.peek(checks, now))

    def adjust(
        self, key: CounterKey, delta: Decimal, now: float, window: Window | None = None
    ) -> Decimal:
        return self._locked(lambda: self._ledger.adjust(key, delta, now, window))

    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        return self._locked(lambda: self._ledger.totals(now))

    def pending(self, now: float) -> list[PendingReservation]:
        return self._locked(lambda: self._ledger.pending(now))

    def reset(self, dimension: str | None = None) -> None:
        self._locked(lambda: self._ledger.reset(dimension))

    def _locked(self, operation: Callable[[], _T]) -> _T:
        self._enter()
        try:
            return operation()
        finally:
            self._leave()


class LockFile:
    """The lock file beside a file store's data: ``flock`` on it serialises every process.

    It is opened once per process: a child after a ``fork`` opens its own (the inherited
    descriptor shares the parent's lock), and the inherited one is closed. ``error`` is the
    exception class its failures raise. Callers hold their own thread lock around it.
    """

    def __init__(self, path: str, error: type[StateStoreError]) -> None:
        self.path = path
        self.error = error
        self._fd: int | None = None
        self._pid = 0  # the process that opened it

    @contextlib.contextmanager
    def held(self, *, exclusive: bool = True) -> Iterator[bool]:
        """Hold the lock (shared when not ``exclusive``); yields whether it was just opened."""
        fd, opened = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:
            raise self.error(f"cannot lock {self.path}: {exc}") from exc
        try:
            yield opened
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> tuple[int, bool]:
        pid = os.getpid()
        if self._fd is not None and self._pid == pid:
            return self._fd, False
        if self._fd is not None:  # inherited from the parent: its own lock, not ours
            inherited, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(inherited)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise self.error(f"cannot open {self.path}: {exc}") from exc
        self._pid = pid
        return self._fd, True

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._pid == os.getpid():  # a fork's copy is the parent's
            os.close(fd)

    def __del__(self) -> None:  # a store dropped without close() must not leak a descriptor
        self.close()


class LocalFileStateStore(StateStore):
    """Totals in one JSON file, safe across threads and processes of one host.

    The file keeps the seed's ``{dimension: {agent_id: total}}`` layout; the pending
    reservations live in a sidecar beside it. See the module docstring for the rest of the
    format, the locking, the order of the writes and the fsync policy. A missing file is an
    empty state; its folder and the lock file beside it are made on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = ".limenex/state.json",
        *,
        lease_seconds: float = 300.0,
    ) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            raise StateStoreError("LocalFileStateStore needs POSIX file locks (fcntl.flock)")
        # Absolute once: a later chdir must not point the store at another folder's file.
        self.path = os.path.abspath(os.fspath(path))
        self.lease_seconds = _lease(lease_seconds)
        self._totals = _File(self.path)
        self._sidecar = _File(self.path + SIDECAR)
        self._lock = threading.Lock()
        self._lock_file = LockFile(self.path + ".lock", StateStoreError)
        self._owner = ""
        self._ledger = Ledger(track=True)
        self._encoder = _Encoder()

    # Each operation names the files it may have changed, in the order to write them: a
    # record is written after the amounts it holds are counted, and removed before they are
    # taken off (see "Crashes and durability" in the module docstring).

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        def operation(ledger: Ledger) -> tuple[Reservation | StateBreach, tuple[_File, ...]]:
            rid = uuid.uuid4().hex
            outcome = ledger.reserve(checks, now, rid, self._owner, self.lease_seconds)
            if type(outcome) is Reservation:
                return outcome, (self._totals, self._sidecar)
            return outcome, (self._sidecar,)  # it may have dropped expired records

        return self._run(operation)

    def commit(self, reservation: Reservation) -> None:
        self._run(lambda ledger: (ledger.commit(reservation), (self._sidecar,)))

    def release(self, reservation: Reservation, now: float) -> None:
        def operation(ledger: Ledger) -> tuple[None, tuple[_File, ...]]:
            undone = ledger.release(reservation, now)  # an expired record is dropped too
            return None, (self._sidecar, self._totals) if undone else (self._sidecar,)

        self._run(operation)

    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        return self._run(lambda ledger: (ledger.peek(checks, now), ()), exclusive=False)

    def adjust(
        self, key: CounterKey, delta: Decimal, now: float, window: Window | None = None
    ) -> Decimal:
        both = (self._sidecar, self._totals)
        return self._run(lambda ledger: (ledger.adjust(key, delta, now, window), both))

    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        return self._run(lambda ledger: (ledger.totals(now), ()), exclusive=False)

    def pending(self, now: float) -> list[PendingReservation]:
        return self._run(lambda ledger: (ledger.pending(now), ()), exclusive=False)

    def reset(self, dimension: str | None = None) -> None:
        def operation(ledger: Ledger) -> tuple[None, tuple[_File, ...]]:
            ledger.reset(dimension)
            return None, (self._sidecar, self._totals)

        self._run(operation)

    def close(self) -> None:
        with self._lock:
            self._lock_file.close()

    async def areserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        outcome: Reservation | StateBreach = await run_blocking(self.reserve, checks, now)
        return outcome

    async def acommit(self, reservation: Reservation) -> None:
        await run_blocking(self.commit, reservation)

    async def arelease(self, reservation: Reservation, now: float) -> None:
        await run_blocking(self.release, reservation, now)

    async def apeek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        totals: tuple[Decimal, ...] = await run_blocking(self.peek, checks, now)
        return totals

    # --- one locked read-modify-write ----------------------------------------------------

    def _run(
        self,
        operation: Callable[[Ledger], tuple[_T, tuple[_File, ...]]],
        *,
        exclusive: bool = True,
    ) -> _T:
        """Run ``operation`` on the files' current state; write back the files it changed."""
        with self._lock, self._lock_file.held(exclusive=exclusive) as opened:
            if opened:  # first use in this process: reservations it makes are its own
                self._owner = _owner()
            try:
                ledger = self._load()
                result, changed = operation(ledger)
                if changed:
                    self._save(ledger, changed)
                return result
            except BaseException:
                # The ledger may be ahead of the files: re-read both.
                self._totals.synced = self._sidecar.synced = False
                raise

    def _save(self, ledger: Ledger, files: tuple[_File, ...]) -> None:
        """Write ``files`` in this order, each one only if its content changed.

        A rename of ``state.json`` is made durable by an fsync of the folder before the next
        file's rename (once that file's data is synced, which on a journaling filesystem has
        done most of the folder's work already), or at the end.
        """
        unsynced = False  # state.json was renamed, and the folder not fsynced since
        for file in files:
            totals = file is self._totals
            data = self._encoder.totals(ledger) if totals else self._encoder.pending(ledger.holds)
            if data != file.seen:
                file.stage(data, sync_folder=unsynced)
                file.install(data)
                unsynced = totals
        if unsynced:
            self._totals.stage(None, sync_folder=True)  # nothing to write: the folder only

    def _load(self) -> Ledger:
        """The ledger, after re-parsing each file whose bytes changed since last time."""
        ledger = self._ledger
        tables = self._totals.load(_decode_totals)
        if tables is not None:
            ledger.tables = tables
            ledger.touched = set()
            self._encoder = _Encoder()
        holds = self._sidecar.load(_decode_pending)
        if holds is not None:
            ledger.holds = holds
        return ledger


class _File:
    """One of the file store's files, with the bytes of it that the ledger matches."""

    __slots__ = ("folder", "path", "refused", "seen", "synced", "temp")

    def __init__(self, path: str) -> None:
        self.path, self.temp, self.folder = path, path + ".tmp", os.path.dirname(path)
        self.seen: bytes | None = None  # ``None``: there is no such file
        self.synced = False  # whether the ledger matches ``seen``
        self.refused: tuple[bytes | None, str] | None = None  # the last corrupt bytes

    def load(self, decode: Callable[[bytes | None], _T]) -> _T | None:
        """The file decoded, or ``None`` when its bytes are those the ledger matches."""
        try:
            with open(self.path, "rb") as file:
                data: bytes | None = file.read()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            raise StateStoreError(f"cannot read {self.path}: {exc}") from exc
        if self.synced and data == self.seen:
            return None
        if self.refused is not None and self.refused[0] == data:
            raise CorruptStateError(self.refused[1])
        try:
            value = decode(data)
        except _Corrupt as exc:
            message = f"{self.path}: {exc}. The file was left as found: fix or move it."
            self.refused = (data, message)
            raise CorruptStateError(message) from None
        self.seen, self.synced, self.refused = data, True, None
        return value

    def stage(self, data: bytes | None, *, sync_folder: bool = False) -> None:
        """Write ``data`` to the temporary file and sync it (nothing to write for ``None``).

        ``sync_folder``: then fsync the folder, making the renames made so far durable.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            if data is not None:
                try:
                    fd = os.open(self.temp, flags, 0o666)
                except FileExistsError:
                    os.unlink(self.temp)  # a crashed writer's leftover
                    fd = os.open(self.temp, flags, 0o666)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    # Always: a rename must never expose a file whose data is not on disk yet.
                    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
                finally:
                    os.close(fd)
            if sync_folder:
                folder = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
        except OSError as exc:
            self._failed(exc)

    def install(self, data: bytes | None) -> None:
        """Rename the staged temporary file over the file (remove the file for ``None``)."""
        try:
            if data is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                os.replace(self.temp, self.path)
        except OSError as exc:
            self._failed(exc)
        self.seen = data

    def _failed(self, exc: OSError) -> NoReturn:
        with contextlib.suppress(OSError):
            os.unlink(self.temp)
        raise StateStoreError(f"cannot write {self.path}: {exc}") from exc


# --- the file's JSON ------------------------------------------------------------------------


class _Body:
    """One table's encoded members (``"agent-1": 30.0``) in chunks of a few hundred.

    A change re-joins one chunk, never the whole table: at 10,000 agents that is the
    difference between a few microseconds and a hundred.
    """

    SIZE = 256

    def __init__(self, table: _Table) -> None:
        self.table = table
        self.chunks: list[dict[str, bytes]] = []
        self.joined: list[bytes | None] = []
        self.index: dict[str, int] = {}
        for subject in table.subjects():
            self.update(subject)

    def update(self, subject: str) -> None:
        """Re-encode ``subject`` from the table (dropping it if the table no longer has it)."""
        value = self.table.dump(subject)
        n = self.index.get(subject)
        if n is None:
            if value is None:
                return
            if not self.chunks or len(self.chunks[-1]) >= self.SIZE:
                self.chunks.append({})
                self.joined.append(None)
            n = self.index[subject] = len(self.chunks) - 1
        if value is None:
            del self.chunks[n][subject], self.index[subject]
        else:
            self.chunks[n][subject] = _json(subject) + b": " + value
        self.joined[n] = None

    def pieces(self) -> list[bytes]:
        """The members as byte strings to concatenate (commas included); empty if none."""
        pieces: list[bytes] = []
        for n, chunk in enumerate(self.chunks):
            joined = self.joined[n]
            if joined is None:
                joined = self.joined[n] = b", ".join(chunk.values())
            if joined:
                pieces += (b", ", joined) if pieces else (joined,)
        return pieces


class _Encoder:
    """Builds the files' bytes from a ledger, re-encoding only what changed since last time.

    A cache entry remembers the table or pending record it was made from, so a table made
    anew (after a reset or a re-read) is encoded afresh. ``state.json`` is assembled with a
    single ``b"".join``: one copy of its bytes per write.
    """

    def __init__(self) -> None:
        self._bodies: dict[TableKey, _Body] = {}
        self._holds: dict[str, tuple[Hold, bytes]] = {}

    def totals(self, ledger: Ledger) -> bytes:
        """``state.json``."""
        if ledger.touched:
            for tkey, subject in ledger.touched:
                body = self._bodies.get(tkey)
                if body is not None and body.table is ledger.tables.get(tkey):
                    body.update(subject)
            ledger.touched.clear()
        out: list[bytes] = []
        tables: list[bytes] = []
        for tkey, table in ledger.tables.items():
            body = self._bodies.get(tkey)
            if body is None or body.table is not table:
                body = self._bodies[tkey] = _Body(table)
            pieces = body.pieces()
            dimension, scope, window = tkey
            if not pieces:
                continue
            if (scope, window) == ("agent", ""):
                _member(out, b"%s: {" % _json(dimension), *pieces, b"}")
            else:
                head = b'{"dimension": %s, "scope": %s, "window": %s, "subjects": {'
                tables += (b", " if tables else b"", head % tuple(map(_json, tkey)), *pieces)
                tables.append(b"}}")
        if tables:
            meta = b'"%s": {"version": 1, "tables": [' % RESERVED.encode()
            _member(out, meta, *tables, b"]}")
        out.append(b"}\n" if out else b"{}\n")
        return b"".join(out)

    def pending(self, holds: dict[str, Hold]) -> bytes | None:
        """The sidecar, ``None`` (no file) when nothing is pending."""
        cache, self._holds = self._holds, {}
        for rid, hold in holds.items():
            cached = cache.get(rid)
            if cached is None or cached[0] is not hold:
                cached = (hold, _encode_hold(rid, hold))
            self._holds[rid] = cached
        if not holds:
            return None
        records = b", ".join(encoded for _, encoded in self._holds.values())
        return b'{"version": 1, "pending": {%s}}\n' % records


def _member(out: list[bytes], *pieces: bytes) -> None:
    """Append one member of the top-level object to ``out``."""
    out.append(b", " if out else b"{")
    out += pieces


def _encode_hold(rid: str, hold: Hold) -> bytes:
    expires, created, owner, undo = hold
    amounts = ", ".join(
        f"[{encode_basestring_ascii(key[0])}, {encode_basestring_ascii(key[1])}, "
        f"{encode_basestring_ascii(key[2])}, {encode_basestring_ascii(key[3])}, {amount}, "
        f"{_encode_where(where)}]"
        for key, where, amount in undo
    )
    return (
        f'{encode_basestring_ascii(rid)}: {{"created_at": {created!r}, '
        f'"expires_at": {expires!r}, "owner": {encode_basestring_ascii(owner)}, '
        f'"amounts": [{amounts}]}}'
    ).encode()


def _encode_where(where: Where) -> str:
    if where is None:
        return "null"
    if isinstance(where, str):
        return encode_basestring_ascii(where)
    return repr(where)


class _Corrupt(Exception):
    """What is wrong with a state file (raised as a CorruptStateError naming the file)."""


def _parse(data: bytes) -> Any:
    try:
        return loads(
            data,
            parse_float=Decimal,
            parse_int=Decimal,
            parse_constant=_no_constant,
            object_pairs_hook=_unique,
        )
    except (ValueError, RecursionError) as exc:
        raise _Corrupt(f"not valid JSON ({exc})") from None


def _decode_totals(data: bytes | None) -> dict[TableKey, _Table]:
    """Parse and check ``state.json``; raise :class:`_Corrupt` saying what is wrong."""
    document = {} if data is None else _parse(data)
    if type(document) is not dict:
        raise _Corrupt(f"expected an object of dimensions, found {_show(document)}")
    tables: dict[TableKey, _Table] = {}
    for dimension, subjects in document.items():
        if dimension != RESERVED:
            where = repr(dimension)
            tables[(dimension, "agent", "")] = _Totals.load(_object(subjects, where), where)
    if RESERVED in document:
        _decode_meta(document[RESERVED], tables)
    return tables


def _decode_meta(value: Any, tables: dict[TableKey, _Table]) -> None:
    if type(value) is dict and "pending" in value:
        raise _Corrupt(
            f"{RESERVED}.pending holds pending reservations as an earlier Limenex kept them"
            f" (now in the {SIDECAR!r} file beside it); once no process of that version uses"
            " the file, remove the key: its amounts stay counted"
        )
    meta = _object(value, RESERVED, {"version", "tables"})
    _version(meta, RESERVED)
    for n, spec in enumerate(_array(meta.get("tables", []), f"{RESERVED}.tables")):
        where = f"{RESERVED}.tables[{n}]"
        fields = _object(spec, where, {"dimension", "scope", "window", "subjects"})
        tkey = (
            _text(fields.get("dimension"), f"{where}.dimension"),
            _text(fields.get("scope"), f"{where}.scope"),
            _text(fields.get("window"), f"{where}.window"),
        )
        if tkey in tables or tkey[0] == RESERVED or tkey[1:] == ("agent", ""):
            raise _Corrupt(f"{where}: table {tkey} is repeated or misplaced")
        window = _window(tkey[2], f"{where}.window")
        subjects = _object(fields.get("subjects"), f"{where}.subjects")
        table: _Table
        if window is None:
            table = _Totals.load(subjects, where)
        elif window.calendar:
            table = _Calendar.load(window, subjects, where)
        else:
            table = _Rolling.load(window, subjects, where)
        tables[tkey] = table


def _decode_pending(data: bytes | None) -> dict[str, Hold]:
    """Parse and check the sidecar; raise :class:`_Corrupt` saying what is wrong."""
    if data is None:
        return {}
    document = _object(_parse(data), "the file", {"version", "pending"})
    _version(document, "the file")
    holds: dict[str, Hold] = {}
    for rid, record in _object(document.get("pending"), "pending").items():
        where = f"pending[{rid!r}]"
        fields = _object(record, where, {"created_at", "expires_at", "owner", "amounts"})
        amounts = _array(fields.get("amounts"), f"{where}.amounts")
        holds[rid] = (
            _time(fields.get("expires_at"), f"{where}.expires_at"),
            _time(fields.get("created_at"), f"{where}.created_at"),
            _text(fields.get("owner"), f"{where}.owner"),
            tuple(_decode_undo(entry, f"{where}.amounts[{n}]") for n, entry in enumerate(amounts)),
        )
    return holds


def _version(fields: dict[str, Any], where: str) -> None:
    version = fields.get("version")
    if type(version) is not Decimal or version != 1:
        raise _Corrupt(f"{where}: unsupported version {_show(version)} (a newer Limenex?)")


def _decode_undo(value: Any, where: str) -> Undo:
    dimension, scope, subject, window_text, amount, put = _array(value, where, 6)
    key = CounterKey(
        _text(dimension, f"{where}[0]"),
        _text(scope, f"{where}[1]"),
        _text(subject, f"{where}[2]"),
        _text(window_text, f"{where}[3]"),
    )
    window = _window(key.window, f"{where}[3]")
    at: Where
    if window is None:
        if put is not None:
            raise _Corrupt(f"{where}[5] must be null for a total without a window")
        at = None
    elif window.calendar:
        at = _text(put, f"{where}[5]")
    else:
        at = _time(put, f"{where}[5]")
    return key, at, _amount(amount, f"{where}[4]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Corrupt(f"key {key!r} appears twice in one object")
            seen.add(key)
    return mapping


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value) if isinstance(value, str) else str(value).lower()
    return text if len(text) <= 40 else text[:37] + "..."


def _object(value: Any, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if type(value) is not dict:
        raise _Corrupt(f"{where} must be an object, found {_show(value)}")
    if allowed is not None and not value.keys() <= allowed:
        unknown = ", ".join(sorted(value.keys() - allowed))
        raise _Corrupt(f"{where} has unknown keys: {unknown}")
    return value


def _array(value: Any, where: str, length: int | None = None) -> list[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        shape = "a list" if length is None else f"a list of {length}"
        raise _Corrupt(f"{where} must be {shape}, found {_show(value)}")
    return value


def _text(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _Corrupt(f"{where} must be a string, found {_show(value)}")
    return value


def _amount(value: Any, where: str) -> Decimal:
    if type(value) is not Decimal or value < 0:
        raise _Corrupt(f"{where} must be a non-negative number, found {_show(value)}")
    return value


def _time(value: Any, where: str) -> float:
    seconds = float(value) if type(value) is Decimal else math.nan
    if not math.isfinite(seconds):
        raise _Corrupt(f"{where} must be a time in seconds, found {_show(value)}")
    return seconds


def _window(text: str, where: str) -> Window | None:
    try:
        return Window.parse(text) if text else None
    except ValueError as exc:
        raise _Corrupt(f"{where}: {exc}") from None


from limenex.core.sqlite import SQLiteStateStore  # noqa: E402 - last: it imports from here
