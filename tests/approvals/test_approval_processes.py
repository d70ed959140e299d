"""Several processes on one SQLite file: an approval is consumed exactly once."""

from __future__ import annotations

import multiprocessing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from limenex.approvals import ApprovalRefused, SQLiteApprovalStore, request_from_decision
from limenex.core.decision import Decision, Verdict

T0 = 1_773_144_000.0


def _consume_worker(path: str, request_id: str, fp: str, start: Any, results: Any) -> None:
    store = SQLiteApprovalStore(path, timeout=30)
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
def test_four_processes_racing_consume_one_wins(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "state.db")
    store = SQLiteApprovalStore(path)
    decision = Decision(Verdict.ESCALATE, "finance.spend", "agent-1", "above 100")
    request = request_from_decision(decision, {"amount_usd": Decimal("120")}, now=T0, ttl=3600)
    store.create(request)
    store.approve(request.id, "alice", T0 + 1)

    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    workers = [
        context.Process(
            target=_consume_worker, args=(path, request.id, request.fingerprint, start, results)
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


def _approve_worker(path: str, request_id: str) -> None:
    store = SQLiteApprovalStore(path)
    store.approve(request_id, "bob", T0 + 1, note="from another process")
    store.close()


def test_an_approval_in_another_process_is_seen_here(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = SQLiteApprovalStore(path)
    decision = Decision(Verdict.ESCALATE, "s", "a", "why")
    request = request_from_decision(decision, {"x": 1}, now=T0, ttl=60)
    store.create(request)
    process = multiprocessing.get_context("spawn").Process(
        target=_approve_worker, args=(path, request.id)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    approved = store.get(request.id, T0 + 2)
    assert approved is not None
    assert (approved.status, approved.decided_by) == ("approved", "bob")
    assert store.consume(request.id, request.fingerprint, T0 + 3).status == "used"
    store.close()


def _forked_consume(store: SQLiteApprovalStore, request_id: str, fp: str, results: Any) -> None:
    try:
        store.consume(request_id, fp, T0 + 2)
        results.put("won")
    except ApprovalRefused as exc:
        results.put(exc.why)
    except BaseException as exc:
        results.put(f"error: {exc!r}")


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = SQLiteApprovalStore(path)
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
