"""``limenex validate`` and ``limenex schema``: exact output, exit codes, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from limenex.cli import main
from limenex.core.policy_store import policy_json_schema

ONE_POLICY = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 50
      breach_verdict: ESCALATE
"""
THREE_POLICIES = (
    ONE_POLICY
    + """\
    - {type: semantic, rule: Stay on task., breach_verdict: ESCALATE}
comms.send:
  policies:
    - {type: deterministic, dimension: sends, operator: lte, value: 5, breach_verdict: BLOCK}
"""
)


def write(tmp_path: Path, text: str, name: str = "policies.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("text", "summary"),
    [
        (ONE_POLICY, "1 skill, 1 policy (1 deterministic, 0 semantic)"),
        (THREE_POLICIES, "2 skills, 3 policies (2 deterministic, 1 semantic)"),
        ("comms.send: {policies: []}\n", "1 skill, 0 policies (0 deterministic, 0 semantic)"),
    ],
    ids=["singular", "plural", "zero"],
)
def test_valid_file_prints_the_summary_and_exits_0(tmp_path: Path, text: str, summary: str) -> None:
    assert run("validate", write(tmp_path, text)) == (0, f"✓ Valid — {summary}\n", "")


def test_validate_defaults_to_dot_limenex_policies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".limenex").mkdir()
    write(tmp_path / ".limenex", ONE_POLICY)
    monkeypatch.chdir(tmp_path)
    assert run("validate")[0] == 0


def test_invalid_file_prints_where_and_what_on_stderr_and_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_POLICY.replace("param:", "parm:"))
    code, out, err = run("validate", path)
    assert (code, out) == (1, "")
    assert err == f"✗ Invalid — {path}:5: parm: unknown key (did you mean 'param'?)\n"


def test_missing_file_is_reported_as_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run("validate") == (1, "", "✗ Invalid — .limenex/policies.yaml: file not found\n")


def test_validate_checks_the_whole_extends_chain(tmp_path: Path) -> None:
    write(tmp_path, ONE_POLICY.replace("ESCALATE", "ALLOW"), "base.yaml")
    code, _, err = run("validate", write(tmp_path, "_extends: base.yaml\n"))
    assert code == 1
    assert f"{tmp_path / 'base.yaml'}:8: breach_verdict: ALLOW cannot be" in err


def test_json_output_for_a_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, THREE_POLICIES)
    code, out, _ = run("validate", "--json", path)
    assert code == 0
    assert json.loads(out) == {
        "valid": True,
        "path": path,
        "skills": 2,
        "policies": 3,
        "deterministic": 2,
        "semantic": 1,
        "sources": [path],
    }


def test_json_output_for_an_invalid_file_names_path_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_POLICY.replace("operator: lt", "operator: le"))
    code, out, _ = run("validate", path, "--json")
    report = json.loads(out)
    assert (code, report["valid"], report["line"], report["key"]) == (1, False, 6, "operator")
    assert report["path"] == path
    assert report["suggestion"] == "did you mean 'lte'?"
    assert report["error"].startswith(f"{path}:6: operator: ")


def test_schema_prints_the_json_schema_indented() -> None:
    code, out, _ = run("schema")
    assert code == 0
    assert json.loads(out) == policy_json_schema()
    assert out.startswith('{\n  "$schema"')


@pytest.mark.slow
def test_python_m_limenex_validate_exits_0_and_1_without_traceback(tmp_path: Path) -> None:
    good = write(tmp_path, ONE_POLICY, "good.yaml")
    bad = write(tmp_path, "a: &x {policies: []}\nb: *x\n", "bad.yaml")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "limenex", *args]
        env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
        return subprocess.run(
            command, capture_output=True, encoding="utf-8", env=env, timeout=60, check=False
        )

    ok, invalid, missing = cli("validate", good), cli("validate", bad), cli("validate", "nope")
    assert (ok.returncode, ok.stdout) == (
        0,
        "✓ Valid — 1 skill, 1 policy (1 deterministic, 0 semantic)\n",
    )
    assert (invalid.returncode, invalid.stdout) == (1, "")
    assert invalid.stderr == (
        f"✗ Invalid — {bad}:1: anchors and aliases are not supported; use _extends\n"
    )
    assert (missing.returncode, missing.stderr) == (1, "✗ Invalid — nope: file not found\n")
    assert "Traceback" not in ok.stderr + invalid.stderr + missing.stderr
