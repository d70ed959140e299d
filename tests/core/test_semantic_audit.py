"""What a semantic rule was asked and answered lands in the call's audit records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from limenex.audit import AuditLog, BufferedAuditLog, JsonlSink, MemorySink
from limenex.core.decision import Verdict
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.semantic import Judgement, SemanticError
from limenex.skills.comms import make_send
from limenex.testing import ScriptedEvaluator

POLICIES = """\
comms.send:
  policies:
    - type: semantic
      rule: "Block anything rude."
      breach_verdict: BLOCK
    - type: semantic
      rule: "Escalate any promise."
      breach_verdict: ESCALATE
"""


def _engine(evaluator: Any, audit: Any) -> PolicyEngine:
    Path("policies.yaml").write_text(POLICIES)
    return PolicyEngine(
        LocalFilePolicyStore("policies.yaml"),
        "memory://",
        llm_evaluator=evaluator,
        audit_logger=audit,
    )


def _sent() -> tuple[list[str], Any]:
    sent: list[str] = []
    return sent, {"email": lambda recipient, text: sent.append(text)}


async def test_each_rule_asked_is_recorded_with_model_latency_and_raw_answer() -> None:
    sink = MemorySink()
    evaluator = ScriptedEvaluator(
        [
            Judgement(
                Verdict.ALLOW, "polite", model="m-1", raw='{"verdict":"ALLOW"}', latency_ms=12.5
            ),
            "ALLOW",
        ]
    )
    engine = _engine(evaluator, AuditLog(sink))
    sent, registry = _sent()
    send = make_send(engine, registry)
    await send(agent_id="a", channel="email", recipient="x@example.com", text="hello")
    assert sent == ["hello"]
    (record,) = [r for r in sink.records if r.event == "executed"]
    first, second = record.extra["semantic"]
    assert first == {
        "policy_index": 0,
        "rule": "Block anything rude.",
        "verdict": "ALLOW",
        "reason": "polite",
        "model": "m-1",
        "raw": '{"verdict":"ALLOW"}',
        "latency_ms": "12.5",  # numbers in audit records are exact decimal strings
    }
    assert second["policy_index"] == 1
    assert second["verdict"] == "ALLOW"
    assert "model" not in second
    assert float(second["latency_ms"]) >= 0


async def test_a_failed_judgement_records_the_error_and_what_the_adapter_knew() -> None:
    sink = MemorySink()

    def failing(intent: str, rule: str) -> Any:
        raise SemanticError("HTTP 500 from the model", model="m-2", raw="oops", latency_ms=3.0)

    engine = _engine(failing, AuditLog(sink))
    sent, registry = _sent()
    send = make_send(engine, registry)
    with pytest.raises(BlockedError):
        await send(agent_id="a", channel="email", recipient="x@example.com", text="hello")
    assert sent == []
    (record,) = [r for r in sink.records if r.event == "blocked"]
    (entry,) = record.extra["semantic"]  # the first rule decided: the second was never asked
    assert entry == {
        "policy_index": 0,
        "rule": "Block anything rude.",
        "error": "HTTP 500 from the model",
        "model": "m-2",
        "raw": "oops",
        "latency_ms": "3.0",
    }


async def test_an_escalation_records_every_rule_asked() -> None:
    sink = MemorySink()
    engine = _engine(
        ScriptedEvaluator(["ALLOW", {"verdict": "ESCALATE", "reason": "a promise"}]), AuditLog(sink)
    )
    sent, registry = _sent()
    send = make_send(engine, registry)
    with pytest.raises(EscalationRequired):
        await send(agent_id="a", channel="email", recipient="x@example.com", text="we promise")
    assert sent == []
    (record,) = [r for r in sink.records if r.event == "escalated"]
    assert [e["verdict"] for e in record.extra["semantic"]] == ["ALLOW", "ESCALATE"]
    assert record.extra["semantic"][1]["reason"] == "a promise"


def test_the_buffered_default_log_and_redaction_cover_the_model_answer(tmp_path: Path) -> None:
    log = BufferedAuditLog(AuditLog(JsonlSink(tmp_path / "audit.log"), redact=["text"]))
    secret = "card 4111-1111"  # noqa: S105 - a redacted value, not a password
    evaluator = ScriptedEvaluator(
        [
            Judgement(Verdict.ALLOW, f"mentions {secret}", model="m", raw=f"text was {secret}"),
            "ALLOW",
        ]
    )
    engine = _engine(evaluator, log)
    sent, registry = _sent()
    send = make_send(engine, registry)
    asyncio.run(send(agent_id="a", channel="email", recipient="x@example.com", text=secret))
    log.flush()
    text = (tmp_path / "audit.log").read_text()
    assert '"semantic"' in text
    assert '"model":"m"' in text
    assert secret not in text
    assert sent == [secret]
    log.close()


async def test_a_long_raw_answer_is_kept_to_its_first_8192_characters() -> None:
    sink = MemorySink()
    long = "x" * 10_000
    engine = _engine(
        ScriptedEvaluator([Judgement(Verdict.BLOCK, "rude", model="m", raw=long)]), AuditLog(sink)
    )
    _sent_list, registry = _sent()
    send = make_send(engine, registry)
    with pytest.raises(BlockedError):
        await send(agent_id="a", channel="email", recipient="x@example.com", text="hi")
    (record,) = [r for r in sink.records if r.event == "blocked"]
    assert record.extra["semantic"][0]["raw"] == "x" * 8192 + "…[1808 more characters]"


async def test_a_redacted_bytes_param_is_scrubbed_from_what_the_model_said() -> None:
    # The evaluator is shown bytes decoded; the audit records them as their str().
    sink = MemorySink()
    evaluator = ScriptedEvaluator(
        [Judgement(Verdict.BLOCK, "it holds the password hunter2", raw='{"why": "hunter2"}')]
    )
    engine = _engine(evaluator, AuditLog(sink, redact=["text"]))
    _sent_list, registry = _sent()
    send = make_send(engine, registry)
    with pytest.raises(BlockedError):
        await send(agent_id="a", channel="email", recipient="x@example.com", text=b"hunter2")
    (record,) = [r for r in sink.records if r.event == "blocked"]
    assert "hunter2" not in json.dumps(record.to_dict())
    assert record.params["text"] == "[redacted]"
