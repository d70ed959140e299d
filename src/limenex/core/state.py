"""The state-store contract every backend implements.

The engine turns the stateful policies of one call into an ordered list of :class:`Check`
objects. :meth:`StateStore.reserve` then does, as **one atomic step** for all of them:

1. read each counter's current total (rolling windows: the amounts recorded in
   ``(now - seconds, now]``; calendar windows: the period containing ``now``);
2. for each check in order, test ``total + amount <op> limit`` (a counter's amount is
   added once per distinct :class:`CounterKey`, however many checks name it);
3. if a check fails, change nothing and return a :class:`StateBreach` for the first one;
4. else add every amount and return a :class:`Reservation`.

A reservation counts as spent from the moment it is made. :meth:`StateStore.commit`
makes that final; :meth:`StateStore.release` undoes exactly that one reservation (the
executor failed). A reservation whose owner vanished stays counted: once its lease has
expired it is simply dropped from the pending list, and a release at or after its expiry
is ignored. ``adjust`` never takes a total below the amounts still pending on it, so a
later release cannot undo someone else's spend.

Totals are exact decimals. Arithmetic goes through :data:`EXACT`, whose traps turn any
rounding into an error (and so into a BLOCK) instead of a silently wrong total.
"""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from decimal import (
    Clamped,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    Subnormal,
    Underflow,
)
from typing import Any, NamedTuple

from limenex.core.errors import StateStoreError
from limenex.core.window import Window

__all__ = [
    "EXACT",
    "OPERATORS",
    "RESERVED_DIMENSION",
    "Check",
    "CommitQueue",
    "CounterKey",
    "PendingReservation",
    "Reservation",
    "StateBreach",
    "StateStore",
]

EXACT = Context(
    prec=96,
    traps=[
        Clamped,
        DivisionByZero,
        Inexact,
        InvalidOperation,
        Overflow,
        Rounded,
        Subnormal,
        Underflow,
    ],
)
"""Decimal context for totals: 96 digits, and any rounding raises instead of losing money."""

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
    "eq": operator.eq,
    "neq": operator.ne,
}


class CounterKey(NamedTuple):
    """Identifies one running total.

    ``scope`` is ``"agent"``, ``"global"`` or the sorted scope names joined by ``"+"``
    (``"agent+recipient"``). ``subject`` is the agent id for ``"agent"``, ``""`` for
    ``"global"``, and a JSON array of the scope values otherwise. ``window`` is ``""`` or
    the window's spec (``"24h"``, ``"day"``); a calendar window's period is not part of the
    key: the store derives it from ``now``.
    """

    dimension: str
    scope: str
    subject: str
    window: str


RESERVED_DIMENSION = "__limenex__"
"""No counter may use this dimension name (the file store keeps its own tables under it)."""


def counter_window(
    key: CounterKey,
    window: Window | None,
    parse: Callable[[str], Window | None] = Window.parse,
) -> Window | None:
    """``key``'s window, checked as every store checks it; ``StateStoreError`` if it is wrong.

    The dimension must not be :data:`RESERVED_DIMENSION`; ``window`` (or, when ``None``, the
    window parsed from ``key.window`` with ``parse``, which a store may cache) must be the
    one ``key.window`` names.
    """
    if key.dimension == RESERVED_DIMENSION:
        raise StateStoreError(f"{RESERVED_DIMENSION!r} is reserved and cannot name a dimension")
    if window is None:
        if not key.window:
            return None
        try:
            window = parse(key.window)
        except ValueError as exc:
            raise StateStoreError(f"counter {key}: {exc}") from exc
    if window is None or window.spec != key.window:
        raise StateStoreError(f"counter {key} does not match its window {window}")
    return window


class Check(NamedTuple):
    """One stateful condition of one call: ``total + amount <op> limit`` must hold."""

    policy_index: int  # the policy's position in the skill's list (for reporting)
    key: CounterKey
    window: Window | None
    amount: Decimal
    op: str
    limit: Decimal


class StateBreach:
    """``reserve`` refused: ``checks[position]`` would not hold. Nothing was changed."""

    __slots__ = ("observed", "position", "projected")

    def __init__(self, position: int, observed: Decimal, projected: Decimal) -> None:
        self.position = position
        self.observed = observed
        self.projected = projected

    def __repr__(self) -> str:
        return (
            f"StateBreach(position={self.position}, observed={self.observed}, "
            f"projected={self.projected})"
        )


class Reservation:
    """``reserve`` succeeded. ``observed`` holds each check's total before this call.

    ``token`` is private to the store that made it.
    """

    __slots__ = ("id", "observed", "token")

    def __init__(self, id: str, observed: tuple[Decimal, ...], token: Any) -> None:
        self.id = id
        self.observed = observed
        self.token = token

    def __repr__(self) -> str:
        return f"Reservation(id={self.id!r}, observed={self.observed!r})"


class PendingReservation(NamedTuple):
    """A reservation that was made and neither committed nor released yet."""

    id: str
    created_at: float
    expires_at: float
    amounts: tuple[tuple[CounterKey, Decimal], ...]
    owner: str


class StateStore(ABC):
    """The contract. Backends implement the sync methods; async ones default to them.

    A backend whose sync methods block on I/O for long overrides the async ones.
    Every method raises :class:`~limenex.core.errors.StateStoreError` (or its subclass
    ``CorruptStateError``) on failure, never a raw driver exception.
    """

    #: The default lease of a reservation, in seconds.
    lease_seconds: float = 300.0

    @abstractmethod
    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        """Atomically test every check and, if all hold, add every amount."""

    @abstractmethod
    def commit(self, reservation: Reservation) -> None:
        """The action ran: make the reservation final."""

    @abstractmethod
    def release(self, reservation: Reservation, now: float) -> None:
        """The action failed: undo exactly this reservation.

        Ignored when the reservation is no longer pending (settled, reset) or when its lease
        has expired at ``now``: an expired reservation stays counted, whatever else happened
        in between.
        """

    @abstractmethod
    def peek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        """Each check's current total, changing nothing (the dry run)."""

    @abstractmethod
    def adjust(
        self, key: CounterKey, delta: Decimal, now: float, window: Window | None = None
    ) -> Decimal:
        """Add ``delta`` (negative for a refund) to a total; return the new total.

        Totals never go below zero. This is the audited operator path, never an agent's.
        """

    @abstractmethod
    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        """Every live total (expired windows left out), for inspection."""

    @abstractmethod
    def pending(self, now: float) -> list[PendingReservation]:
        """Reservations not yet committed or released whose lease has not expired."""

    @abstractmethod
    def reset(self, dimension: str | None = None) -> None:
        """Forget every total (of one dimension, when given) and pending reservation."""

    def close(self) -> None:  # noqa: B027 - stores without resources need nothing here
        """Release connections and file handles."""

    async def aclose(self) -> None:
        """:meth:`close` from async code: stores with async connections close them here."""
        self.close()

    async def areserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        return self.reserve(checks, now)

    async def acommit(self, reservation: Reservation) -> None:
        self.commit(reservation)

    async def arelease(self, reservation: Reservation, now: float) -> None:
        self.release(reservation, now)

    async def apeek(self, checks: Sequence[Check], now: float) -> tuple[Decimal, ...]:
        return self.peek(checks, now)


class CommitQueue:
    """Commits waiting to ride on a networked store's next round trip.

    A reservation counts as spent from the moment it is made, so a commit changes no total:
    it only ends the pending record. Redis, PostgreSQL and SQLite stores therefore queue it
    here and send it along with their next operation, which keeps a successful governed call
    to one round trip. :meth:`add` says when the queue should be sent on its own instead: it
    holds ``max_size`` ids, or its oldest has waited ``max_age`` seconds. ``close`` sends the
    rest. A queued commit that is never sent (the process died) leaves its record to expire
    with its lease, its amounts counted: the same totals a commit gives.

    Thread-safe: ``add`` and ``take`` are each one step under the GIL plus a lock.
    """

    __slots__ = ("_first", "_ids", "_lock", "max_age", "max_size")

    def __init__(self, *, max_age: float = 1.0, max_size: int = 512) -> None:
        self.max_age = max_age
        self.max_size = max_size
        self._ids: list[str] = []
        self._first = 0.0
        self._lock = threading.Lock()

    def add(self, reservation_id: str) -> bool:
        """Queue one commit; ``True`` when the caller should send the queue now."""
        with self._lock:
            ids = self._ids
            if not ids:
                self._first = time.monotonic()
            ids.append(reservation_id)
            return len(ids) >= self.max_size or time.monotonic() - self._first >= self.max_age

    def take(self) -> list[str]:
        """Every queued id, emptying the queue (send them, or ``put_back`` on failure)."""
        if not self._ids:  # the common case on a hot path: nothing to take, no lock
            return []
        with self._lock:
            ids, self._ids = self._ids, []
            return ids

    def put_back(self, ids: Sequence[str]) -> None:
        """Queue again ids whose round trip failed: their records are still pending."""
        if ids:
            with self._lock:
                self._ids[:0] = ids
                self._first = time.monotonic() if len(self._ids) == len(ids) else self._first

    def __len__(self) -> int:
        return len(self._ids)


async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking store operation off the event loop."""
    return await asyncio.to_thread(fn, *args)
