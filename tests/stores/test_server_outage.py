"""A Redis or PostgreSQL server that stops mid-run: calls are blocked, nothing is lost.

Each test starts a private server of its own (a ``redis-server`` with an append-only file
synced on every write; a PostgreSQL cluster made by ``initdb``), so it can kill it without
disturbing the shared servers the rest of the suite uses. Both are killed without a
goodbye (SIGKILL; ``pg_ctl stop -m immediate``), then started again on the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from limenex.core.engine import BlockedError, PolicyEngine
from limenex.core.errors import StateStoreError
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import Check, CounterKey, StateStore
from limenex.stores import from_url

pytestmark = pytest.mark.slow

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 100000
      breach_verdict: BLOCK
"""
PG_BIN = Path("/usr/lib/postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Server:
    """A private server: ``start()``, ``kill()``, and its store URL."""

    url: str
    port: int

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class RedisServer(Server):
    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0?prefix=outage&connect_timeout=0.5&timeout=1"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                redis_server,
                "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--logfile", str(self.folder / "redis.log"),
            ],
        )  # fmt: skip
        _wait_for_port(self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


class PostgresServer(Server):
    def __init__(self, folder: Path) -> None:
        versions = sorted(PG_BIN.glob("*/bin/initdb"))
        if not versions:
            pytest.fail("PostgreSQL's initdb is not installed (Debian: postgresql)")
        self.bin = versions[-1].parent
        self.folder, self.port = folder, _free_port()
        self.data = folder / "data"
        self.url = (
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            "?schema=outage&connect_timeout=1&timeout=2"
        )
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its own account
            shutil.chown(folder, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        else:
            self.prefix = []
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        log = str(self.folder / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        _wait_for_port(self.port)

    def kill(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@pytest.fixture(params=["redis", "postgres"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    # Not pytest's tmp_path: its folders are root's alone, and PostgreSQL runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix=f"limenex-{request.param}-server-"))
    try:
        made: Server = RedisServer(folder) if request.param == "redis" else PostgresServer(folder)
        made.start()
        try:
            yield made
        finally:
            with contextlib.suppress(subprocess.CalledProcessError, ProcessLookupError):
                made.kill()  # unless it is down already
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _total(store: StateStore) -> Decimal:
    key = CounterKey("spend_usd", "agent", "agent-1", "")
    return store.peek([Check(0, key, None, Decimal(0), "gte", Decimal(0))], time.time())[0]


def _pending_amount(store: StateStore) -> Decimal:
    return sum(
        (amount for record in store.pending(time.time()) for _, amount in record.amounts),
        Decimal(0),
    )


async def test_a_server_killed_mid_run_blocks_calls_and_loses_nothing(server: Server) -> None:
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY), state_store=server.url
    )
    executed: list[int] = []
    refusals: list[BlockedError] = []

    def pay(n: int) -> Callable[[], None]:
        return lambda: executed.append(n)

    async def call(n: int) -> str:
        try:
            await engine.execute(
                "finance.spend", "agent-1", {"service": "bank", "amount_usd": 1}, pay(n)
            )
        except BlockedError as exc:
            refusals.append(exc)
            return "blocked"
        return "executed"

    # Before: calls go through.
    assert [await call(n) for n in range(20)] == ["executed"] * 20

    # Mid-run: 8 tasks keep calling while the server is killed under them.
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def worker(w: int) -> None:
        n = 0
        while not stop.is_set():
            outcomes.append(await call(1000 * (w + 1) + n))
            n += 1

    workers = [asyncio.create_task(worker(w)) for w in range(8)]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(1.5)
    ran_when_down = len(executed)
    down = [await call(-n) for n in range(1, 6)]  # the server is down: each is blocked
    stop.set()
    await asyncio.gather(*workers)

    assert down == ["blocked"] * 5
    for refusal in refusals:  # each one a fail-closed BLOCK naming the server: a clear error
        assert refusal.decision.fail_closed
        assert isinstance(refusal.__cause__, StateStoreError)
        assert f"127.0.0.1:{server.port}" in refusal.decision.reason
    assert "blocked" in outcomes
    assert len(executed) == ran_when_down  # no executor ran while the server was down

    # After: the server comes back on the same data; the same engine works again.
    await asyncio.to_thread(server.start)
    deadline = time.monotonic() + 20
    while await call(10**6) != "executed":
        assert time.monotonic() < deadline, "the store did not reconnect"
        await asyncio.sleep(0.2)
    await engine.state_store.aclose()
    engine.close()

    check = from_url(server.url)
    try:
        total, pending = _total(check), _pending_amount(check)
    finally:
        check.close()
    # Every action that ran is counted (nothing lost). A reservation whose reply the kill cut
    # off is counted too, without having run: the safe side, left pending until its lease
    # expires, so the totals add up exactly.
    assert total >= len(executed)
    assert total == len(executed) + pending
