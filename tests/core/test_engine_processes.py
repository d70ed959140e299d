"""Several processes governing through one file store, and a corrupt state file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
from decimal import Decimal
from pathlib import Path

import pytest

from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import CorruptStateError
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.core.stores import LocalFileStateStore
from limenex.skills.finance import make_spend

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


def _spend_worker(folder: str, worker: int, attempts: int, start: object) -> None:
    engine = PolicyEngine(
        policy_store=LocalFilePolicyStore(os.path.join(folder, "policies.yaml")),
        state_store=LocalFileStateStore(os.path.join(folder, "state.json")),
    )
    executed = os.path.join(folder, f"executed-{worker}.log")

    def pay(amount_usd: float) -> None:
        with open(executed, "a") as log:
            log.write(f"{amount_usd}\n")

    spend = make_spend(engine, {"bank": pay})

    async def run() -> None:
        for _ in range(attempts):
            with contextlib.suppress(EscalationRequired):
                await spend(agent_id="agent-1", service="bank", amount_usd=2.5)

    start.wait()  # type: ignore[attr-defined]
    asyncio.run(run())


@pytest.mark.slow
def test_four_processes_sharing_a_file_store_execute_exactly_the_limit(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text(POLICY)
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [
        context.Process(target=_spend_worker, args=(str(tmp_path), n, 40, start)) for n in range(4)
    ]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0

    ran = [
        Decimal(line)
        for n in range(4)
        if (tmp_path / f"executed-{n}.log").exists()
        for line in (tmp_path / f"executed-{n}.log").read_text().split()
    ]
    state = json.loads((tmp_path / "state.json").read_text(), parse_float=Decimal)
    assert len(ran) == 100  # 100 x $2.50 == $250, the limit; 160 attempts in all
    assert state["spend_usd"]["agent-1"] == sum(ran) == 250


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"spend_usd": {"agent-1": "thirty"}}', b""],
)
async def test_corrupt_state_file_blocks_runs_nothing_and_is_kept(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "policies.yaml").write_text(POLICY)
    state = tmp_path / "state.json"
    state.write_bytes(content)
    engine = PolicyEngine(
        policy_store=LocalFilePolicyStore(tmp_path / "policies.yaml"),
        state_store=LocalFileStateStore(state),
    )
    paid: list[float] = []

    async def pay(amount_usd: float) -> None:
        paid.append(amount_usd)

    with pytest.raises(BlockedError) as caught:
        await make_spend(engine, {"bank": pay})(agent_id="a", service="bank", amount_usd=1)

    assert caught.value.decision.fail_closed
    assert isinstance(caught.value.__cause__, CorruptStateError)
    assert str(state) in caught.value.decision.reason
    assert paid == []
    assert state.read_bytes() == content
