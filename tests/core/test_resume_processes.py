"""Escalate in one process, approve from the CLI in another, resume from four more at once.

Each step is a fresh process (``spawn``): the one that escalated has exited before anyone
approves, as after a restart. Exactly one of the racing resumes runs the action.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from limenex.approvals import ApprovalRefused
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.core.state import CounterKey
from limenex.skills.finance import make_spend
from limenex.stores import from_url
from servers import store_url

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 250
      breach_verdict: ESCALATE
"""


def _engine(folder: str, url: str) -> PolicyEngine:
    return PolicyEngine(LocalFilePolicyStore(os.path.join(folder, "policies.yaml")), url)


def _escalate(folder: str, url: str, out: Any) -> None:
    import asyncio

    engine = _engine(folder, url)
    spend = make_spend(engine, {"bank": lambda amount_usd: None})
    try:
        asyncio.run(spend(agent_id="agent-1", service="bank", amount_usd=Decimal("300.50")))
    except EscalationRequired as paused:
        out.put(paused.request_id)
    else:
        out.put(None)
    finally:
        engine.close()


def _resume(folder: str, url: str, request_id: str, start: Any, out: Any) -> None:
    import asyncio

    engine = _engine(folder, url)

    def pay(amount_usd: Decimal) -> str:
        with open(os.path.join(folder, "executed.log"), "a") as log:
            log.write(f"{type(amount_usd).__name__} {amount_usd}\n")
        return "paid"

    make_spend(engine, {"bank": pay})
    start.wait()
    try:
        out.put(asyncio.run(engine.resume(request_id)))
    except ApprovalRefused as refused:
        out.put(refused.why)
    except BlockedError:
        out.put("blocked")
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis", "postgres"])
def test_approved_in_another_process_after_a_restart_runs_once(kind: str, tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text(POLICY)
    url = store_url(kind, tmp_path, "resume")
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    escalating = spawn.Process(target=_escalate, args=(str(tmp_path), url, out))
    escalating.start()
    escalating.join(60)
    request_id = out.get(timeout=5)
    assert isinstance(request_id, str)

    env = {**os.environ, "LIMENEX_STATE_URL": url}
    approve = [sys.executable, "-m", "limenex", "approvals", "approve", request_id]
    done = subprocess.run(
        [*approve, "--by", "ops@example.com"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    start = spawn.Event()
    workers = [
        spawn.Process(target=_resume, args=(str(tmp_path), url, request_id, start, out))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(90)
        assert worker.exitcode == 0
    outcomes = sorted(str(out.get(timeout=5)) for _ in workers)
    assert outcomes.count("paid") == 1, outcomes
    assert set(outcomes) <= {"paid", "used", "blocked"}
    assert (tmp_path / "executed.log").read_text() == "Decimal 300.50\n"
    store = from_url(url)
    try:
        totals = dict(store.totals(0))
    finally:
        store.close()
    assert totals[CounterKey("spend_usd", "agent", "agent-1", "")] == Decimal("300.50")

    again = subprocess.run(
        [*approve, "--by", "ops@example.com"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 1
    assert "already" in again.stderr or "used" in again.stderr
