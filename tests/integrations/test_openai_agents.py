"""Governed function tools in the OpenAI Agents SDK: ALLOW, BLOCK, and ESCALATE as tool approval.

The model is the SDK's own scripted test model: no network, no API key, tracing off.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    RunConfig,
    RunContextWrapper,
    RunHooks,
    Runner,
    RunResult,
    RunState,
    Tool,
    set_tracing_disabled,
)
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tool_context import ToolContext

from limenex.approvals import ApprovalStatus
from limenex.core.engine import PolicyEngine
from limenex.core.errors import LimenexConfigError
from limenex.integrations.openai_agents import (
    GovernedFunctionTool,
    governed_function_tool,
    governed_function_tools,
    review,
)
from limenex.skills.finance import make_charge, make_spend

ROOT = Path(__file__).resolve().parents[2]
RUN = RunConfig(tracing_disabled=True)
REJECTED = "Tool execution was not approved."

POLICIES = """\
finance.spend:
  policies:
    - {type: deterministic, dimension: approved_services, param: service, operator: in,
       values: [aws, openai], breach_verdict: BLOCK}
    - {type: deterministic, dimension: single_spend_usd, param: amount_usd, operator: lte,
       value: 100, stateful: false, breach_verdict: ESCALATE}
    - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lte,
       value: 1000, window: day, breach_verdict: BLOCK}
finance.charge:
  policies:
    - {type: deterministic, dimension: charged, param: amount, operator: lte, value: 100,
       breach_verdict: ESCALATE}
tools.deploy:
  policies:
    - {type: deterministic, dimension: quiet_envs, param: env, operator: in,
       values: [staging], breach_verdict: ESCALATE}
tools.rollback:
  policies:
    - {type: deterministic, dimension: quiet_envs, param: env, operator: in,
       values: [staging], breach_verdict: ESCALATE}
"""


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)


@pytest.fixture
def engine() -> Iterator[PolicyEngine]:
    Path("policies.yaml").write_text(POLICIES)
    made = PolicyEngine(policy_store="policies.yaml")
    yield made
    made.close()


Paid = collections.Counter[tuple[str, float]]


@pytest.fixture
def paid() -> Paid:
    return collections.Counter()


@pytest.fixture
def spend(engine: PolicyEngine, paid: Paid) -> Any:
    def payer(service: str) -> Any:
        async def pay(amount_usd: float) -> str:
            paid[(service, amount_usd)] += 1
            return f"paid {amount_usd} to {service}"

        return pay

    return make_spend(engine, {name: payer(name) for name in ("aws", "openai", "gcp")})


@pytest.fixture
def tool(spend: Any) -> GovernedFunctionTool:
    return governed_function_tool(spend, agent_id="bot", approver="ana")


def pay(service: str, amount: float, call_id: str) -> Any:
    return function_call(
        "finance_spend", {"service": service, "amount_usd": amount}, call_id=call_id
    )


def agent_with(tools: list[Any], *turns: Any) -> tuple[Agent[Any], ScriptedModel]:
    model = ScriptedModel(list(turns))
    return Agent(name="agent", instructions="Do the job.", model=model, tools=tools), model


async def run(agent: Agent[Any], given: Any, **kwargs: Any) -> RunResult:
    return await Runner.run(agent, given, run_config=RUN, **kwargs)


def audit_events() -> list[str]:
    """The events of the engine's audit log (beside its state, in the working directory)."""
    return [json.loads(line)["event"] for line in Path("audit.log").read_text().splitlines()]


def tool_outputs(model: ScriptedModel) -> dict[str, str]:
    """The tool outputs the model was last given, by call id."""
    last = model.last_call
    assert last is not None
    return {
        item["call_id"]: item["output"]
        for item in last.input
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    }


async def test_allow_runs_the_executor_and_returns_its_result(
    tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with([tool], [pay("aws", 30, "c1")], [assistant_message("done")])

    result = await run(agent, "pay aws")

    assert result.interruptions == []
    assert result.final_output == "done"
    assert paid == {("aws", 30): 1}
    assert tool_outputs(model) == {"c1": "paid 30 to aws"}
    model.assert_complete()


async def test_block_is_a_refusal_the_model_reads(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with([tool], [pay("gcp", 30, "c1")], [assistant_message("ok")])

    result = await run(agent, "pay gcp")

    assert result.final_output == "ok"
    assert result.interruptions == []
    assert not paid
    assert tool_outputs(model) == {
        "c1": "BLOCK: finance.spend: service 'gcp' is not in approved_services [aws, openai] "
        "(policy 1, BLOCK)."
    }
    assert await engine.approvals.pending() == []


async def test_escalate_pauses_and_an_approval_runs_the_action_once(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with([tool], [pay("aws", 300, "c1")], [assistant_message("paid")])

    result = await run(agent, "pay aws")

    assert not paid
    [item] = result.interruptions
    assert item.tool_name == "finance_spend"
    assert json.loads(item.arguments or "") == {"service": "aws", "amount_usd": 300}
    assert await review(item, [tool]) == {
        "verdict": "ESCALATE",
        "skill": "finance.spend",
        "agent_id": "bot",
        "params": {"service": "aws", "amount_usd": 300},
        "reason": "finance.spend: amount_usd = 300 breaks 'single_spend_usd <= 100' "
        "(policy 2, ESCALATE).",
        "call_id": "c1",
    }
    assert not paid  # review is a dry run

    state = result.to_state()
    state.approve(item)
    resumed = await run(agent, state)

    assert resumed.interruptions == []
    assert resumed.final_output == "paid"
    assert paid == {("aws", 300): 1}
    assert tool_outputs(model) == {"c1": "paid 300 to aws"}
    request = await engine.approvals.get(tool.request_id("c1"))
    assert request is not None
    assert request.status is ApprovalStatus.USED
    assert request.decided_by == "ana"
    assert request.params == {"agent_id": "bot", "amount_usd": 300, "service": "aws"}
    engine.close()  # flushes the audit log
    assert audit_events() == ["escalated", "approved", "resumed", "executed"]


async def test_a_rejected_call_never_runs(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with([tool], [pay("aws", 300, "c1")], [assistant_message("ok")])
    result = await run(agent, "pay aws")
    state = result.to_state()
    state.reject(result.interruptions[0], rejection_message="ana said no")

    resumed = await run(agent, state)

    assert resumed.final_output == "ok"
    assert not paid
    assert tool_outputs(model) == {"c1": "ana said no"}
    # As documented: the engine makes a request only when a call runs; a rejected one never
    # does, so there is nothing in the engine to deny (the SDK's state keeps the rejection).
    assert await engine.approvals.get(tool.request_id("c1")) is None
    assert await engine.approvals.pending() == []


async def test_parallel_calls_allow_approve_and_reject_count_exactly(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with(
        [tool],
        [pay("aws", 30, "c1"), pay("aws", 300, "c2"), pay("openai", 400, "c3")],
        [assistant_message("done")],
    )

    result = await run(agent, "pay all three")

    assert paid == {("aws", 30): 1}  # the allowed call did not wait for the others
    by_call = {getattr(item.raw_item, "call_id", None): item for item in result.interruptions}
    assert set(by_call) == {"c2", "c3"}
    state = result.to_state()
    state.approve(by_call["c2"])
    state.reject(by_call["c3"])
    resumed = await run(agent, state)

    assert resumed.final_output == "done"
    assert paid == {("aws", 30): 1, ("aws", 300): 1}
    assert tool_outputs(model) == {"c1": "paid 30 to aws", "c2": "paid 300 to aws", "c3": REJECTED}
    approved = await engine.approvals.get(tool.request_id("c2"))
    assert approved is not None
    assert approved.status is ApprovalStatus.USED
    assert await engine.approvals.get(tool.request_id("c1")) is None
    assert await engine.approvals.get(tool.request_id("c3")) is None


async def test_the_agent_id_is_not_the_models_to_set(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    schema = tool.params_json_schema
    assert tool.name == "finance_spend"
    assert tool.description.startswith("Spend ``amount_usd`` US dollars on ``service``")
    assert tool.strict_json_schema
    assert set(schema["properties"]) == {"service", "amount_usd"}
    assert sorted(schema["required"]) == ["amount_usd", "service"]
    assert schema["additionalProperties"] is False

    injected = function_call(
        "finance_spend", {"service": "aws", "amount_usd": 30, "agent_id": "root"}, call_id="c1"
    )
    agent, model = agent_with([tool], [injected], [assistant_message("ok")])
    result = await run(agent, "pay as root")

    assert result.interruptions == []
    assert not paid
    output = tool_outputs(model)["c1"]
    assert output.startswith("ERROR: invalid arguments for finance_spend: agent_id:")
    assert await engine.approvals.pending() == []


async def test_sync_and_async_governed_functions_escalate_and_resume_once(
    engine: PolicyEngine,
) -> None:
    ran: collections.Counter[str] = collections.Counter()

    @engine.governed("tools.deploy")
    def deploy(agent_id: str, service: str, env: str = "staging") -> str:
        """Deploy ``service`` to ``env``."""
        ran[f"deploy {service} {env} by {agent_id}"] += 1
        return f"deployed {service} to {env}"

    @engine.governed("tools.rollback", agent_id_param="who")
    async def rollback(who: str, service: str, env: str) -> str:
        """Roll ``service`` in ``env`` back."""
        ran[f"rollback {service} {env} by {who}"] += 1
        return f"rolled {service} back in {env}"

    def approver(context: ToolContext[Any]) -> str:
        return str(context.context["user"])

    tools = governed_function_tools([deploy, rollback], agent_id="ops", approver=approver)
    deploy_tool, rollback_tool = tools
    assert isinstance(deploy_tool, GovernedFunctionTool)
    assert isinstance(rollback_tool, GovernedFunctionTool)
    assert (deploy_tool.name, rollback_tool.name) == ("tools_deploy", "tools_rollback")
    assert set(deploy_tool.params_json_schema["properties"]) == {"service", "env"}
    assert set(rollback_tool.params_json_schema["properties"]) == {"service", "env"}
    agent, model = agent_with(
        tools,
        [
            function_call("tools_deploy", {"service": "web", "env": "staging"}, call_id="d1"),
            function_call("tools_deploy", {"service": "web", "env": "prod"}, call_id="d2"),
            function_call("tools_rollback", {"service": "api", "env": "prod"}, call_id="r1"),
        ],
        [assistant_message("done")],
    )

    result = await run(agent, "ship it", context={"user": "bob"})

    assert ran == {"deploy web staging by ops": 1}
    assert {getattr(i.raw_item, "call_id", None) for i in result.interruptions} == {"d2", "r1"}
    state = result.to_state()
    for item in result.interruptions:
        state.approve(item)
    resumed = await run(agent, state, context={"user": "bob"})

    assert resumed.final_output == "done"
    assert ran == {
        "deploy web staging by ops": 1,
        "deploy web prod by ops": 1,
        "rollback api prod by ops": 1,
    }
    assert tool_outputs(model) == {
        "d1": "deployed web to staging",
        "d2": "deployed web to prod",
        "r1": "rolled api back in prod",
    }
    for made, call_id in ((deploy_tool, "d2"), (rollback_tool, "r1")):
        request = await engine.approvals.get(made.request_id(call_id))
        assert request is not None
        assert (request.status, request.decided_by) == (ApprovalStatus.USED, "bob")


async def test_a_block_policy_still_stops_an_sdk_approved_call(
    engine: PolicyEngine, spend: Any, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with([tool], [pay("aws", 300, "c1")], [assistant_message("ok")])
    result = await run(agent, "pay aws")
    for _ in range(8):  # meanwhile $760 more is spent: $300 would break the $1000 daily cap
        await spend(agent_id="bot", service="openai", amount_usd=95)
    state = result.to_state()
    state.approve(result.interruptions[0])

    resumed = await run(agent, state)

    assert resumed.final_output == "ok"
    assert paid == {("openai", 95): 8}
    output = tool_outputs(model)["c1"]
    assert output == (
        "BLOCK: finance.spend: spend_usd for agent 'bot' in window day would reach 1060 "
        "(760 recorded + 300 proposed), breaking '<= 1000' (policy 3, BLOCK)."
    )
    request = await engine.approvals.get(tool.request_id("c1"))
    assert request is not None
    assert (request.status, request.decided_by) == (ApprovalStatus.APPROVED, "ana")


async def test_replaying_an_approved_state_never_runs_the_action_twice(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with([tool], [pay("aws", 300, "c1")])
    result = await run(agent, "pay aws")
    state = result.to_state()
    state.approve(result.interruptions[0])
    saved = state.to_json()

    outputs = []
    for _ in range(2):  # the approved state, restored twice (two workers, a retry...)
        model.enqueue([assistant_message("done")])
        restored = await RunState.from_json(agent, saved)
        assert (await run(agent, restored)).final_output == "done"
        outputs.append(tool_outputs(model)["c1"])
    model.enqueue([assistant_message("again")])
    assert (await run(agent, state)).final_output == "again"  # and the original, twice
    model.enqueue([assistant_message("again")])
    assert (await run(agent, state)).final_output == "again"

    assert paid == {("aws", 300): 1}
    request_id = tool.request_id("c1")
    assert outputs == [
        "paid 300 to aws",
        f"BLOCK: approval request {request_id} is used; the action did not run "
        f"(approval request {request_id})",
    ]
    request = await engine.approvals.get(request_id)
    assert request is not None
    assert request.status is ApprovalStatus.USED


class _SpendsFirst(RunHooks[Any]):
    """Charges $50 just before the tool runs: the state moves after the dry run."""

    def __init__(self, charge: Any) -> None:
        self.charge = charge

    async def on_tool_start(
        self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool
    ) -> None:
        await self.charge(agent_id="bot", provider="stripe", amount=50, currency="USD")


async def test_an_escalation_nobody_approved_in_the_sdk_is_refused_not_approved(
    engine: PolicyEngine,
) -> None:
    charged: list[float] = []

    async def stripe(amount: float, currency: str) -> str:
        charged.append(amount)
        return "charged"

    charge = make_charge(engine, {"stripe": stripe})
    tool = governed_function_tool(charge, agent_id="bot", approver="ana")
    call = function_call(
        "finance_charge",
        {"provider": "stripe", "amount": 60, "currency": "USD"},
        call_id="c1",
    )
    agent, model = agent_with([tool], [call], [assistant_message("ok")])

    result = await run(agent, "charge $60", hooks=_SpendsFirst(charge))

    assert result.interruptions == []  # the dry run allowed $60
    assert charged == [50]  # the hook's charge; $60 more would make $110
    request_id = tool.request_id("c1")
    output = tool_outputs(model)["c1"]
    assert output.startswith("ESCALATE: finance.charge: charged for agent 'bot' would reach 110")
    assert output.endswith(f"(approval request {request_id})")
    request = await engine.approvals.get(request_id)
    assert request is not None
    assert request.status is ApprovalStatus.PENDING  # a human may still approve it


async def test_always_approve_is_a_standing_approval_in_the_approvers_name(
    engine: PolicyEngine, tool: GovernedFunctionTool, paid: Paid
) -> None:
    agent, model = agent_with(
        [tool],
        [pay("aws", 300, "c1")],
        [pay("aws", 200, "c2")],
        [assistant_message("done")],
    )
    result = await run(agent, "pay aws twice")
    state = result.to_state()
    state.approve(result.interruptions[0], always_approve=True)

    resumed = await run(agent, state)

    assert resumed.interruptions == []
    assert resumed.final_output == "done"
    assert paid == {("aws", 300): 1, ("aws", 200): 1}
    assert tool_outputs(model) == {"c1": "paid 300 to aws", "c2": "paid 200 to aws"}
    for call_id in ("c1", "c2"):
        request = await engine.approvals.get(tool.request_id(call_id))
        assert request is not None
        assert (request.status, request.decided_by) == (ApprovalStatus.USED, "ana")


def test_bad_configuration_is_refused(spend: Any) -> None:
    with pytest.raises(LimenexConfigError, match="agent_id"):
        governed_function_tools([spend], agent_id="", approver="ana")
    with pytest.raises(LimenexConfigError, match="approver"):
        governed_function_tools([spend], agent_id="bot", approver=" ")
    with pytest.raises(LimenexConfigError, match="two skills make the tool 'finance_spend'"):
        governed_function_tools([spend, spend], agent_id="bot", approver="ana")
    with pytest.raises(LimenexConfigError, match="not a governed skill"):
        governed_function_tools([print], agent_id="bot", approver="ana")


async def test_review_ignores_tools_it_did_not_make(tool: GovernedFunctionTool) -> None:
    agent, _ = agent_with([tool], [pay("aws", 300, "c1")])
    result = await run(agent, "pay aws")
    assert await review(result.interruptions[0], []) is None


@pytest.mark.slow
def test_the_example_runs_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "openai_agents_agent.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "user: Pay this month's bills: OpenAI $30, GCP $40 and AWS $250."
    assert "  c1 -> paid $30.00 to openai" in lines
    assert any(line.startswith("  c2 -> BLOCK: finance.spend: service 'gcp'") for line in lines)
    assert "run paused: 1 tool call(s) wait for a human" in lines
    assert "  human (ana@example.com): approve" in lines
    assert "  c3 -> paid $250.00 to aws" in lines
    assert any(line.endswith(": used, approved by ana@example.com") for line in lines)
    assert lines[-1] == "payments made, each once: openai $30.00, aws $250.00"
    assert list(tmp_path.iterdir()) == []  # it wrote only in its own temporary folder
