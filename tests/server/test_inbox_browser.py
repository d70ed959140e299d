"""The inbox end to end: a real ``limenex serve``, a real escalation, a real browser.

The server runs as its own process on the SQLite state of the test; the engine in the test
process escalates into the same database; headless Chromium (Debian's, driven by
Playwright: ``make test`` installs it through ``scripts/ensure-chromium.sh``) approves or
denies on the page; the engine then resumes, or is refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from limenex.approvals import ApprovalRefused
from limenex.audit import verify
from limenex.core.engine import EscalationRequired, PolicyEngine
from limenex.skills.finance import make_spend

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token-" + "k" * 24
POLICY = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      stateful: false
      operator: lte
      value: 100
      breach_verdict: ESCALATE
"""


@dataclass
class Server:
    url: str
    state_url: str
    policy: Path
    audit_log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"limenex serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our URL
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    pytest.fail(f"limenex serve did not answer at {url} within 30 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `bash scripts/ensure-chromium.sh` (make test does)"
        )
    folder = tmp_path_factory.mktemp("inbox")
    policy = folder / "policies.yaml"
    policy.write_text(POLICY)
    state_url = f"sqlite:///{folder}/state.db"
    port = _free_port()
    log = folder / "serve.log"
    env = {**os.environ, "LIMENEX_TOKEN": TOKEN}
    env.pop("LIMENEX_STATE_URL", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "limenex", "serve", "--url", state_url, "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_up(url, process, log)
        yield Server(url, state_url, policy, folder / "audit.log")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
async def page(server: Server) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            context = await browser.new_context()
            tab = await context.new_page()
            problems: list[str] = []
            tab.on("pageerror", lambda exc: problems.append(str(exc)))

            def console(message: Any) -> None:
                # A 401 or 409 is logged as "Failed to load resource": that is the API working.
                if message.type == "error" and "Failed to load resource" not in message.text:
                    problems.append(message.text)

            tab.on("console", console)
            yield tab
            # No script error and no CSP violation while the test drove the page.
            assert problems == []
        finally:
            await browser.close()


async def _escalate(server: Server, calls: list[Any]) -> tuple[PolicyEngine, Any, str, str]:
    engine = PolicyEngine(str(server.policy), state_store=server.state_url)

    def stripe(*, amount_usd: Any) -> str:
        calls.append(amount_usd)
        return f"charged {amount_usd}"

    spend = make_spend(engine, {"stripe": stripe})
    with pytest.raises(EscalationRequired) as escalated:
        await spend(agent_id="agent-7", service="stripe", amount_usd=120)
    request_id = escalated.value.request_id
    assert request_id is not None
    assert calls == []
    return engine, spend, request_id, escalated.value.decision.reason


async def _sign_in_and_find(page: Any, server: Server, request_id: str, reason: str) -> Any:
    from playwright.async_api import expect

    await page.goto(server.url)
    await page.get_by_label("Access token").fill(TOKEN)
    await page.get_by_label("Your name").fill("Alice Approver")
    await page.get_by_role("button", name="Sign in").click()
    card = page.locator(f'li[data-request-id="{request_id}"]')
    await expect(card).to_be_visible()
    for text in ("finance.spend", "agent-7", "stripe", "120", reason, "amount_usd"):
        await expect(card).to_contain_text(text)
    assert await page.evaluate("() => sessionStorage.getItem('limenex.token')") == TOKEN
    return card


def _audit_records(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.audit_log.read_text().splitlines()]


async def test_approving_on_the_page_lets_the_engine_run_the_action_once(
    server: Server, page: Any
) -> None:
    from playwright.async_api import expect

    calls: list[Any] = []
    engine, _, request_id, reason = await _escalate(server, calls)
    try:
        card = await _sign_in_and_find(page, server, request_id, reason)
        await card.get_by_label("Note (optional)").fill("within this month's budget")
        await card.get_by_role("button", name="Approve").click()
        await expect(page.get_by_role("status")).to_contain_text("Approved")
        await expect(page.get_by_role("status")).to_contain_text(request_id)
        await expect(card).to_have_count(0)

        result = await engine.resume(request_id)
        assert result == "charged 120"
        assert calls == [120]
        with pytest.raises(ApprovalRefused) as refused:
            await engine.resume(request_id)
        assert refused.value.why == "used"
        assert calls == [120]
    finally:
        engine.close()

    approved = [
        r
        for r in _audit_records(server)
        if r["event"] == "approved" and r["extra"].get("request_id") == request_id
    ]
    assert len(approved) == 1
    assert approved[0]["extra"]["decided_by"] == "Alice Approver"
    assert approved[0]["extra"]["note"] == "within this month's budget"
    assert verify(server.audit_log).ok


async def test_denying_on_the_page_means_the_action_never_runs(server: Server, page: Any) -> None:
    from playwright.async_api import expect

    calls: list[Any] = []
    engine, _, request_id, reason = await _escalate(server, calls)
    try:
        card = await _sign_in_and_find(page, server, request_id, reason)
        await card.get_by_role("button", name="Deny").click()
        await expect(page.get_by_role("status")).to_contain_text("Denied")
        await expect(card).to_have_count(0)

        with pytest.raises(ApprovalRefused) as refused:
            await engine.resume(request_id)
        assert refused.value.why == "denied"
        assert calls == []
    finally:
        engine.close()
    assert any(
        r["event"] == "denied" and r["extra"].get("request_id") == request_id
        for r in _audit_records(server)
    )
    assert verify(server.audit_log).ok


async def test_a_wrong_token_is_refused_on_the_page(server: Server, page: Any) -> None:
    from playwright.async_api import expect

    await page.goto(server.url)
    await page.get_by_label("Access token").fill("not-the-token-at-all")
    await page.get_by_label("Your name").fill("Mallory")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("status")).to_contain_text("token was refused")
    await expect(page.get_by_label("Access token")).to_be_visible()
