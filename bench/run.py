"""The benchmark behind the README's performance table.

Each scenario times a loop of governed calls and, in the same run, the same loop calling the
bare executor; the figure is the median over several runs of (governed - bare) per call.
Run ``python bench/run.py`` (``make bench``); ``--write-readme`` replaces the table in
README.md, ``--quick`` runs fewer iterations (a smoke run, not for quoting).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from limenex.core.engine import PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore, LocalFileStateStore
from limenex.skills.finance import make_spend

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 1000000000000
      breach_verdict: ESCALATE
"""


@dataclass
class Row:
    scenario: str
    store: str
    agents: int
    bare_us: float
    governed_us: float
    overhead_us: float
    runs: int
    calls_per_run: int
    target: str


async def _pay(amount_usd: float) -> None:
    return None


def _time_loop(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    async def loop() -> float:
        start = time.perf_counter_ns()
        for _ in range(calls):
            await call()
        return (time.perf_counter_ns() - start) / calls / 1000

    return asyncio.run(loop())


def _time_sync_loop(call: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        call()
    return (time.perf_counter_ns() - start) / calls / 1000


def _measure(
    engine: PolicyEngine, *, agent: str, calls: int, runs: int, sync: bool = False
) -> tuple[float, float, float]:
    """Median bare, governed and overhead µs per call, interleaved run by run.

    Async: ``await spend(...)`` from ``make_spend`` beside ``await executor(...)``.
    Sync: a ``@engine.governed`` function beside the same function undecorated.
    """
    timer: Callable[[Callable[[], Any], int], float]
    if sync:

        def pay(agent_id: str, service: str, amount_usd: float) -> None:
            return None

        pay_governed = engine.governed("finance.spend")(pay)
        timer = _time_sync_loop

        def governed() -> Any:
            return pay_governed(agent_id=agent, service="openai", amount_usd=1.0)

        def bare() -> Any:
            return pay(agent_id=agent, service="openai", amount_usd=1.0)

    else:
        spend = make_spend(engine, {"openai": _pay})
        timer = _time_loop

        def governed() -> Any:
            return spend(agent_id=agent, service="openai", amount_usd=1.0)

        def bare() -> Any:
            return _pay(amount_usd=1.0)

    timer(governed, max(10, calls // 10))  # warm up caches and the file
    bares, governs, overheads = [], [], []
    for _ in range(runs):
        gc.collect()
        b = timer(bare, calls)
        g = timer(governed, calls)
        bares.append(b)
        governs.append(g)
        overheads.append(g - b)
    return statistics.median(bares), statistics.median(governs), statistics.median(overheads)


def _engine(store: StateStore) -> PolicyEngine:
    return PolicyEngine(policy_store=InMemoryPolicyStore.from_yaml(POLICY), state_store=store)


def _seed_file(path: Path, agents: int) -> None:
    """A state file already tracking ``agents`` agents (the seed layout)."""
    totals = {f"agent-{n}": 1.5 for n in range(agents)}
    path.write_text(json.dumps({"spend_usd": totals}))


def memory_rows(calls: int, runs: int) -> list[Row]:
    rows = []
    for sync, scenario in ((False, "async `make_spend`"), (True, "sync `@governed`")):
        engine = _engine(InMemoryStateStore())
        bare, gov, over = _measure(engine, agent="agent-1", calls=calls, runs=runs, sync=sync)
        rows.append(Row(scenario, "memory", 1, bare, gov, over, runs, calls, "≤ 4 µs"))
    return rows


def file_rows(calls: int, runs: int, agent_counts: list[int]) -> list[Row]:
    rows = []
    for sync, scenario in ((False, "async `make_spend`"), (True, "sync `@governed`")):
        for agents in agent_counts:
            RESULTS.mkdir(parents=True, exist_ok=True)  # same disk as the project, ignored by git
            with tempfile.TemporaryDirectory(prefix="state-", dir=RESULTS) as tmp:
                path = Path(tmp) / "state.json"
                if agents > 1:
                    _seed_file(path, agents)
                store = LocalFileStateStore(path)
                bare, gov, over = _measure(
                    _engine(store), agent="agent-1", calls=calls, runs=runs, sync=sync
                )
                store.close()
            target = "≤ 1.5 ms" if agents == 10_000 else ""
            rows.append(Row(scenario, "file (fsync)", agents, bare, gov, over, runs, calls, target))
    return rows


_FOOTPRINT = """
import sys
from decimal import Decimal
from limenex.core.state import Check, CounterKey
from limenex.core.stores import InMemoryStateStore

def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

count = int(sys.argv[1])
base = rss_mb()
store = InMemoryStateStore()
amount, limit = Decimal("1.5"), Decimal("1E+12")
for n in range(count):
    key = CounterKey("spend_usd", "agent", f"agent-{n}", "")
    store.commit(store.reserve([Check(0, key, None, amount, "lt", limit)], 0.0))
assert len(store.totals(0)) == count
print(rss_mb() - base)
"""


def footprint_mb(totals: int) -> float:
    """Resident memory an in-memory store needs for ``totals`` agents, in a fresh process."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _FOOTPRINT, str(totals)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout)


def _fmt(us: float) -> str:
    return f"{us:,.2f} µs" if us < 100 else f"{us / 1000:,.3f} ms"


def table(rows: list[Row]) -> str:
    lines = [
        "| call | store | agents tracked | bare call | governed call | overhead "
        "| overhead ÷ bare | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.store} | {r.agents:,} | {_fmt(r.bare_us)} | "
            f"{_fmt(r.governed_us)} | **{_fmt(r.overhead_us)}** | "
            f"{r.overhead_us / r.bare_us:,.0f}× | {r.target} |"
        )
    lines.append("")
    lines.append(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"median of {rows[0].runs} runs per in-memory figure and {rows[-1].runs} per file "
        "figure; one cumulative policy, one agent, every "
        "call allowed, no audit hook. On the file store a reserve replaces `state.json` "
        "(data and folder fsynced) and records the reservation in the small "
        "`state.json.pending`; the commit only updates that sidecar. On the async path each "
        "store operation runs in a worker thread (`asyncio.to_thread`), so the event loop "
        "never blocks on the disk."
    )
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = "<!-- bench-table -->\n", "<!-- /bench-table -->"
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + text + "\n" + end + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--write-readme", action="store_true", help="update README.md's table")
    args = parser.parse_args()
    # Many short runs, governed and bare back to back: a burst of noise on this shared VM
    # spoils a few runs, not the median.
    rows = memory_rows(calls=2_000 if args.quick else 10_000, runs=3 if args.quick else 31)
    rows += file_rows(
        calls=50 if args.quick else 200,
        runs=3 if args.quick else 9,
        agent_counts=[1, 1_000, 10_000],
    )
    totals = 100_000 if args.quick else 1_000_000
    text = table(rows) + (
        f"\n\nMemory: the in-memory store holds {totals:,} (dimension, agent) totals in "
        f"{footprint_mb(totals):,.0f} MiB of resident memory (target ≤ 300 MB at 1,000,000)."
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.write_readme and not args.quick:
        write_readme(text)


if __name__ == "__main__":
    main()
