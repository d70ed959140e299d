"""An OpenAI Agents SDK agent whose payments are governed by Limenex, offline.

The "model" is the SDK's scripted test model (``agents.testing.ScriptedModel``): no network,
no ``OPENAI_API_KEY``, tracing off. It asks for three payments in one turn: one the policies
allow, one they block, one that needs a human. The run pauses on the third; a human
approves it; the run goes on and the payment is made exactly once. Policies, state,
approvals and the audit log live in a temporary folder.

    python examples/openai_agents_agent.py
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from agents import Agent, RunConfig, Runner, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

from limenex.core.engine import PolicyEngine
from limenex.integrations.openai_agents import (
    GovernedFunctionTool,
    governed_function_tools,
    review,
)
from limenex.skills.finance import make_spend

POLICIES = """\
finance.spend:
  policies:
    - {type: deterministic, dimension: approved_services, param: service, operator: in,
       values: [openai, aws], breach_verdict: BLOCK}
    - {type: deterministic, dimension: single_spend_usd, param: amount_usd, operator: lte,
       value: 100, stateful: false, breach_verdict: ESCALATE}
    - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lte,
       value: 1000, window: day, breach_verdict: BLOCK}
"""

INTENT = "Pay this month's bills: OpenAI $30, GCP $40 and AWS $250."
APPROVER = "ana@example.com"
RUN_CONFIG = RunConfig(tracing_disabled=True)

paid: list[str] = []


async def pay(service: str, amount_usd: float) -> str:
    paid.append(f"{service} ${amount_usd:.2f}")
    return f"paid ${amount_usd:.2f} to {service}"


def payer(service: str) -> Any:
    async def executor(amount_usd: float) -> str:
        return await pay(service, amount_usd)

    return executor


def show(items: Any, seen: set[tuple[str, Any]]) -> None:
    """Print the model's tool calls and the tools' outputs not printed yet."""
    for item in items:
        raw = item.raw_item
        call_id = raw.get("call_id") if isinstance(raw, dict) else getattr(raw, "call_id", None)
        if item.type not in ("tool_call_item", "tool_call_output_item"):
            continue
        if (item.type, call_id) in seen:
            continue
        seen.add((item.type, call_id))
        if item.type == "tool_call_item":
            print(f"  model calls {raw.name}({raw.arguments})")
        else:
            print(f"  {call_id} -> {item.output}")


async def main(folder: Path) -> None:
    set_tracing_disabled(True)
    (folder / "policies.yaml").write_text(POLICIES)
    engine = PolicyEngine(policy_store=folder / "policies.yaml")
    spend = make_spend(engine, {name: payer(name) for name in ("openai", "gcp", "aws")})
    tools = governed_function_tools([spend], agent_id="billing-bot", approver=APPROVER)
    model = ScriptedModel(
        [
            [
                function_call(
                    "finance_spend", {"service": "openai", "amount_usd": 30}, call_id="c1"
                ),
                function_call("finance_spend", {"service": "gcp", "amount_usd": 40}, call_id="c2"),
                function_call("finance_spend", {"service": "aws", "amount_usd": 250}, call_id="c3"),
            ],
            [assistant_message("OpenAI and AWS are paid; GCP is not an approved service.")],
        ]
    )
    agent = Agent(name="billing", instructions="Pay the bills.", model=model, tools=tools)

    print(f"user: {INTENT}")
    seen: set[tuple[str, Any]] = set()
    result = await Runner.run(agent, INTENT, run_config=RUN_CONFIG)
    show(result.new_items, seen)

    while result.interruptions:
        print(f"run paused: {len(result.interruptions)} tool call(s) wait for a human")
        state = result.to_state()
        for item in result.interruptions:
            shown = await review(item, tools)
            if shown is None:  # not one of our tools: nothing here makes such a tool
                raise SystemExit(f"unexpected interruption: {item.tool_name}")
            print(f"  human sees: {shown['skill']} {json.dumps(shown['params'])}")
            print(f"              {shown['verdict']}: {shown['reason']}")
            print(f"  human ({APPROVER}): approve")
            state.approve(item)
        result = await Runner.run(agent, state, run_config=RUN_CONFIG)
        show(result.new_items, seen)

    spend_tool = tools[0]
    if not isinstance(spend_tool, GovernedFunctionTool):
        raise SystemExit("governed_function_tools made something else")
    request = await engine.approvals.get(spend_tool.request_id("c3"))
    if request is None:
        raise SystemExit("the engine kept no request for the approved call")
    print(f"engine request {request.id}: {request.status.value}, approved by {request.decided_by}")
    print(f"model: {result.final_output}")
    print(f"payments made, each once: {', '.join(paid)}")
    engine.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(Path(folder)))
