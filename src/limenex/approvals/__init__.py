"""Approval requests: what an ESCALATE leaves for a human to approve or deny (SPEC §5).

An :class:`ApprovalRequest` is made from the ESCALATE decision and the call's params
(:func:`request_from_decision`) and kept in an :class:`ApprovalStore` beside the state
(:func:`approval_store_for` picks it from the state store):

* in memory (:class:`InMemoryApprovalStore`), for one process;
* in the SQLite database of the state (:class:`SQLiteApprovalStore`);
* in a JSON file beside the file state, ``state.approvals.json``
  (:class:`~limenex.approvals.file.FileApprovalStore`);
* in Redis, under the state store's key prefix
  (:class:`~limenex.approvals.redis.RedisApprovalStore`, needs ``redis``);
* in PostgreSQL, in the state store's schema
  (:class:`~limenex.approvals.postgres.PostgresApprovalStore`, needs ``psycopg``).

Each applies the same transitions in one atomic step of its own. A human approves or denies
a pending request; resuming the action consumes the approved request exactly once
(:meth:`ApprovalStore.consume`), and a denied, expired, unknown or already-used request is
refused with :class:`ApprovalRefused`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from limenex.approvals.file import FileApprovalStore
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
    policies_digest,
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
    "FileApprovalStore",
    "InMemoryApprovalStore",
    "SQLiteApprovalStore",
    "approval_store_for",
    "canonical_json",
    "canonical_params",
    "decimal_paths",
    "fingerprint",
    "new_request_id",
    "policies_digest",
    "request_from_decision",
]


_in_memory: weakref.WeakKeyDictionary[StateStore, InMemoryApprovalStore] = (
    weakref.WeakKeyDictionary()
)


def approval_store_for(state_store: StateStore) -> ApprovalStore:
    """The approval store kept next to ``state_store``, so every process using it sees one set.

    * :class:`~limenex.core.stores.InMemoryStateStore`: one in-memory store per state store
      (engines sharing the state object share the requests);
    * :class:`~limenex.core.stores.SQLiteStateStore`: the ``approvals`` table of its database;
    * :class:`~limenex.core.stores.LocalFileStateStore` at ``X/state.json``: a
      :class:`~limenex.approvals.file.FileApprovalStore` at ``X/state.approvals.json``;
    * :class:`~limenex.stores.redis.RedisStateStore`: a
      :class:`~limenex.approvals.redis.RedisApprovalStore` on the same URL, with the same
      prefix and timeouts;
    * :class:`~limenex.stores.postgres.PostgresStateStore`: a
      :class:`~limenex.approvals.postgres.PostgresApprovalStore` on the same DSN, in the same
      schema, with the same timeouts.

    Any other store raises :class:`~limenex.core.errors.LimenexConfigError`: pass
    ``approval_store=`` to the engine.
    """
    import os
    import sys

    from limenex.core.sqlite import SQLiteStateStore
    from limenex.core.stores import InMemoryStateStore, LocalFileStateStore

    if isinstance(state_store, SQLiteStateStore):
        return SQLiteApprovalStore(state_store.path, timeout=state_store.timeout)
    if isinstance(state_store, InMemoryStateStore):
        store = _in_memory.get(state_store)
        if store is None:
            store = _in_memory.setdefault(state_store, InMemoryApprovalStore())
        return store
    if isinstance(state_store, LocalFileStateStore):
        return FileApprovalStore(os.path.splitext(state_store.path)[0] + ".approvals.json")
    # The drivers are optional: a state store of theirs means they are imported already.
    redis_stores = sys.modules.get("limenex.stores.redis")
    if redis_stores is not None and isinstance(state_store, redis_stores.RedisStateStore):
        from limenex.approvals.redis import RedisApprovalStore

        return RedisApprovalStore(
            state_store.url,
            prefix=state_store.prefix,
            connect_timeout=state_store.connect_timeout,
            timeout=state_store.timeout,
        )
    postgres_stores = sys.modules.get("limenex.stores.postgres")
    if postgres_stores is not None and isinstance(state_store, postgres_stores.PostgresStateStore):
        from limenex.approvals.postgres import PostgresApprovalStore

        settings = state_store._settings
        return PostgresApprovalStore(
            state_store.dsn,
            schema=state_store.schema,
            connect_timeout=settings.connect_timeout,
            timeout=settings.timeout,
        )
    raise LimenexConfigError(
        f"no approval store is known for {type(state_store).__name__}: pass approval_store= "
        "(an ApprovalStore) to the engine"
    )
