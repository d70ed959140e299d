"""Approval requests: what an ESCALATE leaves for a human to approve or deny (SPEC §5).

An :class:`ApprovalRequest` is made from the ESCALATE decision and the call's params
(:func:`request_from_decision`) and kept in an :class:`ApprovalStore`: in memory
(:class:`InMemoryApprovalStore`) or in the SQLite database of the state
(:class:`SQLiteApprovalStore`). A human approves or denies a pending request; resuming the
action consumes the approved request exactly once (:meth:`ApprovalStore.consume`), and a
denied, expired, unknown or already-used request is refused with
:class:`ApprovalRefused`.
"""

from __future__ import annotations

from limenex.approvals.request import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreError,
    canonical_json,
    canonical_params,
    fingerprint,
    new_request_id,
    request_from_decision,
)
from limenex.approvals.sqlite import SQLiteApprovalStore
from limenex.approvals.store import ApprovalStore, InMemoryApprovalStore

__all__ = [
    "ApprovalRefused",
    "ApprovalRequest",
    "ApprovalStatus",
    "ApprovalStore",
    "ApprovalStoreError",
    "InMemoryApprovalStore",
    "SQLiteApprovalStore",
    "canonical_json",
    "canonical_params",
    "fingerprint",
    "new_request_id",
    "request_from_decision",
]
