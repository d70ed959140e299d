"""The adapters' judgement cache: identical questions within the TTL are not asked again."""

from __future__ import annotations

import asyncio
import threading

import pytest
import stub as s
from stub import REPORTED_MODEL, MakeEvaluator, StubServer

from limenex.core.decision import Verdict
from limenex.core.evaluation import Intent
from limenex.semantic import Judgement, SemanticError
from limenex.semantic._adapter import JudgementCache

RULE = "Block any message that shares a password."


def intent(text: str = "hello") -> Intent:
    return Intent("comms.send", "agent-7", {"channel": "email", "text": text})


class Clock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_identical_call_within_the_ttl_is_answered_from_the_cache(
    make_evaluator: MakeEvaluator, stub: StubServer
) -> None:
    stub.answer(s.verdict("BLOCK", "shares a password"))
    clock = Clock()
    evaluator = make_evaluator(cache_ttl=60, clock=clock)

    first = await evaluator(intent(), RULE)
    clock.now += 59.9
    second = await evaluator(intent(), RULE)

    assert len(stub.requests) == 1
    assert first.cached is False
    assert second.cached is True
    assert (second.verdict, second.reason, second.model, second.raw) == (
        Verdict.BLOCK,
        "shares a password",
        REPORTED_MODEL,
        first.raw,
    )


async def test_after_the_ttl_the_model_is_asked_again(
    make_evaluator: MakeEvaluator, stub: StubServer
) -> None:
    stub.answer(s.sequence(s.verdict("ALLOW"), s.verdict("BLOCK")))
    clock = Clock()
    evaluator = make_evaluator(cache_ttl=60, clock=clock)

    assert (await evaluator(intent(), RULE)).verdict is Verdict.ALLOW
    clock.now += 60
    again = await evaluator(intent(), RULE)

    assert len(stub.requests) == 2
    assert again.verdict is Verdict.BLOCK
    assert again.cached is False
    assert (await evaluator(intent(), RULE)).cached is True  # the fresh answer is kept


async def test_failures_are_never_cached(make_evaluator: MakeEvaluator, stub: StubServer) -> None:
    stub.answer(s.sequence(s.status(500), s.text("not json"), s.verdict("ALLOW")))
    evaluator = make_evaluator(cache_ttl=60)

    with pytest.raises(SemanticError):
        await evaluator(intent(), RULE)
    with pytest.raises(SemanticError):
        await evaluator(intent(), RULE)
    judgement = await evaluator(intent(), RULE)

    assert len(stub.requests) == 3
    assert judgement.verdict is Verdict.ALLOW
    assert judgement.cached is False


async def test_a_different_rule_or_action_is_asked_anew(
    make_evaluator: MakeEvaluator, stub: StubServer
) -> None:
    evaluator = make_evaluator(cache_ttl=60)
    await evaluator(intent(), RULE)
    other_rule = await evaluator(intent(), RULE + " Or a credit card number.")
    other_action = await evaluator(intent("hello!"), RULE)
    other_agent = await evaluator(Intent("comms.send", "agent-8", intent().params), RULE)
    assert len(stub.requests) == 4
    assert [other_rule.cached, other_action.cached, other_agent.cached] == [False] * 3


async def test_without_a_ttl_nothing_is_cached(
    make_evaluator: MakeEvaluator, stub: StubServer
) -> None:
    evaluator = make_evaluator()
    results = [await evaluator(intent(), RULE) for _ in range(3)]
    assert len(stub.requests) == 3
    assert not any(judgement.cached for judgement in results)


async def test_the_cache_keeps_the_most_recently_used_up_to_its_size(
    make_evaluator: MakeEvaluator, stub: StubServer
) -> None:
    evaluator = make_evaluator(cache_ttl=60, cache_size=2)
    a, b, c = intent("a"), intent("b"), intent("c")
    await evaluator(a, RULE)
    await evaluator(b, RULE)
    assert (await evaluator(a, RULE)).cached  # a is now the most recently used
    await evaluator(c, RULE)  # evicts b, the least recently used
    assert len(stub.requests) == 3
    assert (await evaluator(a, RULE)).cached
    assert (await evaluator(c, RULE)).cached
    assert not (await evaluator(b, RULE)).cached
    assert len(stub.requests) == 4


async def test_concurrent_identical_calls_all_get_the_answer(
    make_evaluator: MakeEvaluator, stub: StubServer
) -> None:
    stub.answer(s.verdict("ESCALATE", "unsure"))
    evaluator = make_evaluator(cache_ttl=60)
    results = await asyncio.gather(*(evaluator(intent(), RULE) for _ in range(8)))
    assert {(j.verdict, j.reason) for j in results} == {(Verdict.ESCALATE, "unsure")}
    assert (await evaluator(intent(), RULE)).cached


def test_the_cache_is_thread_safe_and_bounded() -> None:
    cache = JudgementCache(ttl=60, size=16, clock=Clock())
    judgement = Judgement(Verdict.ALLOW, "ok")
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(2000):
                key = ("m", "rule", f"{n}-{i % 40}")
                cache.put(key, judgement)
                found = cache.get(key)
                assert found is None or found is judgement
        except BaseException as exc:  # pragma: no cover - only on a bug
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) == 16
