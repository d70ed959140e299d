"""``engine.explain``: the evaluate verdict, a per-policy trace, and no state change."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.core.decision import Verdict
from limenex.core.engine import PolicyEngine
from limenex.core.errors import InvalidArgumentError, LimenexError
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore, LocalFileStateStore, SQLiteStateStore
from limenex.testing import ScriptedEvaluator

MakeEngine = Callable[..., PolicyEngine]

POLICIES = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: 200
      stateful: false
      breach_verdict: BLOCK
    - type: deterministic
      dimension: approved_services
      param: service
      operator: in
      values: [openai, aws]
      breach_verdict: BLOCK
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 100
      window: day
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_calls
      operator: lte
      value: 3
      breach_verdict: BLOCK
    - type: semantic
      rule: "Escalate if the purchase looks unrelated to the task."
      breach_verdict: ESCALATE
"""


def _run(engine: PolicyEngine, amount: int, service: str = "openai") -> None:
    engine.execute_sync("finance.spend", "a", {"service": service, "amount_usd": amount}, _ok)


def _ok() -> None:
    return None


async def test_the_trace_shows_what_each_policy_compared(make_engine: MakeEngine) -> None:
    engine = make_engine(POLICIES, llm_evaluator=lambda intent, rule: "ALLOW")
    _run(engine, 40)
    _run(engine, 30)
    explained = await engine.explain("finance.spend", "a", {"service": "azure", "amount_usd": 50})
    assert explained.verdict is Verdict.BLOCK
    assert explained.decision.policy_index == 1
    cap, services, spend, calls, rule = explained.trace
    assert (cap.result, cap.proposed, cap.limit, cap.reached) == ("holds", 50, 200, True)
    assert (services.result, services.decisive) == ("breached", True)
    assert services.detail == (
        "service = 'azure' is not in [openai, aws] (match: exact), must be in"
    )
    # Policies after the one that decided are judged all the same, marked not reached.
    assert (spend.result, spend.reached) == ("breached", False)
    assert (spend.observed, spend.proposed, spend.projected, spend.limit) == (70, 50, 120, 100)
    assert spend.detail == (
        "spend_usd for agent 'a' in window day: 70 recorded + 50 proposed = 120, must be < 100"
    )
    assert (calls.observed, calls.proposed, calls.projected, calls.result) == (2, 1, 3, "holds")
    assert (rule.result, rule.reached) == ("not asked", False)


async def test_semantic_rules_are_asked_only_when_reached(make_engine: MakeEngine) -> None:
    evaluator = ScriptedEvaluator([{"verdict": "ESCALATE", "reason": "looks unrelated"}])
    engine = make_engine(POLICIES, llm_evaluator=evaluator)
    explained = await engine.explain("finance.spend", "a", {"service": "aws", "amount_usd": 5})
    assert explained.verdict is Verdict.ESCALATE
    assert explained.trace[4].result == "breached"
    assert explained.trace[4].detail == "the model answered ESCALATE: looks unrelated"
    assert len(evaluator.calls) == 1


async def test_without_a_model_the_verdict_says_what_it_depends_on(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(POLICIES)
    explained = await engine.explain(
        "finance.spend", "a", {"service": "aws", "amount_usd": 5}, judge=False
    )
    assert explained.verdict is Verdict.ALLOW
    assert explained.unjudged == (5,)
    assert explained.trace[4].result == "not judged"
    assert "Semantic rule 5 was not judged" in explained.render()
    assert explained.to_dict()["unjudged"] == [5]


def test_explain_changes_no_state(tmp_path: Path) -> None:
    """Totals, pending reservations, approval requests and the files stay as they were."""
    for store in (
        SQLiteStateStore(tmp_path / "state.db"),
        LocalFileStateStore(tmp_path / "file" / "state.json"),
    ):
        engine = PolicyEngine(
            InMemoryPolicyStore.from_yaml(POLICIES), store, audit_logger=False, llm_evaluator=_yes
        )
        _run(engine, 60)
        before = (store.totals(engine.clock.now()), store.pending(engine.clock.now()))
        files = _digests(tmp_path)
        for amount in (10, 50, 500):
            explained = engine.explain_sync(
                "finance.spend", "a", {"service": "aws", "amount_usd": amount}, judge=False
            )
            assert explained.verdict in (Verdict.ALLOW, Verdict.ESCALATE, Verdict.BLOCK)
        assert (store.totals(engine.clock.now()), store.pending(engine.clock.now())) == before
        assert _digests(tmp_path) == files  # before looking at approvals (that makes a lock)
        assert engine.approval_store.pending(engine.clock.now()) == []
        engine.close()


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


async def test_bad_input_is_refused_as_a_governed_call_would_be(make_engine: MakeEngine) -> None:
    engine = make_engine(POLICIES)
    with pytest.raises(InvalidArgumentError) as error:
        await engine.explain("finance.spend", "a", {"service": "aws", "amount_usd": "5"})
    assert error.value.argument == "amount_usd"


# --- the verdict is evaluate's ------------------------------------------------------------

_POLICY = st.sampled_from(
    [
        "{type: deterministic, dimension: single_spend_usd, param: amount_usd, operator: lte,"
        " value: %(v)s, stateful: false, breach_verdict: %(b)s%(m)s}",
        "{type: deterministic, dimension: spend_usd, param: amount_usd, operator: lt,"
        " value: %(v)s, breach_verdict: %(b)s%(m)s}",
        "{type: deterministic, dimension: spend_usd, param: amount_usd, operator: lte,"
        " value: %(v)s, breach_verdict: %(b)s%(m)s}",
        "{type: deterministic, dimension: spend_calls, operator: lte, value: %(c)s,"
        " breach_verdict: %(b)s%(m)s}",
        "{type: deterministic, dimension: services, param: service, operator: in,"
        " values: [a, b], breach_verdict: %(b)s%(m)s}",
        "{type: semantic, rule: 'rule', breach_verdict: %(b)s%(m)s}",
    ]
)


@st.composite
def _policy_files(draw: st.DrawFn) -> str:
    lines = []
    for template in draw(st.lists(_POLICY, min_size=0, max_size=5)):
        lines.append(
            "    - "
            + template
            % {
                "v": draw(st.integers(0, 60)),
                "c": draw(st.integers(0, 4)),
                "b": draw(st.sampled_from(["BLOCK", "ESCALATE"])),
                "m": draw(st.sampled_from(["", ", mode: shadow"])),
            }
        )
    return "finance.spend:\n  policies:" + ("\n" + "\n".join(lines) if lines else " []") + "\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=_policy_files(),
    history=st.lists(st.integers(0, 30), max_size=4),
    amount=st.integers(0, 40),
    service=st.sampled_from(["a", "c"]),
    answer=st.sampled_from(["ALLOW", "BLOCK"]),
)
def test_explain_gives_evaluates_verdict(
    text: str, history: list[int], amount: int, service: str, answer: str
) -> None:
    store = InMemoryStateStore()
    engine = PolicyEngine(
        InMemoryPolicyStore.from_yaml(text),
        store,
        audit_logger=False,
        llm_evaluator=lambda intent, rule: answer,
    )
    for spent in history:
        with contextlib.suppress(LimenexError):  # a refused call records nothing, as intended
            engine.execute_sync("finance.spend", "x", {"service": "a", "amount_usd": spent}, _ok)
    params: dict[str, Any] = {"service": service, "amount_usd": amount}
    evaluated = engine.evaluate_sync("finance.spend", "x", params)
    explained = engine.explain_sync("finance.spend", "x", params)
    assert explained.decision == evaluated  # verdict, policy, numbers, reason and shadow
    decisive = [entry for entry in explained.trace if entry.decisive]
    assert [e.number - 1 for e in decisive] == (
        [] if evaluated.policy_index is None else [evaluated.policy_index]
    )
    for entry in explained.trace:
        if entry.reached and entry.result == "breached" and entry.mode == "enforce":
            assert entry.decisive  # the first enforced breach reached is the one that decides
    engine.close()


def test_amounts_are_exact_in_the_trace(make_engine: MakeEngine) -> None:
    engine = make_engine(POLICIES, llm_evaluator=_yes)
    for _ in range(3):
        _run_decimal(engine, Decimal("0.10"))
    explained = engine.explain_sync(
        "finance.spend", "a", {"service": "aws", "amount_usd": 0.2}, judge=False
    )
    spend = explained.trace[2]
    assert (spend.observed, spend.proposed, spend.projected) == (
        Decimal("0.30"),
        Decimal("0.2"),
        Decimal("0.50"),
    )
    assert explained.to_dict()["trace"][2]["projected"] == "0.50"


def _run_decimal(engine: PolicyEngine, amount: Decimal) -> None:
    engine.execute_sync("finance.spend", "a", {"service": "aws", "amount_usd": amount}, _ok)


def test_explain_reads_every_store(state_store: StateStore, make_engine: MakeEngine) -> None:
    engine = make_engine(POLICIES, llm_evaluator=_yes)
    _run(engine, 90)
    explained = engine.explain_sync(
        "finance.spend", "a", {"service": "aws", "amount_usd": 20}, judge=False
    )
    assert explained.verdict is Verdict.ESCALATE
    assert explained.trace[2].observed == 90


def _yes(intent: str, rule: str) -> str:
    return "ALLOW"


async def test_a_shadow_rule_left_unjudged_does_not_change_the_verdict(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        """\
        comms.send:
          policies:
            - {type: semantic, rule: "Shadow tone check.", breach_verdict: BLOCK, mode: shadow}
            - {type: semantic, rule: "Enforced promise check.", breach_verdict: ESCALATE}
        """
    )
    explained = await engine.explain("comms.send", "a", {"text": "hi"}, judge=False)
    assert [entry.result for entry in explained.trace] == ["not judged", "not judged"]
    assert explained.unjudged == (2,)  # only the enforced rule can change the verdict
    assert "Semantic rule 1" not in explained.render()
