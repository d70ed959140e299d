"""``limenex test``: policy test cases in YAML, their readable failures and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import limenex.cli.policy_tests
import limenex.core.engine
from limenex.cli import main
from limenex.core.errors import PolicyFileError
from limenex.policy_tests import load_test_file, run_test_file

ROOT = Path(__file__).resolve().parents[2]

SPEND = """\
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
      value: 50
      breach_verdict: ESCALATE
"""

SECOND_PURCHASE = """\
policies: policies.yaml
cases:
  - name: the first $30 purchase runs
    call: {skill: finance.spend, agent: agent-1, params: {service: openai, amount_usd: 30}}
    expect: {verdict: ALLOW}
  - name: the second $30 purchase asks a human
    given:
      calls:
        - {skill: finance.spend, agent: agent-1, params: {service: openai, amount_usd: 30}}
    call: {skill: finance.spend, agent: agent-1, params: {service: openai, amount_usd: 30}}
    expect: {verdict: ESCALATE, policy: spend_usd}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def spend_test(tmp_path: Path, cases: str, policies: str = SPEND) -> Path:
    """A test file of ``cases`` (YAML list items) against ``policies`` in policies.yaml."""
    write(tmp_path, "policies.yaml", policies)
    return write(tmp_path, "spend.test.yaml", "policies: policies.yaml\ncases:\n" + cases)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI runs happen in the test's folder, so output names files as users see them."""
    monkeypatch.chdir(tmp_path)


def run(*args: str | Path) -> tuple[int, str, str]:
    """``limenex test ARGS`` in-process; paths are given relative to the current folder."""
    shown = [os.path.relpath(a) if isinstance(a, Path) else a for a in args]
    result = CliRunner().invoke(main, ["test", *shown])
    return result.exit_code, result.stdout, result.stderr


def run_process(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "limenex", "test", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


# --- passing and failing ------------------------------------------------------------------


def test_a_passing_file_prints_a_check_per_case_and_exits_0(tmp_path: Path) -> None:
    write(tmp_path, "policies.yaml", SPEND)
    write(tmp_path, "spend.test.yaml", SECOND_PURCHASE)
    done = run_process("spend.test.yaml", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "✓ spend.test.yaml:3  the first $30 purchase runs\n"
        "✓ spend.test.yaml:6  the second $30 purchase asks a human\n"
        "2 passed, 0 failed\n"
    )


def test_a_wrong_verdict_exits_1_with_a_readable_diff(tmp_path: Path) -> None:
    write(tmp_path, "policies.yaml", SPEND)
    write(tmp_path, "spend.test.yaml", SECOND_PURCHASE.replace("ESCALATE", "ALLOW"))
    done = run_process("spend.test.yaml", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == (
        "✓ spend.test.yaml:3  the first $30 purchase runs\n"
        "✗ spend.test.yaml:6  the second $30 purchase asks a human\n"
        "    expected  ALLOW by policy 3 (spend_usd)\n"
        "    got       ESCALATE by policy 3 (spend_usd)\n"
        "    reason    finance.spend: spend_usd for agent 'agent-1' would reach 60 (30 recorded "
        "+ 30 proposed), breaking '< 50' (policy 3, ESCALATE).\n"
        "    differs   verdict\n"
        "    trace     1. per_call 'single_spend_usd' → holds  amount_usd = 30, must be <= 200\n"
        "              2. set 'approved_services' → holds  service = 'openai' is in "
        "[openai, aws] (match: exact), must be in\n"
        "              3. cumulative 'spend_usd' → breached [decides]  spend_usd for agent "
        "'agent-1': 30 recorded + 30 proposed = 60, must be < 50\n"
        "1 passed, 1 failed\n"
    )


def test_an_allowed_call_expected_to_escalate_shows_what_allowed_it(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        """\
  - name: one $30 purchase asks a human
    call: {skill: finance.spend, agent: agent-1, params: {service: openai, amount_usd: 30}}
    expect: {verdict: ESCALATE, policy: 3}
""",
    )
    code, out, _ = run(path)
    assert code == 1
    assert "    expected  ESCALATE by policy 3 (spend_usd)\n" in out
    assert "    got       ALLOW\n" in out
    assert "    reason    finance.spend: allowed, no policy was breached.\n" in out
    assert "    differs   verdict, policy\n" in out
    assert out.endswith("0 passed, 1 failed\n")


def test_the_right_verdict_by_the_wrong_policy_fails(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        """\
  - name: a gcp purchase is blocked by the per-call cap
    call: {skill: finance.spend, agent: agent-1, params: {service: gcp, amount_usd: 30}}
    expect: {verdict: BLOCK, policy: single_spend_usd}
""",
    )
    code, out, _ = run(path)
    assert code == 1
    assert "    expected  BLOCK by policy 1 (single_spend_usd)\n" in out
    assert "    got       BLOCK by policy 2 (approved_services)\n" in out
    assert "    differs   policy\n" in out


SOFT_AND_HARD = """\
finance.spend:
  policies:
    - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lt, value: 50,
       breach_verdict: ESCALATE}
    - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lt, value: 100,
       breach_verdict: BLOCK}
    - {type: semantic, rule: Stay on task., breach_verdict: ESCALATE}
    - {type: semantic, rule: Stay on task., breach_verdict: BLOCK, mode: shadow}
    - {type: schedule, dimension: office_hours, hours: "09:00-17:00", breach_verdict: ESCALATE}
    - {type: schedule, dimension: office_hours, hours: "08:00-18:00", breach_verdict: BLOCK}
"""


@pytest.mark.parametrize(
    ("expect", "error"),
    [
        (
            "{verdict: ESCALATE, policy: spend_usd}",
            "policy: spend_usd names policies 1 and 2 of finance.spend; write its position: 1 or 2",
        ),
        (
            "{verdict: ESCALATE, shadow_policy: spend_usd}",
            "shadow_policy: spend_usd names policies 1 and 2 of finance.spend; "
            "write its position: 1 or 2",
        ),
        (
            '{verdict: ESCALATE, policy: "Stay on task."}',
            'policy: "Stay on task." names policies 3 and 4 of finance.spend; '
            "write its position: 3 or 4",
        ),
        (
            "{verdict: ESCALATE, policy: office_hours}",
            "policy: office_hours names policies 5 and 6 of finance.spend; "
            "write its position: 5 or 6",
        ),
    ],
    ids=["dimension", "shadow-policy", "semantic-rule", "schedule"],
)
def test_a_name_shared_by_two_policies_of_the_skill_is_refused(
    tmp_path: Path, expect: str, error: str
) -> None:
    """Soft and hard limits may share a dimension: a case must say which one decides."""
    path = spend_test(
        tmp_path,
        "  - name: which spend_usd?\n"
        "    now: 2026-11-24T10:00:00Z\n"
        "    semantic: holds\n"
        "    call: {skill: finance.spend, agent: a, params: {amount_usd: 60}}\n"
        f"    expect: {expect}\n",
        SOFT_AND_HARD,
    )
    code, _, err = run(path)
    assert (code, err) == (2, f"✗ spend.test.yaml:7: {error}\n")
    positions = path.read_text().replace("policy: spend_usd", "policy: 1")
    positions = positions.replace('policy: "Stay on task."', "policy: 3")
    path.write_text(positions.replace("policy: office_hours", "policy: 5"))
    code, out, _ = run(path)
    assert code in (0, 1), out  # loads; the position names one policy


def test_a_position_tells_the_soft_limit_from_the_hard_one(tmp_path: Path) -> None:
    cases = """\
  - name: $60 asks a human (the soft limit)
    now: 2026-11-24T10:00:00Z
    semantic: holds
    call: {skill: finance.spend, agent: a, params: {amount_usd: 60}}
    expect: {verdict: ESCALATE, policy: 1}
  - name: a case naming the hard limit fails
    now: 2026-11-24T10:00:00Z
    semantic: holds
    call: {skill: finance.spend, agent: a, params: {amount_usd: 60}}
    expect: {verdict: ESCALATE, policy: 2}
"""
    code, out, _ = run(spend_test(tmp_path, cases, SOFT_AND_HARD))
    assert code == 1
    assert "    expected  ESCALATE by policy 2 (spend_usd)\n" in out
    assert "    got       ESCALATE by policy 1 (spend_usd)\n" in out
    assert out.endswith("1 passed, 1 failed\n")


def test_the_reason_must_contain_the_expected_text(tmp_path: Path) -> None:
    case = """\
  - name: the reason names the service
    call: {skill: finance.spend, agent: agent-1, params: {service: gcp, amount_usd: 30}}
    expect: {verdict: BLOCK, policy: 2, reason: %s}
"""
    assert run(spend_test(tmp_path, case % "\"service 'gcp' is not in\""))[0] == 0
    code, out, _ = run(spend_test(tmp_path, case % "over budget"))
    assert code == 1
    assert (
        '    expected  BLOCK by policy 2 (approved_services), reason containing "over budget"\n'
        in (out)
    )
    assert "    reason    finance.spend: service 'gcp' is not in approved_services" in out
    assert "    differs   reason\n" in out


# --- shadow mode and traces ---------------------------------------------------------------

SHADOW = """\
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
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 50
      mode: shadow
      breach_verdict: ESCALATE
    - type: semantic
      rule: Escalate a purchase unrelated to the task.
      breach_verdict: ESCALATE
"""

SECOND = """\
    given:
      calls:
        - {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 30}}
    semantic: holds
    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 30}}
"""

SECOND_BREACHED = """\
    given:
      totals:
        - {dimension: spend_usd, agent: a, amount: 30}
    semantic: breached
    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 30}}
"""


def test_expect_shadow_is_the_verdict_with_shadow_policies_enforced(tmp_path: Path) -> None:
    cases = f"""\
  - name: the second $30 runs but would ask a human
{SECOND}    expect: {{verdict: ALLOW, shadow: ESCALATE, shadow_policy: spend_usd}}
  - name: a call no shadow policy would change has its own verdict as shadow verdict
    semantic: holds
    call: {{skill: finance.spend, agent: a, params: {{service: aws, amount_usd: 30}}}}
    expect: {{verdict: ALLOW, shadow: ALLOW}}
  - name: an enforced breach before the shadow policy is also the shadow verdict
    call: {{skill: finance.spend, agent: a, params: {{service: aws, amount_usd: 300}}}}
    expect: {{verdict: BLOCK, shadow: BLOCK, shadow_policy: 1}}
  - name: a shadow breach before an enforced one is the shadow verdict
{SECOND_BREACHED}    expect: {{verdict: ESCALATE, policy: 3, shadow: ESCALATE, shadow_policy: 2}}
"""
    code, out, _ = run(spend_test(tmp_path, cases, SHADOW))
    assert (code, out.splitlines()[-1]) == (0, "4 passed, 0 failed"), out


def test_a_wrong_shadow_verdict_fails_and_shows_both(tmp_path: Path) -> None:
    cases = f"""\
  - name: the second $30 would be fine
{SECOND}    expect: {{verdict: ALLOW, shadow: ALLOW}}
  - name: the wrong policy would decide
{SECOND}    expect: {{verdict: ALLOW, shadow_policy: single_spend_usd}}
"""
    code, out, _ = run(spend_test(tmp_path, cases, SHADOW))
    assert code == 1
    assert "    expected  ALLOW, shadow ALLOW\n" in out
    assert "    got       ALLOW, shadow ESCALATE by policy 2 (spend_usd)\n" in out
    assert "    differs   shadow\n" in out
    assert "    expected  ALLOW, shadow by policy 1 (single_spend_usd)\n" in out
    assert "    differs   shadow_policy\n" in out
    assert out.endswith("0 passed, 2 failed\n")


def test_a_shadow_policy_the_skill_lacks_is_refused(tmp_path: Path) -> None:
    cases = f"""\
  - name: a typo in the shadow policy
{SECOND}    expect: {{verdict: ALLOW, shadow_policy: spend_sud}}
"""
    code, _, err = run(spend_test(tmp_path, cases, SHADOW))
    assert code == 2
    assert "spend.test.yaml:9: shadow_policy: no policy of finance.spend" in err
    assert "did you mean 'spend_usd'?" in err


def test_a_failing_case_shows_the_trace_of_every_policy(tmp_path: Path) -> None:
    """The trace is the engine's explanation on the case's own state and scripted model."""
    cases = f"""\
  - name: expected to be blocked
{SECOND_BREACHED}    expect: {{verdict: BLOCK}}
"""
    code, out, _ = run(spend_test(tmp_path, cases, SHADOW))
    assert code == 1
    trace = out.split("    differs   verdict\n")[1].splitlines()[:3]
    assert trace == [
        "    trace     1. per_call 'single_spend_usd' → holds  amount_usd = 30, must be <= 200",
        "              2. cumulative 'spend_usd' → breached [shadow]  spend_usd for agent 'a': "
        "30 recorded + 30 proposed = 60, must be < 50",
        "              3. semantic 'Escalate a purchase unrelated to the task.' → breached "
        "[decides]  the model answered BLOCK: the test case says it is breached",
    ]


def test_a_passing_case_or_a_case_error_has_no_trace(tmp_path: Path) -> None:
    cases = f"""\
  - name: passes
{SECOND}    expect: {{verdict: ALLOW}}
  - name: no answer for the rule
    call: {{skill: finance.spend, agent: a, params: {{service: aws, amount_usd: 30}}}}
    expect: {{verdict: ALLOW}}
"""
    result = run_test_file(spend_test(tmp_path, cases, SHADOW))
    assert [case.trace for case in result.cases] == [None, None]
    assert result.cases[1].error is not None
    assert "trace" not in result.report()


# --- given state --------------------------------------------------------------------------


def test_given_calls_accumulate_until_the_50th_10_dollar_call(tmp_path: Path) -> None:
    policies = SPEND.replace("value: 50\n", "value: 500\n")
    cases = """\
  - name: the 49th $10 call runs
    given:
      calls:
        - {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 10}, times: 48}
    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 10}}
    expect: {verdict: ALLOW}
  - name: the 50th $10 call asks a human
    given:
      calls:
        - {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 10}, times: 49}
    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 10}}
    expect: {verdict: ESCALATE, policy: spend_usd, reason: "would reach 500 (490 recorded"}
"""
    code, out, _ = run(spend_test(tmp_path, cases, policies))
    assert (code, out.splitlines()[-1]) == (0, "2 passed, 0 failed")


def test_a_refused_given_call_is_a_case_error_naming_it(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        """\
  - name: the setup overspends
    given:
      calls:
        - {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 10}}
        - {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 20}, times: 3}
    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 1}}
    expect: {verdict: ESCALATE}
""",
    )
    code, out, _ = run(path)
    assert code == 1
    assert (
        "    error     given call 2 (time 2 of 3) was ESCALATE, not ALLOW: finance.spend: "
        "spend_usd for agent 'a' would reach 50 (30 recorded + 20 proposed)"
    ) in out


WORKSPACE = """\
filesystem.write:
  policies:
    - {type: deterministic, dimension: workspace, param: filepath, operator: in,
       values: [/srv/agent], match: path, breach_verdict: BLOCK}
"""

BOOM_WRITE = "{skill: filesystem.write, agent: a, params: {filepath: /srv/agent/boom}}"


@pytest.fixture
def planning_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning a write to /srv/agent/boom fails: the engine blocks it (fail-closed)."""
    real = limenex.core.engine.plan_call

    def plan_call(skill: Any, agent_id: str, params: Any, **kwargs: Any) -> Any:
        if params.get("filepath") == "/srv/agent/boom":
            raise ValueError("embedded null byte")
        return real(skill, agent_id, params, **kwargs)

    monkeypatch.setattr(limenex.core.engine, "plan_call", plan_call)


@pytest.mark.usefixtures("planning_fails")
def test_a_call_the_engine_blocks_while_planning_gets_that_block(tmp_path: Path) -> None:
    """A policy that cannot be evaluated blocks the call (fail-closed): a case can expect it."""
    cases = f"""\
  - name: a write the policies cannot evaluate is blocked
    call: {BOOM_WRITE}
    expect: {{verdict: BLOCK, reason: "policy evaluation failed"}}
  - name: expected to run
    call: {BOOM_WRITE}
    expect: {{verdict: ALLOW}}
"""
    path = spend_test(tmp_path, cases, WORKSPACE)
    code, out, err = run(path)
    assert (code, err) == (1, "")
    assert "✓ spend.test.yaml:3  a write the policies cannot evaluate is blocked\n" in out
    assert (
        "✗ spend.test.yaml:6  expected to run\n"
        "    expected  ALLOW\n"
        "    got       BLOCK\n"
        "    reason    filesystem.write: blocked because policy evaluation failed "
        "(ValueError: embedded null byte).\n"
        "    differs   verdict\n"
    ) in out
    assert out.endswith("1 passed, 1 failed\n")
    code, out, _ = run("--json", path)
    report = json.loads(out)
    assert (code, report["passed"], report["failed"]) == (1, 1, 1)
    assert report["files"][0]["cases"][1]["got"]["verdict"] == "BLOCK"


@pytest.mark.usefixtures("planning_fails")
def test_a_given_call_that_raises_is_a_case_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = f"""\
  - name: a blocked given call
    given:
      calls:
        - {BOOM_WRITE}
    call: {{skill: filesystem.write, agent: a, params: {{filepath: /srv/agent/x}}}}
    expect: {{verdict: ALLOW}}
  - name: a given call that raises
    given:
      calls:
        - {{skill: filesystem.write, agent: a, params: {{filepath: /srv/agent/x}}, times: 2}}
    call: {{skill: filesystem.write, agent: a, params: {{filepath: /srv/agent/x}}}}
    expect: {{verdict: ALLOW}}
"""
    path = spend_test(tmp_path, cases, WORKSPACE)
    calls = []

    def fails_the_second_time() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the disk is full")

    monkeypatch.setattr("limenex.policy_tests._nothing", fails_the_second_time)
    code, out, err = run(path)
    assert (code, err) == (1, "")
    assert (
        "    error     given call 1 was BLOCK, not ALLOW: filesystem.write: blocked because "
        "policy evaluation failed (ValueError: embedded null byte).\n"
    ) in out
    assert (
        "    error     given call 1 (time 2 of 2) raised RuntimeError: the disk is full\n"
    ) in out
    assert out.endswith("0 passed, 2 failed\n")


@pytest.mark.parametrize("stage", ["load_test_file", "run_test_file"])
def test_an_unexpected_error_is_a_file_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    write(tmp_path, "policies.yaml", SPEND)
    broken = write(tmp_path, "a.test.yaml", SECOND_PURCHASE)
    fine = write(tmp_path, "b.test.yaml", SECOND_PURCHASE)
    real = getattr(limenex.cli.policy_tests, stage)

    def crashes_on_a(arg: object) -> object:
        if "a.test.yaml" in str(getattr(arg, "path", arg)):
            raise KeyError("surprise")
        return real(arg)

    monkeypatch.setattr(limenex.cli.policy_tests, stage, crashes_on_a)
    what = "loaded" if stage == "load_test_file" else "run"
    result = CliRunner().invoke(main, ["test", "a.test.yaml", "b.test.yaml"])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 2
    assert result.stderr == (
        f"✗ a.test.yaml: could not be {what} (KeyError: 'surprise') "
        "(a bug in limenex: please report it)\n"
    )
    assert result.stdout.endswith(f"2 passed, 0 failed, 1 file could not be {what}\n")
    code, out, _ = run("--json", broken, fine)
    report = json.loads(out)
    assert (code, report["ok"], report["passed"]) == (2, False, 2)
    assert report["errors"][0]["path"] == "a.test.yaml"
    assert report["errors"][0]["problem"] == f"could not be {what} (KeyError: 'surprise')"


WINDOWED = SPEND.replace("value: 50\n", "value: 50\n      window: 24h\n")


@pytest.mark.parametrize(
    ("at", "verdict"),
    [("2026-11-23T09:59:59Z", "ALLOW"), ("2026-11-23T10:00:01Z", "ESCALATE")],
    ids=["a-day-earlier-no-longer-counts", "within-24h-still-counts"],
)
def test_given_calls_at_a_moment_count_only_inside_the_window(
    tmp_path: Path, at: str, verdict: str
) -> None:
    path = spend_test(
        tmp_path,
        f"""\
  - name: yesterday's purchase
    now: 2026-11-24T10:00:00Z
    given:
      calls:
        - skill: finance.spend
          agent: a
          params: {{service: aws, amount_usd: 30}}
          at: {at}
    call: {{skill: finance.spend, agent: a, params: {{service: aws, amount_usd: 30}}}}
    expect: {{verdict: {verdict}}}
""",
        WINDOWED,
    )
    assert run(path)[0] == 0


SCOPES = """\
comms.send:
  policies:
    - {type: deterministic, dimension: sends_per_agent, operator: lte, value: 3,
       breach_verdict: BLOCK}
    - {type: deterministic, dimension: sends_everywhere, operator: lte, value: 100,
       scope: global, breach_verdict: BLOCK}
    - {type: deterministic, dimension: sends_per_recipient, operator: lte, value: 2,
       window: 1h, scope: [agent, recipient], breach_verdict: ESCALATE}
"""


@pytest.mark.parametrize(
    ("total", "blocked_by"),
    [
        ("{dimension: sends_per_agent, agent: a, amount: 3}", "sends_per_agent"),
        ("{dimension: sends_everywhere, amount: 100}", "sends_everywhere"),
        (
            "{dimension: sends_per_recipient, agent: a, params: {recipient: x@y.z}, amount: 2}",
            "sends_per_recipient",
        ),
    ],
    ids=["agent", "global", "agent-and-recipient"],
)
def test_given_totals_set_the_running_total_of_each_scope(
    tmp_path: Path, total: str, blocked_by: str
) -> None:
    verdict = "ESCALATE" if blocked_by == "sends_per_recipient" else "BLOCK"
    path = spend_test(
        tmp_path,
        f"""\
  - name: at the limit
    given:
      totals:
        - {total}
    call: {{skill: comms.send, agent: a, params: {{channel: email, recipient: x@y.z, text: hi}}}}
    expect: {{verdict: {verdict}, policy: {blocked_by}}}
  - name: another recipient or agent is not counted
    given:
      totals:
        - {total}
    call: {{skill: comms.send, agent: b, params: {{channel: email, recipient: o@y.z, text: hi}}}}
    expect: {{verdict: {"BLOCK" if blocked_by == "sends_everywhere" else "ALLOW"}}}
""",
        SCOPES,
    )
    code, out, _ = run(path)
    assert (code, out.splitlines()[-1]) == (0, "2 passed, 0 failed"), out


@pytest.mark.parametrize(
    ("total", "error"),
    [
        (
            "{dimension: sends_per_agnt, agent: a, amount: 1}",
            "spend.test.yaml:6: dimension: no stateful policy keeps a running total of this "
            "dimension (did you mean 'sends_per_agent'?)",
        ),
        (
            "{dimension: sends_per_agent, amount: 1}",
            "spend.test.yaml:6: totals[0]: sends_per_agent is kept per agent: give agent:",
        ),
        (
            "{dimension: sends_per_recipient, agent: a, amount: 1}",
            "spend.test.yaml:6: totals[0]: sends_per_recipient is kept per agent, recipient: "
            "give params: {recipient: ...}",
        ),
        (
            "{dimension: sends_everywhere, agent: a, amount: 1}",
            "spend.test.yaml:6: agent: sends_everywhere is kept across all agents "
            "(scope: global): remove agent:",
        ),
    ],
    ids=["unknown-dimension", "no-agent", "no-scope-param", "agent-of-a-global-total"],
)
def test_a_total_the_policies_cannot_keep_is_refused_when_loading(
    tmp_path: Path, total: str, error: str
) -> None:
    path = spend_test(
        tmp_path,
        f"""\
  - name: a bad total
    given:
      totals:
        - {total}
    call: {{skill: comms.send, agent: a, params: {{channel: email, recipient: x, text: hi}}}}
    expect: {{verdict: ALLOW}}
""",
        SCOPES,
    )
    code, out, err = run(path)
    assert (code, err) == (2, f"✗ {error}\n")
    assert out == "0 passed, 0 failed, 1 file could not be loaded\n"


# --- semantic rules -----------------------------------------------------------------------

SEMANTIC = """\
comms.send:
  policies:
    - type: semantic
      rule: Never promise a refund.
      breach_verdict: ESCALATE
    - type: semantic
      rule: Stay polite.
      breach_verdict: BLOCK
"""


@pytest.mark.parametrize(
    ("semantic", "expect"),
    [
        ("holds", "{verdict: ALLOW}"),
        ("breached", '{verdict: ESCALATE, policy: "Never promise a refund."}'),
        (
            '{"Never promise a refund.": holds, "Stay polite.": breached}',
            "{verdict: BLOCK, policy: 2, reason: the test case says it is breached}",
        ),
    ],
    ids=["holds", "breached", "mapping"],
)
def test_semantic_answers_come_from_the_case(tmp_path: Path, semantic: str, expect: str) -> None:
    path = spend_test(
        tmp_path,
        f"""\
  - name: a message
    semantic: {semantic}
    call: {{skill: comms.send, agent: a, params: {{channel: email, recipient: x, text: hi}}}}
    expect: {expect}
""",
        SEMANTIC,
    )
    code, out, _ = run(path)
    assert code == 0, out


def test_a_semantic_rule_without_an_answer_is_a_case_error_naming_it(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        """\
  - name: only one rule answered
    semantic: {"Never promise a refund.": holds}
    call: {skill: comms.send, agent: a, params: {channel: email, recipient: x, text: hi}}
    expect: {verdict: ALLOW}
""",
        SEMANTIC,
    )
    code, out, _ = run(path)
    assert code == 1
    assert (
        "✗ spend.test.yaml:3  only one rule answered\n"
        "    error     semantic rule 'Stay polite.' was asked; give its answer under `semantic:`\n"
    ) in out


def test_an_answer_for_a_rule_the_policies_lack_is_refused(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        """\
  - name: typo in the rule
    semantic: {"Stay polit.": holds}
    call: {skill: comms.send, agent: a, params: {channel: email, recipient: x, text: hi}}
    expect: {verdict: ALLOW}
""",
        SEMANTIC,
    )
    code, _, err = run(path)
    assert code == 2
    assert err.endswith(
        "spend.test.yaml:4: Stay polit.: no semantic rule of the policy file has exactly this "
        "text (did you mean 'Stay polite.'?)\n"
    )


# --- loading errors -----------------------------------------------------------------------


def test_a_typo_in_a_test_file_names_file_line_and_key_and_exits_2(tmp_path: Path) -> None:
    write(tmp_path, "policies.yaml", SPEND)
    write(
        tmp_path,
        "spend.test.yaml",
        SECOND_PURCHASE.replace("expect: {verdict: ALLOW}", "expcet: {verdict: ALLOW}"),
    )
    done = run_process("spend.test.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "✗ spend.test.yaml:5: expcet: unknown key (did you mean 'expect'?)\n"
    assert done.stdout == "0 passed, 0 failed, 1 file could not be loaded\n"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("    now: 2026-11-24\n", "now: expected a date and time with an offset"),
        ("    now: 2026-11-24T10:00:00\n", "now: 2026-11-24T10:00:00 has no UTC offset"),
        ("    semantic: maybe\n", "semantic: expected holds or breached"),
    ],
    ids=["date-only", "no-offset", "bad-answer"],
)
def test_values_of_the_wrong_kind_are_refused(tmp_path: Path, line: str, error: str) -> None:
    path = spend_test(
        tmp_path,
        "  - name: x\n"
        + line
        + "    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 1}}\n"
        "    expect: {verdict: ALLOW}\n",
    )
    code, _, err = run(path)
    assert code == 2
    assert f"spend.test.yaml:4: {error}" in err


@pytest.mark.parametrize(
    ("times", "error"),
    [
        ("1.0", "expected a whole number, got the number 1.0"),
        ("'2'", "expected a whole number, got the string '2'"),
        ("0", "expected a whole number from 1 to 100,000, got 0"),
    ],
    ids=["float", "string", "zero"],
)
def test_times_must_be_a_whole_number(tmp_path: Path, times: str, error: str) -> None:
    path = spend_test(
        tmp_path,
        "  - name: x\n"
        "    given:\n"
        "      calls:\n"
        "        - {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 1},\n"
        f"           times: {times}}}\n"
        "    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 1}}\n"
        "    expect: {verdict: ALLOW}\n",
    )
    code, _, err = run(path)
    assert (code, err) == (2, f"✗ spend.test.yaml:7: times: {error}\n")


def test_a_lower_case_verdict_suggests_the_right_one(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        "  - name: x\n"
        "    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 1}}\n"
        "    expect: {verdict: allow}\n",
    )
    assert run(path)[2].endswith(
        "spend.test.yaml:5: verdict: expected ALLOW, BLOCK or ESCALATE (upper-case), got the "
        "string 'allow' (did you mean 'ALLOW'?)\n"
    )


@pytest.mark.parametrize(
    ("expect", "error"),
    [
        ("{verdict: BLOCK, policy: 4}", "policy: finance.spend has 3 policies, not 4"),
        ("{verdict: BLOCK, policy: spend}", "policy: no policy of finance.spend has the dimension"),
    ],
    ids=["position", "dimension"],
)
def test_an_expected_policy_the_skill_lacks_is_refused(
    tmp_path: Path, expect: str, error: str
) -> None:
    path = spend_test(
        tmp_path,
        "  - name: x\n"
        "    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: 1}}\n"
        f"    expect: {expect}\n",
    )
    code, _, err = run(path)
    assert code == 2
    assert f"spend.test.yaml:5: {error}" in err


def test_a_skill_the_policies_lack_is_refused(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        "  - name: x\n"
        "    call: {skill: finance.spnd, agent: a, params: {}}\n"
        "    expect: {verdict: BLOCK}\n",
    )
    code, _, err = run(path)
    assert code == 2
    assert err.endswith(
        "spend.test.yaml:4: skill: skill 'finance.spnd' is not in the policy file "
        "(did you mean 'finance.spend'?)\n"
    )


def test_a_missing_policy_file_exits_2(tmp_path: Path) -> None:
    write(tmp_path, "spend.test.yaml", SECOND_PURCHASE)
    done = run_process("spend.test.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "✗ spend.test.yaml:1: policies: cannot read the policy file policies.yaml: file not found\n"
    )


def test_an_invalid_policy_file_reports_like_validate(tmp_path: Path) -> None:
    write(tmp_path, "policies.yaml", SPEND.replace("param: service", "parm: service"))
    write(tmp_path, "spend.test.yaml", SECOND_PURCHASE)
    done = run_process("spend.test.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "✗ policies.yaml:12: parm: unknown key (did you mean 'param'?)\n"


def test_inline_policies_report_errors_at_their_line_in_the_test_file(tmp_path: Path) -> None:
    text = """\
        policies:
          finance.spend:
            policies:
              - {type: deterministic, dimension: spend_usd, param: amount_usd, operator: lt,
                 value: 50, breach_verdict: ESCALATE}
        cases:
          - name: inline policies work
            given:
              totals: [{dimension: spend_usd, agent: a, amount: 45}]
            call: {skill: finance.spend, agent: a, params: {amount_usd: 5}}
            expect: {verdict: ESCALATE, policy: spend_usd}
        """
    path = write(tmp_path, "inline.test.yaml", text)
    assert run(path)[0] == 0
    write(tmp_path, "inline.test.yaml", text.replace("breach_verdict: ESCALATE", "verdict: X"))
    code, _, err = run(path)
    assert code == 2
    assert err == "✗ inline.test.yaml:5: verdict: unknown key (did you mean 'breach_verdict'?)\n"


def test_the_call_refused_before_evaluation_is_a_case_error(tmp_path: Path) -> None:
    path = spend_test(
        tmp_path,
        "  - name: x\n"
        "    call: {skill: finance.spend, agent: a, params: {service: aws, amount_usd: '1'}}\n"
        "    expect: {verdict: BLOCK}\n",
    )
    code, out, _ = run(path)
    assert code == 1
    assert "    error     the call was refused before evaluation: argument 'amount_usd'" in out


# --- discovery and reports ----------------------------------------------------------------


def test_directories_are_searched_for_test_files_in_order(tmp_path: Path) -> None:
    write(tmp_path, "suite/policies.yaml", SPEND)
    write(tmp_path, "suite/b.test.yaml", SECOND_PURCHASE)
    write(
        tmp_path,
        "suite/nested/a.test.yaml",
        SECOND_PURCHASE.replace("policies.yaml", "../policies.yaml"),
    )
    write(tmp_path, "suite/ignored.yaml", "not: a test\n")
    done = run_process("suite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = [line.split()[1].split(":")[0] for line in done.stdout.splitlines()[:-1]]
    assert files == ["suite/b.test.yaml"] * 2 + ["suite/nested/a.test.yaml"] * 2
    assert done.stdout.endswith("4 passed, 0 failed\n")


def test_without_paths_the_limenex_folder_is_searched(tmp_path: Path) -> None:
    assert run() == (
        2,
        "",
        "✗ no test files found (looked for *.test.yaml in .limenex)\n",
    )
    write(tmp_path, ".limenex/policies.yaml", SPEND)
    write(tmp_path, ".limenex/spend.test.yaml", SECOND_PURCHASE)
    code, out, _ = run()
    assert code == 0
    assert out.startswith("✓ .limenex/spend.test.yaml:3  the first $30 purchase runs\n")


def test_json_report(tmp_path: Path) -> None:
    write(tmp_path, "policies.yaml", SPEND)
    path = write(tmp_path, "spend.test.yaml", SECOND_PURCHASE.replace("ESCALATE", "BLOCK"))
    code, out, _ = run("--json", path)
    assert code == 1
    report = json.loads(out)
    assert (report["ok"], report["passed"], report["failed"], report["errors"]) == (
        False,
        1,
        1,
        [],
    )
    failed = report["files"][0]["cases"][1]
    assert failed["line"] == 6
    assert failed["expected"] == {
        "verdict": "BLOCK",
        "policy": "spend_usd",
        "reason": None,
        "shadow": None,
        "shadow_policy": None,
    }
    assert failed["got"]["verdict"] == "ESCALATE"
    assert failed["got"]["policy_index"] == 2
    assert failed["mismatches"] == ["verdict"]
    assert [(t["number"], t["result"], t["decisive"]) for t in failed["trace"]] == [
        (1, "holds", False),
        (2, "holds", False),
        (3, "breached", True),
    ]
    assert failed["trace"][2]["observed"] == "30"
    assert failed["trace"][2]["projected"] == "60"
    assert report["files"][0]["cases"][0]["trace"] is None  # passed: no trace


def test_json_report_of_a_file_that_cannot_be_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, "spend.test.yaml", "policies: p.yaml\ncases: []\n")
    code, out, _ = run("--json", path)
    assert code == 2
    error = json.loads(out)["errors"][0]
    assert (error["line"], error["key"], error["problem"]) == (2, "cases", "must not be empty")


def test_the_library_api_runs_a_file_for_pytest(tmp_path: Path) -> None:
    write(tmp_path, "policies.yaml", SPEND)
    path = write(tmp_path, "spend.test.yaml", SECOND_PURCHASE.replace("ESCALATE", "BLOCK"))
    loaded = load_test_file(path)
    assert [case.line for case in loaded.cases] == [3, 6]
    result = run_test_file(loaded)
    assert not result.passed
    assert [case.name for case in result.failures] == ["the second $30 purchase asks a human"]
    assert "    expected  BLOCK by policy 3 (spend_usd)" in result.report()
    with pytest.raises(PolicyFileError, match="file not found"):
        load_test_file(tmp_path / "missing.test.yaml")


def test_the_project_example_policies_pass_their_tests() -> None:
    done = run_process("examples/", cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "examples/policies/agent.test.yaml" in done.stdout
    assert " 0 failed" in done.stdout
