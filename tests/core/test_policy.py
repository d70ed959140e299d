"""The policy models: strict fields, normalisation, consistency, and whole-set checks."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from limenex.core.decision import Verdict
from limenex.core.policy import (
    BUILTIN_SKILL_PARAMS,
    DeterministicPolicy,
    PolicySet,
    PolicySetError,
    SemanticPolicy,
    SkillPolicies,
)
from limenex.core.window import Window

CUMULATIVE: dict[str, Any] = {
    "type": "deterministic",
    "dimension": "spend_usd",
    "param": "amount_usd",
    "operator": "lt",
    "value": 50,
    "breach_verdict": "ESCALATE",
}
COUNTER: dict[str, Any] = {
    "type": "deterministic",
    "dimension": "spend_calls",
    "operator": "lte",
    "value": 20,
    "breach_verdict": "BLOCK",
}
SET: dict[str, Any] = {
    "type": "deterministic",
    "dimension": "approved_services",
    "param": "service",
    "operator": "in",
    "values": ["openai", "aws"],
    "breach_verdict": "BLOCK",
}
SEMANTIC: dict[str, Any] = {"type": "semantic", "rule": "Be nice.", "breach_verdict": "ESCALATE"}


def deterministic(base: dict[str, Any] = CUMULATIVE, **changes: Any) -> DeterministicPolicy:
    data = {**base, **changes}
    return DeterministicPolicy.model_validate({k: v for k, v in data.items() if v is not ...})


def problem_of(base: dict[str, Any] = CUMULATIVE, **changes: Any) -> str:
    with pytest.raises(ValidationError) as info:
        deterministic(base, **changes)
    return str(info.value)


# --- values -------------------------------------------------------------------------------


def test_float_value_becomes_the_decimal_it_reads_as() -> None:
    assert deterministic(value=0.1).value == Decimal("0.1")


def test_int_value_is_kept_exactly() -> None:
    assert deterministic(value=10**30).value == Decimal(10**30)


def test_negative_cumulative_value_is_allowed_as_a_limit() -> None:
    assert deterministic(value=-5).value == Decimal(-5)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "got the boolean true"),
        ("50", "got the string '50'"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (float("-inf"), "finite"),
        (Decimal("NaN"), "finite"),
        ([50], "got a list"),
    ],
    ids=["bool", "string", "nan", "inf", "-inf", "decimal-nan", "list"],
)
def test_value_must_be_a_finite_number(value: object, fragment: str) -> None:
    assert fragment in problem_of(value=value)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"stateful": "false"}, "valid boolean"),
        ({"stateful": 0}, "valid boolean"),
        ({"dimension": 5}, "valid string"),
        ({"param": True}, "valid string"),
        ({"description": 3}, "valid string"),
    ],
    ids=["stateful-string", "stateful-int", "dimension-int", "param-bool", "description-int"],
)
def test_fields_are_strictly_typed(changes: dict[str, Any], fragment: str) -> None:
    assert fragment in problem_of(**changes)


def test_values_must_be_strings() -> None:
    assert "valid string" in problem_of(SET, values=["openai", 1])


def test_values_must_not_be_empty() -> None:
    assert "at least 1 item" in problem_of(SET, values=[])


@pytest.mark.parametrize("dimension", ["__limenex__", "spend usd", "1st", "", "spend\n"])
def test_dimension_must_be_identifier_like(dimension: str) -> None:
    assert "not a valid name" in problem_of(dimension=dimension)


def test_unknown_operator_is_refused() -> None:
    assert "operator" in problem_of(operator="le")


def test_unknown_keys_are_refused() -> None:
    assert "Extra inputs are not permitted" in problem_of(parm="amount_usd")


# --- verdicts -----------------------------------------------------------------------------


def test_allow_cannot_be_a_breach_verdict() -> None:
    assert "ALLOW cannot be a breach verdict; use BLOCK or ESCALATE" in problem_of(
        breach_verdict="ALLOW"
    )


def test_verdicts_are_case_sensitive_upper_case() -> None:
    assert "did you mean 'BLOCK'?" in problem_of(breach_verdict="block")


def test_breach_verdict_is_a_verdict_member() -> None:
    assert deterministic(breach_verdict="BLOCK").breach_verdict is Verdict.BLOCK


# --- window and scope ---------------------------------------------------------------------


def test_window_is_parsed_from_its_spec() -> None:
    assert deterministic(window="24h").window == Window(spec="24h", seconds=86400)


def test_invalid_window_is_refused_with_the_window_message() -> None:
    assert "invalid window '2 days'" in problem_of(window="2 days")


@pytest.mark.parametrize(
    ("scope", "normalised"),
    [
        ("agent", ("agent",)),
        ("global", ("global",)),
        (["agent"], ("agent",)),
        (["recipient", "agent_id", "agent"], ("agent", "recipient")),
    ],
)
def test_scope_is_normalised(scope: object, normalised: tuple[str, ...]) -> None:
    assert deterministic(scope=scope).scope == normalised


def test_scope_defaults_to_agent() -> None:
    assert deterministic().scope == ("agent",)


@pytest.mark.parametrize(
    ("scope", "fragment"),
    [
        (["agent", "global"], "'global' cannot be part of a list"),
        ([], "non-empty list"),
        ("agnet", "did you mean 'agent'?"),
        ("recipient", "write [recipient]"),
        (["agent", 3], "param names"),
    ],
    ids=["global-in-list", "empty", "typo", "bare-param", "non-string"],
)
def test_invalid_scope_is_refused(scope: object, fragment: str) -> None:
    assert fragment in problem_of(scope=scope)


# --- kinds and consistency ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "kind", "stateful"),
    [
        ({**CUMULATIVE, "stateful": False}, "per_call", False),
        (CUMULATIVE, "cumulative", True),
        ({**CUMULATIVE, "stateful": True}, "cumulative", True),
        (COUNTER, "counter", True),
        (SET, "set", False),
    ],
    ids=["per_call", "cumulative", "cumulative-explicit", "counter", "set"],
)
def test_kind_follows_operator_param_and_stateful(
    policy: dict[str, Any], kind: str, stateful: bool
) -> None:
    model = DeterministicPolicy.model_validate(policy)
    assert (model.kind, model.is_stateful) == (kind, stateful)


@pytest.mark.parametrize(
    ("base", "changes", "fragment"),
    [
        (CUMULATIVE, {"value": ...}, "operator lt needs a value"),
        (CUMULATIVE, {"values": ["a"]}, "values belongs to the set operators"),
        (CUMULATIVE, {"match": "glob"}, "match belongs to the set operators"),
        (SET, {"values": ...}, "operator in needs values"),
        (SET, {"param": ...}, "operator in needs param"),
        (SET, {"value": 3}, "value has no meaning for operator in"),
        (SET, {"window": "24h"}, "window has no meaning for operator in"),
        (SET, {"scope": "global"}, "scope has no meaning for operator in"),
        (SET, {"stateful": True}, "operator in cannot be stateful"),
        (COUNTER, {"stateful": False}, "needs a param to compare"),
        (CUMULATIVE, {"stateful": False, "window": "1h"}, "window needs a stateful policy"),
        (CUMULATIVE, {"stateful": False, "scope": "global"}, "scope needs a stateful policy"),
    ],
    ids=[
        "numeric-needs-value",
        "numeric-forbids-values",
        "numeric-forbids-match",
        "set-needs-values",
        "set-needs-param",
        "set-forbids-value",
        "set-forbids-window",
        "set-forbids-scope",
        "set-cannot-be-stateful",
        "per-call-needs-param",
        "per-call-forbids-window",
        "per-call-forbids-scope",
    ],
)
def test_inconsistent_combinations_are_refused(
    base: dict[str, Any], changes: dict[str, Any], fragment: str
) -> None:
    assert fragment in problem_of(base, **changes)


def test_set_policy_may_say_stateful_false() -> None:
    assert deterministic(SET, stateful=False).kind == "set"


# --- identity and serialisation -----------------------------------------------------------


def test_policies_are_frozen() -> None:
    policy = deterministic()
    with pytest.raises(ValidationError):
        policy.value = Decimal(1)  # type: ignore[misc]  # the point: assignment is refused


def test_equality_and_hash_ignore_the_line() -> None:
    a, b = deterministic(line=3), deterministic(line=30)
    assert a == b
    assert hash(a) == hash(b)
    assert a != deterministic(value=51)


@pytest.mark.parametrize(
    "policy",
    [
        {**CUMULATIVE, "value": 0.1, "window": "24h", "scope": ["agent", "recipient"]},
        {**CUMULATIVE, "stateful": False, "description": "cap"},
        {**COUNTER, "scope": "global", "window": "hour"},
        {**SET, "match": "glob"},
    ],
    ids=["cumulative", "per_call", "counter", "set"],
)
def test_to_yaml_dict_is_json_ready_and_loads_back_equal(policy: dict[str, Any]) -> None:
    model = DeterministicPolicy.model_validate(policy)
    written = json.loads(json.dumps(model.to_yaml_dict()))
    assert DeterministicPolicy.model_validate(written) == model


def test_to_yaml_dict_writes_what_was_written() -> None:
    model = deterministic(value=0.1, window="24h", scope=["agent"])
    assert model.to_yaml_dict() == {**CUMULATIVE, "value": 0.1, "window": "24h", "scope": "agent"}


def test_semantic_accepts_verdict_ceiling_as_alias() -> None:
    policy = SemanticPolicy.model_validate(
        {"type": "semantic", "rule": "r", "verdict_ceiling": "BLOCK"}
    )
    assert policy.breach_verdict is Verdict.BLOCK
    assert policy.to_yaml_dict() == {"type": "semantic", "rule": "r", "breach_verdict": "BLOCK"}


def test_semantic_refuses_both_verdict_spellings() -> None:
    with pytest.raises(ValidationError, match="not both"):
        SemanticPolicy.model_validate({**SEMANTIC, "verdict_ceiling": "BLOCK"})


@pytest.mark.parametrize("rule", ["", "   "])
def test_semantic_rule_must_not_be_empty(rule: str) -> None:
    with pytest.raises(ValidationError, match="must not be empty"):
        SemanticPolicy.model_validate({**SEMANTIC, "rule": rule})


def test_semantic_refuses_allow() -> None:
    with pytest.raises(ValidationError, match="ALLOW cannot be a breach verdict"):
        SemanticPolicy.model_validate({**SEMANTIC, "breach_verdict": "ALLOW"})


def test_skill_policies_picks_the_model_by_type() -> None:
    skill = SkillPolicies.model_validate({"policies": [CUMULATIVE, SEMANTIC]})
    assert [type(p) for p in skill.policies] == [DeterministicPolicy, SemanticPolicy]


# --- the whole set ------------------------------------------------------------------------


def policy_set(**skills: list[dict[str, Any]]) -> PolicySet:
    """``finance_spend=[...]`` builds skill ``finance.spend``."""
    return PolicySet(
        {
            k.replace("_", "."): SkillPolicies.model_validate({"policies": v})
            for k, v in skills.items()
        }
    )


def set_error(**skills: list[dict[str, Any]]) -> PolicySetError:
    with pytest.raises(PolicySetError) as info:
        policy_set(**skills)
    return info.value


def test_builtin_skill_params_are_the_published_signatures() -> None:
    assert BUILTIN_SKILL_PARAMS["finance.spend"] == ("agent_id", "service", "amount_usd")
    assert BUILTIN_SKILL_PARAMS["finance.charge"] == ("agent_id", "provider", "amount", "currency")
    assert BUILTIN_SKILL_PARAMS["filesystem.move"] == ("agent_id", "src", "dst")
    assert len(BUILTIN_SKILL_PARAMS) == 7


def test_counts_split_deterministic_and_semantic() -> None:
    counts = policy_set(finance_spend=[CUMULATIVE, SEMANTIC], comms_send=[]).counts
    assert counts == (2, 2, 1, 1)
    assert counts.semantic == 1


def test_get_returns_none_for_an_unknown_skill() -> None:
    assert policy_set(comms_send=[]).get("finance.spend") is None


def test_skills_mapping_is_read_only() -> None:
    skills = policy_set(comms_send=[]).skills
    with pytest.raises(TypeError):
        skills["x"] = SkillPolicies(policies=())  # type: ignore[index]  # the point


def test_unknown_param_of_a_builtin_skill_names_the_valid_ones() -> None:
    error = set_error(finance_spend=[{**CUMULATIVE, "param": "amount"}])
    assert error.key == "param"
    assert "its params are: agent_id, service, amount_usd" in error.problem
    assert error.suggestion == "did you mean 'amount_usd'?"


def test_unknown_scope_name_of_a_builtin_skill_is_refused() -> None:
    error = set_error(comms_send=[{**COUNTER, "scope": ["agent", "recipent"]}])
    assert (error.key, error.suggestion) == ("scope", "did you mean 'recipient'?")


def test_builtin_scope_names_and_agent_are_accepted() -> None:
    policy_set(comms_send=[{**COUNTER, "scope": ["agent_id", "recipient"]}])


def test_custom_skills_accept_any_param() -> None:
    policy_set(my_tool=[{**CUMULATIVE, "param": "whatever", "scope": ["tenant"]}])


def test_numeric_operator_on_a_text_param_is_refused() -> None:
    error = set_error(finance_spend=[{**CUMULATIVE, "param": "service"}])
    assert "is text, not a number" in error.problem


def test_set_operator_on_a_numeric_param_is_refused() -> None:
    error = set_error(finance_spend=[{**SET, "param": "amount_usd"}])
    assert "is a number" in error.problem


def test_one_skill_cannot_add_two_params_to_one_dimension() -> None:
    error = set_error(my_tool=[{**CUMULATIVE, "param": "a"}, {**CUMULATIVE, "param": "b"}])
    assert (error.index, error.key, error.related) == (1, "param", ("my.tool", 0))


def test_one_dimension_cannot_be_both_counter_and_cumulative() -> None:
    error = set_error(
        finance_spend=[CUMULATIVE], comms_send=[{**COUNTER, "dimension": "spend_usd"}]
    )
    assert (error.skill_id, error.key, error.related) == (
        "comms.send",
        "dimension",
        ("finance.spend", 0),
    )
    assert "a call counter here but a running total of 'amount_usd'" in error.problem


def test_two_skills_may_share_a_dimension_through_different_params() -> None:
    charge = {**CUMULATIVE, "param": "amount"}
    assert policy_set(finance_spend=[CUMULATIVE], finance_charge=[charge]).counts.policies == 2


def test_stateless_policies_do_not_constrain_dimension_use() -> None:
    per_call = {**CUMULATIVE, "stateful": False}
    policy_set(finance_spend=[per_call, {**COUNTER, "dimension": "spend_usd"}])


@pytest.mark.parametrize("skill_id", ["", "_private", "-x", "a b"])
def test_skill_ids_must_be_well_formed(skill_id: str) -> None:
    with pytest.raises(PolicySetError, match="not a valid skill id"):
        PolicySet({skill_id: SkillPolicies(policies=())})
