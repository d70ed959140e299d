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

import weakref
from typing import TYPE_CHECKING

from limenex.approvals.request import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreError,
    canonical_json,
    canonical_params,
    decimal_paths,
    fingerprint,
    new_request_id,
    request_from_decision,
)
from limenex.approvals.service import Approvals
from limenex.approvals.sqlite import SQLiteApprovalStore
from limenex.approvals.store import ApprovalStore, InMemoryApprovalStore
from limenex.core.errors import LimenexConfigError

if TYPE_CHECKING:
    from limenex.core.state import StateStore

__all__ = [
    "ApprovalRefused",
    "ApprovalRequest",
    "ApprovalStatus",
    "ApprovalStore",
    "ApprovalStoreError",
    "Approvals",
    "InMemoryApprovalStore",
    "SQLiteApprovalStore",
    "approval_store_for",
    "canonical_json",
    "canonical_params",
    "decimal_paths",
    "fingerprint",
    "new_request_id",
    "request_from_decision",
]


_in_memory: weakref.WeakKeyDictionary[StateStore, InMemoryApprovalStore] = (
    weakref.WeakKeyDictionary()
)


def approval_store_for(state_store: StateStore) -> ApprovalStore:
    """The approval store kept next to ``state_store``, so every process using it sees one set.

    * :class:`~limenex.core.stores.InMemoryStateStore`: one in-memory store per state store
      (engines sharing the state object share the requests);
    * :class:`~limenex.core.stores.SQLiteStateStore`: the ``approvals`` table of its database.

    Any other store raises :class:`~limenex.core.errors.LimenexConfigError`: pass
    ``approval_store=`` to the engine.
    """
    from limenex.core.sqlite import SQLiteStateStore
    from limenex.core.stores import InMemoryStateStore

    if isinstance(state_store, SQLiteStateStore):
        return SQLiteApprovalStore(state_store.path, timeout=state_store.timeout)
    if isinstance(state_store, InMemoryStateStore):
        store = _in_memory.get(state_store)
        if store is None:
            store = _in_memory.setdefault(state_store, InMemoryApprovalStore())
        return store
    raise LimenexConfigError(
        f"no approval store is known for {type(state_store).__name__}: pass approval_store= "
        "(an ApprovalStore) to the engine"
    )
