"""A LangGraph agent whose payments are governed, with a human approving one of them.

Offline: the "LLM" is a scripted chat model. It asks for two payments at once ($30 to
OpenAI, $80 to AWS); the policy lets payments up to $50 through, sends bigger ones to a
human and refuses anything over $500. The graph pauses on the $80 (``interrupt``), a human
approves it with ``Command(resume=...)``, and it runs exactly once. Then the agent tries
$900 and is refused. Policies, state, approvals and the audit log live in a temporary
folder that is removed at the end.

Run it from the repository root: ``python examples/langgraph_agent.py``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command

from limenex.core.engine import PolicyEngine
from limenex.integrations.langgraph import governed_tools, send_tool_calls
from limenex.skills.finance import make_spend

POLICIES = """\
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
      dimension: reviewed_spend_usd
      param: amount_usd
      operator: lte
      value: 50
      stateful: false
      breach_verdict: ESCALATE
"""

# What the scripted model does on its n-th turn: (tool name, arguments) per tool call.
SCRIPT: list[list[tuple[str, dict[str, Any]]]] = [
    [
        ("finance_spend", {"service": "openai", "amount_usd": 30}),
        ("finance_spend", {"service": "aws", "amount_usd": 80}),
    ],
    [("finance_spend", {"service": "openai", "amount_usd": 900})],
]


class ScriptedModel(BaseChatModel):
    """Stands in for an LLM: answers its n-th turn with ``SCRIPT[n]``."""

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        turn = sum(isinstance(message, AIMessage) for message in messages)
        if turn < len(SCRIPT):
            calls = [
                {"name": name, "args": args, "id": f"call-{turn}-{n}", "type": "tool_call"}
                for n, (name, args) in enumerate(SCRIPT[turn])
            ]
            message = AIMessage("", tool_calls=calls)
        else:
            message = AIMessage("Done: $30 to OpenAI and $80 to AWS are paid; $900 was refused.")
        return ChatResult(generations=[ChatGeneration(message=message)])


def payer(service: str) -> Any:
    def pay(amount_usd: float) -> str:
        print(f"  [executor] paid ${amount_usd:.2f} to {service}")
        return f"receipt: ${amount_usd:.2f} to {service}"

    return pay


def report(messages: Sequence[BaseMessage]) -> None:
    """Print what the tools answered since the agent last spoke."""
    for message in reversed(messages):
        if isinstance(message, AIMessage):
            break
    answers = [m for m in messages[messages.index(message) + 1 :] if isinstance(m, ToolMessage)]
    for answer in answers:  # a refusal already says BLOCK or ESCALATE
        text = answer.content if answer.status == "error" else f"ALLOW: {answer.content}"
        print(f"tool -> agent: {text}")


def main(folder: Path) -> None:
    (folder / "policies.yaml").write_text(POLICIES)
    engine = PolicyEngine(folder / "policies.yaml", f"sqlite:///{folder / 'state.db'}")
    try:
        spend = make_spend(engine, {"openai": payer("openai"), "aws": payer("aws")})
        tools = governed_tools([spend], agent_id="procurement-bot")
        model = ScriptedModel().bind_tools(tools)

        def agent(state: MessagesState) -> dict[str, Any]:
            report(state["messages"])
            reply = model.invoke(state["messages"])
            for call in getattr(reply, "tool_calls", []):
                print(f"agent wants: {call['name']}({call['args']})")
            if not getattr(reply, "tool_calls", []):
                print(f"agent: {reply.content}")
            return {"messages": [reply]}

        builder = StateGraph(MessagesState)
        builder.add_node("agent", agent)
        builder.add_node("tools", ToolNode(tools))
        builder.add_edge(START, "agent")
        # One task per tool call: a call that ran is never run again on resume.
        builder.add_conditional_edges("agent", send_tool_calls("tools"), ["tools", END])
        builder.add_edge("tools", "agent")
        graph = builder.compile(checkpointer=InMemorySaver())
        config: Any = {"configurable": {"thread_id": "procurement-1"}}

        print("user: Top up our API credits.")
        state = graph.invoke({"messages": [("user", "Top up our API credits.")]}, config)
        while state.get("__interrupt__"):
            answers = {}
            for pending in state["__interrupt__"]:
                asked = pending.value
                print(f"ESCALATE (paused): {asked['skill']} {asked['params']}")
                print(f"  why: {asked['reason']}")
                print(f"  request {asked['request_id']} -> alice approves: 'budgeted for Q3'")
                answers[pending.id] = {
                    "decision": "approve",
                    "approver": "alice",
                    "note": "budgeted for Q3",
                }
            state = graph.invoke(Command(resume=answers), config)
    finally:
        engine.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="limenex-langgraph-") as tmp:
        main(Path(tmp))
