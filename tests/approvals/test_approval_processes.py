"""Several processes on one store: an approval is consumed exactly once.

Run on every backend that processes share: one SQLite file, one JSON file, one Redis prefix,
one PostgreSQL schema.
"""

from __future__ import annotations

import multiprocessing
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import servers
from limenex.approvals import (
    ApprovalRefused,
    ApprovalStore,
    FileApprovalStore,
    SQLiteApprovalStore,
    request_from_decision,
)
from limenex.core.decision import Decision, Verdict

T0 = 1_773_144_000.0
SHARED = ["sqlite", "file", "redis", "postgres"]


def _where(backend: str, tmp_path: Path) -> str:
    """Where the processes' stores of ``backend`` meet: a path, a prefix or a schema."""
    if backend == "sqlite":
        return str(tmp_path / "state" / "state.db")
    if backend == "file":
        return str(tmp_path / "state" / "state.approvals.json")
    return f"{servers.RUN}_appr_{uuid.uuid4().hex[:8]}"


def _open(backend: str, where: str) -> ApprovalStore:
    if backend == "sqlite":
        return SQLiteApprovalStore(where, timeout=30)
    if backend == "file":
        return FileApprovalStore(where)
    if backend == "redis":
        from limenex.approvals.redis import RedisApprovalStore

        return RedisApprovalStore(servers.REDIS_URL, prefix=where, timeout=30)
    if backend == "postgres":
        from limenex.approvals.postgres import PostgresApprovalStore

        return PostgresApprovalStore(servers.POSTGRES_URL, schema=where, timeout=30)
    raise AssertionError(backend)


def _consume_worker(
    backend: str, where: str, request_id: str, fp: str, start: Any, results: Any
) -> None:
    store = _open(backend, where)
    store.get(request_id, T0)  # open the connection before the race starts
    start.wait()
    try:
        store.consume(request_id, fp, T0 + 2)
        results.put("won")
    except ApprovalRefused as exc:
        results.put(exc.why)
    except BaseException as exc:
        results.put(f"error: {exc!r}")
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", SHARED)
def test_four_processes_racing_consume_one_wins(backend: str, tmp_path: Path) -> None:
    where = _where(backend, tmp_path)
    store = _open(backend, where)
    decision = Decision(Verdict.ESCALATE, "finance.spend", "agent-1", "above 100")
    request = request_from_decision(decision, {"amount_usd": Decimal("120")}, now=T0, ttl=3600)
    store.create(request)
    store.approve(request.id, "alice", T0 + 1)

    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    workers = [
        context.Process(
            target=_consume_worker,
            args=(backend, where, request.id, request.fingerprint, start, results),
        )
        for _ in range(4)
    ]
    for process in workers:
        process.start()
    start.set()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert outcomes == ["used", "used", "used", "won"]
    assert store.get(request.id, T0 + 3).status == "used"  # type: ignore[union-attr]
    store.close()


def _approve_worker(backend: str, where: str, request_id: str) -> None:
    store = _open(backend, where)
    store.approve(request_id, "bob", T0 + 1, note="from another process")
    store.close()


@pytest.mark.parametrize("backend", SHARED)
def test_an_approval_in_another_process_is_seen_here(backend: str, tmp_path: Path) -> None:
    where = _where(backend, tmp_path)
    store = _open(backend, where)
    decision = Decision(Verdict.ESCALATE, "s", "a", "why")
    request = request_from_decision(decision, {"x": 1}, now=T0, ttl=60)
    store.create(request)
    assert store.get(request.id, T0 + 0.5).status == "pending"  # type: ignore[union-attr]
    process = multiprocessing.get_context("spawn").Process(
        target=_approve_worker, args=(backend, where, request.id)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    approved = store.get(request.id, T0 + 2)
    assert approved is not None
    assert (approved.status, approved.decided_by, approved.note) == (
        "approved",
        "bob",
        "from another process",
    )
    assert store.consume(request.id, request.fingerprint, T0 + 3).status == "used"
    store.close()


def _forked_consume(store: ApprovalStore, request_id: str, fp: str, results: Any) -> None:
    try:
        store.consume(request_id, fp, T0 + 2)
        results.put("won")
    except ApprovalRefused as exc:
        results.put(exc.why)
    except BaseException as exc:
        results.put(f"error: {exc!r}")


@pytest.mark.parametrize("backend", SHARED)
def test_a_forked_child_opens_its_own_connection(backend: str, tmp_path: Path) -> None:
    store = _open(backend, _where(backend, tmp_path))
    decision = Decision(Verdict.ESCALATE, "s", "a", "why")
    request = request_from_decision(decision, {"x": 1}, now=T0, ttl=60)
    store.create(request)
    store.approve(request.id, "alice", T0 + 1)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [
        context.Process(
            target=_forked_consume, args=(store, request.id, request.fingerprint, results)
        )
        for _ in range(3)
    ]
    for child in children:
        child.start()
    outcomes = sorted(results.get(timeout=60) for _ in children)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert outcomes == ["used", "used", "won"]
    assert store.get(request.id, T0 + 3).status == "used"  # type: ignore[union-attr]
    store.close()
