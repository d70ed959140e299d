"""LangGraph: governed skills as tools in real graphs, with a checkpointer and a human."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command
from pydantic import ValidationError

from limenex.approvals import ApprovalStatus
from limenex.core.engine import PolicyEngine
from limenex.core.errors import LimenexConfigError
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.integrations.langgraph import governed_tools, send_tool_calls
from limenex.skills.finance import make_spend
from servers import store_url

ROOT = Path(__file__).resolve().parents[2]

# $50 runs; over $100 a human decides per call; past $300 in total a human decides again;
# over $500 never.
POLICIES = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: single_cap_usd
      param: amount_usd
      operator: lte
      value: 500
      stateful: false
      breach_verdict: BLOCK
    - type: deterministic
      dimension: single_review_usd
      param: amount_usd
      operator: lte
      value: 100
      stateful: false
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 300
      breach_verdict: ESCALATE
audit.total:  # reads the spend_usd total: any amount breaches once something is recorded
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 0
      breach_verdict: BLOCK
tools.deploy:
  policies:
    - type: deterministic
      dimension: deployable
      param: service
      operator: in
      values: [web]
      breach_verdict: ESCALATE
"""

AGENT = "agent-1"
APPROVE = {"decision": "approve", "approver": "alice", "note": "fine"}
DENY = {"decision": "deny", "approver": "bob", "note": "too much"}


class ScriptedModel(BaseChatModel):
    """Answers turn ``n`` (the n-th AI message of the conversation) with ``script[n]``.

    Each turn is a list of ``(tool name, arguments)``; past the script it says "done".
    """

    script: list[list[tuple[str, dict[str, Any]]]]

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        turn = sum(isinstance(message, AIMessage) for message in messages)
        if turn < len(self.script):
            calls = [
                {"name": name, "args": args, "id": f"call-{turn}-{n}", "type": "tool_call"}
                for n, (name, args) in enumerate(self.script[turn])
            ]
            message = AIMessage("", tool_calls=calls)
        else:
            message = AIMessage("done")
        return ChatResult(generations=[ChatGeneration(message=message)])


def build(
    tools: list[BaseTool],
    script: list[list[tuple[str, dict[str, Any]]]],
    *,
    checkpointer: BaseCheckpointSaver[Any] | None = None,
    per_call: bool = True,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    model = ScriptedModel(script=script).bind_tools(tools)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    if per_call:
        builder.add_conditional_edges("agent", send_tool_calls("tools"), ["tools", END])
    else:
        builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer or InMemorySaver())


def spend_call(amount: float, service: str = "openai") -> tuple[str, dict[str, Any]]:
    return ("finance_spend", {"service": service, "amount_usd": amount})


def tool_messages(state: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in state["messages"] if isinstance(m, ToolMessage)]


def by_call(state: dict[str, Any]) -> dict[str, ToolMessage]:
    return {m.tool_call_id: m for m in tool_messages(state)}


CONFIG: Any = {"configurable": {"thread_id": "thread-1"}}


@pytest.fixture
def engine() -> Iterator[PolicyEngine]:
    Path("policies.yaml").write_text(POLICIES)
    built = PolicyEngine(LocalFilePolicyStore("policies.yaml"), "memory://")
    yield built
    built.close()


@pytest.fixture
def paid() -> list[float]:
    return []


@pytest.fixture
def tools(engine: PolicyEngine, paid: list[float]) -> list[BaseTool]:
    async def pay(amount_usd: float) -> str:
        paid.append(amount_usd)
        return f"paid ${amount_usd}"

    return governed_tools([make_spend(engine, {"openai": pay})], agent_id=AGENT)


async def spent(engine: PolicyEngine) -> Any:
    """The agent's recorded spend_usd total."""
    decision = await engine.evaluate("audit.total", AGENT, {"agent_id": AGENT, "amount_usd": 0})
    return decision.observed or 0


# --- 1, 2: ALLOW and BLOCK -------------------------------------------------------------------


async def test_allow_returns_the_executor_result(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    state = await build(tools, [[spend_call(40)]]).ainvoke({"messages": [("user", "go")]}, CONFIG)
    [message] = tool_messages(state)
    assert (message.content, message.status, message.name) == (
        "paid $40",
        "success",
        "finance_spend",
    )
    assert paid == [40]
    assert state["messages"][-1].content == "done"
    assert await spent(engine) == 40


async def test_block_comes_back_as_a_refusal_and_nothing_runs(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    state = await build(tools, [[spend_call(900)]]).ainvoke({"messages": [("user", "go")]}, CONFIG)
    [message] = tool_messages(state)
    assert message.status == "error"
    assert isinstance(message.content, str)
    assert message.content.startswith("BLOCK: finance.spend: ")
    assert "single_cap_usd" in message.content
    assert "__interrupt__" not in state
    assert paid == []


# --- 3: ESCALATE, approve and deny -----------------------------------------------------------


async def test_escalate_interrupts_and_approve_runs_once(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(150)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    [pending] = state["__interrupt__"]
    payload = pending.value
    assert payload["skill"] == "finance.spend"
    assert payload["agent_id"] == AGENT
    assert payload["params"] == {"agent_id": AGENT, "service": "openai", "amount_usd": 150}
    assert "single_review_usd" in payload["reason"]
    request = await engine.approvals.get(payload["request_id"])
    assert request is not None
    assert request.status is ApprovalStatus.PENDING
    assert paid == []

    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    assert "__interrupt__" not in state
    [message] = tool_messages(state)
    assert (message.content, message.status) == ("paid $150", "success")
    assert paid == [150]
    assert await spent(engine) == 150
    request = await engine.approvals.get(payload["request_id"])
    assert request is not None
    assert (request.status, request.decided_by, request.note) == (
        ApprovalStatus.USED,
        "alice",
        "fine",
    )


async def test_deny_never_runs_and_the_model_reads_a_refusal(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(150)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    request_id = state["__interrupt__"][0].value["request_id"]
    state = await graph.ainvoke(Command(resume=DENY), CONFIG)
    [message] = tool_messages(state)
    assert message.status == "error"
    assert message.content == (
        f"BLOCK: a human (bob) denied the action: too much (approval request {request_id})"
    )
    assert paid == []
    request = await engine.approvals.get(request_id)
    assert request is not None
    assert (request.status, request.decided_by, request.note) == (
        ApprovalStatus.DENIED,
        "bob",
        "too much",
    )
    assert await spent(engine) == 0


async def test_a_second_escalate_on_resume_interrupts_again(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    # $250 (reviewed, approved) then $200: reviewed, and past $300 in total on resume.
    graph = build(tools, [[spend_call(250)], [spend_call(200)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    assert paid == [250]
    [first] = state["__interrupt__"]
    assert "single_review_usd" in first.value["reason"]
    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    [second] = state["__interrupt__"]
    assert "spend_usd" in second.value["reason"]
    assert second.value["request_id"] != first.value["request_id"]
    assert paid == [250]
    old = await engine.approvals.get(first.value["request_id"])
    assert old is not None
    assert old.status is ApprovalStatus.USED  # carried into the second request
    # Re-invoking without an answer walks the chain again: no new request, nothing runs.
    again = await graph.ainvoke(None, CONFIG)
    assert [i.value["request_id"] for i in again["__interrupt__"]] == [second.value["request_id"]]
    # The same plain answer again is the one already acted on: it answers nothing new.
    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    assert [i.value["request_id"] for i in state["__interrupt__"]] == [second.value["request_id"]]
    assert paid == [250]
    # A client re-sending its answer to the first interrupt, by id (LangGraph hands it to the
    # call's next interrupt), or any answer that does not name the new request: refused.
    for stale in ({first.id: APPROVE}, {second.id: APPROVE}, {**APPROVE, "note": "new"}):
        with pytest.raises(ValidationError):
            await graph.ainvoke(Command(resume=stale), CONFIG)
    assert paid == [250]
    pending = await engine.approvals.get(second.value["request_id"])
    assert pending is not None
    assert pending.status is ApprovalStatus.PENDING
    named = {**APPROVE, "request_id": second.value["request_id"]}
    state = await graph.ainvoke(Command(resume=named), CONFIG)
    assert "__interrupt__" not in state
    assert paid == [250, 200]
    assert by_call(state)["call-1-0"].content == "paid $200"
    assert await spent(engine) == 450


# --- 4: resuming twice, re-invoking -----------------------------------------------------------


async def test_reinvoking_or_resuming_twice_never_runs_twice(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(150)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    request_id = state["__interrupt__"][0].value["request_id"]
    for _ in range(2):  # no answer: the same request, asked again
        state = await graph.ainvoke(None, CONFIG)
        assert [i.value["request_id"] for i in state["__interrupt__"]] == [request_id]
    assert [r.id for r in await engine.approvals.pending()] == [request_id]

    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    assert paid == [150]
    messages = len(state["messages"])
    for resume in (Command(resume=APPROVE), None):  # nothing is waiting any more
        state = await graph.ainvoke(resume, CONFIG)
        assert len(state["messages"]) == messages
    assert paid == [150]
    assert await engine.approvals.pending() == []
    assert await spent(engine) == 150


# --- 5: parallel tool calls ------------------------------------------------------------------


async def test_parallel_calls_each_run_exactly_once(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(40), spend_call(150), spend_call(120)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    assert paid == [40]
    pending = {i.value["params"]["amount_usd"]: i for i in state["__interrupt__"]}
    assert sorted(pending) == [120, 150]
    answers = {pending[150].id: APPROVE, pending[120].id: DENY}
    state = await graph.ainvoke(Command(resume=answers), CONFIG)
    assert "__interrupt__" not in state
    assert sorted(paid) == [40, 150]
    messages = by_call(state)
    assert messages["call-0-0"].content == "paid $40"
    assert messages["call-0-1"].content == "paid $150"
    assert str(messages["call-0-2"].content).startswith("BLOCK: a human (bob) denied")
    denied = await engine.approvals.get(pending[120].value["request_id"])
    assert denied is not None
    assert denied.status is ApprovalStatus.DENIED
    assert await spent(engine) == 190


async def test_answering_one_of_two_interrupts_runs_only_that_one(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(40), spend_call(150), spend_call(120)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    pending = {i.value["params"]["amount_usd"]: i for i in state["__interrupt__"]}
    state = await graph.ainvoke(Command(resume={pending[150].id: APPROVE}), CONFIG)
    assert [i.id for i in state["__interrupt__"]] == [pending[120].id]
    assert sorted(paid) == [40, 150]
    # Approved, the $120 would now make $310 in total: a second escalation of that call.
    state = await graph.ainvoke(Command(resume={pending[120].id: APPROVE}), CONFIG)
    [again] = state["__interrupt__"]
    assert again.id != pending[120].id
    assert "spend_usd" in again.value["reason"]
    assert sorted(paid) == [40, 150]
    with pytest.raises(ValidationError):  # a second escalation's answer names its request
        await graph.ainvoke(Command(resume={again.id: APPROVE}), CONFIG)
    named = {**APPROVE, "request_id": again.value["request_id"]}
    state = await graph.ainvoke(Command(resume={again.id: named}), CONFIG)
    assert "__interrupt__" not in state
    assert sorted(paid) == [40, 120, 150]
    assert by_call(state)["call-0-2"].content == "paid $120"


def test_a_sync_graph_runs_each_call_once(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(40), spend_call(150)]])
    state = graph.invoke({"messages": [("user", "go")]}, CONFIG)
    [pending] = state["__interrupt__"]
    assert paid == [40]
    state = graph.invoke(Command(resume={pending.id: APPROVE}), CONFIG)
    assert sorted(paid) == [40, 150]
    assert by_call(state)["call-0-1"].content == "paid $150"


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_a_sync_graph_on_a_shared_store_runs_each_call_once(kind: str, tmp_path: Path) -> None:
    # Sync tools run on the engine's own event loop: the store's connections are kept.
    Path("policies.yaml").write_text(POLICIES)
    engine = PolicyEngine(
        LocalFilePolicyStore("policies.yaml"), store_url(kind, tmp_path, "langgraph")
    )
    paid: list[float] = []

    async def pay(amount_usd: float) -> str:
        paid.append(amount_usd)
        return f"paid ${amount_usd}"

    try:
        tools = governed_tools([make_spend(engine, {"openai": pay})], agent_id=AGENT)
        graph = build(tools, [[spend_call(40), spend_call(150)], [spend_call(5)]])
        state = graph.invoke({"messages": [("user", "go")]}, CONFIG)
        [pending] = state["__interrupt__"]
        state = graph.invoke(Command(resume={pending.id: APPROVE}), CONFIG)
        assert sorted(paid) == [5, 40, 150]
        assert by_call(state)["call-0-1"].content == "paid $150"
    finally:
        engine.close()


async def test_a_shared_tool_task_reruns_finished_calls_so_governed_tools_do_not_pause_there(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """The finding: ``tools_condition`` runs all calls in one task, re-run on resume.

    An interrupt there would run the $40 again; so a governed tool that escalates in such a
    task does not interrupt: the model reads ESCALATE and the request waits.
    """
    graph = build(tools, [[spend_call(40), spend_call(150)]], per_call=False)
    with caplog.at_level(logging.WARNING, logger="limenex.integrations.langgraph"):
        state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    assert "__interrupt__" not in state
    assert paid == [40]
    escalated = by_call(state)["call-0-1"]
    assert escalated.status == "error"
    assert str(escalated.content).startswith("ESCALATE: finance.spend: ")
    [request] = await engine.approvals.pending()
    assert request.status is ApprovalStatus.PENDING
    assert str(escalated.content).endswith(f"(approval request {request.id})")
    assert "send_tool_calls" in caplog.text


# --- 6: the schema -----------------------------------------------------------------------------


async def test_the_agent_id_is_not_the_models_to_set(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    [tool] = tools
    assert tool.name == "finance_spend"
    assert tool.description == (
        "Spend ``amount_usd`` US dollars on ``service``, if the policies allow it."
    )
    schema = tool.tool_call_schema
    assert not isinstance(schema, dict)
    shown = schema.model_json_schema()
    assert set(shown["properties"]) == {"service", "amount_usd"}
    assert shown["required"] == ["service", "amount_usd"]

    script = [
        [
            ("finance_spend", {"service": "openai", "amount_usd": 10, "agent_id": "admin"}),
            ("finance_spend", {"service": "openai", "amount_usd": 10, "tip": 1}),
            ("finance_spend", {"service": "openai"}),
        ]
    ]
    state = await build(tools, script).ainvoke({"messages": [("user", "go")]}, CONFIG)
    messages = by_call(state)
    assert all(m.status == "error" for m in messages.values())
    assert "agent_id" in str(messages["call-0-0"].content)
    assert "Extra inputs are not permitted" in str(messages["call-0-0"].content)
    assert "tip" in str(messages["call-0-1"].content)
    assert "amount_usd" in str(messages["call-0-2"].content)
    assert paid == []
    assert await engine.approvals.pending() == []


def test_bad_configuration_is_refused(engine: PolicyEngine) -> None:
    spend = make_spend(engine, {"openai": lambda amount_usd: None})
    with pytest.raises(LimenexConfigError, match="agent_id"):
        governed_tools([spend], agent_id="")
    with pytest.raises(LimenexConfigError, match="not a governed skill"):
        governed_tools([print], agent_id=AGENT)
    with pytest.raises(LimenexConfigError, match="finance_spend"):
        governed_tools([spend, spend], agent_id=AGENT)


# --- 7: @engine.governed, sync and async ----------------------------------------------------


async def test_governed_functions_sync_and_async_are_tools(engine: PolicyEngine) -> None:
    runs: list[str] = []

    @engine.governed("tools.deploy")
    def deploy(agent_id: str, service: str, *, region: str = "eu") -> str:
        """Deploy ``service`` to ``region``."""
        runs.append(f"deploy {service} {region} as {agent_id}")
        return f"deployed {service}"

    @engine.governed("finance.spend", name="async-pay")
    async def pay(agent_id: str, service: str, amount_usd: float) -> str:
        """Pay for ``service``."""
        runs.append(f"pay {service} {amount_usd} as {agent_id}")
        return f"paid {amount_usd}"

    tools = governed_tools([deploy, pay], agent_id=AGENT)
    assert [t.name for t in tools] == ["tools_deploy", "finance_spend"]
    assert tools[0].description == "Deploy ``service`` to ``region``."
    deploy_schema = tools[0].tool_call_schema
    assert not isinstance(deploy_schema, dict)
    shown = deploy_schema.model_json_schema()
    assert set(shown["properties"]) == {"service", "region"}
    assert shown["required"] == ["service"]

    script = [
        [
            ("tools_deploy", {"service": "web"}),
            ("finance_spend", {"service": "x", "amount_usd": 5}),
        ],
        [("tools_deploy", {"service": "billing", "region": "us"})],
    ]
    graph = build(tools, script)
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    [pending] = state["__interrupt__"]
    assert pending.value["params"] == {"agent_id": AGENT, "service": "billing", "region": "us"}
    assert sorted(runs) == ["deploy web eu as agent-1", f"pay x 5.0 as {AGENT}"]
    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    assert runs[-1] == "deploy billing us as agent-1"
    assert len(runs) == 3
    assert by_call(state)["call-1-0"].content == "deployed billing"


# --- 8: a durable approval, from another process ----------------------------------------------


async def test_an_approval_from_another_engine_resumes_the_graph(engine: PolicyEngine) -> None:
    # ``engine`` wrote policies.yaml; this test uses engines of its own, on SQLite.
    paid: list[float] = []

    def pay(amount_usd: float) -> str:
        paid.append(amount_usd)
        return "paid"

    first = PolicyEngine("policies.yaml", "sqlite:///state.db")
    tools = governed_tools([make_spend(first, {"openai": pay})], agent_id=AGENT)
    graph = build(tools, [[spend_call(150)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    request_id = state["__interrupt__"][0].value["request_id"]

    other = PolicyEngine("policies.yaml", "sqlite:///state.db")  # as if another process
    try:
        await other.approvals.approve(request_id, approver="dana", note="ok from the console")
    finally:
        other.close()

    try:
        state = await graph.ainvoke(
            Command(resume={"decision": "approve", "approver": "x"}), CONFIG
        )
        assert paid == [150]
        assert by_call(state)["call-0-0"].content == "paid"
        request = await first.approvals.get(request_id)
        assert request is not None
        assert (request.status, request.decided_by) == (ApprovalStatus.USED, "dana")
        await graph.ainvoke(None, CONFIG)
        assert paid == [150]
        assert await spent(first) == 150
    finally:
        first.close()


# --- 9: a bad answer -----------------------------------------------------------------------------


async def test_a_bad_answer_raises_and_leaves_the_request_pending(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    graph = build(tools, [[spend_call(150)]])
    state = await graph.ainvoke({"messages": [("user", "go")]}, CONFIG)
    request_id = state["__interrupt__"][0].value["request_id"]
    bad_answers = (
        {"decision": "maybe", "approver": "alice"},
        {"decision": "approve"},
        {"decision": "approve", "approver": "alice", "request_id": "another-request"},
        "yes",
    )
    for bad in bad_answers:
        with pytest.raises(ValidationError) as caught:
            await graph.ainvoke(Command(resume=bad), CONFIG)
        assert (
            "decision" in str(caught.value)
            or "approver" in str(caught.value)
            or ("ApprovalAnswer" in str(caught.value))
        )
        request = await engine.approvals.get(request_id)
        assert request is not None
        assert request.status is ApprovalStatus.PENDING
        assert paid == []
    state = await graph.ainvoke(Command(resume=APPROVE), CONFIG)
    assert paid == [150]
    assert by_call(state)["call-0-0"].content == "paid $150"


# --- outside a graph -----------------------------------------------------------------------------


async def test_outside_a_graph_an_escalation_is_a_refusal(
    engine: PolicyEngine, tools: list[BaseTool], paid: list[float]
) -> None:
    [tool] = tools

    def tool_call(amount: float) -> dict[str, Any]:
        args = {"service": "openai", "amount_usd": amount}
        return {"name": "finance_spend", "args": args, "id": "c1", "type": "tool_call"}

    allowed = await tool.ainvoke(tool_call(40))
    assert allowed.content == "paid $40"
    escalated = await tool.ainvoke(tool_call(150))
    assert escalated.status == "error"
    assert escalated.content.startswith("ESCALATE: finance.spend: ")
    assert paid == [40]
    [request] = await engine.approvals.pending()
    assert request.status is ApprovalStatus.PENDING


# --- the example ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_example_runs_and_tells_the_whole_story(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "langgraph_agent.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        "ALLOW",
        "paid $30.00 to openai",
        "ESCALATE",
        "approve",
        "paid $80.00 to aws",
        "BLOCK",
    ):
        assert expected in out, out
    assert out.count("paid $80.00 to aws") == 1, out
    assert list(tmp_path.iterdir()) == []
