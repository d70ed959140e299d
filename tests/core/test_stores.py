"""The state-store contract, once, on every backend of the ``store`` matrix (tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from functools import reduce

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.core.errors import LimenexConfigError, StateStoreError
from limenex.core.state import (
    EXACT,
    OPERATORS,
    Check,
    CounterKey,
    Reservation,
    StateBreach,
    StateStore,
)
from limenex.core.window import Window

T0 = datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp()  # a Tuesday
MakeStore = Callable[..., StateStore]


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Epoch seconds of a UTC moment."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def check(
    amount: str = "10",
    op: str = "lte",
    limit: str = "100",
    *,
    dimension: str = "spend_usd",
    subject: str = "agent-1",
    scope: str = "agent",
    window: str = "",
) -> Check:
    key = CounterKey(dimension, scope, subject, window)
    return Check(
        0, key, Window.parse(window) if window else None, Decimal(amount), op, Decimal(limit)
    )


def total(store: StateStore, of: Check, now: float = T0) -> Decimal:
    return store.peek([of], now)[0]


def reserved(store: StateStore, checks: list[Check], now: float = T0) -> Reservation:
    outcome = store.reserve(checks, now)
    assert isinstance(outcome, Reservation), outcome
    return outcome


def plus(*amounts: Decimal | str) -> Decimal:
    """The exact sum (the default decimal context would round it)."""
    return reduce(EXACT.add, (Decimal(a) for a in amounts), Decimal(0))


def settled(store: StateStore, how: str, reservation: Reservation, now: float = T0) -> None:
    """``commit`` or ``release`` the reservation (a release at ``now``)."""
    if how == "commit":
        store.commit(reservation)
    else:
        store.release(reservation, now)


# --- reserve ---------------------------------------------------------------------------------


def test_reservation_reports_totals_before_and_counts_the_amount(store: StateStore) -> None:
    spend = check("30")
    first = reserved(store, [spend])
    second = reserved(store, [spend])
    assert first.observed == (Decimal(0),)
    assert second.observed == (Decimal(30),)
    assert total(store, spend) == Decimal(60)


def test_breach_reports_the_first_failing_check_with_observed_and_projected(
    store: StateStore,
) -> None:
    store.commit(reserved(store, [check("40", dimension="calls")]))
    checks = [
        check("5", "lte", "100"),
        check("70", "lt", "100", dimension="calls"),  # 40 + 70 = 110: fails first
        check("5", "lt", "1"),  # would fail too
    ]
    outcome = store.reserve(checks, T0)
    assert isinstance(outcome, StateBreach)
    assert (outcome.position, outcome.observed, outcome.projected) == (1, 40, 110)


def test_breach_changes_nothing(store: StateStore) -> None:
    store.commit(reserved(store, [check("20", dimension="calls")]))
    before = (store.totals(T0), store.pending(T0))
    outcome = store.reserve([check("5"), check("90", "lt", "100", dimension="calls")], T0)
    assert isinstance(outcome, StateBreach)
    assert (store.totals(T0), store.pending(T0)) == before


def test_several_keys_are_reserved_all_or_nothing(store: StateStore) -> None:
    a, b = check("10", limit="100"), check("10", limit="15", dimension="calls")
    reserved(store, [a, b])
    assert isinstance(store.reserve([a, b], T0), StateBreach)
    assert (total(store, a), total(store, b)) == (10, 10)


def test_two_checks_on_one_key_add_its_amount_once(store: StateStore) -> None:
    per_day, hard_cap = check("30", "lte", "100"), check("999", "lt", "50")
    reservation = reserved(store, [per_day, hard_cap])  # the first check's amount: 30
    assert reservation.observed == (0, 0)
    assert total(store, per_day) == Decimal(30)
    assert isinstance(store.reserve([per_day, hard_cap], T0), StateBreach)  # 60 < 50 fails


def test_scopes_and_subjects_are_independent_totals(store: StateStore) -> None:
    by_agent = check("10", subject="agent-1")
    other_agent = check("10", subject="agent-2")
    everyone = check("10", scope="global", subject="")
    pair = check("10", scope="agent+recipient", subject='["agent-1", "bob"]')
    for c in (by_agent, by_agent, other_agent, everyone, pair):
        reserved(store, [c])
    assert [total(store, c) for c in (by_agent, other_agent, everyone, pair)] == [20, 10, 10, 10]


def test_each_operator_compares_the_projected_total(store: StateStore) -> None:
    store.commit(reserved(store, [check("10")]))
    outcomes = {
        op: isinstance(store.reserve([check("0", op, "10")], T0), Reservation)
        for op in ("lt", "lte", "gt", "gte", "eq", "neq")
    }
    assert outcomes == {
        "lt": False,
        "lte": True,
        "gt": False,
        "gte": True,
        "eq": True,
        "neq": False,
    }


def test_a_reserved_dimension_name_is_refused(store: StateStore) -> None:
    with pytest.raises(StateStoreError, match="reserved"):
        store.reserve([check(dimension="__limenex__")], T0)


# --- settle ----------------------------------------------------------------------------------


def test_commit_keeps_the_amount_and_ends_the_pending_record(store: StateStore) -> None:
    spend = check("30")
    reservation = reserved(store, [spend])
    assert [p.id for p in store.pending(T0)] == [reservation.id]
    store.commit(reservation)
    assert store.pending(T0) == []
    assert total(store, spend) == Decimal(30)


def test_release_undoes_exactly_that_reservation(store: StateStore) -> None:
    spend = check("30")
    kept = reserved(store, [spend])
    undone = reserved(store, [check("12.5"), check("1", dimension="calls")])
    store.release(undone, T0)
    assert total(store, spend) == Decimal(30)
    assert total(store, check(dimension="calls")) == 0
    assert [p.id for p in store.pending(T0)] == [kept.id]


@pytest.mark.parametrize(
    "settle", [["commit", "commit"], ["release", "release"], ["commit", "release"]]
)
def test_settling_twice_changes_nothing_the_second_time(
    store: StateStore, settle: list[str]
) -> None:
    spend = check("30")
    store.commit(reserved(store, [spend]))
    reservation = reserved(store, [spend])
    settled(store, settle[0], reservation)
    after_first = total(store, spend)
    settled(store, settle[1], reservation)
    assert total(store, spend) == after_first
    assert store.pending(T0) == []


def test_release_after_the_lease_expired_leaves_the_amount_counted(make_store: MakeStore) -> None:
    store = make_store(lease_seconds=60.0)
    spend = check("30")
    reservation = reserved(store, [spend])
    assert store.pending(T0 + 59.9) != []
    assert store.pending(T0 + 60) == []  # expired: dropped, still counted
    store.release(reservation, T0 + 60)
    assert total(store, spend) == Decimal(30)


@pytest.mark.parametrize("reserve_in_between", [False, True], ids=["alone", "after-a-reserve"])
@pytest.mark.parametrize("window", ["", "1h", "day"])
def test_a_release_at_or_after_expiry_is_ignored_whatever_ran_in_between(
    store: StateStore, window: str, reserve_in_between: bool
) -> None:
    """Whether some other call expired the hold first must not decide the total."""
    assert store.lease_seconds == 300.0
    spend = check("30", window=window)
    late = reserved(store, [spend], T0)
    if reserve_in_between:
        reserved(store, [check("1", dimension="calls")], T0 + 500)
    store.release(late, T0 + 1000)
    assert total(store, spend, T0 + 1000) == Decimal(30)
    assert store.pending(T0 + 1000) == []


def test_a_release_just_before_expiry_still_undoes(store: StateStore) -> None:
    spend = check("30")
    reservation = reserved(store, [spend], T0)
    store.release(reservation, T0 + store.lease_seconds - 0.001)
    assert total(store, spend) == 0


def test_a_reserve_drops_expired_pending_records_but_keeps_their_amounts(
    make_store: MakeStore,
) -> None:
    store = make_store(lease_seconds=60.0)
    spend = check("30")
    orphan = reserved(store, [spend])
    later = reserved(store, [spend], T0 + 61)
    assert [p.id for p in store.pending(T0 + 61)] == [later.id]
    store.release(orphan, T0 + 61)
    assert total(store, spend, T0 + 61) == Decimal(60)


def test_a_reservation_from_another_store_changes_nothing(make_store: MakeStore) -> None:
    spend = check("30")
    mine, other = make_store(), make_store()
    kept = reserved(mine, [spend])
    foreign = reserved(other, [spend])  # may carry the same id as ``kept``
    mine.release(foreign, T0)
    mine.commit(foreign)
    assert total(mine, spend) == Decimal(30)
    assert [p.id for p in mine.pending(T0)] == [kept.id]


@pytest.mark.parametrize("lease", [0, -1.0, float("nan"), float("inf"), True])
def test_a_lease_must_be_a_positive_number_of_seconds(make_store: MakeStore, lease: float) -> None:
    with pytest.raises(LimenexConfigError, match="lease_seconds"):
        make_store(lease_seconds=lease)


def test_pending_lists_amounts_times_and_owner(store: StateStore) -> None:
    spend, calls = check("30"), check("1", dimension="calls")
    reservation = reserved(store, [spend, calls])
    (pending,) = store.pending(T0)
    assert pending.id == reservation.id
    assert (pending.created_at, pending.expires_at) == (T0, T0 + store.lease_seconds)
    assert pending.amounts == ((spend.key, Decimal(30)), (calls.key, Decimal(1)))
    assert pending.owner == f"{socket.gethostname()}:{os.getpid()}"


# --- windows ---------------------------------------------------------------------------------


def test_rolling_amount_stops_counting_exactly_at_t_plus_window(store: StateStore) -> None:
    spend = check("5", "lte", "5", window="10s")
    reserved(store, [spend], 100.0)
    assert total(store, spend, 109.999) == Decimal(5)
    assert isinstance(store.reserve([spend], 109.999), StateBreach)
    assert total(store, spend, 110.0) == 0
    assert isinstance(store.reserve([spend], 110.0), Reservation)


def test_rolling_release_removes_exactly_its_entry(store: StateStore) -> None:
    spend = check("5", window="10s")
    first = reserved(store, [spend], 100.0)
    reserved(store, [spend], 104.0)
    store.release(first, 104.0)
    assert total(store, spend, 104.0) == Decimal(5)
    assert total(store, spend, 113.999) == Decimal(5)
    assert total(store, spend, 114.0) == 0


@pytest.mark.parametrize(
    ("window", "recorded", "last_in", "first_out"),
    [
        ("hour", at(2026, 3, 10, 9, 15), at(2026, 3, 10, 9, 59, 59), at(2026, 3, 10, 10)),
        ("day", at(2026, 3, 10, 0), at(2026, 3, 10, 23, 59, 59), at(2026, 3, 11)),
        ("week", at(2026, 3, 9, 8), at(2026, 3, 15, 23, 59, 59), at(2026, 3, 16)),  # Mon..Sun
        ("month", at(2026, 2, 1), at(2026, 2, 28, 23, 59, 59), at(2026, 3, 1)),
    ],
)
def test_calendar_total_lasts_until_its_period_ends(
    store: StateStore, window: str, recorded: float, last_in: float, first_out: float
) -> None:
    spend = check("7", "lte", "7", window=window)
    reserved(store, [spend], recorded)
    assert total(store, spend, last_in) == Decimal(7)
    assert isinstance(store.reserve([spend], last_in), StateBreach)
    assert total(store, spend, first_out) == 0
    assert isinstance(store.reserve([spend], first_out), Reservation)


_hour_starts = st.builds(  # near hour, day and month edges, where periods roll over
    at, st.integers(2000, 2099), st.integers(1, 12), st.integers(1, 28), st.integers(0, 23)
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    window=st.sampled_from(["hour", "day", "week", "month"]),
    first=st.tuples(_hour_starts, st.floats(min_value=-7200, max_value=7200)).map(sum),
    laters=st.lists(
        st.floats(min_value=0, max_value=7200) | st.floats(min_value=0, max_value=40 * 86400),
        min_size=1,
        max_size=20,
    ),
)
def test_a_calendar_total_counts_exactly_while_its_period_lasts(
    make_store: MakeStore, window: str, first: float, laters: list[float]
) -> None:
    store = make_store()
    spend = check("7", window=window)
    reserved(store, [spend], first)
    period = Window.parse(window).bucket
    for later in sorted(laters):
        same = period(first + later) == period(first)
        assert total(store, spend, first + later) == (7 if same else 0), later


def test_calendar_release_undoes_only_in_the_period_it_was_made(store: StateStore) -> None:
    spend = check("7", window="day")
    yesterday = reserved(store, [spend], at(2026, 3, 10, 23))
    reserved(store, [spend], at(2026, 3, 11, 1))
    store.release(yesterday, at(2026, 3, 11, 1))
    assert total(store, spend, at(2026, 3, 11, 2)) == Decimal(7)


def test_totals_lists_live_totals_only(store: StateStore) -> None:
    plain, rolling, daily = check("1"), check("2", window="10s"), check("3", window="day")
    reserved(store, [plain, rolling, daily], at(2026, 3, 10, 23, 59, 55))
    assert dict(store.totals(at(2026, 3, 10, 23, 59, 56))) == {
        plain.key: 1,
        rolling.key: 2,
        daily.key: 3,
    }
    assert dict(store.totals(at(2026, 3, 11, 0, 0, 5))) == {plain.key: 1}


# --- exact totals ----------------------------------------------------------------------------


def test_a_hundred_dimes_reach_ten_exactly_and_the_next_fails(store: StateStore) -> None:
    dime = check("0.1", "lte", "10")
    for _ in range(100):
        store.commit(reserved(store, [dime]))
    assert total(store, dime) == Decimal("10.0")
    outcome = store.reserve([dime], T0)
    assert isinstance(outcome, StateBreach)
    assert outcome.projected == Decimal("10.1")


@pytest.mark.parametrize(
    ("recorded", "amount"),
    [("1E+95", "0.1"), ("0", "1E+200"), ("0.1", "1E-30"), ("999999999999999999999999999999", "1")],
)
def test_a_sum_is_kept_exactly_or_refused_never_rounded(
    store: StateStore, recorded: str, amount: str
) -> None:
    """Each store has its own range; outside it an operation raises and changes nothing."""
    spend = check(recorded, "lte", "1E+300")
    try:
        store.commit(reserved(store, [spend]))
    except StateStoreError as exc:
        assert "exact" in str(exc)  # noqa: PT017 - refusing is one of two allowed outcomes
        assert store.totals(T0) == []
        return
    assert total(store, spend) == Decimal(recorded)
    try:
        store.commit(reserved(store, [check(amount, "lte", "1E+300")]))
    except StateStoreError as exc:
        assert "exact" in str(exc)  # noqa: PT017 - refusing is one of two allowed outcomes
        assert total(store, spend) == Decimal(recorded)
    else:
        assert total(store, spend) == plus(recorded, amount)  # exact, not rounded
    assert store.pending(T0) == []
    before = total(store, spend)
    store.commit(reserved(store, [check("1", "lte", "1E+300")]))  # still exact and usable
    assert total(store, spend) == plus(before, "1")


def test_every_amount_the_engine_allows_adds_up_exactly(store: StateStore) -> None:
    """Amounts below 1E+30 with up to 18 places, and totals of many of them, are kept exactly."""
    largest = Decimal("999999999999999999999999999999.999999999999999999")
    smallest = Decimal("0.000000000000000001")
    for amount in (largest, smallest, largest, Decimal("0.1")):
        store.commit(reserved(store, [check(str(amount), "lte", "1E+40")]))
    assert total(store, check()) == plus(largest, largest, smallest, "0.1")


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity", "sNaN", "-0.01"])
def test_a_non_finite_or_negative_amount_is_refused(store: StateStore, amount: str) -> None:
    with pytest.raises(StateStoreError):
        store.reserve([check(amount, "neq", "1")], T0)
    assert store.totals(T0) == []


# --- adjust, peek, reset ---------------------------------------------------------------------


@pytest.mark.parametrize("window", ["", "10s", "day"])
def test_adjust_adds_and_refunds_never_below_zero(store: StateStore, window: str) -> None:
    spend = check("10", window=window)
    store.commit(reserved(store, [spend]))
    assert store.adjust(spend.key, Decimal("2.5"), T0, spend.window) == Decimal("12.5")
    assert store.adjust(spend.key, Decimal("-5"), T0) == Decimal("7.5")
    assert total(store, spend) == Decimal("7.5")
    assert store.adjust(spend.key, Decimal(-100), T0) == 0
    assert total(store, spend) == 0
    assert total(store, spend, T0 + 20) == 0  # a rolling refund cannot surface later


def test_a_rolling_refund_consumes_the_oldest_entries_first(store: StateStore) -> None:
    spend = check("4", window="10s")
    store.commit(reserved(store, [spend], 100.0))
    store.commit(reserved(store, [spend], 105.0))
    assert store.adjust(spend.key, Decimal(-5), 106.0, spend.window) == Decimal(3)
    assert total(store, spend, 109.999) == Decimal(3)  # 4 - 4 at 100, 4 - 1 at 105
    assert total(store, spend, 110.0) == Decimal(3)
    assert total(store, spend, 115.0) == 0


@pytest.mark.parametrize("window", ["", "10s", "day"])
def test_a_refund_cannot_let_a_later_release_erase_another_reservations_spend(
    store: StateStore, window: str
) -> None:
    spend = check("40", window=window)
    pending = reserved(store, [spend])
    # The refund cannot take the pending 40: its release will do that.
    assert store.adjust(spend.key, Decimal(-40), T0, spend.window) == Decimal(40)
    store.commit(reserved(store, [spend]))
    store.release(pending, T0)
    assert total(store, spend) == Decimal(40)  # the committed reservation's spend
    assert store.adjust(spend.key, Decimal(-40), T0, spend.window) == 0  # nothing pending now


@pytest.mark.parametrize("window", ["", "10s", "day"])
def test_a_refund_is_clamped_to_the_pending_amounts_not_blocked_by_them(
    store: StateStore, window: str
) -> None:
    spend = check("10", window=window)
    store.commit(reserved(store, [spend]))
    pending = reserved(store, [check("25", window=window)])
    assert store.adjust(spend.key, Decimal(-30), T0, spend.window) == Decimal(25)
    store.release(pending, T0)
    assert total(store, spend) == 0


def test_a_rolling_refund_leaves_pending_entries_for_their_release(store: StateStore) -> None:
    spend = check("4", window="10s")
    pending = reserved(store, [spend], 100.0)
    store.commit(reserved(store, [spend], 105.0))
    assert store.adjust(spend.key, Decimal(-4), 106.0, spend.window) == Decimal(4)
    store.release(pending, 107.0)
    assert total(store, spend, 107.0) == 0


def test_a_refund_ignores_pending_amounts_of_an_earlier_calendar_period(
    make_store: MakeStore,
) -> None:
    store = make_store(lease_seconds=7200.0)
    spend = check("40", window="day")
    yesterday = reserved(store, [spend], at(2026, 3, 10, 23, 30))
    store.commit(reserved(store, [spend], at(2026, 3, 11, 0, 10)))
    assert store.adjust(spend.key, Decimal(-40), at(2026, 3, 11, 0, 20), spend.window) == 0
    store.release(yesterday, at(2026, 3, 11, 0, 30))
    assert total(store, spend, at(2026, 3, 11, 0, 40)) == 0


@pytest.mark.parametrize("window", ["", "1h", "day"])
def test_a_refund_can_take_the_amount_of_an_expired_reservation(
    store: StateStore, window: str
) -> None:
    """An expired reservation cannot be released any more: its amount is the operator's."""
    spend = check("40", window=window)
    orphan = reserved(store, [spend], T0)
    now = T0 + store.lease_seconds
    assert store.adjust(spend.key, Decimal(-40), now, spend.window) == 0
    store.release(orphan, now)
    assert total(store, spend, now) == 0
    assert store.pending(now) == []


def test_peek_changes_nothing(store: StateStore) -> None:
    spend = check("30")
    store.commit(reserved(store, [spend]))
    before = store.totals(T0)
    assert store.peek([spend, check(dimension="unseen")], T0) == (Decimal(30), 0)
    assert store.totals(T0) == before
    assert store.pending(T0) == []


def test_reset_forgets_one_dimension_or_everything(store: StateStore) -> None:
    spend, calls = check("30"), check("1", dimension="calls")
    reserved(store, [spend, calls])
    store.reset("spend_usd")
    assert (total(store, spend), total(store, calls)) == (0, 1)
    (pending,) = store.pending(T0)
    assert pending.amounts == ((calls.key, Decimal(1)),)
    store.reset()
    assert (store.totals(T0), store.pending(T0)) == ([], [])


def test_release_after_a_reset_cannot_take_a_later_amount(store: StateStore) -> None:
    spend = check("30")
    before_reset = reserved(store, [spend])
    store.reset("spend_usd")
    store.commit(reserved(store, [spend]))
    store.release(before_reset, T0)
    assert total(store, spend) == Decimal(30)


# --- async and concurrency -------------------------------------------------------------------


async def test_async_methods_behave_like_the_sync_ones(store: StateStore) -> None:
    spend = check("30", "lt", "50")
    first = await store.areserve([spend], T0)
    assert isinstance(first, Reservation)
    await store.acommit(first)
    assert isinstance(await store.areserve([spend], T0), StateBreach)
    second = await store.areserve([check("15", "lt", "50")], T0)
    assert isinstance(second, Reservation)
    await store.arelease(second, T0)
    assert await store.apeek([spend], T0) == (Decimal(30),)


@pytest.mark.parametrize(("attempts", "limit"), [(1, 7), (20, 400)])
def test_racing_threads_reserve_exactly_up_to_the_limit(
    store: StateStore, attempts: int, limit: int
) -> None:
    """40 threads, each reserving ``attempts`` times: no overspend, no lost update."""
    calls = check("1", "lte", str(limit), dimension="calls")
    start = threading.Barrier(40)
    won: list[Reservation] = []

    def call() -> None:
        start.wait()
        for _ in range(attempts):
            outcome = store.reserve([calls], T0)
            if isinstance(outcome, Reservation):
                won.append(outcome)

    threads = [threading.Thread(target=call) for _ in range(40)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert len(won) == limit
    assert total(store, calls) == Decimal(limit)


_actions = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.decimals(min_value=0, max_value=60, places=2)),
        st.tuples(st.sampled_from(["commit", "release"]), st.integers(min_value=0)),
    ),
    max_size=25,
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    actions=_actions,
    limit=st.decimals(min_value=0, max_value=200, places=2),
    op=st.sampled_from(["lt", "lte"]),
)
def test_total_is_the_sum_of_unreleased_reservations_and_never_passes_the_limit(
    make_store: MakeStore,
    actions: list[tuple[str, object]],
    limit: Decimal,
    op: str,
) -> None:
    store = make_store()
    holds = OPERATORS[op]
    open_: list[tuple[Reservation, Decimal]] = []
    expected, ever_reserved = Decimal(0), False
    for action, value in actions:
        if action == "reserve":
            amount = Decimal(str(value))
            outcome = store.reserve([Check(0, check().key, None, amount, op, limit)], T0)
            assert isinstance(outcome, Reservation) is holds(expected + amount, limit)
            if isinstance(outcome, Reservation):
                open_.append((outcome, amount))
                expected += amount
                ever_reserved = True
        elif open_:
            reservation, amount = open_.pop(int(str(value)) % len(open_))
            settled(store, action, reservation)
            if action == "release":
                expected -= amount
        observed = total(store, check())
        assert observed == expected
        assert observed <= limit
        assert holds(observed, limit) or not ever_reserved
