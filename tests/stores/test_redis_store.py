"""What is specific to the Redis store, against the real server on 127.0.0.1.

The behaviour every store shares is in ``tests/core/test_stores.py`` and the engine tests
(``-k redis``). Here: one round trip per governed call (counted by the server), the script
coming back after ``SCRIPT FLUSH``, clear and quick failures, reconnection, isolation of
prefixes, four processes racing on one key, the exact decimal arithmetic of the Lua script
against Python's ``Decimal``, and the connections' life cycle across event loops.

Every store gets a prefix of its own under this run's ``RUN``; its keys are removed after
the test (and the run's, by the session fixture in ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.core.engine import BlockedError, PolicyEngine
from limenex.core.errors import LimenexConfigError, StateStoreError
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import EXACT, OPERATORS, Check, CounterKey, Reservation, StateBreach
from limenex.core.stores import InMemoryStateStore
from limenex.core.window import Window
from limenex.stores.redis import LUA_DECIMAL, SCRIPT_SHA, RedisStateStore
from servers import REDIS_URL, RUN

T0 = 1_773_144_000.0  # 2026-03-10T12:00:00Z
MakeRedis = Callable[..., RedisStateStore]


def check(
    amount: str = "1",
    op: str = "lte",
    limit: str = "1000",
    *,
    subject: str = "agent-1",
    window: str = "",
    dimension: str = "spend_usd",
) -> Check:
    key = CounterKey(dimension, "agent", subject, window)
    return Check(
        0, key, Window.parse(window) if window else None, Decimal(amount), op, Decimal(limit)
    )


def reserved(store: RedisStateStore, checks: list[Check], now: float = T0) -> Reservation:
    outcome = store.reserve(checks, now)
    assert isinstance(outcome, Reservation), outcome
    return outcome


async def areserved(store: RedisStateStore, checks: list[Check], now: float = T0) -> Reservation:
    outcome = await store.areserve(checks, now)
    assert isinstance(outcome, Reservation), outcome
    return outcome


def total(store: RedisStateStore, of: Check, now: float = T0) -> Decimal:
    return store.peek([of], now)[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def make(server: redis.Redis) -> Iterator[MakeRedis]:
    """Make stores on fresh prefixes; close them and delete their keys afterwards."""
    made: list[RedisStateStore] = []

    def make_store(url: str = REDIS_URL, **options: Any) -> RedisStateStore:
        options.setdefault("prefix", f"{RUN}:t{uuid.uuid4().hex[:8]}")
        store = RedisStateStore(url, **options)
        made.append(store)
        return store

    yield make_store
    for store in made:
        store.close()
        keys = list(server.scan_iter(match="{" + store.prefix + "}:*", count=1000))
        if keys:
            server.unlink(*keys)


def evalsha_calls(server: redis.Redis) -> int:
    stats = server.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def client_ids(server: redis.Redis, name: str) -> list[str]:
    return [str(client["id"]) for client in server.client_list() if client["name"] == name]


# --- one round trip ------------------------------------------------------------------------


def test_a_reserve_and_its_commit_are_one_round_trip(make: MakeRedis, server: redis.Redis) -> None:
    """The server's slow log (threshold 0) lists every command a client sent, none of the
    commands a script ran: a reserve + commit is one EVALSHA; the commit rides on the next."""
    name = f"lxt-{uuid.uuid4().hex[:8]}"
    store = make(f"{REDIS_URL}?client_name={name}")
    spend = check("5")
    store.commit(reserved(store, [spend]))  # connect and load the script first
    threshold = server.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    server.config_set("slowlog-log-slower-than", 0)
    try:
        server.slowlog_reset()
        before = evalsha_calls(server)
        first = reserved(store, [spend])
        store.commit(first)
        after = evalsha_calls(server)
        sent = [
            _text(e["command"]) for e in server.slowlog_get(128) if _text(e["client_name"]) == name
        ]
    finally:
        server.config_set("slowlog-log-slower-than", threshold)
    assert after - before == 1
    assert len(sent) == 1
    assert sent[0].startswith(f"EVALSHA {SCRIPT_SHA} 1 ")
    # The queued commit went out with the next operation: the record is gone.
    second = reserved(store, [spend])
    assert [p.id for p in store.pending(T0)] == [second.id]
    assert total(store, spend) == Decimal(15)


async def test_concurrent_async_calls_share_script_calls(
    make: MakeRedis, server: redis.Redis
) -> None:
    """Reserves issued while a call is in flight go out together, each judged in order."""
    store = make()
    spend = check("1", "lte", "150")
    before = evalsha_calls(server)
    outcomes = await asyncio.gather(*(store.areserve([spend], T0) for _ in range(200)))
    calls = evalsha_calls(server) - before
    won = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(won) == 150
    assert sorted(o.observed[0] for o in won) == [Decimal(n) for n in range(150)]
    assert all(isinstance(o, StateBreach) and o.observed == 150 for o in outcomes if o not in won)
    assert calls < 20  # far fewer script calls than reserves
    for reservation in won[:50]:
        await store.arelease(reservation, T0)
    for reservation in won[50:]:
        await store.acommit(reservation)
    assert await store.apeek([spend], T0) == (Decimal(100),)
    assert store.pending(T0) == []
    await store.aclose()


# --- the script ----------------------------------------------------------------------------


def test_the_script_is_sent_again_after_script_flush(make: MakeRedis, server: redis.Redis) -> None:
    store = make()
    spend = check("2")
    store.commit(reserved(store, [spend]))
    server.script_flush()
    assert server.script_exists(SCRIPT_SHA) == [False]
    store.commit(reserved(store, [spend]))  # NOSCRIPT, then EVAL of the script: one retry
    assert server.script_exists(SCRIPT_SHA) == [True]

    async def again() -> None:
        server.script_flush()
        assert isinstance(await store.areserve([spend], T0), Reservation)
        await store.aclose()

    asyncio.run(again())
    assert total(store, spend) == Decimal(6)


def test_keys_share_the_prefix_hash_tag_and_the_layout(
    make: MakeRedis, server: redis.Redis
) -> None:
    store = make()
    checks = [check("1"), check("2", window="day"), check("3", window="10s")]
    reserved(store, checks)
    tag = "{" + store.prefix + "}:"
    keys = set(server.scan_iter(match=tag + "*"))
    assert {key[len(tag) :].split(":", 1)[0] for key in keys} == {"p", "c", "s", "r", "t", "h", "x"}
    assert all(key.startswith(tag) for key in keys)  # one hash tag: one cluster slot


def test_time_is_the_callers_now_not_the_servers(make: MakeRedis) -> None:
    store = make(lease_seconds=60.0)
    long_ago = 946_684_800.0  # 2000-01-01
    first = reserved(store, [check("1", window="day")], long_ago)
    (pending,) = store.pending(long_ago)
    assert (pending.id, pending.created_at, pending.expires_at) == (
        first.id,
        long_ago,
        long_ago + 60.0,
    )
    assert store.pending(long_ago + 60.0) == []
    assert total(store, check(window="day"), long_ago + 86_400) == 0


def test_a_reserve_drops_a_bounded_number_of_expired_records(
    make: MakeRedis, server: redis.Redis
) -> None:
    store = make(lease_seconds=1.0)
    spend = check("1", "lte", "1E+6")
    for _ in range(100):
        reserved(store, [spend])  # never settled: each expires at T0 + 1
    expiry = "{" + store.prefix + "}:x"
    assert server.zcard(expiry) == 100
    reserved(store, [spend], T0 + 5)
    dropped = 100 + 1 - server.zcard(expiry)
    assert 1 <= dropped <= 16  # bounded work per call, whatever the backlog
    assert len(store.pending(T0 + 5)) == 1  # the operator path drops them all
    assert total(store, spend, T0 + 5) == Decimal(101)  # expired amounts stay counted


def test_rolling_entries_are_pruned_as_they_expire(make: MakeRedis, server: redis.Redis) -> None:
    store = make()
    spend = check("1", "lte", "1E+6", window="10s")
    for n in range(250):
        store.commit(reserved(store, [spend], T0 + n * 0.01))
    entries = "{" + store.prefix + "}:r:9:spend_usd5:agent3:10s:agent-1"
    assert server.llen(entries) == 250
    assert total(store, spend, T0 + 10.995) == Decimal(150)  # those at T0 + 1.00 ... + 2.49
    assert server.llen(entries) == 150
    assert total(store, spend, T0 + 20) == 0
    assert server.exists(entries) == 0


# --- exact decimals --------------------------------------------------------------------------

_ARITHMETIC = (
    LUA_DECIMAL
    + """
local out = {}
for k = 1, #ARGV, 2 do
  local a, b = dparse(ARGV[k]), dparse(ARGV[k + 1])
  local sum = dadd(a, b)
  local exact = Z
  if dcmp(a, b) >= 0 then exact = dsub(a, b) end
  out[#out + 1] = {dfmt(a), dfmt(sum), dwide(sum) and '1' or '0', dfmt(dsub0(a, b)),
    dfmt(exact), tostring(dcmp(a, b))}
end
return out
"""
)


@st.composite
def decimals(draw: st.DrawFn, digits: int = 30) -> Decimal:
    """Non-negative decimals the store keeps: up to ``digits`` digits before the point, up
    to 18 places, and 96 significant digits in all."""
    whole = draw(st.integers(0, 10**digits - 1) | st.sampled_from([0, 1, 10**digits - 1]))
    places = min(draw(st.integers(0, 18)), 96 - len(str(whole)) if whole else 18)
    fraction = draw(st.integers(0, 10**places - 1)) if places else 0
    return Decimal(f"{whole}.{fraction:0{places}d}") if places else Decimal(whole)


def same(a: Decimal, b: Decimal) -> bool:
    """Equal in value and in the places shown (``30.0`` is not ``30``)."""
    return a.compare_total(b) == 0


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(decimals(), decimals())
        | st.tuples(decimals(96), decimals(96))
        | st.tuples(decimals(30), decimals(30)).map(lambda p: (p[0], p[0])),
        min_size=1,
        max_size=20,
    )
)
def test_the_scripts_arithmetic_is_pythons_decimal_exactly(
    pairs: list[tuple[Decimal, Decimal]],
) -> None:
    """Sum, subtraction floored at zero, exact subtraction and comparison, on values up to
    96 digits with up to 18 places, agree with ``EXACT`` digit for digit (places included);
    a sum ``EXACT`` cannot hold is one the script flags as too wide."""
    args = [format(value, "f") for pair in pairs for value in pair]
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        results = client.eval(_ARITHMETIC, 0, *args)
    finally:
        client.close()
    for (a, b), (text, summed, wide, floored, exact, order) in zip(pairs, results, strict=True):
        assert same(Decimal(text), a)
        try:
            expected_sum = EXACT.add(a, b)
        except ArithmeticError:
            assert wide == "1", (a, b)
        else:
            assert wide == "0", (a, b)
            assert same(Decimal(summed), expected_sum), (a, b, summed)
        assert int(order) == (a > b) - (a < b)
        try:
            difference = EXACT.subtract(a, b)
        except ArithmeticError:  # 0.1 - 1E+95 is beyond EXACT too: no store subtracts it
            continue
        assert same(Decimal(floored), difference if difference > 0 else Decimal(0)), (a, b)
        if a >= b:
            assert same(Decimal(exact), difference), (a, b)


_windows = st.sampled_from(["", "10s", "day"])
_amounts = decimals(2) | decimals(30)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), _windows, _amounts, st.sampled_from(["lt", "lte"])),
        st.tuples(st.sampled_from(["commit", "release"]), st.integers(0, 50)),
        st.tuples(st.just("adjust"), _windows, _amounts, st.booleans()),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.5, 4.0, 11.0, 43_200.0])),
    ),
    max_size=25,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=_operations, limit=decimals(3) | decimals(31))
def test_the_store_keeps_totals_as_the_reference_store_does(
    make: MakeRedis, operations: list[tuple[Any, ...]], limit: Decimal
) -> None:
    """Random reserves, settlements, refunds and waits on both stores: the same outcomes,
    the same totals down to the places shown, with 30-digit amounts and 18 places."""
    mine, reference = make(), InMemoryStateStore()
    now = T0
    held: list[tuple[Reservation, Reservation]] = []
    try:
        for operation in operations:
            kind = operation[0]
            if kind == "reserve":
                _, window, amount, op = operation
                checks = [check(str(amount), op, str(limit), window=window)]
                got, want = mine.reserve(checks, now), reference.reserve(checks, now)
                assert type(got) is type(want)
                if isinstance(got, Reservation) and isinstance(want, Reservation):
                    assert all(map(same, got.observed, want.observed)), (got, want)
                    held.append((got, want))
                elif isinstance(got, StateBreach) and isinstance(want, StateBreach):
                    assert same(got.observed, want.observed)
                    assert same(got.projected, want.projected)
            elif kind in ("commit", "release") and held:
                got_r, want_r = held.pop(operation[1] % len(held))
                if kind == "commit":
                    mine.commit(got_r)
                    reference.commit(want_r)
                else:
                    mine.release(got_r, now)
                    reference.release(want_r, now)
            elif kind == "adjust":
                _, window, amount, refund = operation
                key = check(window=window).key
                delta = -amount if refund else amount
                window_ = Window.parse(window) if window else None
                got_total = mine.adjust(key, delta, now, window_)
                assert same(got_total, reference.adjust(key, delta, now, window_))
            elif kind == "wait":
                now += operation[1]
            for window in ("", "10s", "day"):
                of = [check(window=window)]
                assert all(map(same, mine.peek(of, now), reference.peek(of, now))), window
        assert dict(mine.totals(now)) == dict(reference.totals(now))
        pending = sorted(sum(amount for _, amount in p.amounts) for p in mine.pending(now))
        assert pending == sorted(sum(a for _, a in p.amounts) for p in reference.pending(now))
    finally:
        mine.reset()


def test_an_amount_it_cannot_keep_exactly_is_refused_changing_nothing(make: MakeRedis) -> None:
    store = make()
    store.commit(reserved(store, [check("1", "lte", "1E+200")]))
    for amount in ("0.0000000000000000001", "1E+96", "1E-30"):
        with pytest.raises(StateStoreError, match="exact"):
            store.reserve([check(amount, "lte", "1E+200")], T0)
    big = "9" * 90
    store.commit(reserved(store, [check(big, "lte", "1E+200")]))
    with pytest.raises(StateStoreError, match="exact"):  # 90 digits + 18 places > 96
        store.reserve([check("0.000000000000000001", "lte", "1E+200")], T0)
    assert total(store, check()) == EXACT.add(Decimal(big), 1)
    assert store.pending(T0) == []
    # 18 places and 30-digit amounts, as the engine lets through, are kept exactly.
    store.reset()
    largest = Decimal("999999999999999999999999999999.999999999999999999")
    for _ in range(3):
        store.commit(reserved(store, [check(str(largest), "lte", "1E+40")]))
    assert same(total(store, check()), EXACT.multiply(largest, 3))


@pytest.mark.parametrize(
    ("op", "limit", "holds"),
    [
        ("lt", "-1", False),
        ("gt", "-1", True),
        ("lte", "1E+500", True),
        ("gt", "1E+500", False),
        ("eq", "5.0000000000000000001", False),
        ("neq", "5.0000000000000000001", True),
        ("lt", "5.0000000000000000001", True),
        ("gt", "4.9999999999999999999", True),
        ("gte", "5.0000000000000000001", False),
        ("lte", "4.9999999999999999999", False),
    ],
)
def test_any_limit_is_compared_exactly(make: MakeRedis, op: str, limit: str, holds: bool) -> None:
    """Limits beyond what a total can be, or with more places, decide as they would in Python."""
    assert holds is OPERATORS[op](Decimal(5), Decimal(limit))
    store = make()
    outcome = store.reserve([check("5", op, limit)], T0)
    assert isinstance(outcome, Reservation) is holds


# --- failures ------------------------------------------------------------------------------


def test_an_unreachable_server_fails_fast_and_names_it_without_the_password(
    make: MakeRedis,
) -> None:
    port = closed_port()
    store = make(f"redis://user:s3cr3t-pw@127.0.0.1:{port}/0", connect_timeout=1.0)
    assert "s3cr3t-pw" not in repr(store)
    started = time.monotonic()
    with pytest.raises(StateStoreError) as caught:
        store.reserve([check()], T0)
    assert time.monotonic() - started < 1.5
    message = str(caught.value)
    assert f"Redis at 127.0.0.1:{port} is unreachable" in message
    assert "refused" in message.lower()
    assert "s3cr3t-pw" not in message
    assert caught.value.__cause__ is not None

    async def via_the_engine() -> BlockedError:
        engine = PolicyEngine(
            policy_store=InMemoryPolicyStore.from_yaml(
                "finance.spend: {policies: [{type: deterministic, dimension: spend_usd, "
                "param: amount_usd, operator: lte, value: 10, breach_verdict: ESCALATE}]}"
            ),
            state_store=store,
        )
        with pytest.raises(BlockedError) as blocked:
            await engine.execute(
                "finance.spend", "a", {"service": "x", "amount_usd": 1}, lambda: None
            )
        await store.aclose()
        return blocked.value

    blocked = asyncio.run(via_the_engine())
    assert blocked.decision.fail_closed
    assert f"127.0.0.1:{port}" in blocked.decision.reason
    assert "s3cr3t-pw" not in blocked.decision.reason


def test_a_server_that_never_answers_fails_within_the_timeout(make: MakeRedis) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections complete in the backlog, nothing ever answers
        port = listener.getsockname()[1]
        store = make(f"redis://127.0.0.1:{port}/0", connect_timeout=0.5, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StateStoreError, match=f"Redis at 127.0.0.1:{port} did not answer"):
            store.reserve([check()], T0)
        assert time.monotonic() - started < 2.0

        async def hung() -> None:
            started = time.monotonic()
            with pytest.raises(StateStoreError, match="did not answer"):
                await store.areserve([check()], T0)
            assert time.monotonic() - started < 2.0
            await store.aclose()

        asyncio.run(hung())


def test_the_store_reconnects_after_its_connections_are_killed(
    make: MakeRedis, server: redis.Redis
) -> None:
    name = f"lxt-{uuid.uuid4().hex[:8]}"
    store = make(f"{REDIS_URL}?client_name={name}")
    spend = check("1")
    store.commit(reserved(store, [spend]))

    def kill() -> int:
        ids = client_ids(server, name)
        for client_id in ids:
            server.client_kill_filter(_id=client_id)
        return len(ids)

    assert kill() == 1
    store.commit(reserved(store, [spend]))  # no error: the dead connection is replaced

    async def killed_under_a_loop() -> None:
        await store.acommit(await areserved(store, [spend]))
        assert kill() >= 1
        assert isinstance(await store.areserve([spend], T0), Reservation)
        await store.aclose()

    asyncio.run(killed_under_a_loop())
    assert total(store, spend) == Decimal(4)  # nothing recorded was lost


def test_a_store_error_from_the_server_is_a_state_store_error(
    make: MakeRedis, server: redis.Redis
) -> None:
    store = make()
    server.set("{" + store.prefix + "}:t", "not a set")  # someone else's key in our place
    with pytest.raises(StateStoreError, match=re.escape(f"Redis at {store.server} refused")):
        store.totals(T0)


# --- isolation and concurrency -----------------------------------------------------------


def test_two_prefixes_are_isolated(make: MakeRedis) -> None:
    one, two = make(), make()
    spend = check("30")
    mine = reserved(one, [spend])
    theirs = reserved(two, [check("7")])
    assert (total(one, spend), total(two, spend)) == (30, 7)
    two.release(mine, T0)  # not its reservation: nothing happens
    two.commit(mine)
    one.release(theirs, T0)
    assert (total(one, spend), total(two, spend)) == (30, 7)
    assert [p.id for p in one.pending(T0)] == [mine.id]
    assert [p.id for p in two.pending(T0)] == [theirs.id]
    two.reset()
    assert (total(one, spend), two.totals(T0), len(one.pending(T0))) == (30, [], 1)


def _race_worker(prefix: str, limit: int, attempts: int, start: Any, results: Any) -> None:
    """One process: 3 threads (sync connections) and 5 tasks (async) reserving 1 each."""
    store = RedisStateStore(REDIS_URL, prefix=prefix)
    spend = check("1", "lte", str(limit))
    outcomes: list[tuple[Decimal, bool]] = []  # (observed, released)
    lock = threading.Lock()

    def keep(outcome: Reservation | StateBreach, n: int) -> bool:
        if not isinstance(outcome, Reservation):
            return False
        with lock:
            outcomes.append((outcome.observed[0], n % 4 == 0))
        return n % 4 != 0  # every fourth success fails its action: released

    def thread() -> None:
        for n in range(attempts):
            outcome = store.reserve([spend], time.time())
            if isinstance(outcome, Reservation):
                if keep(outcome, n):
                    store.commit(outcome)
                else:
                    store.release(outcome, time.time())

    async def task() -> None:
        for n in range(attempts):
            outcome = await store.areserve([spend], time.time())
            if isinstance(outcome, Reservation):
                if keep(outcome, n):
                    await store.acommit(outcome)
                else:
                    await store.arelease(outcome, time.time())

    async def run() -> None:
        threads = [threading.Thread(target=thread) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.gather(*(task() for _ in range(5)))
        for t in threads:
            t.join()
        await store.aclose()

    start.wait()
    asyncio.run(run())
    store.close()
    results.put(outcomes)


@pytest.mark.slow
def test_four_processes_never_pass_the_limit_and_count_what_ran(
    make: MakeRedis,
) -> None:
    """4 processes x (3 threads + 5 tasks) x 30 reserves of 1 against a limit of 300."""
    store = make()
    limit, attempts = 300, 30
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [
        context.Process(target=_race_worker, args=(store.prefix, limit, attempts, start, results))
        for _ in range(4)
    ]
    for process in workers:
        process.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in workers]
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    won = [entry for outcome in outcomes for entry in outcome]
    kept = sum(1 for _, released in won if not released)
    assert all(observed + 1 <= limit for observed, _ in won)  # none ever passed the limit
    assert len(won) >= limit  # 960 attempts: the limit was reached
    assert total(store, check(), time.time()) == kept  # exactly what ran
    assert store.pending(time.time()) == []


# --- connections and event loops -------------------------------------------------------------


def test_async_connections_close_with_their_event_loop(make: MakeRedis) -> None:
    """A loop that ends (``asyncio.run``) closes its connections; a loop closed abruptly
    leaves them to ``close()``. Neither leaves an unclosed socket behind."""
    store = make()
    spend = check("1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")

        async def use() -> None:
            await store.acommit(await areserved(store, [spend]))
            await asyncio.gather(*(store.apeek([spend], T0) for _ in range(5)))

        asyncio.run(use())  # no aclose: the loop's shutdown closes its connections
        loop = asyncio.new_event_loop()
        loop.run_until_complete(use())
        loop.close()  # without shutdown_asyncgens: its connections are left open
        store.close()  # closes them
        loop = asyncio.new_event_loop()
        loop.run_until_complete(use())
        store.close()  # a loop that is still there but not running
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        gc.collect()
    assert [w for w in seen if issubclass(w.category, ResourceWarning)] == []
    assert total(store, spend) == Decimal(3)


def test_a_closed_store_opens_again_when_used(make: MakeRedis) -> None:
    store = make()
    store.commit(reserved(store, [check()]))
    store.close()
    store.close()
    assert total(store, check()) == 1


def test_many_threads_share_the_store(make: MakeRedis) -> None:
    store = make()
    spend = check("1", "lte", "500")
    won: list[Reservation] = []

    def call() -> None:
        for _ in range(30):
            outcome = store.reserve([spend], T0)
            if isinstance(outcome, Reservation):
                won.append(outcome)
                store.commit(outcome)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 500
    assert total(store, spend) == 500


def test_a_forked_child_uses_its_own_connections(make: MakeRedis) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    store = make()
    store.commit(reserved(store, [check()]))
    context = multiprocessing.get_context("fork")
    child = context.Process(target=lambda: store.commit(reserved(store, [check()])))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    store.commit(reserved(store, [check()]))
    assert total(store, check()) == 3


# --- review: defects found and fixed ---------------------------------------------------------


@pytest.mark.parametrize("option", ["bogus=1", "ssl_cert_reqs=none"])
def test_a_url_option_the_connection_does_not_take_is_refused_up_front(option: str) -> None:
    """Such a URL made a store whose every call raised a raw ``TypeError`` from redis-py (not a
    StateStoreError), dropping the queued commits it had taken: refused when it is made."""
    with pytest.raises(LimenexConfigError, match=option.split("=")[0]):
        RedisStateStore(f"{REDIS_URL}?{option}", prefix=f"{RUN}:t{uuid.uuid4().hex[:8]}")


async def test_a_subject_the_client_cannot_send_fails_only_its_own_call_in_a_batch(
    make: MakeRedis,
) -> None:
    """An agent id with a lone surrogate cannot be encoded: it failed the whole script call
    its reservation rode in, so every other caller batched with it was refused too."""
    store = make()
    subjects = ["agent-a", "bad\ud800", "agent-c", "x" * 10_000 + "\ud800", "agent-e"]
    outcomes = await asyncio.gather(
        *(store.areserve([check("1", subject=subject)], T0) for subject in subjects),
        return_exceptions=True,
    )
    assert [type(outcome) for outcome in outcomes] == [
        Reservation,
        StateStoreError,
        Reservation,
        StateStoreError,
        Reservation,
    ]
    assert "cannot send the subject" in str(outcomes[1])
    with pytest.raises(StateStoreError, match="cannot send the subject"):
        store.reserve([check("1", subject="bad\ud800")], T0)
    assert await store.apeek([check(subject="agent-c")], T0) == (Decimal(1),)
    assert len(store.pending(T0)) == 3
    await store.aclose()


def test_event_loops_of_many_threads_use_one_store_at_once(make: MakeRedis) -> None:
    """Each thread runs loops of its own (``asyncio.run``) on one store: a loop's first call
    went through the store's loops while another thread added one, and failed with a raw
    ``RuntimeError: dictionary changed size during iteration``."""
    store = make()
    spend = check("1", "lte", "1E+6")
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    async def once() -> None:
        await store.acommit(await areserved(store, [spend]))

    def loops() -> None:
        start.wait()
        for _ in range(25):
            try:
                asyncio.run(once())
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=loops) for _ in range(16)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert errors == []
    assert total(store, spend) == 16 * 25
