"""``limenex explain``: the verdict and per-policy trace, on any store, changing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from limenex.cli import main
from limenex.core.engine import PolicyEngine
from limenex.stores import from_url
from limenex.testing import FrozenClock
from servers import store_url

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
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 100
      window: day
      breach_verdict: ESCALATE
    - type: semantic
      rule: "Escalate if the purchase looks unrelated to the task."
      breach_verdict: ESCALATE
"""

AT = "2026-11-24T10:00:00+00:00"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _policies(tmp_path: Path) -> str:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICIES)
    return str(path)


def _spend(url: str, policies: str, *amounts: int) -> None:
    engine = PolicyEngine(
        policies,
        url,
        audit_logger=False,
        llm_evaluator=lambda intent, rule: "ALLOW",
        clock=FrozenClock(datetime.fromisoformat(AT)),
    )
    for amount in amounts:
        engine.execute_sync(
            "finance.spend", "agent-1", {"service": "aws", "amount_usd": amount}, lambda: None
        )
    engine.close()


def _explain(policies: str, *args: str) -> tuple[int, str, str]:
    return run(
        "explain", "finance.spend", "--agent", "agent-1", "--policies", policies, "--at", AT, *args
    )


def test_the_trace_reads_policy_by_policy(tmp_path: Path) -> None:
    policies = _policies(tmp_path)
    _spend(f"sqlite:///{tmp_path}/state.db", policies, 70)
    code, out, err = _explain(policies, "--param", "service=aws", "--param", "amount_usd=40")
    assert (code, err) == (0, "")
    assert out == (
        "finance.spend by 'agent-1' at 2026-11-24T10:00:00Z: ESCALATE\n"
        "  finance.spend: spend_usd for agent 'agent-1' in window day would reach 110 "
        "(70 recorded + 40 proposed), breaking '< 100' (policy 2, ESCALATE).\n"
        "\n"
        "  1. per_call 'single_spend_usd' → holds (breach: BLOCK)\n"
        "       amount_usd = 40, must be <= 200\n"
        "  2. cumulative 'spend_usd' → breached (breach: ESCALATE)  [decides]\n"
        "       spend_usd for agent 'agent-1' in window day: 70 recorded + 40 proposed = 110, "
        "must be < 100\n"
        "  3. semantic 'Escalate if the purchase looks unrelated to the task.' → not asked "
        "(breach: ESCALATE)  [not reached]\n"
        "       the model is not asked: an earlier policy decided\n"
    )


def test_json_has_the_numbers_as_exact_strings(tmp_path: Path) -> None:
    policies = _policies(tmp_path)
    _spend(f"sqlite:///{tmp_path}/state.db", policies, 10)
    code, out, _ = _explain(
        policies, "--param", "service=aws", "--param", "amount_usd=0.1", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["verdict"] == "ALLOW"
    assert report["unjudged"] == [3]  # no model here: the verdict assumes rule 3 holds
    assert report["params"] == {"service": "aws", "amount_usd": "0.1"}
    spend = report["trace"][1]
    assert (spend["observed"], spend["proposed"], spend["projected"], spend["limit"]) == (
        "10",
        "0.1",
        "10.1",
        "100",
    )
    assert report["state"] == "read"


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis", "postgres"])
def test_explain_reads_each_store_and_changes_nothing(tmp_path: Path, kind: str) -> None:
    policies = _policies(tmp_path)
    url = store_url(kind, tmp_path, "explain")
    _spend(url, policies, 90)
    store = from_url(url)
    before = (store.totals(0.0), store.pending(0.0))
    for amount in ("5", "50", "500"):
        code, out, _ = _explain(
            policies, "--state", url, "--param", "service=aws", "--param", f"amount_usd={amount}"
        )
        assert code == 0, out
    code, out, _ = _explain(
        policies, "--state", url, "--param", "service=aws", "--param", "amount_usd=20", "--json"
    )
    assert json.loads(out)["trace"][1]["observed"] == "90"
    assert (store.totals(0.0), store.pending(0.0)) == before
    assert not (tmp_path / "audit.log").exists()
    store.close()


def test_a_missing_state_file_is_not_created(tmp_path: Path) -> None:
    policies = _policies(tmp_path)
    code, out, _ = _explain(policies, "--param", "service=aws", "--param", "amount_usd=5")
    assert code == 0
    assert out.endswith(f"(no state recorded yet at {tmp_path}/state.db: every total is 0)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policies.yaml"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--param", "service=aws", "--param", "amount_usd=ten"],
            "Error: argument 'amount_usd' must be a number (int, float or Decimal), "
            "got str 'ten'\n",
        ),
        (
            ["--param", "service=aws"],
            "Error: argument 'amount_usd' is missing (a policy reads it)\n",
        ),
        (["--param", "amount_usd"], "expected name=value, got 'amount_usd'"),
        (["--at", "yesterday"], "not an ISO 8601 time: 'yesterday'"),
        (["--at", "2026-11-24T10:00:00"], "has no UTC offset"),
        (["--at", "0001-01-01T00:00:00+01:00"], "outside the years 1970 to 8999"),
        (["--state", "sqlite://rel.db"], "three slashes"),
    ],
    ids=["not-a-number", "missing", "no-equals", "bad-time", "naive-time", "year-1", "url"],
)
def test_bad_input_names_what_is_wrong_and_exits_non_zero(
    tmp_path: Path, args: list[str], message: str
) -> None:
    policies = _policies(tmp_path)
    result = CliRunner().invoke(
        main, ["explain", "finance.spend", "--agent", "a", "--policies", policies, *args]
    )
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_skill_or_a_broken_file_is_an_error(tmp_path: Path) -> None:
    policies = _policies(tmp_path)
    code, _, err = run("explain", "comms.send", "--agent", "a", "--policies", policies)
    assert code == 1
    assert "'comms.send' has no entry in the policy file" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text(POLICIES.replace("param:", "parm:", 1))
    code, _, err = run("explain", "finance.spend", "--agent", "a", "--policies", str(broken))
    assert code == 1
    assert f"✗ Invalid — {broken}:5: parm: unknown key (did you mean 'param'?)" in err


def test_python_dash_m_works_as_a_subprocess(tmp_path: Path) -> None:
    policies = _policies(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "limenex",
            "explain",
            "finance.spend",
            "--agent",
            "a",
            "--policies",
            policies,
            "--param",
            "service=aws",
            "--param",
            "amount_usd=500",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ": BLOCK\n" in done.stdout.splitlines()[0] + "\n"
