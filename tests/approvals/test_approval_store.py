"""Approval requests and their stores: lifecycle, refusals, expiry, races, persistence."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.approvals import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStore,
    ApprovalStoreError,
    InMemoryApprovalStore,
    SQLiteApprovalStore,
    canonical_json,
    canonical_params,
    decimal_paths,
    fingerprint,
    request_from_decision,
)
from limenex.core.decision import Decision, Verdict
from limenex.core.errors import (
    CorruptStateError,
    InvalidArgumentError,
    LimenexConfigError,
    StateStoreError,
)
from limenex.core.policy import DeterministicPolicy
from limenex.core.state import Check, CounterKey, Reservation
from limenex.core.stores import SQLiteStateStore

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

BACKENDS = ["memory", "sqlite"]


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


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Stores of one backend; the SQLite ones all open the same file (same requests)."""
    made: list[ApprovalStore] = []
    memory = InMemoryApprovalStore()

    def make() -> ApprovalStore:
        store: ApprovalStore
        if request.param == "memory":
            store = memory
        else:
            store = SQLiteApprovalStore(tmp_path / "state" / "state.db")
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
    store: ApprovalStore = (
        InMemoryApprovalStore()
        if backend == "memory"
        else SQLiteApprovalStore(tmp_path_factory.mktemp("machine") / "state.db")
    )
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
