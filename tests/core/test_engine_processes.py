"""Several processes governing through one store (tasks, threads, connections), and a corrupt
state file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import CorruptStateError
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.core.state import Check, CounterKey
from limenex.core.stores import LocalFileStateStore
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


def _spend_worker(folder: str, url: str, worker: int, start: object) -> None:
    """5 asyncio tasks and 3 threads, each with its own calls: several connections at once."""
    engine = PolicyEngine(
        policy_store=LocalFilePolicyStore(os.path.join(folder, "policies.yaml")),
        state_store=url,
    )
    lock = threading.Lock()
    executed = os.path.join(folder, f"executed-{worker}.log")

    def pay(amount_usd: float) -> None:
        with lock, open(executed, "a") as log:
            log.write(f"{amount_usd}\n")

    spend = make_spend(engine, {"bank": pay})

    async def task() -> None:
        for _ in range(5):
            with contextlib.suppress(EscalationRequired):
                await spend(agent_id="agent-1", service="bank", amount_usd=2.5)

    def thread() -> None:
        for _ in range(5):
            with contextlib.suppress(EscalationRequired):
                engine.execute_sync(
                    "finance.spend",
                    "agent-1",
                    {"service": "bank", "amount_usd": 2.5},
                    lambda: pay(2.5),
                )

    async def run() -> None:
        threads = [threading.Thread(target=thread) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.gather(*(task() for _ in range(5)))
        for t in threads:
            t.join()

    start.wait()  # type: ignore[attr-defined]
    asyncio.run(run())
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "sqlite", "redis", "postgres"])
def test_four_processes_sharing_a_store_execute_exactly_the_limit(
    tmp_path: Path, kind: str
) -> None:
    """4 processes x (5 tasks + 3 threads) x 5 calls of $2.50 = 160 attempts for $250."""
    (tmp_path / "policies.yaml").write_text(POLICY)
    url = store_url(kind, tmp_path, "processes")
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [
        context.Process(target=_spend_worker, args=(str(tmp_path), url, n, start)) for n in range(4)
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
    assert len(ran) == 100  # 100 x $2.50 == $250, the limit; 160 attempts in all
    store = from_url(url)
    try:
        key = CounterKey("spend_usd", "agent", "agent-1", "")
        recorded = store.peek([Check(0, key, None, Decimal(0), "gte", Decimal(0))], time.time())
        assert recorded[0] == sum(ran) == 250
        assert store.pending(time.time()) == []  # every commit landed
    finally:
        store.close()
    if kind == "file":  # and in the seed's layout
        state = json.loads((tmp_path / "state.json").read_text(), parse_float=Decimal)
        assert state["spend_usd"]["agent-1"] == 250


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
