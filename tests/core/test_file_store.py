"""What only the JSON file store promises: its layout, its durability, and safety across
processes. The behaviour shared by every store is in test_stores.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

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


def reserved(store: LocalFileStateStore, *checks: Check, now: float = T0) -> Reservation:
    reservation = store.reserve(checks, now)
    assert isinstance(reservation, Reservation), reservation
    return reservation


def commit(store: LocalFileStateStore, *checks: Check, now: float = T0) -> None:
    """Reserve (it must succeed) and commit."""
    store.commit(reserved(store, *checks, now=now))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / ".limenex" / "state.json"


@pytest.fixture
def sidecar(path: Path) -> Path:
    return path.with_name("state.json.pending")


def test_quickstart_leaves_the_seed_layout_exactly(path: Path) -> None:
    store = LocalFileStateStore(path)
    first = reserved(store, spend("30.0"))
    assert path.read_text() == '{"spend_usd": {"agent-1": 30.0}}\n'  # the record: in the sidecar
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


def test_pending_reservations_live_in_a_sidecar_that_exists_only_while_one_does(
    path: Path, sidecar: Path
) -> None:
    store = LocalFileStateStore(path, lease_seconds=60)
    first = reserved(store, spend("5"))
    second = reserved(store, spend("2.5", window="24h"), now=T0 + 1)
    owner = store.pending(T0)[0].owner
    assert json.loads(path.read_text()) == {
        "spend_usd": {"agent-1": 5},
        "__limenex__": {
            "version": 1,
            "tables": [
                {
                    "dimension": "spend_usd",
                    "scope": "agent",
                    "window": "24h",
                    "subjects": {"agent-1": [[T0 + 1, 2.5]]},
                }
            ],
        },
    }
    assert json.loads(sidecar.read_text()) == {
        "version": 1,
        "pending": {
            first.id: {
                "created_at": T0,
                "expires_at": T0 + 60,
                "owner": owner,
                "amounts": [["spend_usd", "agent", "agent-1", "", 5, None]],
            },
            second.id: {
                "created_at": T0 + 1,
                "expires_at": T0 + 61,
                "owner": owner,
                "amounts": [["spend_usd", "agent", "agent-1", "24h", 2.5, T0 + 1]],
            },
        },
    }
    store.commit(first)
    assert list(json.loads(sidecar.read_text())["pending"]) == [second.id]
    store.release(second, T0 + 2)
    assert not sidecar.exists()
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 5}}


def test_the_reserved_key_is_written_only_when_needed(path: Path) -> None:
    store = LocalFileStateStore(path)
    commit(store, spend("5"))
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
    "pending records kept as a 0.2 development version did": (
        b'{"__limenex__": {"version": 1, "pending": {"x": {"created_at": 1,'
        b' "expires_at": 2, "owner": "h:1", "amounts": [["d", "agent", "a", "", 5, null]]}}}}'
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
        with pytest.raises(CorruptStateError, match=re.escape(str(path))):
            call()
    assert path.read_bytes() == content
    assert not path.with_name("state.json.tmp").exists()


def test_pending_records_in_the_state_file_are_refused_with_how_to_fix_it(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(CORRUPT["pending records kept as a 0.2 development version did"])
    with pytest.raises(CorruptStateError, match=r"__limenex__\.pending .* remove the key"):
        LocalFileStateStore(path).peek([spend("1")], T0)


CORRUPT_SIDECAR = {
    "not json": b"{not json",
    "empty file": b"",
    "a list": b"[]",
    "no version": b'{"pending": {}}',
    "an unknown version": b'{"version": 2, "pending": {}}',
    "an unknown key": b'{"version": 1, "pending": {}, "extra": 1}',
    "a bad pending record": (
        b'{"version": 1, "pending": {"x": {"created_at": 1, "expires_at": 2, "owner": "h:1",'
        b' "amounts": [["d", "agent", "a", "", -5, null]]}}}'
    ),
}


@pytest.mark.parametrize("content", CORRUPT_SIDECAR.values(), ids=CORRUPT_SIDECAR.keys())
def test_a_corrupt_sidecar_is_refused_on_every_call_and_left_as_found(
    path: Path, sidecar: Path, content: bytes
) -> None:
    store = LocalFileStateStore(path)
    reservation = reserved(store, spend("10"))
    sidecar.write_bytes(content)
    state = path.read_bytes()
    calls: list[Callable[[], object]] = [
        lambda: store.reserve([spend("1")], T0),
        lambda: store.commit(reservation),
        lambda: store.release(reservation, T0),
        lambda: store.peek([spend("1")], T0),
        lambda: store.totals(T0),
        lambda: store.pending(T0),
        lambda: store.adjust(spend("1").key, Decimal(-1), T0),
        lambda: store.reset(),
        lambda: LocalFileStateStore(path).commit(reservation),
    ]
    for call in calls:
        with pytest.raises(CorruptStateError, match=re.escape(str(sidecar))):
            call()
    assert sidecar.read_bytes() == content
    assert path.read_bytes() == state
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock", sidecar.name]


def test_a_file_corrupted_between_calls_is_refused_until_a_human_fixes_it(path: Path) -> None:
    store = LocalFileStateStore(path)
    commit(store, spend("10"))
    path.write_bytes(b'{"spend_usd": {"agent-1": "ten"}}')
    with pytest.raises(CorruptStateError, match="non-negative number"):
        store.reserve([spend("10")], T0)
    path.write_bytes(b'{"spend_usd": {"agent-1": 10}}')
    assert isinstance(store.reserve([spend("10")], T0), Reservation)
    assert store.peek([spend("0")], T0) == (Decimal(20),)


@pytest.mark.parametrize("name", ["state.json.tmp", "state.json.pending.tmp"])
def test_a_stale_temporary_file_is_removed_by_the_next_write(path: Path, name: str) -> None:
    path.parent.mkdir(parents=True)
    temp = path.with_name(name)
    temp.write_bytes(b'{"spend_usd": {"agent-1": 99')  # a writer that crashed
    store = LocalFileStateStore(path)
    reservation = reserved(store, spend("1"))
    assert not temp.exists()
    assert [p.id for p in LocalFileStateStore(path).pending(T0)] == [reservation.id]
    store.commit(reservation)
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock"]
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
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock"]


def failing_replace(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``os.replace`` fails for the file called ``name``: the crash between two writes."""
    replace = os.replace

    def failing(source: str, target: str) -> None:
        if os.path.basename(target) == name:
            raise OSError(5, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(os, "replace", failing)


def test_a_reserve_whose_record_cannot_be_written_fails_with_the_amount_counted(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStateStore(path)
    with monkeypatch.context() as patch:
        failing_replace(patch, "state.json.pending")
        with pytest.raises(StateStoreError, match=r"state\.json\.pending: .*Input/output error"):
            store.reserve([spend("10")], T0)
    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 10}}
    for reader in (store, LocalFileStateStore(path)):
        assert reader.peek([spend("0")], T0) == (Decimal(10),)  # no record: nothing to undo
        assert reader.pending(T0) == []
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock"]


def test_a_release_whose_totals_cannot_be_written_leaves_the_amount_counted(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStateStore(path)
    reservation = reserved(store, spend("10"))
    with monkeypatch.context() as patch:
        failing_replace(patch, "state.json")
        with pytest.raises(StateStoreError, match=r"state\.json: .*Input/output error"):
            store.release(reservation, T0)
    for reader in (store, LocalFileStateStore(path)):
        assert reader.peek([spend("0")], T0) == (Decimal(10),)  # the record went first
        assert reader.pending(T0) == []
    store.release(reservation, T0)  # a retry finds no record: the amount stays counted
    assert store.peek([spend("0")], T0) == (Decimal(10),)
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock"]


def test_a_commit_rewrites_only_the_sidecar(path: Path, sidecar: Path) -> None:
    store = LocalFileStateStore(path)
    first = reserved(store, spend("10"))
    second = reserved(store, spend("20"))
    state = (path.stat().st_ino, path.read_bytes())
    store.commit(first)
    assert (path.stat().st_ino, path.read_bytes()) == state
    assert [p.id for p in LocalFileStateStore(path).pending(T0)] == [second.id]
    store.commit(second)
    assert (path.stat().st_ino, path.read_bytes()) == state
    assert not sidecar.exists()


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the store does to the disk, in order: ``sync`` (a file's data), ``sync folder``,
    ``replace NAME`` (a rename over NAME) and ``unlink NAME``."""
    done: list[str] = []

    def recording(name: str, describe: Callable[..., str]) -> None:
        call = getattr(os, name)

        def recorded(*args: Any) -> Any:
            done.append(describe(*args))
            return call(*args)

        monkeypatch.setattr(os, name, recorded)

    recording("fdatasync", lambda fd: "sync")
    recording("fsync", lambda fd: "sync folder")
    recording("replace", lambda source, target: f"replace {os.path.basename(target)}")
    recording("unlink", lambda target: f"unlink {os.path.basename(target)}")
    return done


def test_writes_are_synced_and_ordered_so_every_pending_amount_stays_counted(
    path: Path, disk: list[str]
) -> None:
    """The order of the writes in the module docstring: no torn file after any crash, a
    record only once its amount is counted and durable, and durable totals."""
    store = LocalFileStateStore(path)
    reservations = [reserved(store, spend("10")) for _ in range(3)]
    counted_then_recorded = [
        "sync",
        "replace state.json",
        "sync",
        "sync folder",
        "replace state.json.pending",
    ]
    assert disk == counted_then_recorded * 3
    disk.clear()
    store.commit(reservations[0])
    assert disk == ["sync", "replace state.json.pending"]
    disk.clear()
    store.release(reservations[1], T0)
    assert disk == [
        "sync",
        "replace state.json.pending",
        "sync",
        "replace state.json",
        "sync folder",
    ]
    disk.clear()
    store.adjust(spend("1").key, Decimal(5), T0)
    assert disk == ["sync", "replace state.json", "sync folder"]
    disk.clear()
    store.reset()
    assert disk == ["unlink state.json.pending", "sync", "replace state.json", "sync folder"]


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
    assert not path.with_name("state.json.pending").exists()


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

    assert json.loads(path.read_text()) == {"spend_usd": {"agent-1": 30}}
    store = LocalFileStateStore(path)
    (pending,) = store.pending(1000.0)
    assert pending.id == reservation_id
    assert pending.owner.endswith(f":{child.pid}")
    assert isinstance(store.reserve([spend("30")], 1299.0), StateBreach)
    assert store.pending(1300.0) == []
    assert isinstance(store.reserve([spend("30")], 1300.0), StateBreach)  # still counted
    assert store.peek([spend("0")], 1300.0) == (Decimal(30),)
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.json.lock"]
    assert LocalFileStateStore(path).pending(1000.0) == []  # the expired record left the disk
