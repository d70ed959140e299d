"""LangGraph: governed skills as LangChain tools, with a human in the loop.

:func:`governed_tools` turns skills (what ``make_spend(engine, registry)`` and the other
factories return, and ``@engine.governed`` functions, sync or async) into LangChain tools.
Each is named after its skill id (``finance.spend`` -> ``finance_spend``), described by the
skill's docstring, and takes exactly the skill's arguments *without* the agent id, which the
integration sets: a model cannot choose whom it acts as, and unknown arguments are refused.

* **ALLOW**: the executor runs; its result is the tool's output.
* **BLOCK**: the model reads a refusal naming the verdict and the reason (an error
  ``ToolMessage``); nothing ran.
* **ESCALATE**: the tool calls :func:`langgraph.types.interrupt` with the pending request
  (``request_id``, ``skill``, ``agent_id``, ``params``, ``reason``, ``expires_at``). Resume
  with ``Command(resume={"decision": "approve" | "deny", "approver": NAME, "note": TEXT})``:
  approve runs the action exactly once (every BLOCK policy still applies; a further
  ESCALATE interrupts again, and its answer must name its ``request_id``), deny gives the
  model a refusal. The approval lives in the
  engine's approval store, so a human may also approve from another process
  (``engine.approvals.approve``) before the graph is resumed.

LangGraph re-runs a task from the top when it resumes it, so each escalation is keyed by the
tool call (thread, checkpoint namespace, tool call id): the re-run finds the request the
first run made instead of asking twice, and an approved action runs once.

**Run one tool call per task.** A ``ToolNode`` reached by a plain edge (``tools_condition``)
runs all of a step's tool calls in *one* task; when one of them interrupts, LangGraph re-runs
the whole task on resume and the calls that had already run would run again. Dispatch each
call as its own task with :func:`send_tool_calls` (as ``create_react_agent``'s default
``version="v2"`` and LangChain's ``create_agent`` do): a finished call is then never re-run.
A governed tool that escalates in a task that is not its own does not interrupt: the model
reads the ESCALATE refusal, the request waits in ``engine.approvals``, and a warning is
logged.

Usage::

    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode
    from langgraph.types import Command

    from limenex.integrations.langgraph import governed_tools, send_tool_calls

    tools = governed_tools([make_spend(engine, {"openai": pay})], agent_id="agent-1")
    llm = chat_model.bind_tools(tools)

    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [llm.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", send_tool_calls("tools"), ["tools", END])
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=InMemorySaver())

    config = {"configurable": {"thread_id": "t-1"}}
    state = graph.invoke({"messages": [("user", "Buy credits")]}, config)
    for pending in state.get("__interrupt__", []):  # one per escalated tool call
        print(pending.value["reason"])
    answers = {
        pending.id: {"decision": "approve", "approver": "alice", "note": "ok"}
        for pending in state["__interrupt__"]
    }
    graph.invoke(Command(resume=answers), config)
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, InjectedToolCallId, ToolException
from langgraph.config import get_config
from langgraph.graph import END
from langgraph.prebuilt.tool_node import ToolCallWithContext
from langgraph.types import Send, interrupt
from pydantic import BaseModel, ConfigDict, Field, create_model

from limenex.approvals.request import ApprovalRequest, ApprovalStatus, request_id_for
from limenex.core.decision import Verdict
from limenex.core.errors import LimenexConfigError
from limenex.integrations import Outcome, SkillHandle, call, decide, handle_of, tool_name

__all__ = ["ApprovalAnswer", "GovernedTool", "governed_tools", "send_tool_calls"]

log = logging.getLogger(__name__)

_CALL_ID = "limenex_tool_call_id"
"""The hidden field LangChain fills with the tool call's id (never shown to the model)."""

_SCRATCHPAD = "__pregel_scratchpad"
"""Present in a LangGraph task's ``configurable``: the tool runs inside a graph."""

_PUSH = "__pregel_push"
"""The first item of a ``Send`` task's ``langgraph_path``: a task of its own."""

_HAS_RESPONSE_SCHEMA = "response_schema" in inspect.signature(interrupt).parameters


class ApprovalAnswer(BaseModel):
    """What a human resumes an escalated tool call with (``Command(resume=...)``)."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "deny"]
    approver: str = Field(min_length=1, pattern=r"\S")
    note: str | None = None
    request_id: str | None = None
    """Optional: the request this answers (``interrupt_payload()["request_id"]``)."""


class GovernedTool(BaseTool):
    """A governed skill as a LangChain tool; made by :func:`governed_tools`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    handle: SkillHandle
    """The skill this tool calls."""
    agent_id: str
    """Who every call acts as; set by the integration, never by the model."""
    handle_tool_error: bool = True  # a refusal (ToolException) becomes an error ToolMessage

    def _run(self, config: RunnableConfig, **kwargs: Any) -> Any:
        kwargs.pop("run_manager", None)
        # On the engine's helper loop, in this call's context (LangGraph's config).
        return self.handle.engine._await_elsewhere(self._govern(kwargs, config))

    async def _arun(self, config: RunnableConfig, **kwargs: Any) -> Any:
        kwargs.pop("run_manager", None)
        return await self._govern(kwargs, config)

    async def _govern(self, arguments: dict[str, Any], config: RunnableConfig) -> Any:
        call_id = arguments.pop(_CALL_ID, None)
        handle = self.handle
        conf = config.get("configurable") or {}
        thread = conf.get("thread_id")
        if _SCRATCHPAD not in conf or thread is None or not call_id:
            # Not in a resumable graph: nothing can pause, so an ESCALATE is a refusal and
            # the request waits in engine.approvals for a human.
            return _finish(await call(handle, self.agent_id, arguments))
        key = f"langgraph:{thread}:{conf.get('checkpoint_ns', '')}:{call_id}"
        outcome, step = await _pick_up(handle, self.agent_id, arguments, key)
        if outcome.verdict is Verdict.ESCALATE and _shares_task(config):
            # Pausing here would make LangGraph run this task's other tool calls again on
            # resume: the request waits in engine.approvals instead, and the model is told.
            log.warning(
                "limenex: %s escalated in a task that runs several tool calls, so it does "
                "not interrupt (resuming would run the others again); dispatch each tool "
                "call as its own task (limenex.integrations.langgraph.send_tool_calls)",
                self.name,
            )
            return _finish(outcome)
        while outcome.verdict is Verdict.ESCALATE and outcome.request is not None:
            answer = _ask(outcome.interrupt_payload(), step)
            step += 1
            outcome = await decide(handle, outcome.request.id, answer, next_key=_key(key, step))
        return _finish(outcome)


def governed_tools(skills: Iterable[Callable[..., Any]], *, agent_id: str) -> list[BaseTool]:
    """LangChain tools for ``skills``, every call made as ``agent_id``.

    ``skills`` are what the skill factories return and ``@engine.governed`` functions. Run the
    tools one call per task (see :func:`send_tool_calls`) in a graph with a checkpointer.
    """
    if not isinstance(agent_id, str) or not agent_id.strip():
        raise LimenexConfigError("governed_tools: agent_id must be a non-empty string")
    tools: list[BaseTool] = []
    names: set[str] = set()
    for skill in skills:
        handle = handle_of(skill)
        name = tool_name(handle.skill_id)
        if name in names:
            raise LimenexConfigError(
                f"governed_tools: two tools would be named {name!r}; give each skill its own id"
            )
        names.add(name)
        description = inspect.getdoc(handle.fn) or f"The governed skill {handle.skill_id}."
        tools.append(
            GovernedTool(
                name=name,
                description=description,
                args_schema=_args_schema(handle, name, description),
                handle=handle,
                agent_id=agent_id,
            )
        )
    return tools


def send_tool_calls(
    node: str = "tools", *, otherwise: str = END, messages_key: str = "messages"
) -> Callable[[Any], list[Send] | str]:
    """A conditional edge sending each tool call of the last AI message to ``node`` alone.

    Each call becomes its own task, so a call that finished is never run again when another
    one interrupts and the step is resumed. Without tool calls, the edge goes to
    ``otherwise``.
    """

    def route(state: Any) -> list[Send] | str:
        messages: list[AnyMessage] = (
            state[messages_key] if isinstance(state, Mapping) else getattr(state, messages_key)
        )
        last = messages[-1] if messages else None
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return otherwise
        return [
            Send(
                node,
                ToolCallWithContext(
                    __type="tool_call_with_context", tool_call=tool_call, state=state
                ),
            )
            for tool_call in last.tool_calls
        ]

    return route


# --- internals ------------------------------------------------------------------------------


def _key(key: str, step: int) -> str:
    """The key of the ``step``-th request of one tool call's chain of escalations."""
    return key if step == 0 else f"{key}#{step}"


async def _pick_up(
    handle: SkillHandle, agent_id: str, arguments: dict[str, Any], key: str
) -> tuple[Outcome, int]:
    """The call's outcome so far, and how many escalations of its chain were answered.

    A first run evaluates the call. A re-run (LangGraph resumed the task) finds the requests
    the earlier runs made: for each one already answered (its successor exists) it calls
    ``interrupt`` again, which returns the recorded answer, so that LangGraph's count of the
    task's interrupts stays aligned; then it stands where the chain ends.
    """
    approvals = handle.engine.approvals
    request = await approvals.get(request_id_for(key))
    if request is None:
        return await call(handle, agent_id, arguments, key=key), 0
    step = 0
    while (following := await approvals.get(request_id_for(_key(key, step + 1)))) is not None:
        _ask(_payload(request), step)  # answered already: returns the answer acted on
        request, step = following, step + 1
    if request.status is ApprovalStatus.USED:  # approved and run by an earlier run
        return Outcome(
            Verdict.ALLOW,
            result=(
                f"The approved action already ran (approval request {request.id}); "
                "it is not run again."
            ),
            request=request,
        ), step
    return await call(handle, agent_id, arguments, key=_key(key, step)), step


def _shares_task(config: RunnableConfig) -> bool:
    """Whether the tool runs in a task that may run other tool calls too (not a ``Send``)."""
    path = (config.get("metadata") or {}).get("langgraph_path")
    return not (isinstance(path, tuple | list) and path and path[0] == _PUSH)


def _payload(request: ApprovalRequest) -> dict[str, Any]:
    return Outcome(Verdict.ESCALATE, reason=request.reason, request=request).interrupt_payload()


def _ask(payload: dict[str, Any], index: int) -> dict[str, Any]:
    """Pause for a human (``interrupt``, this task's ``index``-th); their answer, checked.

    The answer may name the ``request_id`` it answers; one naming another request is refused
    like a malformed one (LangGraph raises, records nothing, and the request stays pending).
    From the call's second escalation on (``index`` > 0) it *must* name it: LangGraph hands
    an answer keyed by the call's first interrupt id to its next interrupt, so a client
    re-sending its first answer would otherwise approve a request no human has seen.
    """
    schema = _answer_schema(payload["request_id"], required=index > 0)
    _drop_stale_answer(index)
    if _HAS_RESPONSE_SCHEMA:  # LangGraph checks the answer and never hands a bad one to a model
        answer = interrupt(payload, response_schema=schema)
    else:  # pragma: no cover - LangGraph before response_schema
        answer = schema.model_validate(interrupt(payload))
    return answer.model_dump(exclude={"request_id"}, exclude_none=True)


def _answer_schema(request_id: str, *, required: bool) -> type[ApprovalAnswer]:
    """:class:`ApprovalAnswer` whose ``request_id`` must be ``request_id`` (or absent)."""
    only: Any = Literal.__getitem__(request_id)  # Literal[<this request's id>]
    field = (only, ...) if required else (only | None, None)
    schema: type[ApprovalAnswer] = create_model(
        "ApprovalAnswer", __base__=ApprovalAnswer, request_id=field
    )
    return schema


def _drop_stale_answer(index: int) -> None:
    """Keep an answer already acted on from answering a later escalation of the same call.

    A plain ``Command(resume=answer)`` stays in the checkpoint until the step ends: when the
    call escalated again after acting on it, re-invoking the graph without a new answer
    would hand that same answer to the new request, which no human has seen. Such an answer
    (one this task already took from an earlier interrupt) is dropped, so the new request
    interrupts again. Answers given by interrupt id, or naming the request, are never stale.
    """
    if not index:
        return  # the first interrupt: nothing was taken before it
    pad = get_config().get("configurable", {}).get(_SCRATCHPAD)
    taken = getattr(pad, "resume", None)
    peek = getattr(pad, "get_null_resume", None)
    if not isinstance(taken, list) or not callable(peek):  # fail closed, never silently
        raise LimenexConfigError(
            "this LangGraph version keeps resume answers differently: limenex cannot tell a "
            "stale answer from a new one, so the escalated call is not resumed "
            "(install a LangGraph version this limenex supports: langgraph>=1.0,<2)"
        )
    if len(taken) != index:
        return  # an answer recorded for this very interrupt
    value = peek(False)
    if value is not None and value in taken:
        peek(True)  # consumed for this run only; nothing is recorded


def _finish(outcome: Outcome) -> Any:
    if outcome.verdict is Verdict.ALLOW:
        return outcome.result
    raise ToolException(outcome.refusal())


def _args_schema(handle: SkillHandle, name: str, description: str) -> type[BaseModel]:
    """The tool's arguments: the skill's, without the agent id; nothing else accepted."""
    hints = _type_hints(handle.fn)
    fields: dict[str, Any] = {}
    for param in handle.signature.parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise LimenexConfigError(
                f"{handle.skill_id}: parameter {param.name!r} cannot be a tool argument "
                "(a tool passes named arguments only: no *args, **kwargs or positional-only)"
            )
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    if _CALL_ID in fields:
        raise LimenexConfigError(f"{handle.skill_id}: {_CALL_ID!r} is reserved")
    fields[_CALL_ID] = (Annotated[str | None, InjectedToolCallId], None)
    model: type[BaseModel] = create_model(
        name,
        __config__=ConfigDict(extra="forbid", protected_namespaces=()),
        __doc__=description,
        **fields,
    )
    return model


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """``fn``'s parameter annotations, resolved where they can be (else ``Any``)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: S110 - an annotation that cannot be resolved: one by one below
        pass
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    hints: dict[str, Any] = {}
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 - the function's own
            except Exception:
                annotation = Any
        hints[name] = annotation
    return hints
