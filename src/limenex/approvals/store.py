"""The approval store contract and its in-memory reference implementation.

Every backend applies the same transitions (:func:`decide` and :func:`use`) to the stored
request inside one atomic step of its own: a lock for :class:`InMemoryApprovalStore`, one
``BEGIN IMMEDIATE`` transaction for :class:`~limenex.approvals.sqlite.SQLiteApprovalStore`.
So a request is approved or denied at most once, and consumed at most once, whatever the
number of threads or processes racing for it.

Times are always passed in (``now``, epoch seconds), as everywhere in Limenex: a store never
reads the clock, so expiry is exact and testable. A request expires *at* ``expires_at``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hmac
import threading
from collections.abc import Callable

from limenex.approvals.request import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreError,
    refused,
)

Step = Callable[[ApprovalRequest | None], ApprovalRequest]
"""A transition: the request as kept (``None`` if unknown) -> the request to keep."""

__all__ = ["ApprovalStore", "BlockingApprovalStore", "InMemoryApprovalStore", "decide", "use"]


def decide(
    request: ApprovalRequest | None,
    request_id: str,
    status: ApprovalStatus,
    by: str,
    now: float,
    note: str,
) -> ApprovalRequest:
    """``request`` approved or denied (``status``) by ``by`` at ``now``; only from pending."""
    action = "approve" if status is ApprovalStatus.APPROVED else "deny"
    if not isinstance(by, str) or not by:
        raise ApprovalRefused(
            f"cannot {action} approval request {request_id!r}: the approver must be named",
            request_id=request_id,
            why="approver",
        )
    if request is None:
        raise refused(request_id, None, action)
    current = request.at(now).status
    if current is not ApprovalStatus.PENDING:
        raise refused(request_id, current, action)
    return dataclasses.replace(request, status=status, decided_by=by, decided_at=now, note=note)


def use(
    request: ApprovalRequest | None, request_id: str, fingerprint: str, now: float
) -> ApprovalRequest:
    """``request`` consumed at ``now``: only an approved, unexpired one with ``fingerprint``."""
    if request is None:
        raise refused(request_id, None, "use")
    current = request.at(now).status
    if current is not ApprovalStatus.APPROVED:
        raise refused(request_id, current, "use")
    if not isinstance(fingerprint, str) or not hmac.compare_digest(
        fingerprint.encode("utf-8", "replace"), request.fingerprint.encode("utf-8")
    ):
        raise ApprovalRefused(
            f"cannot use approval request {request_id!r}: the action presented is not the one"
            " that was approved (its fingerprint differs)",
            request_id=request_id,
            why="fingerprint",
        )
    return dataclasses.replace(request, status=ApprovalStatus.USED, used_at=now)


class ApprovalStore(abc.ABC):
    """Where approval requests are kept. Every method is one atomic step.

    Reads (:meth:`get`, :meth:`pending`) return requests as they read at ``now``: a pending or
    approved request whose ``expires_at`` is at or before ``now`` is ``expired``. Refusals
    raise :class:`~limenex.approvals.request.ApprovalRefused`; a backend failure raises
    :class:`~limenex.approvals.request.ApprovalStoreError` (a ``StateStoreError``), never a
    driver's own exception. The ``a``-prefixed coroutines default to the sync methods.
    """

    @abc.abstractmethod
    def create(self, request: ApprovalRequest) -> None:
        """Keep a new request. An id already kept raises ``ApprovalStoreError``."""

    @abc.abstractmethod
    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        """The request as it reads at ``now``, or ``None`` if there is no such request."""

    @abc.abstractmethod
    def pending(self, now: float) -> list[ApprovalRequest]:
        """The requests still waiting for a human at ``now``, oldest first."""

    def approve(self, request_id: str, by: str, now: float, note: str = "") -> ApprovalRequest:
        """Approve a pending request; the approved request. Any other status is refused."""
        return self.transition(
            lambda r: decide(r, request_id, ApprovalStatus.APPROVED, by, now, note), request_id
        )

    def deny(self, request_id: str, by: str, now: float, note: str = "") -> ApprovalRequest:
        """Deny a pending request; the denied request. Any other status is refused."""
        return self.transition(
            lambda r: decide(r, request_id, ApprovalStatus.DENIED, by, now, note), request_id
        )

    def consume(self, request_id: str, fingerprint: str, now: float) -> ApprovalRequest:
        """Turn one approved, unexpired request with ``fingerprint`` into used; return it.

        Exactly once: of any number of concurrent calls, one returns and the others are
        refused (``why == "used"``).
        """
        return self.transition(lambda r: use(r, request_id, fingerprint, now), request_id)

    @abc.abstractmethod
    def transition(self, step: Step, request_id: str) -> ApprovalRequest:
        """One atomic step: read the request (``None`` if unknown), apply ``step``, keep and
        return its result. ``step`` raises to refuse, and then nothing is written.

        What a backend implements for :meth:`approve`, :meth:`deny` and :meth:`consume`:
        atomic across threads and processes (a lock, a transaction, a WATCH).
        """

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the store's resources; it may be used again afterwards (reopened)."""

    async def acreate(self, request: ApprovalRequest) -> None:
        """:meth:`create`, awaitable."""
        self.create(request)

    async def aget(self, request_id: str, now: float) -> ApprovalRequest | None:
        """:meth:`get`, awaitable."""
        return self.get(request_id, now)

    async def apending(self, now: float) -> list[ApprovalRequest]:
        """:meth:`pending`, awaitable."""
        return self.pending(now)

    async def aapprove(
        self, request_id: str, by: str, now: float, note: str = ""
    ) -> ApprovalRequest:
        """:meth:`approve`, awaitable."""
        return self.approve(request_id, by, now, note)

    async def adeny(self, request_id: str, by: str, now: float, note: str = "") -> ApprovalRequest:
        """:meth:`deny`, awaitable."""
        return self.deny(request_id, by, now, note)

    async def aconsume(self, request_id: str, fingerprint: str, now: float) -> ApprovalRequest:
        """:meth:`consume`, awaitable."""
        return self.consume(request_id, fingerprint, now)

    async def aclose(self) -> None:
        """:meth:`close`, awaitable."""
        self.close()


class BlockingApprovalStore(ApprovalStore):
    """An approval store whose methods block on I/O: the coroutines run them on a thread.

    So an event loop never waits on a disk or a server; the sync methods stay the one
    implementation of each step.
    """

    async def acreate(self, request: ApprovalRequest) -> None:
        await asyncio.to_thread(self.create, request)

    async def aget(self, request_id: str, now: float) -> ApprovalRequest | None:
        return await asyncio.to_thread(self.get, request_id, now)

    async def apending(self, now: float) -> list[ApprovalRequest]:
        return await asyncio.to_thread(self.pending, now)

    async def aapprove(
        self, request_id: str, by: str, now: float, note: str = ""
    ) -> ApprovalRequest:
        return await asyncio.to_thread(self.approve, request_id, by, now, note)

    async def adeny(self, request_id: str, by: str, now: float, note: str = "") -> ApprovalRequest:
        return await asyncio.to_thread(self.deny, request_id, by, now, note)

    async def aconsume(self, request_id: str, fingerprint: str, now: float) -> ApprovalRequest:
        return await asyncio.to_thread(self.consume, request_id, fingerprint, now)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


class InMemoryApprovalStore(ApprovalStore):
    """Requests in a dict under a lock: the reference semantics, for one process.

    Requests are kept as their :meth:`~ApprovalRequest.to_dict` mappings and rebuilt on every
    read, so a caller can never change a kept request through an object it was handed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, object]] = {}

    def __repr__(self) -> str:
        return f"InMemoryApprovalStore({len(self._rows)} requests)"

    def _load(self, request_id: str) -> ApprovalRequest | None:
        row = self._rows.get(request_id) if isinstance(request_id, str) else None
        return None if row is None else ApprovalRequest.from_dict(row)

    def create(self, request: ApprovalRequest) -> None:
        row = request.to_dict()
        with self._lock:
            if request.id in self._rows:
                raise ApprovalStoreError(f"an approval request {request.id!r} already exists")
            self._rows[request.id] = row

    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        with self._lock:
            request = self._load(request_id)
        return None if request is None else request.at(now)

    def pending(self, now: float) -> list[ApprovalRequest]:
        with self._lock:
            requests = [ApprovalRequest.from_dict(row) for row in self._rows.values()]
        waiting = [r for r in requests if r.at(now).status is ApprovalStatus.PENDING]
        return sorted(waiting, key=lambda r: (r.created_at, r.id))

    def transition(self, step: Step, request_id: str) -> ApprovalRequest:
        with self._lock:
            done = step(self._load(request_id))
            self._rows[request_id] = done.to_dict()
            return done
