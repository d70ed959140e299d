"""The benchmark behind the README's performance table.

Each scenario times a loop of governed calls and, in the same run, the same loop calling the
bare executor; the figure is the median over several runs of (governed - bare) per call.
Run ``python bench/run.py`` (``make bench``); ``--write-readme`` replaces the table in
README.md, ``--quick`` runs fewer iterations (a smoke run, not for quoting).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from limenex.audit import AuditLog, BufferedAuditLog, JsonlSink
from limenex.core.engine import PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import StateStore
from limenex.core.stores import InMemoryStateStore, LocalFileStateStore, SQLiteStateStore
from limenex.skills.finance import make_spend
from limenex.stores import from_url

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("LIMENEX_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("LIMENEX_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RUN = f"lxbench_{uuid.uuid4().hex[:8]}"
"""This run's Redis key prefix and PostgreSQL schema prefix, removed when it ends."""
MILLION = 1_000_000
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

    flush = _flusher(engine)
    timer(governed, max(10, calls // 10))  # warm up caches and the file
    flush()
    bares, governs, overheads = [], [], []
    for _ in range(runs):
        gc.collect()
        b = timer(bare, calls)
        g = timer(governed, calls)
        start = time.perf_counter_ns()
        flush()  # the audit writer's work is part of the governed calls' cost
        g += (time.perf_counter_ns() - start) / calls / 1000
        bares.append(b)
        governs.append(g)
        overheads.append(g - b)
    return statistics.median(bares), statistics.median(governs), statistics.median(overheads)


def _engine(store: StateStore, *, audit: bool = True) -> PolicyEngine:
    """An engine with the default audit: a buffered JSONL log (in a folder of its own)."""
    logger: Any = False
    if audit:
        RESULTS.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="audit-", dir=RESULTS)
        _AUDIT_FOLDERS.append(folder)
        logger = BufferedAuditLog(AuditLog(JsonlSink(Path(folder) / "audit.log")))
    return PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY), state_store=store, audit_logger=logger
    )


_AUDIT_FOLDERS: list[str] = []


def _flusher(engine: PolicyEngine) -> Callable[[], None]:
    log = engine.audit_logger
    if isinstance(log, BufferedAuditLog):
        return log.flush
    return lambda: None


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
        engine = _engine(InMemoryStateStore(), audit=False)
        bare, gov, over = _measure(engine, agent="agent-1", calls=calls, runs=runs, sync=sync)
        rows.append(Row(scenario + ", audit off", "memory", 1, bare, gov, over, runs, calls, ""))
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


# --- SQLite, Redis, PostgreSQL: per call at 1 and 1,000,000 agents ---------------------------


def _populate_sqlite(store: StateStore, agents: int) -> None:
    """Bulk-insert ``agents`` totals (bench only: knows the store's table)."""
    assert isinstance(store, SQLiteStateStore)
    import sqlite3

    store.peek([], 0.0)  # creates the schema
    with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        conn.executemany(
            'INSERT INTO counters (dimension, scope, subject, "window", total) '
            "VALUES ('spend_usd', 'agent', ?, '', '1.5')",
            ((f"agent-{n}",) for n in range(2, agents + 1)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _populate_redis(store: StateStore, agents: int) -> None:
    """``agents`` totals written by a Lua loop on the server (bench only: knows the keys)."""
    import redis

    from limenex.stores.redis import _table_id

    tid = _table_id("spend_usd", "agent", "")
    key = "{" + getattr(store, "prefix") + "}:"  # noqa: B009 - typed as the base class here
    fill = """
    for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
      redis.call('HSET', KEYS[1], 'agent-' .. i, '1.5')
    end
    redis.call('SADD', KEYS[2], ARGV[3])
    """
    with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as client:
        for start in range(2, agents + 1, 100_000):
            end = min(start + 99_999, agents)
            client.eval(fill, 2, f"{key}p:{tid}", f"{key}t", start, end, f"p|{tid}")


def _populate_postgres(store: StateStore, agents: int) -> None:
    """``agents`` rows from one ``generate_series`` (bench only: knows the table)."""
    import psycopg
    from psycopg import sql

    schema = getattr(store, "schema")  # noqa: B009 - typed as the base class here
    store.peek([], 0.0)  # creates the schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        table = sql.Identifier(schema, "counters")
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (dimension, scope, subject, win, secs, total) "
                "SELECT 'spend_usd', 'agent', 'agent-' || g, '', 0, 1.5 "
                "FROM generate_series(2, %s) g"
            ).format(table),
            (agents,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))


def _new_store(kind: str, folder: Path) -> StateStore:
    name = f"{RUN}_{uuid.uuid4().hex[:6]}"
    if kind == "memory":
        return InMemoryStateStore()
    if kind == "sqlite":
        return SQLiteStateStore(folder / f"{name}.db")
    if kind == "redis":
        return from_url(f"{REDIS_URL}?prefix={name}")
    if kind == "postgres":
        return from_url(f"{POSTGRES_URL}?schema={name}")
    raise ValueError(kind)


_POPULATE: dict[str, Callable[[StateStore, int], None]] = {
    "sqlite": _populate_sqlite,
    "redis": _populate_redis,
    "postgres": _populate_postgres,
}
_LABEL = {"sqlite": "SQLite (WAL)", "redis": "Redis", "postgres": "PostgreSQL"}
_TARGET = {"sqlite": "≤ 40 µs", "redis": "", "postgres": ""}


def _drop(kind: str, store: StateStore) -> None:
    """Remove what a bench store left on its server."""
    store.reset()
    store.close()
    if kind == "postgres":
        import psycopg
        import psycopg.sql

        schema = getattr(store, "schema")  # noqa: B009 - typed as the base class here
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(schema)
                )
            )


def store_rows(kind: str, calls: int, runs: int, agent_counts: list[int]) -> list[Row]:
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for agents in agent_counts:
        with tempfile.TemporaryDirectory(prefix="state-", dir=RESULTS) as tmp:
            store = _new_store(kind, Path(tmp))
            try:
                if agents > 1:
                    _POPULATE[kind](store, agents)
                for sync, scenario in ((False, "async `make_spend`"), (True, "sync `@governed`")):
                    bare, gov, over = _measure(
                        _engine(store), agent="agent-1", calls=calls, runs=runs, sync=sync
                    )
                    target = _TARGET[kind] if agents == 1 else "flat"
                    rows.append(
                        Row(scenario, _LABEL[kind], agents, bare, gov, over, runs, calls, target)
                    )
                    if kind == "sqlite" and agents == 1:  # the store's own cost, as in §9
                        bare, gov, over = _measure(
                            _engine(store, audit=False),
                            agent="agent-1",
                            calls=calls,
                            runs=runs,
                            sync=sync,
                        )
                        label = scenario + ", audit off"
                        rows.append(
                            Row(label, _LABEL[kind], agents, bare, gov, over, runs, calls, "")
                        )
            finally:
                _drop(kind, store)
    return rows


# --- throughput: 50 concurrent tasks, one hot agent ---------------------------------------


@dataclass
class Throughput:
    store: str
    tasks: int
    bare_per_s: float
    governed_per_s: float
    runs: int
    calls_per_run: int
    target: str


def _rate(call: Callable[[], Awaitable[Any]], tasks: int, per_task: int) -> float:
    async def run() -> float:
        async def worker() -> None:
            for _ in range(per_task):
                await call()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        return tasks * per_task / (time.perf_counter() - start)

    return asyncio.run(run())


def throughput_row(kind: str, calls: int, runs: int, tasks: int = 50) -> Throughput:
    with tempfile.TemporaryDirectory(prefix="state-", dir=RESULTS) as tmp:
        store = (
            LocalFileStateStore(Path(tmp) / "state.json")
            if kind == "file"
            else _new_store(kind, Path(tmp))
        )
        try:
            engine = _engine(store)
            spend = make_spend(engine, {"openai": _pay})

            def governed() -> Awaitable[None]:
                return spend(agent_id="agent-1", service="openai", amount_usd=1.0)  # type: ignore[no-any-return]

            def bare() -> Awaitable[None]:
                return _pay(amount_usd=1.0)

            per_task = max(1, calls // tasks)
            _rate(governed, tasks, max(1, per_task // 10))  # warm up connections
            bares, governs = [], []
            for _ in range(runs):
                gc.collect()
                bares.append(_rate(bare, tasks, per_task))
                governs.append(_rate(governed, tasks, per_task))
            _flusher(engine)()
        finally:
            if kind in _POPULATE:
                _drop(kind, store)
            else:
                store.close()
    target = {"redis": "≥ 8,000/s", "postgres": "≥ 3,000/s"}.get(kind, "")
    label = {"memory": "memory", "file": "file (fsync)", **_LABEL}[kind]
    return Throughput(
        label,
        tasks,
        statistics.median(bares),
        statistics.median(governs),
        runs,
        per_task * tasks,
        target,
    )


def throughput_table(rows: list[Throughput]) -> str:
    lines = [
        "| store | concurrent tasks | bare executor | governed calls | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.store} | {r.tasks} | {r.bare_per_s:,.0f}/s | **{r.governed_per_s:,.0f}/s** "
            f"| {r.target} |"
        )
    lines.append("")
    lines.append(
        "All tasks spend against **one hot agent** (the worst case: every call touches the "
        f"same total), in one process, on loopback; median of {rows[0].runs} runs of "
        f"{rows[-1].calls_per_run:,} calls, the bare executor timed in the same runs."
    )
    return "\n".join(lines)


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
        f"Python {platform.python_version()} on {platform.machine()}; each figure the median "
        "of several interleaved runs (governed, then bare, back to back); one cumulative "
        "policy, every call allowed, audited to the default buffered JSONL log (the writer's "
        "work, timed by flushing it after each run, is counted in the governed call) unless "
        "the row says *audit off*. *flat*: the same call with "
        f"{MILLION:,} other agents already recorded. On the file store a reserve replaces "
        "`state.json` (data and folder fsynced). On SQLite a call is one `BEGIN IMMEDIATE` "
        "transaction (WAL, `synchronous=NORMAL`); on Redis one Lua script call; on "
        "PostgreSQL one statement: the commit rides on the next call's round trip."
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
    many = 20_000 if args.quick else MILLION
    runs = 3 if args.quick else 9
    rows += store_rows("sqlite", calls=500 if args.quick else 3_000, runs=runs,
                       agent_counts=[1, many])  # fmt: skip
    rows += file_rows(calls=50 if args.quick else 200, runs=runs, agent_counts=[1, 1_000, 10_000])
    rows += store_rows("redis", calls=200 if args.quick else 1_000, runs=runs,
                       agent_counts=[1, many])  # fmt: skip
    rows += store_rows("postgres", calls=100 if args.quick else 300, runs=runs,
                       agent_counts=[1, many])  # fmt: skip
    rates = [
        throughput_row(
            kind,
            calls=1_000 if args.quick or kind == "file" else 10_000,  # the file store: ~1 ms a call
            runs=3 if args.quick else 7,
        )
        for kind in ("memory", "sqlite", "file", "redis", "postgres")
        if not (kind == "file" and args.quick)
    ]
    totals = 100_000 if args.quick else MILLION
    text = (
        table(rows)
        + "\n\n**Throughput**, 50 concurrent tasks on one hot agent:\n\n"
        + throughput_table(rates)
        + f"\n\nMemory: the in-memory store holds {totals:,} (dimension, agent) totals in "
        f"{footprint_mb(totals):,.0f} MiB of resident memory (target ≤ 300 MB at 1,000,000)."
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {"per_call": [asdict(r) for r in rows], "throughput": [asdict(r) for r in rates]},
            indent=2,
        )
    )
    if args.write_readme and not args.quick:
        write_readme(text)
    for folder in _AUDIT_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
