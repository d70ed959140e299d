"""Approval requests in a JSON file, beside the file state store's ``state.json``.

:class:`FileApprovalStore` keeps every request in one file, a JSON object mapping each id to
the request's :meth:`~limenex.approvals.request.ApprovalRequest.to_dict`::

    {"<id>": {"agent_id": "agent-1", "created_at": 1773144000.0, "decimals": [["amount"]],
              "status": "pending", ...}}

For a :class:`~limenex.core.stores.LocalFileStateStore` at ``X/state.json`` it is
``X/state.approvals.json`` (:func:`~limenex.approvals.approval_store_for`). A missing file
holds no request; the file and its folder are made by the first ``create``.

Every operation takes the store's thread lock and an ``flock`` of the sibling
``<file>.lock`` (shared to read, exclusive to change; the lock file is never removed), then
reads the file; a change (``create``, ``approve``, ``deny``, ``consume``) checks and applies
its transition (:func:`~limenex.approvals.store.decide`, :func:`~limenex.approvals.store.use`)
and writes the whole file back before letting go of the lock. So a request is approved,
denied or consumed at most once, whatever the number of threads and processes of the host.

A file is written as the state store writes its own (the same helper): to ``<file>.tmp``,
fdatasynced, renamed over the file with ``os.replace``, then the folder fsynced before the
call returns. A crash leaves the old file or the new one, never a torn one, and a change is
durable once its call has returned. A file that is not ours (not JSON, a wrong shape, a
request that does not read back) raises :class:`~limenex.core.errors.CorruptStateError` on
every call and is never written to. The async methods run the sync ones on a worker thread.
A forked child opens its own lock file on first use: it never shares its parent's ``flock``.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from limenex.approvals.request import ApprovalRequest, ApprovalStatus, ApprovalStoreError
from limenex.approvals.store import BlockingApprovalStore
from limenex.core.errors import CorruptStateError, StateStoreError
from limenex.core.stores import LockFile, _Corrupt, _File, _no_constant, _show, _unique

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None  # type: ignore[assignment]  # FileApprovalStore refuses to start then

__all__ = ["FileApprovalStore"]

_T = TypeVar("_T")
_Rows = dict[str, dict[str, Any]]
_FORK_WAIT = 5.0
"""Seconds a fork waits for a store's operation in another thread to finish."""


class FileApprovalStore(BlockingApprovalStore):
    """Approval requests in one JSON file, safe across threads and processes of one host.

    ``path`` is made absolute once. See the module docstring for the format and the locking.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            raise ApprovalStoreError("FileApprovalStore needs POSIX file locks (fcntl.flock)")
        # Absolute once: a later chdir must not point the store at another folder's file.
        self.path = os.path.abspath(os.fspath(path))
        self._file = _File(self.path)
        self._lock_file = LockFile(self.path + ".lock", ApprovalStoreError)
        self._lock = threading.Lock()
        self._rows: _Rows = {}  # the requests of the bytes ``self._file.seen``
        _stores.add(self)

    def __repr__(self) -> str:
        return f"FileApprovalStore({self.path!r})"

    # --- the operations -------------------------------------------------------------------

    def create(self, request: ApprovalRequest) -> None:
        row = request.to_dict()

        def insert(rows: _Rows) -> tuple[None, _Rows]:
            if request.id in rows:
                raise ApprovalStoreError(f"an approval request {request.id!r} already exists")
            return None, {**rows, request.id: row}

        self._run(insert)

    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        request = self._run(lambda rows: (_load(rows, request_id), None), exclusive=False)
        return None if request is None else request.at(now)

    def pending(self, now: float) -> list[ApprovalRequest]:
        def waiting(rows: _Rows) -> tuple[list[ApprovalRequest], None]:
            found = [
                _request(row)
                for row in rows.values()
                if row["status"] == ApprovalStatus.PENDING.value and row["expires_at"] > now
            ]
            return sorted(found, key=lambda r: (r.created_at, r.id)), None

        return self._run(waiting, exclusive=False)

    def transition(
        self, step: Callable[[ApprovalRequest | None], ApprovalRequest], request_id: str
    ) -> ApprovalRequest:
        """Read the request, apply ``step`` and write the result back, under the locks."""

        def change(rows: _Rows) -> tuple[ApprovalRequest, _Rows]:
            done = step(_load(rows, request_id))
            return done, {**rows, done.id: done.to_dict()}

        return self._run(change)

    def close(self) -> None:
        with self._lock:
            self._lock_file.close()

    # --- one locked read-check-write ------------------------------------------------------

    def _run(
        self, operation: Callable[[_Rows], tuple[_T, _Rows | None]], *, exclusive: bool = True
    ) -> _T:
        """``operation(rows)`` on the file's current requests; write back the rows it returns."""
        with self._lock, self._lock_file.held(exclusive=exclusive):
            try:
                rows = self._load()
                result, changed = operation(rows)
                if changed is not None:
                    self._save(changed)
                return result
            except BaseException:
                self._file.synced = False  # the file may be ahead of the rows: re-read it
                raise

    def _load(self) -> _Rows:
        try:
            rows = self._file.load(_decode)
        except CorruptStateError:
            raise
        except StateStoreError as exc:
            raise ApprovalStoreError(str(exc)) from exc
        if rows is not None:
            self._rows = rows
        return self._rows

    def _save(self, rows: _Rows) -> None:
        data = _encode(rows)
        try:
            self._file.stage(data)
            self._file.install(data)
            self._file.stage(None, sync_folder=True)  # the rename made durable
        except StateStoreError as exc:
            raise ApprovalStoreError(str(exc)) from exc
        self._rows = rows


def _load(rows: _Rows, request_id: str) -> ApprovalRequest | None:
    row = rows.get(request_id) if isinstance(request_id, str) else None
    return None if row is None else _request(row)


def _request(row: dict[str, Any]) -> ApprovalRequest:
    # A deep copy: a caller must never reach the kept rows through what it was handed.
    return ApprovalRequest.from_dict(copy.deepcopy(row))


def _encode(rows: _Rows) -> bytes:
    text = json.dumps(rows, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
    return text.encode("ascii") + b"\n"


def _decode(data: bytes | None) -> _Rows:
    """The requests the file holds (none for a missing file); :class:`_Corrupt` if not ours."""
    if data is None:
        return {}
    try:
        value = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as exc:
        raise _Corrupt(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _Corrupt(f"expected an object of approval requests, found {_show(value)}")
    rows: _Rows = {}
    for key, row in value.items():
        try:
            request = ApprovalRequest.from_dict(row)
            rows[key] = request.to_dict()
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise _Corrupt(
                f"approval request {key!r} cannot be read ({type(exc).__name__}: {exc})"
            ) from None
        if request.id != key:
            raise _Corrupt(f"approval request {key!r} is kept under the id {request.id!r}")
    return rows


# --- fork: a child never inherits a thread lock held by an operation of its parent --------

_stores: weakref.WeakSet[FileApprovalStore] = weakref.WeakSet()
_held_for_fork: list[threading.Lock] = []


def _before_fork() -> None:
    for store in list(_stores):
        if store._lock.acquire(timeout=_FORK_WAIT):
            _held_for_fork.append(store._lock)


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_for_fork.clear()
    for store in list(_stores):
        store._lock = threading.Lock()  # its lock file is reopened on use (another pid)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
