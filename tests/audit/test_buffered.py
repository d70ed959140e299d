"""The engine's default audit: a buffered log written by a background thread, failing closed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from limenex.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    AuditRecord,
    BufferedAuditLog,
    JsonlSink,
    MemorySink,
    chain_body,
    verify,
)
from limenex.core.engine import BlockedError, PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 1000000
      breach_verdict: BLOCK
"""


class FlakySink(MemorySink):
    """A memory sink whose writes fail while ``down`` is set (a disk that filled up)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.batches: list[int] = []

    def append_many(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        if self.down:
            raise AuditError("disk full")
        self.batches.append(len(records))
        return super().append_many(records)


def engine_with(log: BufferedAuditLog) -> PolicyEngine:
    return PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store="memory://",
        audit_logger=log,
    )


def spend(engine: PolicyEngine, ran: list[int], n: int) -> None:
    engine.execute_sync(
        "finance.spend", "agent-1", {"amount_usd": 1, "n": n}, lambda: ran.append(n)
    )


def test_calls_queue_records_and_a_flush_writes_them_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = BufferedAuditLog(AuditLog(JsonlSink(path)), flush_interval=60)
    engine = engine_with(log)
    ran: list[int] = []
    for n in range(1, 201):
        spend(engine, ran, n)
    assert not path.exists() or path.stat().st_size == 0  # nothing written on the call path
    log.flush()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["params"]["n"] for r in records] == list(range(1, 201))
    assert {r["event"] for r in records} == {"executed"}
    assert records[-1]["extra"]["state"][0]["after"] == "200"
    assert all(r["latency_ms"] is not None for r in records)
    assert verify(path).ok
    engine.close()


def test_the_writer_thread_writes_within_its_interval(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    engine = engine_with(BufferedAuditLog(AuditLog(JsonlSink(path)), flush_interval=0.05))
    spend(engine, [], 1)
    deadline = time.monotonic() + 10
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert verify(path).count == 1
    engine.close()


def test_threads_calling_at_once_make_one_chain() -> None:
    sink = MemorySink()
    log = BufferedAuditLog(AuditLog(sink), flush_interval=0.01)
    engine = engine_with(log)
    ran: list[int] = []

    def worker(base: int) -> None:
        for i in range(250):
            spend(engine, ran, base + i)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.flush()
    assert len(sink.records) == len(ran) == 2000
    assert sorted(r.params["n"] for r in sink.records) == sorted(ran)
    assert [r.seq for r in sink.records] == list(range(1, 2001))
    engine.close()


def test_a_failing_sink_blocks_calls_keeps_every_record_and_recovers() -> None:
    sink = FlakySink()
    log = BufferedAuditLog(AuditLog(sink), flush_interval=60)
    engine = engine_with(log)
    ran: list[int] = []
    spend(engine, ran, 1)
    sink.down = True
    spend(engine, ran, 2)  # queued before the failure is known: it runs
    with pytest.raises(AuditError, match="disk full"):
        log.flush()
    with pytest.raises(BlockedError) as blocked:
        spend(engine, ran, 3)
    assert blocked.value.decision.fail_closed
    assert "audit" in blocked.value.decision.reason
    assert ran == [1, 2]
    sink.down = False
    log.flush()  # the retry writes what was kept, in order, with the call it blocked
    assert [(r.event, r.params["n"]) for r in sink.records] == [
        ("executed", 1),
        ("executed", 2),
        ("blocked", 3),
    ]
    assert sink.records[2].fail_closed
    spend(engine, ran, 4)
    log.flush()
    assert [r.params["n"] for r in sink.records] == [1, 2, 3, 4]
    assert ran == [1, 2, 4]
    engine.close()


def test_too_many_records_waiting_blocks_calls() -> None:
    sink = FlakySink()
    log = BufferedAuditLog(AuditLog(sink), flush_interval=60, max_pending=5)
    engine = engine_with(log)
    ran: list[int] = []
    for n in range(5):
        spend(engine, ran, n)
    with pytest.raises(BlockedError, match="behind"):
        spend(engine, ran, 5)
    assert ran == [0, 1, 2, 3, 4]
    log.flush()
    spend(engine, ran, 6)
    engine.close()
    assert len(sink.records) == 6


def test_a_closed_log_blocks_calls() -> None:
    log = BufferedAuditLog(AuditLog(MemorySink()), flush_interval=60)
    engine = engine_with(log)
    engine.close()  # a log the engine was given is flushed, not closed: others may share it
    spend(engine, [], 0)
    log.close()
    ran: list[int] = []
    with pytest.raises(BlockedError, match="closed"):
        spend(engine, ran, 1)
    assert ran == []


@pytest.mark.parametrize("interval", [0, -1, 61, "1"])
def test_bad_settings_are_refused(interval: object) -> None:
    with pytest.raises(ValueError, match="flush_interval"):
        BufferedAuditLog(AuditLog(MemorySink()), flush_interval=interval)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pending"):
        BufferedAuditLog(AuditLog(MemorySink()), max_pending=0)


def test_records_queued_at_exit_are_written(tmp_path: Path) -> None:
    script = f"""
import asyncio
from limenex.audit import AuditLog, BufferedAuditLog, JsonlSink
from limenex.core.engine import PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore
log = BufferedAuditLog(AuditLog(JsonlSink({str(tmp_path / "audit.log")!r})), flush_interval=60)
engine = PolicyEngine(InMemoryPolicyStore.from_yaml({POLICY!r}), "memory://", audit_logger=log)
for n in range(50):
    engine.execute_sync("finance.spend", "a", {{"amount_usd": n}}, lambda: None)
"""  # no close(): the process simply ends
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert verify(tmp_path / "audit.log").count == 50


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_write_the_parents_records_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = BufferedAuditLog(AuditLog(JsonlSink(path)), flush_interval=60)
    engine = engine_with(log)
    ran: list[int] = []
    for n in range(3):
        spend(engine, ran, n)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            spend(engine, ran, 100)
            log.flush()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log.flush()
    numbers = sorted(json.loads(line)["params"]["n"] for line in path.read_text().splitlines())
    assert numbers == [0, 1, 2, 100]
    assert verify(path).ok
    engine.close()


def test_a_log_that_cannot_be_opened_blocks_from_the_first_call(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    log = BufferedAuditLog(AuditLog(JsonlSink(blocker / "audit.log")), flush_interval=0.02)
    engine = engine_with(log)
    ran: list[int] = []
    with pytest.raises(BlockedError, match="audit"):
        spend(engine, ran, 1)
    assert ran == []
    blocker.unlink()  # fixed: the writer finds out by itself and calls run again
    deadline = time.monotonic() + 10
    while not log.admits() and time.monotonic() < deadline:
        time.sleep(0.01)
    spend(engine, ran, 2)
    engine.close()
    assert ran == [2]
    assert verify(blocker / "audit.log").count == 2
    events = [
        json.loads(line)["event"]
        for line in (blocker / "audit.log").read_text().split("\n")
        if line
    ]
    assert events == ["blocked", "executed"]  # the blocked call was kept until it could be written


def test_a_record_that_cannot_be_made_leaves_a_placeholder_not_a_wedged_log() -> None:
    def refuse_secret(record: AuditRecord) -> AuditRecord:
        if record.params.get("n") == 2:
            raise RuntimeError("redaction rule crashed")
        return record

    sink = MemorySink()
    log = BufferedAuditLog(AuditLog(sink, processors=[refuse_secret]), flush_interval=60)
    engine = engine_with(log)
    ran: list[int] = []
    for n in (1, 2, 3):
        spend(engine, ran, n)
    engine.execute_sync(
        "finance.spend", "agent-1", {"amount_usd": 1, "n": 4, "huge": 7**9000}, lambda: None
    )
    log.flush()
    assert ran == [1, 2, 3]
    assert [r.params.get("n") for r in sink.records] == [1, None, 3, 4]
    placeholder = sink.records[1]
    assert placeholder.params == {}  # nothing unprocessed is written
    assert "redaction rule crashed" in placeholder.reason
    assert placeholder.extra == {"unrecordable": "AuditError"}  # the processor failed
    assert sink.records[3].params["huge"] == f"<int of {(7**9000).bit_length()} bits>"
    engine.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_sink_is_busy_can_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = JsonlSink(path)
    log = BufferedAuditLog(AuditLog(sink), flush_interval=60)
    engine = engine_with(log)
    spend(engine, [], 1)
    log.flush()
    sink._lock.acquire()  # as if the writer thread were mid-write at the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import signal

        signal.alarm(20)  # a child stuck on the inherited lock dies instead of hanging
        try:
            spend(engine, [], 2)
            log.flush()
            os._exit(0)
        except BaseException:
            os._exit(1)
    sink._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert verify(path).count == 2
    engine.close()


@pytest.mark.parametrize(
    "params",
    [
        {"amount_usd": 1.5, "service": "openai", "agent_id": "a"},
        {"amount": Decimal("0.10"), "tags": ["x", 2], "nested": {"b": None, "a": True}},
        {"é": "ünïcode", "big": 10**40},
    ],
)
def test_the_writers_short_path_writes_what_the_record_path_would(params: dict[str, Any]) -> None:
    from limenex.core.decision import allowed_decision
    from limenex.core.state import Check, CounterKey

    checks = [
        Check(0, CounterKey("spend", "agent", "a", "day"), None, Decimal("2.5"), "lt", Decimal(9))
    ]
    state = (checks, (Decimal("1.25"),))
    log = BufferedAuditLog(AuditLog(MemorySink()))
    item = ("executed", ("finance.spend", "a"), params, 1_767_225_600.25, 1.5, state, {})
    short = log._body(item)
    record = AuditRecord.from_decision(
        "executed",
        allowed_decision("finance.spend", "a"),
        params,
        at=1_767_225_600.25,
        latency_ms=1.5,
        state=state,
    )
    full = record.to_dict()
    assert (full.pop("seq"), full.pop("prev")) == (None, None)  # set by the chain
    assert short == full
    assert chain_body(short, 7, GENESIS) == chain_body(record.to_dict(), 7, GENESIS)
    assert record.chained(7, GENESIS).line() == chain_body(short, 7, GENESIS)[1]
    assert short["extra"]["state"][0]["after"] == "3.75"


def test_a_processor_that_adds_what_json_cannot_hold_leaves_a_placeholder() -> None:
    import datetime

    def enrich(record: AuditRecord) -> AuditRecord:
        if record.params.get("n") == 2:
            return dataclasses.replace(record, extra={"when": datetime.datetime.now()})
        return record

    sink = MemorySink()
    log = BufferedAuditLog(AuditLog(sink, processors=[enrich]), flush_interval=60)
    engine = engine_with(log)
    ran: list[int] = []
    for n in (1, 2, 3):
        spend(engine, ran, n)
    log.flush()  # not wedged: every call stays allowed, every record is written
    spend(engine, ran, 4)
    log.flush()
    assert ran == [1, 2, 3, 4]
    assert [r.params.get("n") for r in sink.records] == [1, None, 3, 4]
    assert sink.records[1].extra == {"unrecordable": "TypeError"}
    engine.close()


def test_a_huge_decimal_is_recorded_short() -> None:
    sink = MemorySink()
    log = BufferedAuditLog(AuditLog(sink), flush_interval=60)
    engine = engine_with(log)
    engine.execute_sync(
        "finance.spend", "a", {"amount_usd": 1, "n": Decimal("1E+100000000")}, lambda: None
    )
    log.flush()
    assert sink.records[0].params["n"] == "1E+100000000"
    engine.close()
