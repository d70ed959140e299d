"""Loading policy files: strict YAML, errors with file/line/key, _extends, stores, schema."""

from __future__ import annotations

import contextlib
import textwrap
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from limenex.core.errors import PolicyFileError
from limenex.core.policy import DeterministicPolicy, SemanticPolicy
from limenex.core.policy_store import (
    InMemoryPolicyStore,
    LocalFilePolicyStore,
    PolicyStore,
    load_policy_file,
    load_policy_text,
    policy_json_schema,
)

SPEC_EXAMPLE = """\
finance.spend:
  policies:
    - type: deterministic          # per-call cap: no state
      dimension: single_spend_usd
      param: amount_usd
      operator: lte                # lt lte gt gte eq neq
      value: 500
      stateful: false
      breach_verdict: BLOCK        # BLOCK | ESCALATE
    - type: deterministic          # cumulative
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 50
      window: 24h
      scope: agent
      breach_verdict: ESCALATE
    - type: deterministic          # counter: no param means "one more call"
      dimension: spend_calls
      operator: lte
      value: 20
      window: hour
      breach_verdict: BLOCK
    - type: deterministic          # set-based
      dimension: approved_services
      param: service
      operator: in                 # in | not_in
      values: [openai, aws]
      match: exact
      breach_verdict: BLOCK
    - type: semantic               # judged by the LLM the user provides
      rule: "Escalate if the purchase looks unrelated to the user's request."
      breach_verdict: ESCALATE     # `verdict_ceiling` is accepted as an alias
"""

#: One valid policy; its keys sit on lines 3-8. Cases below edit it.
BASE = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 50
      breach_verdict: ESCALATE
"""


def error_of(text: str, path: str = "policies.yaml") -> PolicyFileError:
    with pytest.raises(PolicyFileError) as info:
        load_policy_text(text, path)
    return info.value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# --- what loads ---------------------------------------------------------------------------


def test_spec_example_loads_with_each_kind_in_order() -> None:
    skill = load_policy_text(SPEC_EXAMPLE).get("finance.spend")
    assert skill is not None
    kinds = [p.kind if isinstance(p, DeterministicPolicy) else "semantic" for p in skill.policies]
    assert kinds == ["per_call", "cumulative", "counter", "set", "semantic"]


def test_each_policy_remembers_the_line_it_starts_on() -> None:
    skill = load_policy_text(SPEC_EXAMPLE).get("finance.spend")
    assert skill is not None
    assert [p.line for p in skill.policies] == [3, 10, 18, 24, 31]


def test_float_values_load_as_the_decimal_written() -> None:
    policy_set = load_policy_text(BASE.replace("value: 50", "value: 0.1"))
    policy = policy_set.skills["finance.spend"].policies[0]
    assert isinstance(policy, DeterministicPolicy)
    assert policy.value == Decimal("0.1")


def test_empty_policies_list_means_governed_without_rules() -> None:
    skill = load_policy_text("comms.send:\n  policies: []\n").get("comms.send")
    assert skill is not None
    assert skill.policies == ()


def test_verdict_ceiling_alias_loads_as_breach_verdict() -> None:
    text = "x:\n  policies:\n    - {type: semantic, rule: r, verdict_ceiling: BLOCK}\n"
    policy = load_policy_text(text).skills["x"].policies[0]
    assert isinstance(policy, SemanticPolicy)
    assert policy.breach_verdict == "BLOCK"


def test_quoted_strings_and_utf8_text_are_fine() -> None:
    text = 'x:\n  description: "Café ✓"\n  policies: []\n'
    assert load_policy_text(text).skills["x"].description == "Café ✓"


# --- what is refused, and where -----------------------------------------------------------


def case(name: str, text: str, line: int, key: str, fragment: str) -> object:
    return pytest.param(text, line, key, fragment, id=name)


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        # unknown keys, with a suggestion
        case("parm", BASE.replace("param:", "parm:"), 5, "parm", "(did you mean 'param'?)"),
        case("polices", BASE.replace("policies:", "polices:"), 2, "polices", "'policies'?"),
        case("operater", BASE.replace("operator:", "operater:"), 6, "operater", "'operator'?"),
        case("line-is-not-a-key", BASE + "      line: 3\n", 9, "line", "unknown key"),
        case("_extnds", "_extnds: base.yaml\n", 1, "_extnds", "did you mean '_extends'?"),
        case("_setting", "_version: 1\n", 1, "_version", "the only setting is _extends"),
        # wrong types
        case("bool-as-string", BASE + '      stateful: "false"\n', 9, "stateful", "without quotes"),
        case("number-as-string", BASE.replace("50", "'50'"), 7, "value", "the string '50'"),
        case("number-as-bool", BASE.replace("50", "true"), 7, "value", "the boolean true"),
        case("inf", BASE.replace("50", ".inf"), 7, "value", "finite number"),
        case("-inf", BASE.replace("50", "-.inf"), 7, "value", "finite number"),
        case("nan", BASE.replace("50", ".nan"), 7, "value", "finite number"),
        case("operator-list", BASE.replace("lt", "[lt]"), 6, "operator", "got a list"),
        case("operator-le", BASE.replace("lt", "le"), 6, "operator", "did you mean 'lte'?"),
        case("date-as-text", BASE + "      description: 2024-01-01\n", 9, "description", "date"),
        case(
            "allow-verdict",
            BASE.replace("ESCALATE", "ALLOW"),
            8,
            "breach_verdict",
            "ALLOW cannot be a breach verdict; use BLOCK or ESCALATE",
        ),
        case(
            "lower-case-verdict",
            BASE.replace("ESCALATE", "escalate"),
            8,
            "breach_verdict",
            "'ESCALATE'?",
        ),
        # policy types
        case(
            "type-typo",
            BASE.replace("deterministic", "determinstic"),
            3,
            "type",
            "'deterministic'?",
        ),
        case(
            "type-missing",
            BASE.replace("type: deterministic\n      ", ""),
            3,
            "type",
            "missing policy type",
        ),
        case(
            "policy-not-mapping",
            "x:\n  policies:\n    - text\n",
            3,
            "policies[0]",
            "expected a mapping",
        ),
        # empty values are mistakes, not defaults
        case(
            "empty-param", BASE.replace("param: amount_usd", "param:"), 5, "param", "has no value"
        ),
        case(
            "empty-skill", "finance.spend:\n", 1, "finance.spend", "write policies: [] to govern it"
        ),
        case("empty-policies", "finance.spend: {policies: }\n", 1, "policies", "has no value"),
        case(
            "skill-is-list",
            "finance.spend: [a]\n",
            1,
            "finance.spend",
            "put the list under policies:",
        ),
        # numbers YAML 1.1 reads in surprising ways
        case("octal", BASE.replace("50", "050"), 7, "value", "YAML 1.1 reads 050 as 40"),
        case("hex", BASE.replace("50", "0x32"), 7, "value", "YAML 1.1 reads 0x32 as 50"),
        case("sexagesimal", BASE.replace("50", "1:30"), 7, "value", "YAML 1.1 reads 1:30 as 90"),
        # consistency
        case("values-on-numeric", BASE + "      values: [a]\n", 9, "values", "set operators"),
        case(
            "numeric-without-value",
            BASE.replace("value: 50", "window: 24h"),
            3,
            "value",
            "needs a value",
        ),
        case(
            "window-on-per-call",
            BASE + "      stateful: false\n      window: 24h\n",
            10,
            "window",
            "window needs a stateful policy",
        ),
        case(
            "unknown-builtin-param",
            BASE.replace("param: amount_usd", "param: amount"),
            5,
            "param",
            "its params are: agent_id, service, amount_usd (did you mean 'amount_usd'?)",
        ),
        case(
            "unknown-scope-param",
            BASE + "      scope: [agent, recipient]\n",
            9,
            "scope",
            "'recipient'",
        ),
        case(
            "bad-dimension",
            BASE.replace("spend_usd", "spend usd"),
            4,
            "dimension",
            "not a valid name",
        ),
        case("bad-skill-id", "'-x': {policies: []}\n", 1, "-x", "not a valid skill id"),
    ],
)
def test_mistakes_are_errors_naming_line_and_key(
    text: str, line: int, key: str, fragment: str
) -> None:
    error = error_of(text)
    assert (error.path, error.line, error.key) == ("policies.yaml", line, key)
    assert fragment in str(error)


def test_error_text_reads_file_line_key_problem_suggestion() -> None:
    error = error_of(BASE.replace("param:", "parm:"))
    assert str(error) == "policies.yaml:5: parm: unknown key (did you mean 'param'?)"


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    error = error_of(BASE + "      colour: red\n")
    assert error.suggestion is not None
    assert error.suggestion.startswith("valid keys: type, dimension, param, operator")
    assert "line" not in error.suggestion.split(": ")[1].split(", ")


def test_typo_key_is_reported_rather_than_the_key_it_hides() -> None:
    error = error_of(BASE.replace("      param: amount_usd\n", "").replace("value:", "vlaue:"))
    assert error.key == "vlaue"


def test_both_verdict_spellings_are_refused_at_the_alias() -> None:
    text = "x:\n  policies:\n    - type: semantic\n      rule: r\n"
    error = error_of(text + "      breach_verdict: BLOCK\n      verdict_ceiling: BLOCK\n")
    assert (error.line, error.key) == (6, "verdict_ceiling")


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("a: {policies: []}\na: {policies: []}\n", 2, "a"),
        ("a:\n  policies: []\n  policies: []\n", 3, "policies"),
        (BASE + "      value: 60\n", 9, "value"),
        ("a: {policies: [{type: semantic, rule: r, rule: s}]}\n", 1, "rule"),
    ],
    ids=["top", "skill", "policy", "flow"],
)
def test_duplicate_keys_are_errors_at_any_depth(text: str, line: int, key: str) -> None:
    error = error_of(text)
    assert (error.line, error.key, error.problem) == (line, key, "duplicate key")


@pytest.mark.parametrize(
    "value",
    ["!!str 50", "!!python/object/apply:os.system ['true']", "!custom 50", "! 50"],
    ids=["std-tag", "python-tag", "custom-tag", "non-specific-tag"],
)
def test_explicit_yaml_tags_are_refused(value: str) -> None:
    error = error_of(BASE.replace("value: 50", f"value: {value}"))
    assert error.line == 7
    assert "explicit YAML tags" in error.problem


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: &p {policies: []}\nb: *p\n", 1),
        (BASE.replace("value: 50", "value: &v 50"), 7),
        ("a: {policies: []}\nb: *p\n", 2),
    ],
    ids=["anchor-and-alias", "unused-anchor", "alias-alone"],
)
def test_anchors_and_aliases_are_refused(text: str, line: int) -> None:
    error = error_of(text)
    assert error.line == line
    assert error.problem == "anchors and aliases are not supported; use _extends"


def test_merge_keys_are_refused() -> None:
    error = error_of("a:\n  <<: {policies: []}\n")
    assert error.line == 2
    assert error.problem == "merge keys (<<) are not supported; use _extends"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("on: {policies: []}\n", "YAML reads on as a boolean"),
        ("123: {policies: []}\n", "quote it: '123'"),
        ("? [a]\n: {policies: []}\n", "keys must be text, not a list"),
    ],
    ids=["bool-key", "int-key", "complex-key"],
)
def test_keys_must_be_text(text: str, fragment: str) -> None:
    assert fragment in str(error_of(text))


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", None, "the file is empty"),
        ("# only a comment\n", None, "the file is empty"),
        ("- finance.spend\n", 1, "got a list"),
        ("hello\n", 1, "got text"),
        ("~\n", 1, "got null"),
        ("a: [\n", 2, "invalid YAML"),
        ("a: {policies: []}\n---\nb: {policies: []}\n", 2, "a single document"),
        ("a: {policies: []}\n\x08\n", 2, "character 0x0008 is not allowed"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", None, "nested too deeply"),
    ],
    ids=[
        "empty",
        "comment",
        "list",
        "scalar",
        "null",
        "syntax",
        "two-documents",
        "control-character",
        "deep",
    ],
)
def test_a_file_must_be_one_mapping(text: str, line: int | None, fragment: str) -> None:
    error = error_of(text)
    assert error.line == line
    assert fragment in error.problem


@given(st.text(max_size=200))
def test_any_text_loads_or_raises_policy_file_error(text: str) -> None:
    with contextlib.suppress(PolicyFileError):
        load_policy_text(text)


@given(st.text(alphabet="abpolicestyrm:-[]{},&*!'\"#\n 0123456789._", max_size=120))
def test_yaml_like_text_loads_or_raises_policy_file_error(text: str) -> None:
    with contextlib.suppress(PolicyFileError):
        load_policy_text(text)


# --- dimension consistency across the file ------------------------------------------------

COUNTER_ON_SPEND = """\
comms.send:
  policies:
    - {type: deterministic, dimension: spend_usd, operator: lte, value: 3, breach_verdict: BLOCK}
"""


def test_dimension_used_as_counter_and_cumulative_names_both_places() -> None:
    error = error_of(BASE + COUNTER_ON_SPEND)
    assert (error.line, error.key) == (11, "dimension")
    assert "(see policies.yaml:3)" in error.problem


def test_one_skill_adding_two_params_to_one_dimension_is_refused() -> None:
    policy = "{type: deterministic, dimension: d, param: %s, operator: lt, value: 1, "
    policy += "breach_verdict: BLOCK}"
    text = f"x:\n  policies:\n    - {policy % 'a'}\n    - {policy % 'b'}\n"
    error = error_of(text)
    assert (error.line, error.key) == (4, "param")
    assert "(see policies.yaml:3)" in error.problem


def test_skills_may_share_a_dimension_through_their_own_params() -> None:
    charge = BASE.replace("finance.spend", "finance.charge").replace("amount_usd", "amount")
    assert load_policy_text(BASE + charge).counts.policies == 2


# --- _extends -----------------------------------------------------------------------------


def test_extends_puts_parent_policies_first_and_keeps_every_skill(tmp_path: Path) -> None:
    write(
        tmp_path / "base.yaml",
        """\
        finance.spend:
          description: from base
          policies:
            - {type: semantic, rule: parent rule, breach_verdict: BLOCK}
        comms.send:
          policies: []
        """,
    )
    child = write(
        tmp_path / "policies.yaml",
        """\
        _extends: base.yaml
        finance.spend:
          policies:
            - {type: semantic, rule: child rule, breach_verdict: ESCALATE}
        web.post:
          policies: []
        """,
    )
    policy_set = load_policy_file(child)
    spend = policy_set.skills["finance.spend"]
    assert [p.rule for p in spend.policies if isinstance(p, SemanticPolicy)] == [
        "parent rule",
        "child rule",
    ]
    assert spend.description == "from base"
    assert set(policy_set.skills) == {"finance.spend", "comms.send", "web.post"}
    assert policy_set.sources == (str(child), str(tmp_path / "base.yaml"))


def test_extends_is_relative_to_the_extending_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf" / "shared" / "base.yaml", "a: {policies: []}\n")
    write(tmp_path / "conf" / "shared" / "mid.yaml", "_extends: base.yaml\nb: {policies: []}\n")
    write(tmp_path / "conf" / "policies.yaml", "_extends: shared/mid.yaml\n")
    monkeypatch.chdir(tmp_path)
    policy_set = load_policy_file(Path("conf/policies.yaml"))
    assert set(policy_set.skills) == {"a", "b"}
    assert policy_set.sources == (
        "conf/policies.yaml",
        "conf/shared/mid.yaml",
        "conf/shared/base.yaml",
    )


def test_extends_from_text_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "base.yaml", "a: {policies: []}\n")
    monkeypatch.chdir(tmp_path)
    assert set(load_policy_text("_extends: base.yaml\n").skills) == {"a"}


def test_extends_cycle_is_an_error_naming_the_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_extends: b.yaml\n")
    write(tmp_path / "b.yaml", "_extends: a.yaml\n")
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(tmp_path / "a.yaml")
    error = info.value
    assert (error.path, error.line, error.key) == (str(tmp_path / "b.yaml"), 1, "_extends")
    assert f"{tmp_path / 'a.yaml'} → {tmp_path / 'b.yaml'} → {tmp_path / 'a.yaml'}" in str(error)


def test_a_file_extending_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "_extends: p.yaml\n")
    with pytest.raises(PolicyFileError, match="_extends cycle"):
        load_policy_file(path)


def test_errors_inside_a_parent_name_the_parent_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE.replace("param:", "parm:"))
    child = write(tmp_path / "policies.yaml", "_extends: base.yaml\n")
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(child)
    assert (info.value.path, info.value.line, info.value.key) == (
        str(tmp_path / "base.yaml"),
        5,
        "parm",
    )


def test_whole_set_errors_point_into_the_file_that_wrote_the_policy(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "policies.yaml", "_extends: base.yaml\n" + COUNTER_ON_SPEND)
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(child)
    error = info.value
    assert (error.path, error.line, error.key) == (str(child), 4, "dimension")
    assert f"(see {tmp_path / 'base.yaml'}:3)" in error.problem


def test_missing_parent_is_an_error_at_the_extends_line(tmp_path: Path) -> None:
    child = write(tmp_path / "policies.yaml", "a: {policies: []}\n_extends: nope.yaml\n")
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(child)
    assert (info.value.path, info.value.line, info.value.key) == (str(child), 2, "_extends")
    assert "nope.yaml: file not found" in info.value.problem


def test_extends_must_be_a_path() -> None:
    assert error_of("_extends: [a.yaml]\n").key == "_extends"


# --- files and stores ---------------------------------------------------------------------


def test_missing_file_is_a_policy_file_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: file not found"


def test_a_directory_is_not_a_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="is a directory"):
        load_policy_file(tmp_path)


def test_non_utf8_file_is_a_policy_file_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"a: {policies: []}\n# \xff\n")
    with pytest.raises(PolicyFileError, match="not UTF-8 text"):
        load_policy_file(path)


def test_local_store_defaults_to_dot_limenex(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / ".limenex" / "policies.yaml", BASE)
    monkeypatch.chdir(tmp_path)
    store = LocalFilePolicyStore()
    assert store.path == Path(".limenex/policies.yaml")
    assert store.get("finance.spend") is not None
    assert store.get("comms.send") is None


def test_local_store_reload_picks_up_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", BASE)
    store = LocalFilePolicyStore(path)
    write(path, BASE + "comms.send: {policies: []}\n")
    assert set(store.reload().skills) == {"finance.spend", "comms.send"}
    assert store.get("comms.send") is not None


def test_local_store_reload_keeps_the_last_good_set_on_error(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", BASE)
    store = LocalFilePolicyStore(path)
    before = store.policy_set
    write(path, BASE.replace("param:", "parm:"))
    with pytest.raises(PolicyFileError):
        store.reload()
    assert store.policy_set is before
    assert store.get("finance.spend") is not None


def test_in_memory_store_from_yaml_policy_set_or_mapping() -> None:
    policy_set = load_policy_text(BASE)
    stores = [
        InMemoryPolicyStore.from_yaml(BASE),
        InMemoryPolicyStore(policy_set),
        InMemoryPolicyStore(dict(policy_set.skills)),
    ]
    assert all(isinstance(s, PolicyStore) for s in stores)
    assert {s.get("finance.spend") for s in stores} == {policy_set.get("finance.spend")}


def test_in_memory_store_from_yaml_raises_policy_file_error() -> None:
    with pytest.raises(PolicyFileError, match="<string>:5: parm"):
        InMemoryPolicyStore.from_yaml(BASE.replace("param:", "parm:"))


# --- JSON Schema --------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12_and_versioned() -> None:
    schema = policy_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"].endswith(":v1")
    assert schema["additionalProperties"] is False


def test_schema_accepts_the_spec_example() -> None:
    jsonschema.validate(yaml.safe_load(SPEC_EXAMPLE), policy_json_schema())


@pytest.mark.parametrize(
    "text",
    [
        BASE.replace("param:", "parm:"),
        BASE.replace("ESCALATE", "ALLOW"),
        BASE.replace("value: 50", "values: [a]"),
        BASE.replace("param: amount_usd", "param: null"),
        BASE + "      stateful: false\n      window: 24h\n",
        BASE + "      scope: [agent, global]\n",
        "_version: 1\n",
        "x:\n  policies:\n    - {type: semantic, rule: r}\n",
    ],
    ids=[
        "unknown-key",
        "allow",
        "values-on-numeric",
        "null",
        "per-call-window",
        "global-in-list",
        "unknown-setting",
        "no-verdict",
    ],
)
def test_schema_refuses_what_the_loader_refuses(text: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(text), policy_json_schema())
