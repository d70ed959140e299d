"""A semantic evaluator over Anthropic's Messages API.

::

    from anthropic import AsyncAnthropic
    from limenex.semantic.anthropic import AnthropicEvaluator

    evaluator = AnthropicEvaluator(AsyncAnthropic(), "claude-haiku-4-5", timeout=5.0)
    engine = PolicyEngine("policies.yaml", llm_evaluator=evaluator)

Needs ``pip install 'limenex[anthropic]'``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

try:
    import anthropic
    from anthropic.types import Message, MessageParam, ToolChoiceToolParam, ToolParam
except ImportError as exc:  # pragma: no cover - exercised with the SDK hidden
    raise ImportError(
        "limenex.semantic.anthropic needs the Anthropic SDK: pip install 'limenex[anthropic]'"
    ) from exc

from limenex.semantic._adapter import ANSWER_NAME, ANSWER_SCHEMA, Adapter, Reply, run_blocking

__all__ = ["AnthropicEvaluator"]

_TOOL: ToolParam = {
    "name": ANSWER_NAME,
    "description": "Record the verdict on the action and the reason for it.",
    "input_schema": ANSWER_SCHEMA,
}
_CHOICE: ToolChoiceToolParam = {
    "type": "tool",
    "name": ANSWER_NAME,
    "disable_parallel_tool_use": True,
}


class AnthropicEvaluator(Adapter):
    """Judges semantic rules with ``model`` through ``client``'s Messages API.

    ``client`` is an ``anthropic.AsyncAnthropic`` or a sync ``anthropic.Anthropic`` (run on
    the adapters' own bounded worker threads; prefer the async client, whose timeout ends
    the call). The rule goes in ``system``, the action only in the user message, as
    quoted JSON data; the model must answer by calling one forced tool whose input is
    ``{"verdict", "reason"}``, parsed strictly (``raw`` is that input as JSON text). Each
    call is bounded by ``timeout`` seconds and never retried; any failure raises
    :class:`~limenex.semantic.SemanticError`, which the engine turns into the policy's breach
    verdict. ``cache_ttl`` (seconds) reuses successful judgements of identical
    ``(model, rule, action)``, at most ``cache_size`` of them.
    """

    provider = "Anthropic"
    timeout_errors = (anthropic.APITimeoutError,)

    def __init__(
        self,
        client: anthropic.AsyncAnthropic | anthropic.Anthropic,
        model: str,
        *,
        timeout: float = 10.0,
        cache_ttl: float | None = None,
        cache_size: int = 1024,
        max_tokens: int = 1024,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(client, anthropic.AsyncAnthropic | anthropic.Anthropic):
            raise TypeError(
                "client must be an anthropic.AsyncAnthropic or anthropic.Anthropic, "
                f"got {type(client).__name__}"
            )
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        super().__init__(
            model, timeout=timeout, cache_ttl=cache_ttl, cache_size=cache_size, clock=clock
        )
        self.client = client
        self.max_tokens = max_tokens

    async def _request(self, system: str, user: str) -> Reply:
        messages: list[MessageParam] = [{"role": "user", "content": user}]
        client = self.client
        if isinstance(client, anthropic.AsyncAnthropic):
            api = client.with_options(timeout=self.timeout, max_retries=0).messages
            response = await api.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=system,
                messages=messages,
                tools=[_TOOL],
                tool_choice=_CHOICE,
            )
        else:
            sync = client.with_options(timeout=self.timeout, max_retries=0).messages

            def create() -> Message:
                return sync.create(
                    model=self.model,
                    max_tokens=self.max_tokens,
                    system=system,
                    messages=messages,
                    tools=[_TOOL],
                    tool_choice=_CHOICE,
                )

            response = await run_blocking(create)
        return _reply(response)


def _reply(response: Message) -> Reply:
    model = response.model if isinstance(response.model, str) and response.model else None
    texts = [block.text for block in response.content if block.type == "text"]
    calls = [block for block in response.content if block.type == "tool_use"]
    if response.stop_reason == "refusal":
        raw = "\n".join(texts) or None
        return Reply(raw, model, problem="the model refused to answer")
    if len(calls) != 1 or calls[0].name != ANSWER_NAME:
        raw = "\n".join(texts) or None
        names = [call.name for call in calls]
        return Reply(
            raw, model, problem=f"the model did not call the {ANSWER_NAME} tool once: {names}"
        )
    raw = json.dumps(calls[0].input, ensure_ascii=False)
    if not isinstance(calls[0].input, dict):  # the tool's input is an object, nothing else
        kind = type(calls[0].input).__name__
        return Reply(raw, model, problem=f"the tool input is a {kind}, not an object")
    if response.stop_reason == "max_tokens":
        return Reply(raw, model, problem="the answer was cut off (max_tokens)")
    return Reply(raw, model, answer=calls[0].input)
