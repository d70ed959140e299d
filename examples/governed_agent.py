"""A short governed-agent demo: a scripted agent's tool calls meet the policies.

Runs offline: the "model" that judges the semantic rule is a keyword check standing in for
the LLM a real team would plug in. State lives in the embedded default store, SQLite, in a
temporary folder.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from limenex.approvals import ApprovalRefused
from limenex.audit import verify
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.core.stores import SQLiteStateStore
from limenex.skills.comms import make_send
from limenex.skills.filesystem import make_write
from limenex.skills.finance import make_spend

HERE = Path(__file__).parent


def judge(intent: str, rule: str) -> str:
    """Stands in for an LLM: escalates messages that promise something."""
    return "ESCALATE" if "we guarantee" in intent.lower() else "ALLOW"


async def pay(amount_usd: float) -> str:
    return f"paid ${amount_usd:.2f}"


async def email(recipient: str, text: str) -> str:
    return f"emailed {recipient}"


async def main(folder: Path) -> None:
    engine = PolicyEngine(
        policy_store=LocalFilePolicyStore(HERE / "policies" / "agent.yaml"),
        state_store=SQLiteStateStore(folder / "state.db"),  # audit.log goes beside it
        llm_evaluator=judge,
    )
    spend = make_spend(engine, {"openai": pay, "aws": pay, "gcp": pay})
    send = make_send(engine, {"email": email})
    write = make_write(engine)

    skills = {"spend": spend, "send": send, "write": write}
    ana = {"channel": "email", "recipient": "ana@example.com"}
    # What a (scripted) agent decided to do, in order: (label, skill, arguments).
    plan: list[tuple[str, str, dict[str, Any]]] = [
        ("spend $40 on openai", "spend", {"service": "openai", "amount_usd": 40}),
        ("spend $50 on aws", "spend", {"service": "aws", "amount_usd": 50}),
        ("spend $20 on aws", "spend", {"service": "aws", "amount_usd": 20}),
        ("spend $5 on gcp", "spend", {"service": "gcp", "amount_usd": 5}),
        ("spend $900 on openai", "spend", {"service": "openai", "amount_usd": 900}),
        ("email ana (1)", "send", {**ana, "text": "Status: green"}),
        ("email ana (2)", "send", {**ana, "text": "Status: still green"}),
        ("email ana (3)", "send", {**ana, "text": "Status: green again"}),
        (
            "email a customer",
            "send",
            {"channel": "email", "recipient": "cto@client.example", "text": "We guarantee 100%."},
        ),
        ("write a report", "write", {"filepath": folder / "report.txt", "content": "ok"}),
        ("write /etc/../etc/hosts", "write", {"filepath": "/etc/../etc/hosts", "content": "x"}),
    ]
    paused: list[tuple[str, str]] = []
    for label, skill, arguments in plan:
        try:
            outcome = skills[skill](agent_id="ops-bot", **arguments)
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
            print(f"ALLOW     {label:<24} -> {outcome}")
        except BlockedError as exc:
            print(f"BLOCK     {label:<24} -> {exc.decision.reason}")
        except EscalationRequired as exc:
            print(f"ESCALATE  {label:<24} -> {exc.decision.reason}")
            paused.append((label, str(exc.request_id)))

    # A human looks at what is waiting (`limenex approvals list`, or `limenex serve`'s inbox).
    print(f"\n{len(await engine.approvals.pending())} requests wait for a human")
    (spend_label, spend_id), (email_label, email_id) = paused
    await engine.approvals.approve(spend_id, approver="ana@example.com", note="budget ok")
    await engine.approvals.deny(email_id, approver="ana@example.com", note="no promises")
    print(f"APPROVED  {spend_label:<24} -> resumed: {await engine.resume(spend_id)}")
    try:
        await engine.resume(spend_id)
    except ApprovalRefused as exc:
        print(f"REFUSED   {spend_label:<24} -> a second resume: {exc.why}")
    try:
        await engine.resume(email_id)
    except ApprovalRefused as exc:
        print(f"DENIED    {email_label:<24} -> resume refused: {exc.why}")
    print("\nstate (`limenex state show` lists the same):")
    for key, total in sorted(engine.state_store.totals(engine.clock.now())):
        window = f" per {key.window}" if key.window else ""
        print(f"  {key.dimension} [{key.scope} {key.subject}]{window}: {total}")
    engine.close()  # flushes the audit log
    result = verify(folder / "audit.log")
    print(f"\naudit log: {result.count} records, hash chain intact: {result.ok}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="limenex-demo-") as tmp:
        asyncio.run(main(Path(tmp)))
