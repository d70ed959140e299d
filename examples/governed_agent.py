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
        state_store=SQLiteStateStore(folder / "state.db"),
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
    print("\nstate (`limenex state show` lists the same):")
    for key, total in sorted(engine.state_store.totals(engine.clock.now())):
        window = f" per {key.window}" if key.window else ""
        print(f"  {key.dimension} [{key.scope} {key.subject}]{window}: {total}")
    engine.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="limenex-demo-") as tmp:
        asyncio.run(main(Path(tmp)))
