"""What humans do with approval requests: read them, approve or deny them, each one audited.

:class:`Approvals` is ``engine.approvals``; the CLI (``limenex approvals``) and the HTTP
inbox (``limenex serve``) use the same class over the same store, so an approval given in
any of them is one and the same record, and one audit record (``approved`` or ``denied``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from limenex.approvals.request import ApprovalRequest
from limenex.approvals.store import ApprovalStore

__all__ = ["Approvals", "RequestAudit"]


class RequestAudit(Protocol):
    """What records approval events: :class:`~limenex.audit.AuditLog` and its buffered twin."""

    def write_request(self, event: str, request: ApprovalRequest, **extra: Any) -> Any: ...


class Approvals:
    """Approval requests of one store, acted on by humans.

    ``clock`` returns epoch seconds (expiry is judged by it); ``audit`` receives an
    ``approved`` or ``denied`` record for every decision, after the store has kept it. A
    failing audit raises :class:`~limenex.audit.AuditError`: the decision stands (it was
    kept first) and the error says so. The coroutines are the engine's API; the ``*_sync``
    twins serve synchronous tools.
    """

    def __init__(
        self,
        store: ApprovalStore,
        *,
        audit: RequestAudit | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock

    def __repr__(self) -> str:
        return f"Approvals({self.store!r})"

    async def get(self, request_id: str) -> ApprovalRequest | None:
        """The request as it reads now (``expired`` once past its time), else ``None``."""
        return await self.store.aget(request_id, self.clock())

    async def pending(self) -> list[ApprovalRequest]:
        """The requests waiting for a human, oldest first."""
        return await self.store.apending(self.clock())

    async def approve(
        self, request_id: str, approver: str, note: str | None = None
    ) -> ApprovalRequest:
        """Approve a pending request as ``approver``; anything else raises ``ApprovalRefused``."""
        done = await self.store.aapprove(request_id, approver, self.clock(), note or "")
        self._record("approved", done)
        return done

    async def deny(
        self, request_id: str, approver: str, note: str | None = None
    ) -> ApprovalRequest:
        """Deny a pending request as ``approver``; anything else raises ``ApprovalRefused``."""
        done = await self.store.adeny(request_id, approver, self.clock(), note or "")
        self._record("denied", done)
        return done

    def get_sync(self, request_id: str) -> ApprovalRequest | None:
        """:meth:`get` for synchronous code."""
        return self.store.get(request_id, self.clock())

    def pending_sync(self) -> list[ApprovalRequest]:
        """:meth:`pending` for synchronous code."""
        return self.store.pending(self.clock())

    def approve_sync(
        self, request_id: str, approver: str, note: str | None = None
    ) -> ApprovalRequest:
        """:meth:`approve` for synchronous code."""
        done = self.store.approve(request_id, approver, self.clock(), note or "")
        self._record("approved", done)
        return done

    def deny_sync(self, request_id: str, approver: str, note: str | None = None) -> ApprovalRequest:
        """:meth:`deny` for synchronous code."""
        done = self.store.deny(request_id, approver, self.clock(), note or "")
        self._record("denied", done)
        return done

    def _record(self, event: str, request: ApprovalRequest) -> None:
        if self.audit is None:
            return
        from limenex.audit import AuditError

        try:
            self.audit.write_request(event, request)
        except AuditError as exc:
            raise AuditError(
                f"approval request {request.id!r} was {request.status.value}, but its audit "
                f"record could not be written: {exc}"
            ) from exc
