"""A semantic evaluator over any OpenAI-compatible Chat Completions endpoint.

OpenAI itself, vLLM, Ollama, llama.cpp's server... anything ``openai.OpenAI(base_url=...)``
can talk to::

    from openai import AsyncOpenAI
    from limenex.semantic.openai import OpenAIEvaluator

    evaluator = OpenAIEvaluator(AsyncOpenAI(), "gpt-4o-mini", timeout=5.0, cache_ttl=60)
    engine = PolicyEngine("policies.yaml", llm_evaluator=evaluator)

Needs ``pip install 'limenex[openai]'``.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import openai
    from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
    from openai.types.shared_params import ResponseFormatJSONSchema
except ImportError as exc:  # pragma: no cover - exercised with the SDK hidden
    raise ImportError(
        "limenex.semantic.openai needs the OpenAI SDK: pip install 'limenex[openai]'"
    ) from exc

from limenex.semantic._adapter import ANSWER_NAME, ANSWER_SCHEMA, Adapter, Reply, run_blocking

__all__ = ["OpenAIEvaluator"]

_FORMAT: ResponseFormatJSONSchema = {
    "type": "json_schema",
    "json_schema": {"name": ANSWER_NAME, "strict": True, "schema": ANSWER_SCHEMA},
}


class OpenAIEvaluator(Adapter):
    """Judges semantic rules with ``model`` through ``client``'s Chat Completions API.

    ``client`` is an ``openai.AsyncOpenAI`` or a sync ``openai.OpenAI`` (run on
    the adapters' own bounded worker threads; prefer the async client, whose timeout ends
    the call). The rule goes in the system message, the action only in the user message, as
    quoted JSON data; the answer is asked for as strict JSON schema output and parsed
    strictly. Each call is bounded by ``timeout`` seconds and never retried; any failure
    raises :class:`~limenex.semantic.SemanticError`, which the engine turns into the
    policy's breach verdict. ``cache_ttl`` (seconds) reuses successful judgements of
    identical ``(model, rule, action)``, at most ``cache_size`` of them.
    """

    provider = "OpenAI"
    timeout_errors = (openai.APITimeoutError,)

    def __init__(
        self,
        client: openai.AsyncOpenAI | openai.OpenAI,
        model: str,
        *,
        timeout: float = 10.0,
        cache_ttl: float | None = None,
        cache_size: int = 1024,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(client, openai.AsyncOpenAI | openai.OpenAI):
            raise TypeError(
                "client must be an openai.AsyncOpenAI or openai.OpenAI, "
                f"got {type(client).__name__}"
            )
        super().__init__(
            model, timeout=timeout, cache_ttl=cache_ttl, cache_size=cache_size, clock=clock
        )
        self.client = client

    async def _request(self, system: str, user: str) -> Reply:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]
        client = self.client
        if isinstance(client, openai.AsyncOpenAI):
            completions = client.with_options(timeout=self.timeout, max_retries=0).chat.completions
            response = await completions.create(
                model=self.model, messages=messages, response_format=_FORMAT
            )
        else:
            sync = client.with_options(timeout=self.timeout, max_retries=0).chat.completions

            def create() -> ChatCompletion:
                return sync.create(model=self.model, messages=messages, response_format=_FORMAT)

            response = await run_blocking(create)
        return _reply(response)


def _reply(response: ChatCompletion) -> Reply:
    model = response.model if isinstance(response.model, str) and response.model else None
    if not response.choices:
        return Reply(None, model, problem="the response has no choices")
    choice = response.choices[0]
    message = choice.message
    if message.refusal:
        return Reply(message.refusal, model, problem=f"the model refused: {message.refusal:.200}")
    raw = message.content
    if choice.finish_reason in ("length", "content_filter"):
        return Reply(raw, model, problem=f"the answer was cut off ({choice.finish_reason})")
    if not isinstance(raw, str):
        return Reply(None, model, problem="the answer has no text")
    return Reply(raw, model, answer=raw)
