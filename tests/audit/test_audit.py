"""The hash-chained audit log: records, redaction, sinks, tamper detection, engine hook, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.audit import (
    _BEFORE_HASH,
    GENESIS,
    REDACTED,
    AuditError,
    AuditLog,
    AuditRecord,
    BufferedAuditLog,
    JsonlSink,
    MemorySink,
    Redactor,
    canonical_json,
    read_tail,
    record_hash,
    verify,
    verify_lines,
)
from limenex.cli import main
from limenex.core.decision import Decision, Verdict
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import LimenexRuntimeError
from limenex.core.policy_store import InMemoryPolicyStore

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: 500
      stateful: false
      breach_verdict: BLOCK
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 100
      breach_verdict: ESCALATE
"""


def allow(agent: str = "agent-1") -> Decision:
    return Decision(Verdict.ALLOW, "finance.spend", agent, "within every policy")


def write_log(path: Path, n: int, **kwargs: object) -> AuditLog:
    log = AuditLog(JsonlSink(path), **kwargs)  # type: ignore[arg-type]
    for i in range(n):
        log.write("decision", allow(), {"amount_usd": Decimal(f"{i}.10"), "note": f"call {i}"})
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- records and the chain ------------------------------------------------------------------


def test_chain_builds_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"  # the folder is created
    write_log(path, 5)
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    for record in records:
        assert record["hash"] == record_hash(record)
    result = verify(path)
    assert (result.ok, result.count, result.first_bad_line, result.why) == (True, 5, None, None)
    assert result.head == records[-1]["hash"]


def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.touch()
    assert verify(path) == verify_lines([])
    assert verify(path).ok
    assert verify(path).count == 0


def test_record_keeps_money_exact_and_never_writes_floats(tmp_path: Path) -> None:
    decision = Decision(
        Verdict.ESCALATE,
        "finance.spend",
        "agent-1",
        "over the limit",
        observed=Decimal("99.99"),
        projected=Decimal("130.09"),
        limit=Decimal("100"),
    )
    sink = MemorySink()
    record = AuditLog(sink).write(
        "decision", decision, {"amount_usd": 30.1, "big": Decimal("1E+3")}, latency_ms=1.23456
    )
    assert (record.observed, record.projected, record.limit) == ("99.99", "130.09", "100")
    assert record.params == {"amount_usd": "30.1", "big": "1000"}
    assert record.latency_ms == "1.235"
    assert record.verdict == "ESCALATE"
    line = sink.lines()[0]
    assert "30.1" in line
    assert all(not isinstance(v, float) for v in json.loads(line).values())


def test_extra_and_odd_params_are_recorded(tmp_path: Path) -> None:
    sink = MemorySink()
    log = AuditLog(sink)
    log.write("executed", allow(), {"tags": {"b", "a"}, "when": object}, approver="ops")
    record = sink.records[0]
    assert record.extra == {"approver": "ops"}
    assert record.params["tags"] == ["a", "b"]
    assert isinstance(record.params["when"], str)
    assert AuditRecord.from_dict(json.loads(record.line())) == record


def test_memory_sink_chains_like_the_file(tmp_path: Path) -> None:
    sink = MemorySink()
    log = AuditLog(sink)
    for _ in range(3):
        log("decision", allow(), {"amount_usd": 1})
    assert [r.seq for r in sink.records] == [1, 2, 3]
    assert verify_lines([(line + "\n").encode() for line in sink.lines()]).ok


# --- redaction ------------------------------------------------------------------------------


def test_redaction_of_top_level_and_nested_fields() -> None:
    sink = MemorySink()
    log = AuditLog(sink, redact=["token", "payload.card.number", "items.secret", "absent.x"])
    params = {
        "token": {"value": "sk-123"},
        "payload": {"card": {"number": "4242424242424242", "exp": "12/30"}, "id": 7},
        "items": [{"secret": "a", "keep": 1}, {"keep": 2}],
        "amount_usd": 5,
    }
    record = log.write("decision", allow(), params)
    assert record.params == {
        "token": REDACTED,
        "payload": {"card": {"number": REDACTED, "exp": "12/30"}, "id": 7},
        "items": [{"secret": REDACTED, "keep": 1}, {"keep": 2}],
        "amount_usd": 5,
    }
    assert params["payload"]["card"]["number"] == "4242424242424242"  # type: ignore[index]
    assert "4242" not in sink.lines()[0]
    assert "sk-123" not in sink.lines()[0]


def test_redactor_refuses_empty_paths() -> None:
    with pytest.raises(ValueError, match="dotted path"):
        Redactor(["payload..number"])


# --- tampering --------------------------------------------------------------------------------


def tamper(path: Path, change: str) -> int:
    """Apply ``change`` to a 6-record log; returns the line verify must name."""
    lines = lines_of(path)
    if change == "edit":
        record = json.loads(lines[2])
        record["params"]["amount_usd"] = "0.01"
        lines[2] = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        bad = 3
    elif change == "edit-and-rehash":  # a forger recomputes the record's own hash
        record = json.loads(lines[2])
        record["agent_id"] = "someone-else"
        record["hash"] = record_hash(record)
        lines[2] = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        bad = 4  # the next record's prev no longer matches
    elif change == "drop":
        del lines[3]
        bad = 4
    elif change == "drop-first":
        del lines[0]
        bad = 1
    elif change == "insert-copy":
        lines.insert(2, lines[1])
        bad = 3
    elif change == "insert-forged":
        record = json.loads(lines[1])
        record["seq"], record["prev"] = 3, record["hash"]
        record["hash"] = record_hash(record)
        lines.insert(2, (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode())
        bad = 4  # the forged record links; the original third one no longer does
    elif change == "swap":
        lines[2], lines[3] = lines[3], lines[2]
        bad = 3
    elif change == "truncate-last":
        lines[-1] = lines[-1][:-30]
        bad = 6
    elif change == "garble":
        lines[4] = b"{not json\n"
        bad = 5
    elif change == "blank":
        lines.insert(1, b"\n")
        bad = 2
    elif change == "pretty-print":  # same data, not the canonical bytes
        lines[0] = (json.dumps(json.loads(lines[0]), sort_keys=True) + "\n").encode()
        bad = 1
    else:  # pragma: no cover
        raise AssertionError(change)
    path.write_bytes(b"".join(lines))
    return bad


@pytest.mark.parametrize(
    "change",
    [
        "edit",
        "edit-and-rehash",
        "drop",
        "drop-first",
        "insert-copy",
        "insert-forged",
        "swap",
        "truncate-last",
        "garble",
        "blank",
        "pretty-print",
    ],
)
def test_tampering_is_detected_at_the_right_line(tmp_path: Path, change: str) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 6)
    bad = tamper(path, change)
    result = verify(path)
    assert not result.ok
    assert result.first_bad_line == bad, result.why
    assert result.count == bad - 1
    assert result.why


def test_verify_reasons_are_readable(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 6)
    original = path.read_bytes()
    expected = {
        "edit": "hash mismatch",
        "drop": "seq 5 where 4 was expected",
        "truncate-last": "incomplete",
        "garble": "not a valid JSON record",
        "insert-forged": "seq 3 where 4 was expected",
    }
    for change, why in expected.items():
        path.write_bytes(original)
        tamper(path, change)
        assert why in (verify(path).why or ""), change


def test_a_torn_final_line_without_newline_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    path.write_bytes(path.read_bytes()[:-1])  # only the newline is lost
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert "incomplete" in (result.why or "")


@st.composite
def byte_changes(draw: st.DrawFn, lines: list[bytes]) -> tuple[int, int, int]:
    line = draw(st.integers(0, len(lines) - 1))
    position = draw(st.integers(0, len(lines[line]) - 1))
    value = draw(st.integers(0, 255).filter(lambda b: b != lines[line][position]))
    return line, position, value


def _sample_lines() -> list[bytes]:
    sink = MemorySink()
    log = AuditLog(sink, redact=["card.number"])
    log.write(
        "decision",
        allow(),
        {"amount_usd": Decimal("12.50"), "note": 'café ✓ "quoted"', "card": {"number": "1"}},
    )
    log.write("executed", allow("agent-2"), {"amount_usd": 3, "flag": True, "none": None})
    log.write(
        "decision",
        Decision(
            Verdict.BLOCK, "finance.spend", "agent-1", "too much", limit=Decimal("500"),
            observed=Decimal("600"), projected=Decimal("600"), fail_closed=False,
        ),
        {"amount_usd": 600, "list": [1, "two", {"three": 3.0}]},
    )  # fmt: skip
    return [(line + "\n").encode("ascii") for line in sink.lines()]


SAMPLE = _sample_lines()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_changes(SAMPLE))
def test_any_single_byte_change_is_detected(change: tuple[int, int, int]) -> None:
    line, position, value = change
    assert verify_lines(SAMPLE).ok
    changed = list(SAMPLE)
    raw = bytearray(changed[line])
    raw[position] = value
    data = bytes(raw)
    changed[line : line + 1] = data.splitlines(keepends=True)  # a new "\n" splits the line
    result = verify_lines(changed)
    assert not result.ok
    assert result.first_bad_line == line + 1, result.why


# --- the file sink: durability, concurrency, resuming ------------------------------------------


def test_reopening_resumes_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    write_log(path, 2)  # a new sink, as after a restart
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["prev"] == records[2]["hash"]
    assert verify(path).ok


def test_a_torn_last_line_stops_appends_instead_of_forking(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AuditError, match="torn record"):
        write_log(path, 1)
    path.write_bytes(path.read_bytes() + b"\n")  # still not a record
    with pytest.raises(AuditError, match="not an audit record"):
        write_log(path, 1)


def test_a_long_record_is_found_as_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(JsonlSink(path))
    log.write("decision", allow(), {"blob": "x" * 50_000})
    log.write("decision", allow(), {"blob": "y" * 20_000})
    log.write("decision", allow(), {})
    assert verify(path).count == 3
    assert [seq for seq, _ in read_tail(path, 2)] == [2, 3]
    assert [seq for seq, _ in read_tail(path, 10)] == [1, 2, 3]


def test_sink_failure_raises_audit_error(tmp_path: Path) -> None:
    folder = tmp_path / "is-a-directory"
    folder.mkdir()
    with pytest.raises(AuditError, match="cannot open the audit log") as info:
        AuditLog(JsonlSink(folder)).write("decision", allow(), {})
    assert isinstance(info.value, LimenexRuntimeError)


def test_threads_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(JsonlSink(path))
    other = AuditLog(JsonlSink(path))  # a second sink on the same file, same process

    def work(target: AuditLog, agent: str) -> None:
        for _ in range(25):
            target.write("decision", allow(agent), {"amount_usd": 1})

    threads = [
        threading.Thread(target=work, args=(log if n % 2 else other, f"agent-{n}"))
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = verify(path)
    assert (result.ok, result.count) == (True, 200), result.why


def _append_worker(path: str, worker: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    log = AuditLog(JsonlSink(path))
    for i in range(50):
        log.write("decision", allow(f"worker-{worker}"), {"i": i})


@pytest.mark.slow
def test_processes_append_concurrently_without_forking(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_append_worker, args=(str(path), n, start)) for n in range(4)]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    result = verify(path)
    assert (result.ok, result.count) == (True, 200), result.why
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == list(range(1, 201))
    assert len({r["prev"] for r in records}) == 200  # no two records share a parent: no fork
    for worker in range(4):
        mine = [r["params"]["i"] for r in records if r["agent_id"] == f"worker-{worker}"]
        assert mine == list(range(50))


# --- the engine hook ----------------------------------------------------------------------------


def test_engine_writes_a_verifiable_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store="memory://",
        audit_logger=AuditLog(JsonlSink(path), redact=["card"]),
    )
    ran: list[str] = []
    spend = "finance.spend"
    engine.execute_sync(
        spend, "agent-1", {"amount_usd": 60, "card": "4242"}, lambda: ran.append("a")
    )
    with pytest.raises(EscalationRequired) as paused:
        engine.execute_sync(
            spend, "agent-1", {"amount_usd": 60, "card": "4242"}, lambda: ran.append("b")
        )
    with pytest.raises(BlockedError):
        engine.execute_sync(
            spend, "agent-1", {"amount_usd": 900, "card": "4242"}, lambda: ran.append("c")
        )
    assert ran == ["a"]
    result = verify(path)
    assert (result.ok, result.count) == (True, 4), result.why
    records = [json.loads(line) for line in lines_of(path)]
    assert [(r["event"], r["verdict"]) for r in records] == [
        ("allowed", "ALLOW"),
        ("executed", "ALLOW"),
        ("escalated", "ESCALATE"),
        ("blocked", "BLOCK"),
    ]
    assert records[1]["extra"]["state"] == [
        {
            "dimension": "spend_usd",
            "scope": "agent",
            "subject": "agent-1",
            "window": None,
            "param": "amount_usd",
            "before": "0",
            "after": "60",
        }
    ]
    assert all(r["latency_ms"] is not None for r in records)
    escalated = records[2]
    assert escalated["extra"]["request_id"] == paused.value.request_id
    assert (escalated["observed"], escalated["projected"], escalated["limit"]) == (
        "60",
        "120",
        "100",
    )
    assert escalated["policy"]["dimension"] == "spend_usd"
    assert all(r["params"]["card"] == REDACTED for r in records)
    assert "4242" not in path.read_text()


async def test_engine_async_path_is_audited(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store="memory://",
        audit_logger=AuditLog(JsonlSink(path)),
    )

    async def fail() -> None:
        raise RuntimeError("provider down")

    with pytest.raises(RuntimeError, match="provider down"):
        await engine.execute("finance.spend", "agent-1", {"amount_usd": 5}, fail)
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["event"] for r in records] == ["allowed", "failed"]
    assert verify(path).ok


def test_a_failing_sink_blocks_the_call_and_nothing_runs(tmp_path: Path) -> None:
    folder = tmp_path / "audit.log"
    folder.mkdir()  # the log path is a directory: every write fails
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store="memory://",
        audit_logger=AuditLog(JsonlSink(folder)),
    )
    ran: list[int] = []
    with pytest.raises(BlockedError) as info:
        engine.execute_sync("finance.spend", "agent-1", {"amount_usd": 5}, lambda: ran.append(1))
    assert ran == []
    assert info.value.decision.fail_closed
    assert isinstance(info.value.__cause__, AuditError)


# --- the CLI ------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["audit", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_verify_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    code, out, err = cli("verify", "--path", str(path))
    assert (code, out, err) == (0, "✓ Audit log intact — 3 records\n", "")
    code, out, _ = cli("verify", "--path", str(path), "--json")
    assert code == 0
    assert json.loads(out)["ok"] is True
    assert json.loads(out)["count"] == 3


def test_cli_verify_broken(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4)
    tamper(path, "swap")
    code, out, err = cli("verify", "--path", str(path))
    assert code == 1
    assert out == ""
    assert err.startswith("✗ Audit log broken at line 3: seq 4 where 3 was expected")
    code, out, _ = cli("verify", "--path", str(path), "--json")
    assert code == 1
    assert json.loads(out)["first_bad_line"] == 3


def test_cli_verify_missing_or_unreadable(tmp_path: Path) -> None:
    code, _, err = cli("verify", "--path", str(tmp_path / "nope.log"))
    assert code == 1
    assert err == f"✗ No audit log at {tmp_path / 'nope.log'}\n"
    code, _, err = cli("verify", "--path", str(tmp_path))  # a directory
    assert code == 1
    assert err.startswith("✗ cannot read the audit log")


def test_cli_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_log(Path(".limenex/audit.log"), 1)
    assert cli("verify") == (0, "✓ Audit log intact — 1 record\n", "")


def test_cli_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 30)
    code, out, _ = cli("tail", "--path", str(path))
    assert code == 0
    rows = out.splitlines()
    assert len(rows) == 20
    assert rows[0].startswith("#11  ")
    assert "decision  ALLOW  finance.spend  agent-1: within every policy" in rows[-1]
    code, out, _ = cli("tail", "--path", str(path), "-n", "2", "--json")
    assert code == 0
    assert [r["seq"] for r in json.loads(out)] == [29, 30]
    assert json.loads(out)[1]["params"]["amount_usd"] == "29.10"


def test_cli_tail_shows_garbled_lines_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    code, out, _ = cli("tail", "--path", str(path), "-n", "2")
    assert code == 0
    assert "unreadable: b'garbage'" in out.splitlines()[-1]
    code, out, _ = cli("tail", "--path", str(path), "-n", "1", "--json")
    assert json.loads(out) == [{"unreadable": "garbage"}]
    code, _, err = cli("tail", "--path", str(tmp_path / "nope.log"))
    assert code == 1
    assert "no audit log at" in err


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=12),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=4,
    ),
    extra=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    seq=st.integers(min_value=1, max_value=2**40),
)
def test_a_chained_line_is_the_canonical_json_of_the_record(
    params: dict[str, Any], extra: dict[str, str], seq: int
) -> None:
    record = AuditRecord.from_decision("executed", allow(), params, at=1.5, extra=extra)
    linked = record.chained(seq, "a" * 64)
    assert linked.line() == canonical_json(linked.to_dict())
    assert linked.hash == record_hash(linked.to_dict())
    assert sorted(linked.to_dict()).index("hash") == len(_BEFORE_HASH)
    # A record changed after chaining is serialised afresh, never from the old line.
    changed = dataclasses.replace(linked, reason="edited")
    assert changed.line() == canonical_json(changed.to_dict())


def test_a_redacted_value_quoted_in_the_reason_or_a_subject_is_redacted_too(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(
            """
            comms.send:
              policies:
                - {type: deterministic, dimension: allowed_recipients, param: recipient,
                   operator: in, values: [ops@example.com], breach_verdict: BLOCK}
            billing.charge:
              policies:
                - {type: deterministic, dimension: per_card, operator: lte, value: 1,
                   scope: [agent, card], breach_verdict: ESCALATE}
            """
        ),
        state_store="memory://",
        audit_logger=AuditLog(JsonlSink(path), redact=["recipient", "card"]),
    )
    with pytest.raises(BlockedError):
        engine.execute_sync(
            "comms.send", "agent-1", {"recipient": "ana@secret.example"}, lambda: None
        )
    engine.execute_sync("billing.charge", "agent-1", {"card": "4242424242424242"}, lambda: None)
    with pytest.raises(EscalationRequired) as paused:
        engine.execute_sync("billing.charge", "agent-1", {"card": "4242424242424242"}, lambda: None)
    assert paused.value.request_id is not None
    engine.approvals.approve_sync(paused.value.request_id, approver="ops")
    text = path.read_text()
    assert "ana@secret.example" not in text
    assert "4242424242424242" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["event"] for r in records] == [
        "blocked",
        "allowed",
        "executed",
        "escalated",
        "approved",
    ]
    assert "[redacted]" in records[0]["reason"]
    assert records[2]["extra"]["state"][0]["subject"] == '["agent-1","[redacted]"]'
    assert verify(path).ok


def test_the_tools_and_the_default_log_read_the_redaction_list_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from limenex.audit import REDACT_ENV, redact_from_env

    monkeypatch.setenv(REDACT_ENV, "card, payload.card.number,,iban")
    assert redact_from_env() == ("card", "payload.card.number", "iban")
    engine = PolicyEngine(InMemoryPolicyStore.from_yaml(POLICY), "memory://")
    log = engine.audit_logger
    assert isinstance(log, BufferedAuditLog)
    assert log.log.processors[0].fields == ("card", "payload.card.number", "iban")  # type: ignore[attr-defined]
    engine.close()


def test_a_kept_head_finds_records_cut_off_the_end(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(JsonlSink(path))
    for i in range(5):
        log.write("executed", allow(), {"i": i})
    runner = CliRunner()
    done = runner.invoke(main, ["audit", "verify", "--path", str(path), "--json"])
    head = json.loads(done.output)["head"]
    log.write("executed", allow(), {"i": 5})  # the log grows: the kept head is still in it
    ok = runner.invoke(main, ["audit", "verify", "--path", str(path), "--expect-head", head])
    assert ok.exit_code == 0, ok.output
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))  # the last three records cut off: a valid chain
    assert verify(path).ok
    cut = runner.invoke(main, ["audit", "verify", "--path", str(path), "--expect-head", head])
    assert cut.exit_code == 1
    assert "incomplete" in cut.output
    assert "cut off" in cut.output
    result = verify(path, expect_head=head)
    assert (result.ok, result.count, result.first_bad_line) == (False, 3, None)


def test_a_redacted_value_is_found_in_every_spelling_a_record_quotes_it_in(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(
            """
            billing.pay:
              policies:
                - {type: deterministic, dimension: per_payment, param: amount, operator: lte,
                   value: 100, stateful: false, breach_verdict: BLOCK}
            billing.login:
              policies:
                - {type: deterministic, dimension: allowed_users, param: user,
                   operator: in, values: [ops], breach_verdict: BLOCK}
                - {type: deterministic, dimension: logins, operator: lte, value: 9,
                   scope: [agent, account], breach_verdict: BLOCK}
            """
        ),
        state_store="memory://",
        audit_logger=AuditLog(JsonlSink(path), redact=["amount", "user", "account"]),
    )
    with pytest.raises(BlockedError):  # the reason prints the Decimal: 1E+16
        engine.execute_sync("billing.pay", "a", {"amount": 1e16}, lambda: None)
    with pytest.raises(BlockedError):  # the reason quotes the repr: DOMAIN\\\\ana
        engine.execute_sync(
            "billing.login", "a", {"user": "DOMAIN\\ana", "account": "x"}, lambda: None
        )
    engine.execute_sync(  # the subject is JSON: "DOMAIN\\\\4242"
        "billing.login", "a", {"user": "ops", "account": "DOMAIN\\4242"}, lambda: None
    )
    text = path.read_text()
    for secret in ("1E+16", "1e+16", "10000000000000000", "ana", "4242"):
        assert secret not in text, secret
    first = json.loads(text.splitlines()[0])
    assert (first["observed"], first["projected"], first["limit"]) == (
        "[redacted]",
        "[redacted]",
        "100",
    )
    assert verify(path).ok


def test_a_relative_log_path_is_fixed_when_the_sink_is_made(tmp_path: Path) -> None:
    import contextlib
    import os

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with contextlib.chdir(tmp_path / "a"):
        log = AuditLog(JsonlSink("audit.log"))
        log.write("executed", allow(), {})
    with contextlib.chdir(tmp_path / "b"):
        log.write("executed", allow(), {})  # not a second chain in another folder
    assert not os.path.exists(tmp_path / "b" / "audit.log")
    assert verify(tmp_path / "a" / "audit.log").count == 2


def test_a_redacted_amount_cannot_be_worked_out_from_the_totals(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(
            """
            billing.pay:
              policies:
                - {type: deterministic, dimension: paid, param: amount, operator: lte,
                   value: 100, breach_verdict: BLOCK}
                - {type: deterministic, dimension: payments, operator: lte, value: 99,
                   breach_verdict: BLOCK}
            """
        ),
        state_store="memory://",
        audit_logger=AuditLog(JsonlSink(path), redact=["amount"]),
    )
    engine.execute_sync("billing.pay", "a", {"amount": Decimal("37.25")}, lambda: None)
    engine.execute_sync(
        "billing.pay", "a", {"amount": Decimal("1.500000000000000000000")}, lambda: None
    )
    with pytest.raises(BlockedError):
        engine.execute_sync("billing.pay", "a", {"amount": Decimal("88.5")}, lambda: None)
    text = path.read_text()
    for secret in ("37.25", "1.5", "88.5", "38.75", "127.25"):
        assert secret not in text, secret
    executed = next(r for r in map(json.loads, text.splitlines()) if r["event"] == "executed")
    paid, calls = executed["extra"]["state"]
    assert (paid["param"], paid["before"], paid["after"]) == ("amount", "[redacted]", "[redacted]")
    assert (calls["param"], calls["before"], calls["after"]) == (None, "0", "1")  # not secret
    assert verify(path).ok


def test_a_redacted_value_no_decimal_can_hold_is_still_redacted() -> None:
    sink = MemorySink()
    log = AuditLog(sink, redact=["note"])
    log.write("blocked", allow(), {"note": "1e1000000", "other": "x"})
    assert sink.records[0].params == {"note": "[redacted]", "other": "x"}
