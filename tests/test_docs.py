"""Every README snippet and every example runs, and prints what the README says it prints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import run_quickstart  # noqa: E402

SECTIONS = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M)
RUNNABLE = [s for s in SECTIONS if run_quickstart.snippets(s)]


def test_readme_has_runnable_sections() -> None:
    assert {"Quickstart", "Skills", "Policy file"} <= set(RUNNABLE)


@pytest.mark.parametrize("section", RUNNABLE)
def test_readme_section_prints_what_it_documents(section: str, tmp_path: Path) -> None:
    pairs = run_quickstart.run_section(section, tmp_path, echo=False)
    assert pairs, f"section {section!r} shows no output to check"
    for expected, actual in pairs:
        assert actual == expected


def test_quickstart_leaves_the_seed_state_layout(tmp_path: Path) -> None:
    run_quickstart.run_section("Quickstart", tmp_path, echo=False)
    state = json.loads((tmp_path / ".limenex" / "state.json").read_text())
    assert state == {"spend_usd": {"agent-1": 30.0}}


def test_make_demo_entry_points_succeed() -> None:
    quick = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_quickstart.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert quick.returncode == 0, quick.stderr
    assert "Action paused for human review" in quick.stdout


def test_governed_agent_demo_meets_every_kind_of_rule() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "governed_agent.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    verdicts = [line.split()[0] for line in done.stdout.splitlines()[:11]]
    assert verdicts == [
        "ALLOW",  # $40 openai
        "ALLOW",  # $50 aws: $90 today
        "ESCALATE",  # $20 more would make $110 > $100 a day
        "BLOCK",  # gcp is not an approved service
        "BLOCK",  # $900 is over the per-purchase cap
        "ALLOW",
        "ALLOW",
        "BLOCK",  # third email to one recipient within the hour
        "ESCALATE",  # the model flags a commitment
        "ALLOW",
        "BLOCK",  # /etc/../etc/hosts is inside /etc
    ]
    lines = done.stdout.splitlines()
    assert "2 requests wait for a human" in lines
    human = [
        line.split()[0]
        for line in lines
        if line.split()[:1] in (["APPROVED"], ["REFUSED"], ["DENIED"])
    ]
    assert human == ["APPROVED", "REFUSED", "DENIED"]
    assert "resumed: paid $20.00" in done.stdout
    assert "spend_usd [agent ops-bot] per day: 110" in done.stdout  # the resumed $20 counted
    assert "hash chain intact: True" in done.stdout
