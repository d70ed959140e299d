"""Approval requests and their stores: lifecycle, refusals, expiry, races, persistence."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servers
from limenex.approvals import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStore,
    ApprovalStoreError,
    InMemoryApprovalStore,
    SQLiteApprovalStore,
    approval_store_for,
    canonical_json,
    canonical_params,
    decimal_paths,
    fingerprint,
    request_from_decision,
)
from limenex.approvals.file import FileApprovalStore
from limenex.approvals.postgres import PostgresApprovalStore
from limenex.approvals.redis import RedisApprovalStore
from limenex.core.decision import Decision, Verdict
from limenex.core.errors import (
    CorruptStateError,
    InvalidArgumentError,
    LimenexConfigError,
    StateStoreError,
)
from limenex.core.policy import DeterministicPolicy
from limenex.core.state import Check, CounterKey, Reservation, StateStore
from limenex.core.stores import LocalFileStateStore, SQLiteStateStore

T0 = 1_773_144_000.0  # 2026-03-10T12:00:00Z
TTL = 3600.0
PARAMS = {"service": "bank", "amount_usd": Decimal("120.50"), "meta": {"b": [1, 2.5], "a": None}}
POLICY = DeterministicPolicy.model_validate(
    {
        "type": "deterministic",
        "dimension": "spend_usd",
        "param": "amount_usd",
        "operator": "lte",
        "value": 100,
        "breach_verdict": "ESCALATE",
    }
)

BACKENDS = ["memory", "sqlite", "file", "redis", "postgres"]


def escalation(skill: str = "finance.spend", agent: str = "agent-1") -> Decision:
    return Decision(
        Verdict.ESCALATE,
        skill,
        agent,
        "amount_usd 120.50 is above 100: a human must approve",
        policy=POLICY,
        policy_index=0,
    )


def new_request(params: dict[str, Any] | None = None, *, now: float = T0) -> ApprovalRequest:
    return request_from_decision(
        escalation(), PARAMS if params is None else params, now=now, ttl=TTL
    )


MakeStore = Callable[[], ApprovalStore]


def namespace() -> str:
    """A fresh Redis prefix or PostgreSQL schema of this run (removed when the run ends)."""
    return f"{servers.RUN}_appr_{uuid.uuid4().hex[:8]}"


def factory(backend: str, folder: Path) -> MakeStore:
    """Make stores of ``backend`` that all see the same requests (one file, prefix, schema)."""
    memory = InMemoryApprovalStore()
    name = namespace()

    def make() -> ApprovalStore:
        if backend == "memory":
            return memory
        if backend == "sqlite":
            return SQLiteApprovalStore(folder / "state" / "state.db")
        if backend == "file":
            return FileApprovalStore(folder / "state" / "state.approvals.json")
        if backend == "redis":
            return RedisApprovalStore(servers.REDIS_URL, prefix=name)
        if backend == "postgres":
            return PostgresApprovalStore(servers.POSTGRES_URL, schema=name)
        raise AssertionError(backend)

    return make


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Stores of one backend; all of one fixture see the same requests (like one SQLite file)."""
    made: list[ApprovalStore] = []
    new = factory(request.param, tmp_path)

    def make() -> ApprovalStore:
        store = new()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> ApprovalStore:
    return make_store()


def refusal(call: Callable[[], object], why: str) -> ApprovalRefused:
    with pytest.raises(ApprovalRefused) as caught:
        call()
    assert caught.value.why == why, str(caught.value)
    return caught.value


# --- the request ----------------------------------------------------------------------------


def test_a_request_from_an_escalation_has_every_field() -> None:
    request = new_request()
    assert request.skill_id == "finance.spend"
    assert request.agent_id == "agent-1"
    assert request.params == {
        "amount_usd": "120.50",
        "meta": {"a": None, "b": [1, 2.5]},
        "service": "bank",
    }
    assert list(request.params) == sorted(request.params)
    assert request.fingerprint == fingerprint("finance.spend", "agent-1", PARAMS)
    assert len(request.fingerprint) == 64
    assert request.policy == POLICY.to_yaml_dict()
    assert request.policy_index == 0
    assert request.reason == escalation().reason
    assert (request.created_at, request.expires_at) == (T0, T0 + TTL)
    assert request.status is ApprovalStatus.PENDING
    assert (request.decided_by, request.decided_at, request.note) == (None, None, "")
    data = request.to_dict()
    assert data["status"] == "pending"
    assert canonical_json(data)  # JSON-ready
    assert ApprovalRequest.from_dict(data) == request
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.status = ApprovalStatus.APPROVED  # type: ignore[misc]


def test_ids_are_unguessable_and_unique() -> None:
    ids = {new_request().id for _ in range(2000)}
    assert len(ids) == 2000
    for rid in list(ids)[:50]:
        assert len(rid) >= 22  # 128 random bits, URL-safe base64
        assert rid.replace("-", "").replace("_", "").isalnum()


def test_canonical_params_give_a_stable_fingerprint() -> None:
    one = {"b": {"y": [Decimal("0.10"), {"z": 1, "a": Decimal("1E+3")}], "x": "é"}, "a": 1.5}
    two = {"a": 1.5, "b": {"x": "é", "y": (Decimal("0.10"), {"a": Decimal("1000"), "z": 1})}}
    assert canonical_params(one) == canonical_params(two)
    assert canonical_json(canonical_params(one)) == (
        '{"a":1.5,"b":{"x":"é","y":["0.10",{"a":"1000","z":1}]}}'
    )
    assert fingerprint("s", "a", one) == fingerprint("s", "a", two)
    # A decimal and its text are different actions; the kept request gives the decimals back.
    assert fingerprint("s", "a", canonical_params(one)) != fingerprint("s", "a", one)
    assert decimal_paths(one) == (("b", "y", 0), ("b", "y", 1, "a"))
    kept = dataclasses.replace(
        new_request(), params=canonical_params(one), decimals=decimal_paths(one)
    )
    back = ApprovalRequest.from_dict(kept.to_dict()).call_params()
    assert back == {
        "a": 1.5,
        "b": {"x": "é", "y": [Decimal("0.10"), {"a": Decimal("1000"), "z": 1}]},
    }
    assert str(back["b"]["y"][0]) == "0.10"
    assert fingerprint("s", "a", back) == fingerprint("s", "a", one)
    # Any difference in skill, agent or params changes it.
    assert fingerprint("s", "a", one) != fingerprint("s2", "a", one)
    assert fingerprint("s", "a", one) != fingerprint("s", "a2", one)
    assert fingerprint("s", "a", {"a": Decimal("0.1")}) != fingerprint(
        "s", "a", {"a": Decimal("0.10")}
    )
    assert fingerprint("s", "a", {"a": 1}) != fingerprint("s", "a", {"a": "1"})


@pytest.mark.parametrize(
    "params",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": Decimal("NaN")},
        {"x": Decimal("-Infinity")},
        {"x": b"bytes"},
        {"x": {1: "non-string key"}},
        {"x": {1, 2}},
        {"x": object()},
    ],
)
def test_params_that_are_not_json_data_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        new_request(params)


def test_only_an_escalation_with_a_positive_ttl_makes_a_request() -> None:
    block = Decision(Verdict.BLOCK, "finance.spend", "agent-1", "no")
    with pytest.raises(InvalidArgumentError, match="ESCALATE"):
        request_from_decision(block, PARAMS, now=T0, ttl=TTL)
    for ttl in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(InvalidArgumentError, match="ttl"):
            request_from_decision(escalation(), PARAMS, now=T0, ttl=ttl)
    bare = Decision(Verdict.ESCALATE, "s", "a", "semantic review")
    request = request_from_decision(bare, {}, now=T0, ttl=1)
    assert (request.policy, request.policy_index, request.params) == (None, None, {})


def test_error_classes_sit_in_the_tree() -> None:
    assert issubclass(ApprovalRefused, LimenexConfigError)
    assert issubclass(ApprovalStoreError, StateStoreError)


# --- lifecycle on every backend -------------------------------------------------------------


def test_escalate_approve_consume(store: ApprovalStore) -> None:
    request = new_request()
    store.create(request)
    assert store.get(request.id, T0) == request
    assert store.pending(T0 + 1) == [request]

    approved = store.approve(request.id, "alice", T0 + 10, note="ok for this vendor")
    assert approved.status is ApprovalStatus.APPROVED
    assert (approved.decided_by, approved.decided_at, approved.note) == (
        "alice",
        T0 + 10,
        "ok for this vendor",
    )
    assert store.get(request.id, T0 + 11) == approved
    assert store.pending(T0 + 11) == []

    used = store.consume(request.id, request.fingerprint, T0 + 20)
    assert used.status is ApprovalStatus.USED
    assert used.used_at == T0 + 20
    assert used.decided_by == "alice"
    assert store.get(request.id, T0 + 21) == used
    assert store.get(request.id, T0 + TTL * 10) == used  # used never reads as expired
    refusal(lambda: store.consume(request.id, request.fingerprint, T0 + 30), "used")


def test_deny(store: ApprovalStore) -> None:
    request = new_request()
    store.create(request)
    denied = store.deny(request.id, "bob", T0 + 5, note="not this vendor")
    assert (denied.status, denied.decided_by, denied.note) == (
        ApprovalStatus.DENIED,
        "bob",
        "not this vendor",
    )
    assert store.get(request.id, T0 + 6) == denied
    assert store.pending(T0 + 6) == []


def test_every_refusal_says_why(store: ApprovalStore) -> None:
    pending, approved, denied, used, expired = (new_request() for _ in range(5))
    for request in (pending, approved, denied, used, expired):
        store.create(request)
    store.approve(approved.id, "alice", T0 + 1)
    store.deny(denied.id, "alice", T0 + 1)
    store.approve(used.id, "alice", T0 + 1)
    store.consume(used.id, used.fingerprint, T0 + 2)
    late = T0 + TTL + 1

    # Unknown ids, for every action.
    for call in (
        lambda: store.approve("no-such-id", "alice", T0),
        lambda: store.deny("no-such-id", "alice", T0),
        lambda: store.consume("no-such-id", pending.fingerprint, T0),
    ):
        error = refusal(call, "unknown")
        assert "no such request" in str(error)
        assert error.request_id == "no-such-id"
    assert store.get("no-such-id", T0) is None

    # Approve and deny only from pending.
    for decide in (store.approve, store.deny):
        assert "already approved" in str(
            refusal(lambda d=decide: d(approved.id, "bob", T0 + 3), "approved")  # type: ignore[misc]
        )
        assert "denied" in str(
            refusal(lambda d=decide: d(denied.id, "bob", T0 + 3), "denied")  # type: ignore[misc]
        )
        assert "already used" in str(
            refusal(lambda d=decide: d(used.id, "bob", T0 + 3), "used")  # type: ignore[misc]
        )
        assert "expired" in str(
            refusal(lambda d=decide: d(expired.id, "bob", late), "expired")  # type: ignore[misc]
        )

    # Consume only an approved, unexpired request with its own fingerprint.
    assert "not been approved" in str(
        refusal(lambda: store.consume(pending.id, pending.fingerprint, T0 + 3), "pending")
    )
    refusal(lambda: store.consume(denied.id, denied.fingerprint, T0 + 3), "denied")
    refusal(lambda: store.consume(used.id, used.fingerprint, T0 + 3), "used")
    refusal(lambda: store.consume(approved.id, approved.fingerprint, late), "expired")
    refusal(lambda: store.consume(expired.id, expired.fingerprint, late), "expired")

    # An approver must be named.
    refusal(lambda: store.approve(pending.id, "", T0 + 3), "approver")

    # None of the refusals changed anything.
    assert store.get(pending.id, T0 + 3) == pending
    assert store.get(approved.id, T0 + 3).status is ApprovalStatus.APPROVED  # type: ignore[union-attr]
    assert store.get(denied.id, T0 + 3).status is ApprovalStatus.DENIED  # type: ignore[union-attr]


def test_a_different_action_cannot_use_the_approval(store: ApprovalStore) -> None:
    request = new_request()
    store.create(request)
    store.approve(request.id, "alice", T0 + 1)
    other = fingerprint("finance.spend", "agent-1", {**PARAMS, "amount_usd": Decimal("9999")})
    for wrong in (other, "", request.fingerprint.upper(), "é"):
        error = refusal(lambda w=wrong: store.consume(request.id, w, T0 + 2), "fingerprint")  # type: ignore[misc]
        assert "fingerprint differs" in str(error)
    # The approval is still there for the action that was approved.
    assert store.consume(request.id, request.fingerprint, T0 + 3).status is ApprovalStatus.USED


def test_expiry_is_exactly_at_expires_at(store: ApprovalStore) -> None:
    waiting, approved = new_request(), new_request()
    store.create(waiting)
    store.create(approved)
    store.approve(approved.id, "alice", T0 + 1)
    edge = T0 + TTL
    just_before = edge - 0.001

    assert store.get(waiting.id, just_before).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    assert [r.id for r in store.pending(just_before)] == [waiting.id]
    assert store.get(waiting.id, edge).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]
    assert store.get(approved.id, edge).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]
    assert store.pending(edge) == []
    refusal(lambda: store.approve(waiting.id, "alice", edge), "expired")
    refusal(lambda: store.consume(approved.id, approved.fingerprint, edge), "expired")
    # A second earlier, the approved one was still usable.
    assert store.consume(approved.id, approved.fingerprint, just_before).status is (
        ApprovalStatus.USED
    )


def test_pending_lists_oldest_first(store: ApprovalStore) -> None:
    requests = [new_request(now=T0 + n) for n in (3, 1, 2)]
    for request in requests:
        store.create(request)
    assert [r.created_at for r in store.pending(T0 + 10)] == [T0 + 1, T0 + 2, T0 + 3]


def test_an_id_is_created_once(store: ApprovalStore) -> None:
    request = new_request()
    store.create(request)
    with pytest.raises(ApprovalStoreError, match="already exists"):
        store.create(dataclasses.replace(request, reason="another"))
    assert store.get(request.id, T0) == request


def test_requests_handed_out_cannot_change_the_kept_one(store: ApprovalStore) -> None:
    request = new_request()
    store.create(request)
    request.params["amount_usd"] = "1"
    read = store.get(request.id, T0)
    assert read is not None
    assert read.params["amount_usd"] == "120.50"
    read.params["amount_usd"] = "2"
    assert store.get(request.id, T0).params["amount_usd"] == "120.50"  # type: ignore[union-attr]


async def test_async_variants(store: ApprovalStore) -> None:
    request = new_request()
    await store.acreate(request)
    assert await store.aget(request.id, T0) == request
    assert await store.apending(T0) == [request]
    await store.aapprove(request.id, "alice", T0 + 1)
    used = await store.aconsume(request.id, request.fingerprint, T0 + 2)
    assert used.status is ApprovalStatus.USED
    with pytest.raises(ApprovalRefused):
        await store.aconsume(request.id, request.fingerprint, T0 + 3)
    other = new_request()
    await store.acreate(other)
    assert (await store.adeny(other.id, "bob", T0 + 1)).status is ApprovalStatus.DENIED
    await store.aclose()


def test_forty_threads_racing_consume_one_wins(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(4)]  # SQLite: four connections to one file
    request = new_request()
    stores[0].create(request)
    stores[1].approve(request.id, "alice", T0 + 1)
    barrier = threading.Barrier(40)
    wins: list[ApprovalRequest] = []
    refusals: list[str] = []
    other: list[BaseException] = []

    def race(n: int) -> None:
        barrier.wait()
        try:
            wins.append(stores[n % 4].consume(request.id, request.fingerprint, T0 + 2))
        except ApprovalRefused as exc:
            refusals.append(exc.why)
        except BaseException as exc:  # pragma: no cover - reported below
            other.append(exc)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert other == []
    assert len(wins) == 1
    assert refusals == ["used"] * 39


def test_a_slow_consume_still_lets_exactly_one_win(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every racer reads the request as approved before any writes: the step must be atomic."""
    stores = [make_store() for _ in range(4)]
    request = new_request()
    stores[0].create(request)
    stores[0].approve(request.id, "alice", T0 + 1)
    module = sys.modules["limenex.approvals.store"]  # every backend's consume applies it
    plain_use = module.use

    def slow_use(*args: Any) -> ApprovalRequest:
        done: ApprovalRequest = plain_use(*args)
        time.sleep(0.05)  # between the read and the write
        return done

    monkeypatch.setattr(module, "use", slow_use)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def race(n: int) -> None:
        barrier.wait()
        try:
            stores[n % 4].consume(request.id, request.fingerprint, T0 + 2)
            outcomes.append("won")
        except ApprovalRefused as exc:
            outcomes.append(exc.why)
        except BaseException as exc:  # pragma: no cover - reported below
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["used"] * 7 + ["won"]


# --- SQLite ---------------------------------------------------------------------------------


def test_requests_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SQLiteApprovalStore(path)
    kept, approved = new_request(), new_request()
    first.create(kept)
    first.create(approved)
    first.approve(approved.id, "alice", T0 + 1, note="fine")
    first.close()

    again = SQLiteApprovalStore(path)
    assert again.get(kept.id, T0 + 2) == kept
    read = again.get(approved.id, T0 + 2)
    assert read is not None
    assert (read.status, read.decided_by, read.note) == (ApprovalStatus.APPROVED, "alice", "fine")
    assert again.consume(approved.id, approved.fingerprint, T0 + 3).status is ApprovalStatus.USED
    again.close()
    third = SQLiteApprovalStore(path)
    refusal(lambda: third.consume(approved.id, approved.fingerprint, T0 + 4), "used")
    third.close()


def spend(amount: str) -> Check:
    key = CounterKey("spend_usd", "agent", "agent-1", "")
    return Check(0, key, None, Decimal(amount), "lte", Decimal("100"))


@pytest.mark.parametrize("first", ["state", "approvals"])
def test_one_file_holds_state_and_approvals(tmp_path: Path, first: str) -> None:
    path = tmp_path / "state" / "state.db"
    if first == "state":
        state = SQLiteStateStore(path)
        approvals = SQLiteApprovalStore(path)
    else:
        approvals = SQLiteApprovalStore(path)
        state = SQLiteStateStore(path)
    try:
        reservation = state.reserve([spend("30")], T0)
        assert isinstance(reservation, Reservation)
        request = new_request()
        approvals.create(request)
        state.commit(reservation)
        approvals.approve(request.id, "alice", T0 + 1)
        second = state.reserve([spend("50")], T0 + 2)
        assert isinstance(second, Reservation)
        assert approvals.consume(request.id, request.fingerprint, T0 + 3).status is (
            ApprovalStatus.USED
        )
        state.commit(second)
        assert state.peek([spend("0")], T0 + 4) == (Decimal("80"),)
        assert state.pending(T0 + 4) == []
        state.reset()  # the state's own reset leaves the approvals alone
        assert state.totals(T0 + 5) == []
        assert approvals.get(request.id, T0 + 5).status is ApprovalStatus.USED  # type: ignore[union-attr]
    finally:
        state.close()
        approvals.close()
    # Both reopen the file as theirs.
    state, approvals = SQLiteStateStore(path), SQLiteApprovalStore(path)
    try:
        assert isinstance(state.reserve([spend("1")], T0 + 6), Reservation)
        assert approvals.get(request.id, T0 + 6) is not None
    finally:
        state.close()
        approvals.close()
    conn = sqlite3.connect(path)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"counters", "entries", "pending", "meta", "approvals"}


def test_a_file_that_is_not_ours_is_refused_and_kept(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello, this is not a database" * 10)
    store = SQLiteApprovalStore(text)
    with pytest.raises(CorruptStateError, match="not an SQLite database"):
        store.get("x", T0)
    assert text.read_bytes() == b"hello, this is not a database" * 10

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    foreign = SQLiteApprovalStore(other)
    with pytest.raises(CorruptStateError, match="not a Limenex state database"):
        foreign.create(new_request())
    assert other.read_bytes() == before


def test_a_held_write_lock_becomes_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteApprovalStore(path, timeout=0.2)
    request = new_request()
    store.create(request)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ApprovalStoreError, match="locked"):
            store.approve(request.id, "alice", T0 + 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.approve(request.id, "alice", T0 + 1).status is ApprovalStatus.APPROVED
    store.close()


def test_an_unreadable_row_is_a_corrupt_state_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteApprovalStore(path)
    request = new_request()
    store.create(request)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE approvals SET params = '{broken' WHERE id = ?", (request.id,))
    conn.commit()
    conn.close()
    with pytest.raises(CorruptStateError, match="cannot read"):
        store.get(request.id, T0)
    with pytest.raises(CorruptStateError):
        store.consume(request.id, request.fingerprint, T0)
    store.close()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    for timeout in (-1, float("nan"), "5"):
        with pytest.raises(LimenexConfigError, match="timeout"):
            SQLiteApprovalStore(tmp_path / "s.db", timeout=timeout)  # type: ignore[arg-type]


# --- every field round-trips on every backend ---------------------------------------------


def full_request() -> ApprovalRequest:
    """A request with every field set, and params that are easy to get wrong."""
    params = {
        "amount": Decimal("120.50"),
        "rows": [{"fee": Decimal("0.10"), "n": 10**30}, Decimal("-1E+3")],
        "big": 1e300,
        "tiny": 5e-324,
        "text": "é ü 漢 \u2028 \\\" '",
        "nothing": None,
        "flag": True,
    }
    request = request_from_decision(escalation(), params, now=T0 + 0.1, ttl=TTL)
    assert request.decimals == (("amount",), ("rows", 0, "fee"), ("rows", 1))
    return dataclasses.replace(
        request,
        status=ApprovalStatus.USED,
        decided_by="alice ☃",
        decided_at=T0 + 1.25,
        note="fine\nfor this one",
        used_at=T0 + 2.5,
    )


def test_every_field_round_trips(make_store: MakeStore) -> None:
    store, other = make_store(), make_store()
    request = full_request()
    store.create(request)
    bare = new_request({})
    bare = dataclasses.replace(bare, policy=None, policy_index=None)
    store.create(bare)
    for reader in (store, other):
        read = reader.get(request.id, T0 + 3)
        assert read is not None
        assert read.to_dict() == request.to_dict()
        assert canonical_json(read.to_dict()) == canonical_json(request.to_dict())
        assert read.call_params() == request.call_params()
        assert read.call_params()["rows"][0]["fee"] == Decimal("0.10")
        assert str(read.call_params()["rows"][0]["fee"]) == "0.10"
        assert reader.get(bare.id, T0).to_dict() == bare.to_dict()  # type: ignore[union-attr]
    # A closed store opens again on use.
    store.close()
    assert store.get(request.id, T0 + 3).to_dict() == request.to_dict()  # type: ignore[union-attr]


# --- the file backend ----------------------------------------------------------------------


def test_the_file_holds_each_request_as_its_dict(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.approvals.json"
    store = FileApprovalStore(path)
    assert store.get("nothing", T0) is None
    assert not path.exists()  # reading makes no file
    request = full_request()
    store.create(request)
    waiting = new_request()
    store.create(waiting)
    store.approve(waiting.id, "bob", T0 + 1)
    kept = json.loads(path.read_text("ascii"))
    assert kept == {
        request.id: request.to_dict(),
        waiting.id: store.get(waiting.id, T0 + 2).to_dict(),  # type: ignore[union-attr]
    }
    assert (tmp_path / "state" / "state.approvals.json.lock").exists()
    assert not (tmp_path / "state" / "state.approvals.json.tmp").exists()
    store.close()
    again = FileApprovalStore(path)
    assert again.get(request.id, T0).to_dict() == request.to_dict()  # type: ignore[union-attr]
    again.close()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"x": {"id": "x"}}',
        b'{"a": 1, "a": 2}',
        b'{"x": {"id": "y"}}',
        b"NaN",
        b"",
    ],
)
def test_a_corrupt_approvals_file_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.approvals.json"
    good = FileApprovalStore(path)
    request = new_request()
    good.create(request)
    if content == b'{"x": {"id": "y"}}':  # a readable request, kept under another id
        content = json.dumps({"x": request.to_dict()}).encode()
    path.write_bytes(content)
    store = FileApprovalStore(path)
    for call in (
        lambda: store.get(request.id, T0),
        lambda: store.pending(T0),
        lambda: store.create(new_request()),
        lambda: store.approve(request.id, "alice", T0 + 1),
        lambda: good.consume(request.id, request.fingerprint, T0 + 1),
    ):
        with pytest.raises(CorruptStateError, match="left as found"):
            call()
    assert path.read_bytes() == content
    assert not path.with_name(path.name + ".tmp").exists()
    store.close()
    good.close()


def test_a_file_that_cannot_be_reached_is_an_approval_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    store = FileApprovalStore(blocker / "state.approvals.json")  # its folder is a file
    for call in (
        lambda: store.get("x", T0),
        lambda: store.create(new_request()),
        lambda: store.consume("x", "f", T0),
    ):
        with pytest.raises(ApprovalStoreError):
            call()
    store.close()
    # A file that cannot be read (a folder in its place).
    folder = tmp_path / "state.approvals.json"
    folder.mkdir()
    other = FileApprovalStore(folder)
    with pytest.raises(ApprovalStoreError, match="cannot read"):
        other.get("x", T0)
    other.close()


# --- Redis ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_redis_keys_carry_the_prefix_hash_tag() -> None:
    import redis

    prefix = namespace()
    store = RedisApprovalStore(servers.REDIS_URL, prefix=prefix)
    waiting, decided = new_request(now=T0 + 1), full_request()
    store.create(waiting)
    store.create(decided)
    client = redis.Redis.from_url(servers.REDIS_URL, decode_responses=True)
    try:
        keys = set(client.scan_iter(match=f"*{prefix}*"))
        assert keys == {
            "{" + prefix + "}:approval:" + waiting.id,
            "{" + prefix + "}:approval:" + decided.id,
            "{" + prefix + "}:approvals:waiting",
        }
        text = client.get("{" + prefix + "}:approval:" + decided.id)
        assert text == canonical_json(decided.to_dict())
        index = "{" + prefix + "}:approvals:waiting"
        assert client.zrange(index, 0, -1, withscores=True) == [(waiting.id, T0 + 1)]
        store.deny(waiting.id, "bob", T0 + 2)
        assert client.zcard(index) == 0
        # A value that is not a request is refused, and kept.
        client.set("{" + prefix + "}:approval:broken", "{not json")
        with pytest.raises(CorruptStateError, match="left as found"):
            store.get("broken", T0)
        with pytest.raises(CorruptStateError):
            store.approve("broken", "alice", T0)
        assert client.get("{" + prefix + "}:approval:broken") == "{not json"
    finally:
        client.close()
        store.close()


def test_an_unreachable_redis_is_an_approval_store_error() -> None:
    store = RedisApprovalStore(
        f"redis://:s3cret@127.0.0.1:{closed_port()}/0", prefix=namespace(), connect_timeout=1
    )
    for call in (
        lambda: store.get("x", T0),
        lambda: store.pending(T0),
        lambda: store.create(new_request()),
        lambda: store.approve("x", "alice", T0),
        lambda: store.consume("x", "f", T0),
    ):
        with pytest.raises(ApprovalStoreError, match=r"Redis at 127\.0\.0\.1") as caught:
            call()
        assert "s3cret" not in str(caught.value)
    store.close()


async def test_an_unreachable_redis_fails_the_async_calls_too() -> None:
    store = RedisApprovalStore(f"redis://127.0.0.1:{closed_port()}/0", prefix=namespace())
    with pytest.raises(ApprovalStoreError):
        await store.aget("x", T0)
    with pytest.raises(ApprovalStoreError):
        await store.aconsume("x", "f", T0)
    await store.aclose()


def test_redis_settings_are_checked() -> None:
    for prefix in ("", "a{b", "c}", 3):
        with pytest.raises(LimenexConfigError, match="prefix"):
            RedisApprovalStore(servers.REDIS_URL, prefix=prefix)  # type: ignore[arg-type]
    with pytest.raises(LimenexConfigError, match="Redis URL"):
        RedisApprovalStore("http://example.com", prefix="p")
    with pytest.raises(LimenexConfigError, match="timeout"):
        RedisApprovalStore(servers.REDIS_URL, prefix="p", timeout=0)


# --- PostgreSQL ----------------------------------------------------------------------------


def test_postgres_keeps_a_table_in_the_schema() -> None:
    import psycopg

    schema = namespace()
    store = PostgresApprovalStore(servers.POSTGRES_URL, schema=schema)
    request = full_request()
    store.create(request)
    with psycopg.connect(servers.POSTGRES_URL, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        ).fetchall()
        assert tables == [("approvals",)]
        conn.execute(
            f'UPDATE "{schema}".approvals SET params = %s WHERE id = %s',  # noqa: S608
            ("{broken", request.id),
        )
        with pytest.raises(CorruptStateError, match="left as found"):
            store.get(request.id, T0)
        with pytest.raises(CorruptStateError):
            store.consume(request.id, request.fingerprint, T0)
        (params,) = conn.execute(
            f'SELECT params FROM "{schema}".approvals WHERE id = %s',  # noqa: S608
            (request.id,),
        ).fetchone()  # type: ignore[misc]
        assert params == "{broken"
        # The schema dropped under a live store: made again on the next call.
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert store.get(request.id, T0) is None
    store.create(request)
    assert store.get(request.id, T0 + 3).to_dict() == request.to_dict()  # type: ignore[union-attr]
    store.close()


def test_an_unreachable_postgres_is_an_approval_store_error() -> None:
    store = PostgresApprovalStore(
        f"postgresql://postgres:s3cret@127.0.0.1:{closed_port()}/test", schema=namespace()
    )
    for call in (
        lambda: store.get("x", T0),
        lambda: store.pending(T0),
        lambda: store.create(new_request()),
        lambda: store.approve("x", "alice", T0),
        lambda: store.consume("x", "f", T0),
    ):
        with pytest.raises(ApprovalStoreError, match=r"PostgreSQL at 127\.0\.0\.1") as caught:
            call()
        assert "s3cret" not in str(caught.value)
    store.close()


async def test_an_unreachable_postgres_fails_the_async_calls_too() -> None:
    store = PostgresApprovalStore(
        f"postgresql://postgres@127.0.0.1:{closed_port()}/test", schema=namespace()
    )
    with pytest.raises(ApprovalStoreError):
        await store.aget("x", T0)
    with pytest.raises(ApprovalStoreError):
        await store.aconsume("x", "f", T0)
    await store.aclose()


def test_postgres_settings_are_checked() -> None:
    for schema in ("", "1abc", "pg_x", "a-b", "x" * 64, 3):
        with pytest.raises(LimenexConfigError, match="schema"):
            PostgresApprovalStore(servers.POSTGRES_URL, schema=schema)  # type: ignore[arg-type]
    with pytest.raises(LimenexConfigError, match="DSN"):
        PostgresApprovalStore("not a dsn = = =", schema="p")
    with pytest.raises(LimenexConfigError, match="max_connections"):
        PostgresApprovalStore(servers.POSTGRES_URL, schema="p", max_connections=0)


# --- approval_store_for ---------------------------------------------------------------------


def state_stores(kind: str, tmp_path: Path) -> tuple[StateStore, StateStore]:
    """Two state store objects pointed at the same state."""
    if kind == "file":
        path = tmp_path / "state" / "state.json"
        return LocalFileStateStore(path), LocalFileStateStore(str(path))
    if kind == "redis":
        from limenex.stores.redis import RedisStateStore

        prefix = namespace()
        return (
            RedisStateStore(servers.REDIS_URL, prefix=prefix),
            RedisStateStore(servers.REDIS_URL, prefix=prefix),
        )
    from limenex.stores.postgres import PostgresStateStore

    schema = namespace()
    return (
        PostgresStateStore(servers.POSTGRES_URL, schema=schema),
        PostgresStateStore(servers.POSTGRES_URL, schema=schema),
    )


@pytest.mark.parametrize("kind", ["file", "redis", "postgres"])
def test_approval_store_for_shares_requests_beside_the_state(kind: str, tmp_path: Path) -> None:
    first_state, second_state = state_stores(kind, tmp_path)
    first, second = approval_store_for(first_state), approval_store_for(second_state)
    expected = {
        "file": FileApprovalStore,
        "redis": RedisApprovalStore,
        "postgres": PostgresApprovalStore,
    }[kind]
    try:
        assert type(first) is expected
        assert type(second) is expected
        request = full_request()
        first.create(request)
        assert second.get(request.id, T0).to_dict() == request.to_dict()  # type: ignore[union-attr]
        waiting = new_request()
        second.create(waiting)
        assert [r.id for r in first.pending(T0 + 1)] == [waiting.id]
        first.approve(waiting.id, "alice", T0 + 1)
        assert second.consume(waiting.id, waiting.fingerprint, T0 + 2).status is (
            ApprovalStatus.USED
        )
        refusal(lambda: first.consume(waiting.id, waiting.fingerprint, T0 + 3), "used")
        # The state store works beside its approvals.
        reservation = first_state.reserve([spend("30")], T0)
        assert isinstance(reservation, Reservation)
        first_state.commit(reservation)
        assert second_state.peek([spend("0")], T0 + 1) == (Decimal("30"),)
        first_state.reset()
        assert second.get(waiting.id, T0 + 4).status is ApprovalStatus.USED  # type: ignore[union-attr]
        if kind == "file":
            assert isinstance(first, FileApprovalStore)
            assert first.path == str(tmp_path / "state" / "state.approvals.json")
        elif kind == "redis":
            assert isinstance(first, RedisApprovalStore)
            assert first.prefix == first_state.prefix  # type: ignore[attr-defined]
        else:
            assert isinstance(first, PostgresApprovalStore)
            assert first.schema == first_state.schema  # type: ignore[attr-defined]
    finally:
        for store in (first, second):
            store.close()
        for state in (first_state, second_state):
            state.close()


# --- the status machine never goes back -------------------------------------------------------

_steps = st.lists(
    st.tuples(
        st.sampled_from(["approve", "deny", "consume", "consume-wrong", "get"]),
        st.sampled_from([0, 1]),  # which of two requests
        st.floats(min_value=0, max_value=TTL / 2, allow_nan=False),  # time advanced
    ),
    max_size=25,
)
_ORDER = {
    ApprovalStatus.PENDING: 0,
    ApprovalStatus.APPROVED: 1,
    ApprovalStatus.DENIED: 2,
    ApprovalStatus.EXPIRED: 2,
    ApprovalStatus.USED: 2,
}


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_steps)
def test_the_status_machine_never_goes_back(
    backend: str, tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, float]]
) -> None:
    store = factory(backend, tmp_path_factory.mktemp("machine"))()
    try:
        requests = [new_request(), new_request()]
        for request in requests:
            store.create(request)
        seen: list[list[ApprovalStatus]] = [[ApprovalStatus.PENDING], [ApprovalStatus.PENDING]]
        consumed = [0, 0]
        now = T0
        for action, which, advance in steps:
            now += advance
            request = requests[which]
            try:
                if action == "approve":
                    store.approve(request.id, "alice", now)
                elif action == "deny":
                    store.deny(request.id, "bob", now)
                elif action == "consume":
                    store.consume(request.id, request.fingerprint, now)
                    consumed[which] += 1
                elif action == "consume-wrong":
                    store.consume(request.id, "0" * 64, now)
                    raise AssertionError("a wrong fingerprint was accepted")
            except ApprovalRefused:
                pass
            for n in (0, 1):
                status = store.get(requests[n].id, now).status  # type: ignore[union-attr]
                last = seen[n][-1]
                assert _ORDER[status] >= _ORDER[last], (seen[n], status)
                if _ORDER[last] == 2:  # a final status stays exactly what it was
                    assert status is last
                seen[n].append(status)
        for n in (0, 1):
            assert consumed[n] <= 1
            assert (ApprovalStatus.USED in seen[n]) == (consumed[n] == 1)
            if ApprovalStatus.DENIED in seen[n]:
                assert ApprovalStatus.APPROVED not in seen[n]
                assert consumed[n] == 0
    finally:
        store.close()


def test_an_approvals_table_from_an_earlier_version_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SQLiteStateStore(path).close()  # a state database, as the engine makes it
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TABLE approvals (id TEXT PRIMARY KEY, skill_id TEXT NOT NULL, agent_id TEXT"
            " NOT NULL, params TEXT NOT NULL, fingerprint TEXT NOT NULL, policy TEXT,"
            " policy_index INTEGER, reason TEXT NOT NULL, created_at REAL NOT NULL, expires_at"
            " REAL NOT NULL, status TEXT NOT NULL, decided_by TEXT, decided_at REAL, note TEXT"
            " NOT NULL, used_at REAL) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO approvals VALUES ('old-1', 'finance.spend', 'agent-1', '{\"a\":1}',"
            " 'f', NULL, 0, 'why', 1.0, 9e9, 'pending', NULL, NULL, '', NULL)"
        )
    store = SQLiteApprovalStore(path)
    kept = store.get("old-1", 2.0)
    assert kept is not None
    assert (kept.decimals, kept.action, kept.params) == ((), "", {"a": 1})
    store.create(new_request())  # the new columns are written too
    assert len(store.pending(T0)) == 2
    store.close()


def test_a_postgres_approvals_table_from_an_earlier_version_gains_the_new_columns() -> None:
    import psycopg
    from psycopg import sql

    schema = f"{servers.RUN}_old_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.approvals (id text PRIMARY KEY, skill_id text NOT NULL,"
                " agent_id text NOT NULL, params text NOT NULL, fingerprint text NOT NULL,"
                " policy text, policy_index bigint, reason text NOT NULL, created_at float8"
                " NOT NULL, expires_at float8 NOT NULL, status text NOT NULL, decided_by text,"
                " decided_at float8, note text NOT NULL, used_at float8)"
            ).format(sql.Identifier(schema))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.approvals VALUES ('old-1', 'finance.spend', 'agent-1',"
                " '{{\"a\":1}}', 'f', NULL, 0, 'why', 1.0, 9e9, 'pending', NULL, NULL, '', NULL)"
            ).format(sql.Identifier(schema))
        )
    store = PostgresApprovalStore(servers.POSTGRES_URL, schema=schema)
    try:
        kept = store.get("old-1", 2.0)
        assert kept is not None
        assert (kept.decimals, kept.action, kept.waived, kept.params) == ((), "", (), {"a": 1})
        store.create(new_request())
        assert len(store.pending(T0)) == 2
    finally:
        store.close()
