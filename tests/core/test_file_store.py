"""What only the JSON file store promises: its layout, its durability, and safety across
processes. The behaviour shared by every store is in test_stores.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from limenex.core.errors import CorruptStateError, StateStoreError
from limenex.core.state import Check, CounterKey, Reservation, StateBreach
from limenex.core.stores import LocalFileStateStore
from limenex.core.window import Window

T0 = 1_773_144_000.0  # 2026-03-10T12:00:00Z


def spend(amount: str, op: str = "lt", limit: str = "50", *, window: str = "") -> Check:
    key = CounterKey("spend_usd", "agent", "agent-1", window)
    return Check(
        0, key, Window.parse(window) if window else None, Decimal(amount), op, Decimal(limit)
    )


def commit(store: LocalFileStateStore, *checks: Check, now: float = T0) -> None:
    """Reserve (it must succeed) and commit."""
    reservation = store.reserve(checks, now)
    assert isinstance(reservation, Reservation), reservation
    store.commit(reservation)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / ".limenex" / "state.json"


def test_quickstart_leaves_the_seed_layout_exactly(path: Path) -> None:
    store = LocalFileStateStore(path)
    first = store.reserve([spend("30.0")], T0)
    assert isinstance(first, Reservation)
    store.commit(first)
    assert isinstance(store.reserve([spend("30.0")], T0), StateBreach)
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 30.0}}
    assert path.read_text() == '{"spend_usd": {"agent-1": 30.0}}\n'
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock"]


def test_amounts_are_written_as_exact_decimal_literals(path: Path) -> None:
    store = LocalFileStateStore(path)
    calls = Check(
        0, CounterKey("calls", "agent", "agent-1", ""), None, Decimal(1), "lte", Decimal(9)
    )
    commit(store, spend("0.10"), calls)
    assert path.read_text() == '{"spend_usd": {"agent-1": 0.10}, "calls": {"agent-1": 1}}\n'
    totals = LocalFileStateStore(path).peek([spend("0"), calls], T0)
    assert [str(total) for total in totals] == ["0.10", "1"]


def test_a_new_instance_reads_back_every_kind_of_state(path: Path) -> None:
    store = LocalFileStateStore(path)
    checks = [
        spend("30.0"),
        spend("2.5", window="24h"),
        spend("7", window="day"),
        Check(0, CounterKey("spend_usd", "global", "", ""), None, Decimal("4"), "lt", Decimal(50)),
    ]
    commit(store, *checks)
    pending = store.reserve([spend("1.25", window="24h")], T0 + 1)
    assert isinstance(pending, Reservation)

    reopened = LocalFileStateStore(path)
    assert reopened.totals(T0 + 2) == store.totals(T0 + 2)
    assert reopened.pending(T0 + 2) == store.pending(T0 + 2)
    assert [p.id for p in reopened.pending(T0 + 2)] == [pending.id]
    assert dict(reopened.totals(T0 + 2))[checks[1].key] == Decimal("3.75")
    reopened.release(pending, T0 + 2)  # a reservation made by another instance
    assert dict(store.totals(T0 + 2))[checks[1].key] == Decimal("2.5")
    assert store.pending(T0 + 2) == []


def test_any_agent_id_and_dimension_survive_the_round_trip(path: Path) -> None:
    """The file is encoded by hand, fragment by fragment: names must be escaped."""
    odd = 'agent "ü"\n\\ \ud800 end'
    keys = [CounterKey("spend", "agent", odd, ""), CounterKey(odd, "global", "", "day")]
    checks = [
        Check(0, k, Window.parse(k.window) if k.window else None, Decimal(3), "lt", Decimal(9))
        for k in keys
    ]
    store = LocalFileStateStore(path)
    commit(store, *checks)
    pending = store.reserve(checks, T0)
    assert isinstance(pending, Reservation)
    reopened = LocalFileStateStore(path)
    assert dict(reopened.totals(T0)) == {keys[0]: 6, keys[1]: 6}
    assert reopened.pending(T0)[0].amounts == ((keys[0], 3), (keys[1], 3))


def test_each_instance_sees_the_others_writes(path: Path) -> None:
    one, two = LocalFileStateStore(path), LocalFileStateStore(path)
    commit(one, spend("20"))
    commit(two, spend("20"))
    assert isinstance(one.reserve([spend("20")], T0), StateBreach)  # 60 < 50 fails
    assert one.peek([spend("0")], T0) == (Decimal(40),)


def test_the_reserved_key_is_written_only_when_needed(path: Path) -> None:
    store = LocalFileStateStore(path)
    reservation = store.reserve([spend("5")], T0)
    assert isinstance(reservation, Reservation)
    assert "pending" in json.loads(path.read_text())["__limenex__"]
    store.commit(reservation)
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 5}}
    commit(store, spend("5", window="day"))
    assert "tables" in json.loads(path.read_text())["__limenex__"]
    store.reset()
    assert json.loads(path.read_text()) == {}


def test_a_missing_file_is_an_empty_state_until_the_first_write(path: Path) -> None:
    store = LocalFileStateStore(path)
    assert store.totals(T0) == []
    assert not path.exists()
    commit(store, spend("1"))
    assert path.exists()


CORRUPT = {
    "not json": b"{not json",
    "empty file": b"",
    "a list": b"[]",
    "a dimension that is not an object": b'{"spend_usd": 5}',
    "a total that is a string": b'{"spend_usd": {"a": "x"}}',
    "a negative total": b'{"spend_usd": {"a": -1}}',
    "NaN": b'{"spend_usd": {"a": NaN}}',
    "a boolean total": b'{"spend_usd": {"a": true}}',
    "a repeated agent": b'{"spend_usd": {"a": 1, "a": 2}}',
    "an unknown version": b'{"__limenex__": {"version": 99}}',
    "an unknown reserved key": b'{"__limenex__": {"version": 1, "extra": 1}}',
    "a bad window": (
        b'{"__limenex__": {"version": 1, "tables": [{"dimension": "d", "scope": "global",'
        b' "window": "fortnight", "subjects": {}}]}}'
    ),
    "a bad pending record": (
        b'{"__limenex__": {"version": 1, "pending": {"x": {"created_at": 1,'
        b' "expires_at": 2, "owner": "h:1", "amounts": [["d", "agent", "a", "", -5, null]]}}}}'
    ),
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_file_is_refused_on_every_call_and_left_as_found(
    path: Path, content: bytes
) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    store = LocalFileStateStore(path)
    calls = [
        lambda: store.reserve([spend("1")], T0),
        lambda: store.peek([spend("1")], T0),
        lambda: store.adjust(spend("1").key, Decimal(1), T0),
        lambda: store.reset(),
        lambda: store.reserve([spend("1")], T0),
    ]
    for call in calls:
        with pytest.raises(CorruptStateError, match=str(path)):
            call()
    assert path.read_bytes() == content
    assert not path.with_name("state.json.tmp").exists()


def test_a_file_corrupted_between_calls_is_refused_until_a_human_fixes_it(path: Path) -> None:
    store = LocalFileStateStore(path)
    commit(store, spend("10"))
    path.write_bytes(b'{"spend_usd": {"agent-1": "ten"}}')
    with pytest.raises(CorruptStateError, match="non-negative number"):
        store.reserve([spend("10")], T0)
    path.write_bytes(b'{"spend_usd": {"agent-1": 10}}')
    assert isinstance(store.reserve([spend("10")], T0), Reservation)
    assert store.peek([spend("0")], T0) == (Decimal(20),)


def test_a_stale_temporary_file_is_removed_by_the_next_write(path: Path) -> None:
    path.parent.mkdir(parents=True)
    temp = path.with_name("state.json.tmp")
    temp.write_bytes(b'{"spend_usd": {"agent-1": 99')  # a writer that crashed
    store = LocalFileStateStore(path)
    commit(store, spend("1"))
    assert not temp.exists()
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 1}}


def test_a_failed_write_leaves_nothing_counted_and_no_temporary_file(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStateStore(path)
    commit(store, spend("10"))

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", disk_full)
        with pytest.raises(StateStoreError, match="No space left"):
            store.reserve([spend("10")], T0)
    assert store.peek([spend("0")], T0) == (Decimal(10),)
    assert store.pending(T0) == []
    assert not path.with_name("state.json.tmp").exists()


def test_every_write_syncs_its_data_and_reserve_also_syncs_the_folder(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability policy in the module docstring: no torn file after any crash, and a
    reservation survives a power cut."""
    store = LocalFileStateStore(path)
    synced: list[str] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append("file"))
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append("folder"))
    reservation = store.reserve([spend("10")], T0)
    assert isinstance(reservation, Reservation)
    assert synced == ["file", "folder"]
    store.commit(reservation)
    assert synced == ["file", "folder", "file"]
    store.adjust(spend("1").key, Decimal(-1), T0)
    assert synced == ["file", "folder", "file", "file", "folder"]


async def test_async_calls_run_off_the_event_loop_thread(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStateStore(path)
    threads: list[int] = []
    reserve = store.reserve

    def recording(checks: list[Check], now: float) -> Reservation | StateBreach:
        threads.append(threading.get_ident())
        return reserve(checks, now)

    monkeypatch.setattr(store, "reserve", recording)
    assert isinstance(await store.areserve([spend("1")], T0), Reservation)
    assert threads
    assert threads[0] != threading.get_ident()


def test_a_release_after_expiry_removes_the_pending_record_from_the_file(path: Path) -> None:
    store = LocalFileStateStore(path, lease_seconds=60)
    reservation = store.reserve([spend("5")], T0)
    assert isinstance(reservation, Reservation)
    store.release(reservation, T0 + 60)
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 5}}  # counted, not pending
    assert LocalFileStateStore(path).pending(T0) == []


def test_a_relative_path_keeps_naming_the_same_file_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (second / ".limenex").mkdir(parents=True)
    other_state = second / ".limenex" / "state.json"
    other_state.write_bytes(b'{"spend_usd": {"agent-2": 1}}\n')
    first.mkdir()
    monkeypatch.chdir(first)
    store = LocalFileStateStore(".limenex/state.json")
    commit(store, spend("30"))
    monkeypatch.chdir(second)
    assert isinstance(store.reserve([spend("30")], T0), StateBreach)  # 60 < 50 fails
    assert store.peek([spend("0")], T0) == (Decimal(30),)
    assert other_state.read_bytes() == b'{"spend_usd": {"agent-2": 1}}\n'
    assert sorted(os.listdir(other_state.parent)) == ["state.json"]
    assert json.loads((first / ".limenex" / "state.json").read_text()) == {
        "spend_usd": {"agent-1": 30}
    }


# --- across processes ------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from decimal import Decimal
    from limenex.core.state import Check, CounterKey, Reservation
    from limenex.core.stores import LocalFileStateStore

    path, go = sys.argv[1], sys.argv[2]
    store = LocalFileStateStore(path)
    check = Check(0, CounterKey("spend_usd", "agent", "agent-1", ""), None,
                  Decimal(10), "lt", Decimal(500))
    while not __import__("os").path.exists(go):
        time.sleep(0.001)
    won = 0
    for _ in range(30):
        outcome = store.reserve([check], 1000.0)
        if isinstance(outcome, Reservation):
            store.commit(outcome)
            won += 1
    print(won)
    """
)


@pytest.mark.slow
def test_four_processes_never_overspend_one_file(path: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    go.touch()
    won = [int(worker.communicate(timeout=60)[0]) for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4
    assert sum(won) == 49
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 490}}


KILLED = textwrap.dedent(
    """
    import sys, time
    from decimal import Decimal
    from limenex.core.state import Check, CounterKey
    from limenex.core.stores import LocalFileStateStore

    store = LocalFileStateStore(sys.argv[1], lease_seconds=300)
    check = Check(0, CounterKey("spend_usd", "agent", "agent-1", ""), None,
                  Decimal(30), "lt", Decimal(50))
    print(store.reserve([check], 1000.0).id, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.slow
def test_a_killed_process_reservation_stays_counted_after_its_lease(path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        reservation_id = child.stdout.readline().strip()
        os.kill(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL

    store = LocalFileStateStore(path)
    (pending,) = store.pending(1000.0)
    assert pending.id == reservation_id
    assert pending.owner.endswith(f":{child.pid}")
    assert isinstance(store.reserve([spend("30")], 1299.0), StateBreach)
    assert store.pending(1300.0) == []
    assert isinstance(store.reserve([spend("30")], 1300.0), StateBreach)  # still counted
    assert store.peek([spend("0")], 1300.0) == (Decimal(30),)
