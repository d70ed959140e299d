"""Shadow mode: the would-be verdict is evaluated and audited, the action always runs."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.audit import AuditLog, BufferedAuditLog, MemorySink
from limenex.core.decision import Verdict
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import PolicyFileError
from limenex.core.policy_store import InMemoryPolicyStore, LocalFilePolicyStore, load_policy_text
from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore
from limenex.testing import ScriptedEvaluator

MakeEngine = Callable[..., PolicyEngine]

SHADOW_SKILL = """\
finance.spend:
  mode: shadow
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 50
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: approved_services
      param: service
      operator: in
      values: [openai]
      breach_verdict: BLOCK
"""

SHADOW_POLICY = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: 100
      stateful: false
      breach_verdict: BLOCK
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 50
      mode: shadow
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_calls
      operator: lte
      value: 5
      breach_verdict: BLOCK
"""


def _totals(store: StateStore) -> dict[str, Decimal]:
    return {key.dimension: total for key, total in store.totals(0.0) if total}


async def test_a_shadow_skill_runs_every_action_and_counts_every_amount(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    sink = MemorySink()
    engine = make_engine(SHADOW_SKILL, audit_logger=AuditLog(sink))
    ran: list[int] = []

    async def pay() -> int:
        ran.append(30)
        return 30

    for _ in range(3):  # 60 and 90 would breach `lte 50`
        result = await engine.execute(
            "finance.spend", "a", {"service": "aws", "amount_usd": 30}, pay
        )
        assert result == 30
    assert ran == [30, 30, 30]
    totals = {k.dimension: v for k, v in state_store.totals(engine.clock.now())}
    assert totals["spend_usd"] == 90  # the shadow totals are real: later verdicts are realistic
    executed = [r for r in sink.records if r.event == "executed"]
    assert [r.verdict for r in executed] == ["ALLOW"] * 3
    first, second, third = (r.extra["shadow"] for r in executed)
    # Every call breaks the service list (policy 2, BLOCK); the 2nd and 3rd also the cap.
    assert first == {
        "verdict": "BLOCK",
        "policy_index": 1,
        "breaches": [
            {
                "policy_index": 1,
                "verdict": "BLOCK",
                "reason": "finance.spend: service 'aws' is not in approved_services [openai] "
                "(policy 2, BLOCK).",
            }
        ],
    }
    assert second["verdict"] == "ESCALATE"
    assert [b["policy_index"] for b in second["breaches"]] == [0, 1]
    assert "would reach 60 (30 recorded + 30 proposed)" in second["breaches"][0]["reason"]
    assert "would reach 90 (60 recorded + 30 proposed)" in third["breaches"][0]["reason"]


def test_a_shadow_skill_runs_on_the_sync_path_too(make_engine: MakeEngine) -> None:
    sink = MemorySink()
    engine = make_engine(SHADOW_SKILL, audit_logger=AuditLog(sink))
    assert engine.execute_sync("finance.spend", "a", {"service": "x", "amount_usd": 80}, lambda: 1)
    (record,) = [r for r in sink.records if r.event == "executed"]
    assert record.extra["shadow"]["verdict"] == "ESCALATE"


async def test_a_shadow_policy_reports_and_enforced_policies_still_decide(
    make_engine: MakeEngine,
) -> None:
    sink = MemorySink()
    engine = make_engine(SHADOW_POLICY, audit_logger=AuditLog(sink))
    params = {"service": "aws", "amount_usd": 40}
    await engine.execute("finance.spend", "a", params, lambda: None)
    decision = await engine.evaluate("finance.spend", "a", params)
    assert decision.verdict is Verdict.ALLOW
    assert decision.shadow_verdict is Verdict.ESCALATE
    (shadow,) = decision.shadow
    assert (shadow.policy_index, shadow.observed, shadow.projected) == (1, 40, 80)
    await engine.execute("finance.spend", "a", params, lambda: None)  # runs: only shadow breached
    with pytest.raises(BlockedError) as blocked:  # the enforced per-call cap still blocks
        await engine.execute("finance.spend", "a", {"service": "aws", "amount_usd": 500}, _never)
    assert blocked.value.decision.policy_index == 0
    assert blocked.value.decision.shadow == ()  # policy 1 decided before the shadow policy
    executed = [r for r in sink.records if r.event == "executed"]
    assert "shadow" not in executed[0].extra
    assert executed[1].extra["shadow"]["verdict"] == "ESCALATE"


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_enforced_breach_after_a_shadow_breach_carries_both(
    make_engine: MakeEngine, sync: bool
) -> None:
    """The store refuses at the enforced counter and sends no totals: the shadow total
    before it is read separately, so the refusal still says what the shadow policy saw."""
    sink = MemorySink()
    engine = make_engine(SHADOW_POLICY, audit_logger=AuditLog(sink))
    params = {"service": "s", "amount_usd": 20}
    for _ in range(5):
        await engine.execute("finance.spend", "a", params, _none)
    with pytest.raises(BlockedError) as blocked:  # the 6th call breaks the enforced counter
        await _call(engine, params, sync=sync)
    decision = blocked.value.decision
    assert decision.policy_index == 2
    assert decision.shadow_verdict is Verdict.ESCALATE
    assert [(d.policy_index, d.observed) for d in decision.shadow] == [(1, 100)]
    dry = await engine.evaluate("finance.spend", "a", params)
    assert (dry.verdict, dry.shadow) == (Verdict.BLOCK, decision.shadow)
    (record,) = [r for r in sink.records if r.event == "blocked"]
    assert record.extra["shadow"]["verdict"] == "ESCALATE"
    assert record.extra["shadow"]["policy_index"] == 1


async def test_a_shadow_breach_after_the_deciding_policy_is_not_reported(
    make_engine: MakeEngine,
) -> None:
    """With the shadow policy enforced, the earlier enforced one would still decide."""
    sink = MemorySink()
    engine = make_engine(
        """\
        finance.spend:
          policies:
            - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lt,
               value: 50, breach_verdict: ESCALATE}
            - {type: deterministic, dimension: approved_services, param: service,
               operator: in, values: [openai], breach_verdict: BLOCK, mode: shadow}
        """,
        audit_logger=AuditLog(sink),
    )
    params = {"service": "aws", "amount_usd": 60}
    for decision in (
        await engine.evaluate("finance.spend", "a", params),
        (await _escalated(engine, params)).decision,
    ):
        assert (decision.verdict, decision.shadow, decision.shadow_verdict) == (
            Verdict.ESCALATE,
            (),
            None,
        )
    (record,) = [r for r in sink.records if r.event == "escalated"]
    assert "shadow" not in record.extra


async def _call(engine: PolicyEngine, params: dict[str, Any], *, sync: bool) -> None:
    if sync:
        engine.execute_sync("finance.spend", "a", params, _never)
    else:
        await engine.execute("finance.spend", "a", params, _never)


async def _escalated(engine: PolicyEngine, params: dict[str, Any]) -> EscalationRequired:
    with pytest.raises(EscalationRequired) as escalated:
        await engine.execute("finance.spend", "a", params, _never)
    return escalated.value


async def test_a_shadow_semantic_rule_is_asked_audited_and_never_enforced(tmp_path: Path) -> None:
    yaml_text = """\
    comms.send:
      policies:
        - type: semantic
          rule: "Block anything rude."
          breach_verdict: BLOCK
          mode: shadow
        - type: semantic
          rule: "Escalate any promise."
          breach_verdict: ESCALATE
    """
    sink = MemorySink()
    evaluator = ScriptedEvaluator(
        [{"verdict": "BLOCK", "reason": "rude"}, "ALLOW", TimeoutError("x"), "ALLOW"]
    )
    engine = PolicyEngine(
        InMemoryPolicyStore.from_yaml(textwrap.dedent(yaml_text)),
        "memory://",
        llm_evaluator=evaluator,
        audit_logger=AuditLog(sink),
    )
    sent: list[str] = []
    for _ in range(2):
        await engine.execute(
            "comms.send", "a", {"text": "you fool"}, lambda: sent.append("you fool")
        )
    assert sent == ["you fool", "you fool"]  # both enforced rules were asked and held
    first, second = (r for r in sink.records if r.event == "executed")
    assert first.extra["shadow"]["verdict"] == "BLOCK"
    assert "rude" in first.extra["shadow"]["breaches"][0]["reason"]
    assert [e["policy_index"] for e in first.extra["semantic"]] == [0, 1]
    # A shadow rule whose model fails counts as breached, in shadow: the call still runs.
    assert second.extra["shadow"]["verdict"] == "BLOCK"
    assert "error" in second.extra["semantic"][0]
    engine.close()


async def test_the_buffered_default_log_keeps_the_shadow_entry(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    sink = MemorySink()
    log = BufferedAuditLog(AuditLog(sink))
    engine = make_engine(SHADOW_SKILL, audit_logger=log)
    await engine.execute("finance.spend", "a", {"service": "aws", "amount_usd": 10}, _none)
    log.flush()
    (record,) = sink.records
    assert record.event == "executed"
    assert record.extra["shadow"]["verdict"] == "BLOCK"
    log.close()


def test_an_escalate_in_shadow_makes_no_approval_request(make_engine: MakeEngine) -> None:
    engine = make_engine(SHADOW_SKILL)
    engine.execute_sync("finance.spend", "a", {"service": "openai", "amount_usd": 80}, lambda: 1)
    assert asyncio.run(engine.approvals.pending()) == []


def test_shadow_does_not_change_failure_handling() -> None:
    """Shadow changes what policies decide, not what failures do: a store down BLOCKs."""

    class Down(InMemoryStateStore):
        def reserve(self, checks: Any, now: float) -> Any:
            raise OSError("store down")

    engine = PolicyEngine(InMemoryPolicyStore.from_yaml(SHADOW_SKILL), Down(), audit_logger=False)
    with pytest.raises(BlockedError) as blocked:
        engine.execute_sync("finance.spend", "a", {"service": "openai", "amount_usd": 1}, _never)
    assert blocked.value.decision.fail_closed


# --- the policy format ---------------------------------------------------------------------


def test_a_policy_may_not_enforce_inside_a_shadow_skill() -> None:
    text = SHADOW_SKILL.replace(
        "      breach_verdict: BLOCK", "      breach_verdict: BLOCK\n      mode: enforce"
    )
    with pytest.raises(PolicyFileError) as error:
        load_policy_text(text, "p.yaml")
    assert error.value.line == 2
    assert error.value.key == "mode"
    assert "shadow mode" in str(error.value)


def test_an_unknown_mode_is_refused_with_a_suggestion() -> None:
    with pytest.raises(PolicyFileError) as error:
        load_policy_text(SHADOW_SKILL.replace("mode: shadow", "mode: shadw"), "p.yaml")
    assert str(error.value) == (
        "p.yaml:2: mode: expected one of enforce, shadow; got the string 'shadw' "
        "(did you mean 'shadow'?)"
    )


def test_an_extending_file_cannot_put_its_baseline_in_shadow(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "finance.spend:\n  policies:\n"
        "    - {type: deterministic, dimension: single_spend_usd, param: amount_usd,"
        " operator: lte, value: 100, stateful: false, breach_verdict: BLOCK}\n"
    )
    (tmp_path / "team.yaml").write_text(
        "_extends: base.yaml\nfinance.spend:\n  mode: shadow\n  policies:\n"
        "    - {type: deterministic, dimension: approved_services, param: service,"
        " operator: in, values: [openai], breach_verdict: BLOCK}\n"
    )
    store = LocalFilePolicyStore(tmp_path / "team.yaml")
    skill = store.get("finance.spend")
    assert skill is not None
    assert [skill.policy_mode(i) for i in range(2)] == ["enforce", "shadow"]
    assert skill.mode == "enforce"  # not every file that names the skill says shadow
    engine = PolicyEngine(store, "memory://", audit_logger=False)
    ran = engine.execute_sync("finance.spend", "a", {"service": "aws", "amount_usd": 5}, lambda: 1)
    assert ran == 1  # the team's own rule is in shadow
    with pytest.raises(BlockedError):  # the baseline's cap is enforced
        engine.execute_sync("finance.spend", "a", {"service": "aws", "amount_usd": 500}, _never)
    engine.close()


def test_mode_is_kept_out_of_the_approval_digest_unless_written() -> None:
    plain = load_policy_text(SHADOW_POLICY.replace("      mode: shadow\n", ""))
    policy = plain.skills["finance.spend"].policies[1]
    assert "mode" not in policy.to_yaml_dict()
    shadow = load_policy_text(SHADOW_POLICY).skills["finance.spend"].policies[1]
    assert shadow.to_yaml_dict()["mode"] == "shadow"


# --- the invariant ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    amounts=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12),
    limit=st.integers(min_value=0, max_value=100),
)
def test_shadow_always_runs_and_counts_exactly(amounts: list[int], limit: int) -> None:
    """Whatever the limit, a shadow skill runs every call, the total is the exact sum, and
    the audit's would-be verdict is ESCALATE exactly when the running total passes it."""
    text = textwrap.dedent(
        f"""\
        finance.spend:
          mode: shadow
          policies:
            - {{type: deterministic, dimension: spend_usd, param: amount_usd, operator: lte,
                value: {limit}, breach_verdict: ESCALATE}}
        """
    )
    sink = MemorySink()
    store = InMemoryStateStore()
    engine = PolicyEngine(InMemoryPolicyStore.from_yaml(text), store, audit_logger=AuditLog(sink))
    runs = 0

    def act() -> None:
        nonlocal runs
        runs += 1

    total = 0
    expected: list[str | None] = []
    for amount in amounts:
        total += amount
        expected.append("ESCALATE" if total > limit else None)
        engine.execute_sync("finance.spend", "a", {"service": "s", "amount_usd": amount}, act)
    assert runs == len(amounts)
    assert dict((k.dimension, v) for k, v in store.totals(0.0)).get("spend_usd", 0) == total
    seen = [r.extra.get("shadow", {}).get("verdict") for r in sink.records if r.event == "executed"]
    assert seen == expected
    engine.close()


async def _none() -> None:
    return None


def _never() -> None:
    raise AssertionError("the executor must not run")


def test_audit_tail_marks_a_call_shadow_policies_would_have_stopped(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from limenex.audit import JsonlSink, verify
    from limenex.cli import main

    log = AuditLog(JsonlSink(tmp_path / "audit.log"))
    engine = PolicyEngine(
        InMemoryPolicyStore.from_yaml(SHADOW_SKILL), "memory://", audit_logger=log
    )
    engine.execute_sync("finance.spend", "a", {"service": "openai", "amount_usd": 80}, lambda: 1)
    engine.close()
    log.close()
    out = CliRunner().invoke(main, ["audit", "tail", "--path", str(tmp_path / "audit.log")]).stdout
    assert out.rstrip().endswith("[shadow: ESCALATE by policy 1]")
    assert verify(tmp_path / "audit.log").ok


def test_a_skill_switched_to_shadow_in_code_invalidates_its_approvals() -> None:
    """The digest an approval request keeps covers the mode each policy is applied in, so
    a request approved under enforced policies is not resumed under shadow ones."""
    from limenex.core.policy import SkillPolicies

    enforced = load_policy_text(SHADOW_SKILL.replace("  mode: shadow\n", "")).skills
    shadow = {k: SkillPolicies(policies=v.policies, mode="shadow") for k, v in enforced.items()}
    first = PolicyEngine(InMemoryPolicyStore(enforced), "memory://", audit_logger=False)
    second = PolicyEngine(InMemoryPolicyStore(shadow), "memory://", audit_logger=False)
    skill = "finance.spend"
    assert first._policies_digest(first.skill(skill)) != second._policies_digest(
        second.skill(skill)
    )
    first.close()
    second.close()
