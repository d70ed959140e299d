"""The inbox's HTTP API: every endpoint, the token, and what other web pages cannot do."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from limenex.approvals import (
    ApprovalRequest,
    Approvals,
    ApprovalStoreError,
    InMemoryApprovalStore,
    approval_store_for,
    canonical_params,
    fingerprint,
    new_request_id,
)
from limenex.audit import AuditError, AuditLog, AuditRecord, JsonlSink, verify
from limenex.cli import main
from limenex.core.errors import StateStoreError
from limenex.core.state import CounterKey, StateStore
from limenex.core.stores import SQLiteStateStore
from limenex.server import SECURITY_HEADERS, create_app, loopback_hosts

TOKEN = "test-token-" + "x" * 32
BASE = "http://127.0.0.1:8765"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "Content-Type": "application/json"}


def new_request(
    *,
    skill_id: str = "finance.spend",
    agent_id: str = "agent-7",
    params: dict[str, Any] | None = None,
    created_at: float | None = None,
    ttl: float = 3600.0,
) -> ApprovalRequest:
    params = params if params is not None else {"service": "stripe", "amount_usd": 120}
    now = time.time() if created_at is None else created_at
    return ApprovalRequest(
        id=new_request_id(),
        skill_id=skill_id,
        agent_id=agent_id,
        params=canonical_params(params),
        fingerprint=fingerprint(skill_id, agent_id, params),
        policy={"dimension": "amount_usd", "operator": "lte", "value": 100},
        policy_index=0,
        reason="amount_usd 120 exceeds 100",
        created_at=now,
        expires_at=now + ttl,
    )


class Inbox:
    """An app over a fresh SQLite state, its approvals table and an audit log, plus a client."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path}/state.db"
        self.state = SQLiteStateStore(tmp_path / "state.db")
        self.store = approval_store_for(self.state)
        self.audit_path = tmp_path / "audit.log"
        self.audit = AuditLog(JsonlSink(self.audit_path))
        self.approvals = Approvals(self.store, audit=self.audit)
        self.app = create_app(
            self.approvals, state_store=self.state, audit_path=self.audit_path, token=TOKEN
        )
        self.client = TestClient(self.app, base_url=BASE, raise_server_exceptions=False)

    def add(self, **fields: Any) -> ApprovalRequest:
        request = new_request(**fields)
        self.store.create(request)
        return request

    def status(self, request_id: str) -> str:
        found = self.approvals.get_sync(request_id)
        assert found is not None
        return found.status.value

    def audit_events(self) -> list[str]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line)["event"] for line in self.audit_path.read_text().splitlines()]

    def close(self) -> None:
        self.client.close()
        self.audit.close()
        self.store.close()
        self.state.close()


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    made = Inbox(tmp_path)
    yield made
    made.close()


def without_display(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key != "display"}


def assert_protected(response: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name


# --- the page -------------------------------------------------------------------------------


def test_the_page_loads_without_a_token_and_holds_no_data(inbox: Inbox) -> None:
    inbox.add()
    page = inbox.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert_protected(page)
    assert "agent-7" not in page.text
    assert '<script src="/inbox.js"' in page.text
    assert "<script>" not in page.text  # no inline script: the CSP allows none
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    script = inbox.client.get("/inbox.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text
    assert "sessionStorage" in script.text
    style = inbox.client.get("/inbox.css")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")


def test_every_reply_carries_the_security_headers(inbox: Inbox) -> None:
    for response in (
        inbox.client.get("/api/requests"),  # 401
        inbox.client.get("/api/nothing", headers=AUTH),  # 404
        inbox.client.get("/nothing"),  # 404
        inbox.client.delete("/", headers=AUTH),  # 405
        inbox.client.get("/", headers={"Host": "evil.example:8765"}),  # 400
    ):
        assert_protected(response)
        assert response.headers["content-type"] == "application/json"
        assert "error" in response.json()


# --- reading --------------------------------------------------------------------------------


def test_pending_requests_oldest_first_each_as_to_dict(inbox: Inbox) -> None:
    now = time.time()
    second = inbox.add(agent_id="agent-2", created_at=now - 10)
    first = inbox.add(agent_id="agent-1", created_at=now - 20)
    decided = inbox.add(agent_id="agent-3", created_at=now - 30)
    inbox.approvals.deny_sync(decided.id, "carol")
    response = inbox.client.get("/api/requests", headers=AUTH)
    assert response.status_code == 200
    assert_protected(response)
    assert [without_display(r) for r in response.json()] == [first.to_dict(), second.to_dict()]


def test_one_request_in_any_status_and_404_for_an_unknown_one(inbox: Inbox) -> None:
    request = inbox.add(params={"amount_usd": Decimal("120.50"), "note": "<b>hi</b>"})
    got = inbox.client.get(f"/api/requests/{request.id}", headers=AUTH)
    assert got.status_code == 200
    assert without_display(got.json()) == request.to_dict()
    assert got.json()["params"] == {"amount_usd": "120.50", "note": "<b>hi</b>"}
    inbox.approvals.approve_sync(request.id, "alice")
    assert inbox.client.get(f"/api/requests/{request.id}", headers=AUTH).json()["status"] == (
        "approved"
    )
    missing = inbox.client.get("/api/requests/no-such-id", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["why"] == "unknown"
    too_long = inbox.client.get("/api/requests/" + "a" * 500, headers=AUTH)
    assert too_long.status_code == 404


# --- deciding -------------------------------------------------------------------------------


def test_approve_keeps_the_decision_and_audits_it(inbox: Inbox) -> None:
    request = inbox.add()
    response = inbox.client.post(
        f"/api/requests/{request.id}/approve",
        headers=JSON,
        content=json.dumps({"by": " alice ", "note": "ok for this month"}),
    )
    assert response.status_code == 200, response.text
    assert_protected(response)
    body = response.json()
    assert body["status"] == "approved"
    assert body["decided_by"] == "alice"
    assert body["note"] == "ok for this month"
    assert inbox.status(request.id) == "approved"
    assert inbox.client.get("/api/requests", headers=AUTH).json() == []
    assert inbox.audit_events() == ["approved"]
    record = json.loads(inbox.audit_path.read_text())
    assert record["extra"]["request_id"] == request.id
    assert record["extra"]["decided_by"] == "alice"
    assert verify(inbox.audit_path).ok

    again = inbox.client.post(
        f"/api/requests/{request.id}/approve", headers=JSON, json={"by": "bob"}
    )
    assert again.status_code == 409
    assert again.json()["why"] == "approved"
    assert "error" in again.json()
    denied_late = inbox.client.post(
        f"/api/requests/{request.id}/deny", headers=JSON, json={"by": "bob"}
    )
    assert denied_late.status_code == 409
    assert denied_late.json()["why"] == "approved"
    assert inbox.audit_events() == ["approved"]


def test_deny_is_final_and_audited(inbox: Inbox) -> None:
    request = inbox.add()
    response = inbox.client.post(
        f"/api/requests/{request.id}/deny", headers=JSON, json={"by": "bob", "note": None}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "denied"
    assert response.json()["note"] == ""
    after = inbox.client.post(
        f"/api/requests/{request.id}/approve", headers=JSON, json={"by": "alice"}
    )
    assert after.status_code == 409
    assert after.json()["why"] == "denied"
    assert inbox.status(request.id) == "denied"
    assert inbox.audit_events() == ["denied"]
    assert verify(inbox.audit_path).ok


def test_an_expired_or_unknown_request_is_refused(inbox: Inbox) -> None:
    expired = inbox.add(created_at=time.time() - 100, ttl=50)
    response = inbox.client.post(
        f"/api/requests/{expired.id}/approve", headers=JSON, json={"by": "alice"}
    )
    assert response.status_code == 409
    assert response.json()["why"] == "expired"
    unknown = inbox.client.post("/api/requests/nope/deny", headers=JSON, json={"by": "alice"})
    assert unknown.status_code == 404
    assert unknown.json()["why"] == "unknown"
    assert inbox.audit_events() == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"by": ""},
        {"by": "   "},
        {"by": 7},
        {"by": None},
        {"by": "alice", "note": 3},
        {"by": "a" * 201},
        {"by": "alice", "note": "n" * 4001},
        ["by", "alice"],
        "alice",
    ],
)
def test_a_decision_needs_a_named_approver_and_a_text_note(inbox: Inbox, body: Any) -> None:
    request = inbox.add()
    response = inbox.client.post(f"/api/requests/{request.id}/approve", headers=JSON, json=body)
    assert response.status_code == 400
    assert "error" in response.json()
    assert inbox.status(request.id) == "pending"
    assert inbox.audit_events() == []


def test_a_body_that_is_not_json_is_400(inbox: Inbox) -> None:
    request = inbox.add()
    response = inbox.client.post(
        f"/api/requests/{request.id}/approve", headers=JSON, content=b"by=alice"
    )
    assert response.status_code == 400
    assert inbox.status(request.id) == "pending"


def test_only_approve_and_deny_are_actions(inbox: Inbox) -> None:
    request = inbox.add()
    for action in ("use", "consume", "approve/x"):
        response = inbox.client.post(
            f"/api/requests/{request.id}/{action}", headers=JSON, json={"by": "alice"}
        )
        assert response.status_code == 404
    assert inbox.client.get(f"/api/requests/{request.id}/approve", headers=AUTH).status_code == (
        405
    )
    assert inbox.status(request.id) == "pending"


# --- the token ------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/api/requests"),
    ("GET", "/api/requests/{id}"),
    ("POST", "/api/requests/{id}/approve"),
    ("POST", "/api/requests/{id}/deny"),
    ("GET", "/api/audit"),
    ("GET", "/api/state"),
    ("GET", "/api/unknown"),
]

BAD_AUTH: list[dict[str, Any]] = [
    {},
    {"Authorization": "Bearer wrong-token-but-long-enough"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer é".encode("latin-1")},
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("auth", BAD_AUTH)
def test_without_the_token_every_endpoint_refuses_and_nothing_changes(
    inbox: Inbox, method: str, path: str, auth: dict[str, Any]
) -> None:
    request = inbox.add()
    inbox.state.adjust(CounterKey("spend_usd", "agent", "agent-7", ""), Decimal(5), time.time())
    response = inbox.client.request(
        method,
        path.format(id=request.id) + f"?token={TOKEN}",
        headers={**auth, "Content-Type": "application/json"},
        content=json.dumps({"by": "mallory"}),
    )
    assert response.status_code == 401
    assert_protected(response)
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body) == {"error"}
    assert "agent-7" not in response.text
    assert inbox.status(request.id) == "pending"
    assert inbox.audit_events() == []


# --- other web pages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "http://127.0.0.1:8766"}, 403),
        ({"Origin": "http://localhost:8765.evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": ""}, 415),
        (
            {
                "Origin": "https://evil.example",
                "Sec-Fetch-Site": "cross-site",
                "Content-Type": "application/x-www-form-urlencoded",
            },
            403,
        ),
    ],
)
@pytest.mark.parametrize("action", ["approve", "deny"])
def test_a_cross_site_post_is_refused_and_the_request_stays_pending(
    inbox: Inbox, headers: dict[str, str], status: int, action: str
) -> None:
    request = inbox.add()
    response = inbox.client.post(
        f"/api/requests/{request.id}/{action}",
        headers={**JSON, **headers},
        content=json.dumps({"by": "mallory"}).encode(),
    )
    assert response.status_code == status
    assert_protected(response)
    assert inbox.status(request.id) == "pending"
    assert inbox.audit_events() == []


def test_cross_site_reads_are_refused_too(inbox: Inbox) -> None:
    inbox.add()
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = inbox.client.get("/api/requests", headers={**AUTH, **headers})
        assert response.status_code == 403
        assert "agent-7" not in response.text
        assert "access-control-allow-origin" not in response.headers


def test_the_servers_own_origin_may_post(inbox: Inbox) -> None:
    request = inbox.add()
    response = inbox.client.post(
        f"/api/requests/{request.id}/approve",
        headers={
            **JSON,
            "Content-Type": "application/json; charset=utf-8",
            "Origin": BASE,
            "Sec-Fetch-Site": "same-origin",
        },
        json={"by": "alice"},
    )
    assert response.status_code == 200
    assert inbox.status(request.id) == "approved"


@pytest.mark.parametrize(
    "host",
    ["evil.example:8765", "evil.example", "127.0.0.1:8766", "127.0.0.1", "", "localhost.evil:8765"],
)
def test_a_host_header_not_naming_this_server_is_refused(inbox: Inbox, host: str) -> None:
    request = inbox.add()
    for method, path in (("GET", "/"), ("GET", "/api/requests")):
        response = inbox.client.request(method, path, headers={**AUTH, "Host": host})
        assert response.status_code == 400
        assert "agent-7" not in response.text
    response = inbox.client.post(
        f"/api/requests/{request.id}/approve",
        headers={**JSON, "Host": host},
        json={"by": "mallory"},
    )
    assert response.status_code == 400
    assert inbox.status(request.id) == "pending"


@pytest.mark.parametrize("host", ["localhost:8765", "127.0.0.1:8765", "LOCALHOST:8765"])
def test_localhost_names_on_the_port_are_answered(inbox: Inbox, host: str) -> None:
    response = inbox.client.get("/api/requests", headers={**AUTH, "Host": host})
    assert response.status_code == 200


def test_loopback_hosts() -> None:
    assert loopback_hosts("127.0.0.1", 8765) == {
        "127.0.0.1:8765",
        "localhost:8765",
        "[::1]:8765",
    }
    assert "[::1]:9000" in loopback_hosts("::1", 9000)
    hosts = loopback_hosts("0.0.0.0", 8080, ["Inbox.Example.Internal"])  # noqa: S104
    assert "inbox.example.internal:8080" in hosts
    assert "0.0.0.0:8080" in hosts
    assert "localhost" not in hosts
    assert "localhost" in loopback_hosts("127.0.0.1", 80)


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        create_app(
            Approvals(InMemoryApprovalStore()),
            state_store=SQLiteStateStore(tmp_path / "s.db"),
            audit_path=tmp_path / "audit.log",
            token="short",  # noqa: S106 - a test token, refused for its length
        )


# --- audit and state ------------------------------------------------------------------------


def test_audit_tail(inbox: Inbox) -> None:
    assert inbox.client.get("/api/audit", headers=AUTH).json() == []  # no log yet
    first, second = inbox.add(), inbox.add()
    inbox.client.post(f"/api/requests/{first.id}/approve", headers=JSON, json={"by": "alice"})
    inbox.client.post(f"/api/requests/{second.id}/deny", headers=JSON, json={"by": "bob"})
    records = inbox.client.get("/api/audit", headers=AUTH).json()
    assert [r["event"] for r in records] == ["approved", "denied"]
    assert [r["seq"] for r in records] == [1, 2]
    assert records[1]["extra"]["request_id"] == second.id
    last = inbox.client.get("/api/audit?n=1", headers=AUTH).json()
    assert [r["event"] for r in last] == ["denied"]
    assert inbox.client.get("/api/audit?n=0", headers=AUTH).json() == []
    for bad in ("x", "-1", "1001", "1.5"):
        response = inbox.client.get(f"/api/audit?n={bad}", headers=AUTH)
        assert response.status_code == 400, bad
    with inbox.audit_path.open("ab") as log:
        log.write(b"not json\n")
    tail = inbox.client.get("/api/audit?n=2", headers=AUTH).json()
    assert tail[-1] == {"unreadable": "not json"}


def test_state_is_what_state_show_json_prints(inbox: Inbox) -> None:
    assert inbox.client.get("/api/state", headers=AUTH).json() == []
    now = time.time()
    inbox.state.adjust(CounterKey("spend_usd", "agent", "agent-7", ""), Decimal("12.50"), now)
    inbox.state.adjust(CounterKey("calls", "global", "", ""), Decimal(3), now)
    response = inbox.client.get("/api/state", headers=AUTH)
    assert response.status_code == 200
    cli = CliRunner().invoke(main, ["state", "show", "--url", inbox.url, "--json"])
    assert cli.exit_code == 0, cli.output
    assert response.json() == json.loads(cli.output)
    assert {"dimension": "spend_usd", "scope": "agent", "subject": "agent-7", "window": ""} | {
        "total": "12.50"
    } in response.json()


# --- failures -------------------------------------------------------------------------------


class BrokenApprovalStore(InMemoryApprovalStore):
    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        raise ApprovalStoreError("database is down")

    def pending(self, now: float) -> list[ApprovalRequest]:
        raise ApprovalStoreError("database is down")

    def approve(self, request_id: str, by: str, now: float, note: str = "") -> ApprovalRequest:
        raise ApprovalStoreError("database is down")

    def deny(self, request_id: str, by: str, now: float, note: str = "") -> ApprovalRequest:
        raise ApprovalStoreError("database is down")


class BrokenStateStore(SQLiteStateStore):
    def totals(self, now: float) -> list[tuple[CounterKey, Decimal]]:
        raise StateStoreError("state database is down")


def test_store_errors_are_503_json_never_a_traceback(tmp_path: Path) -> None:
    state: StateStore = BrokenStateStore(tmp_path / "state.db")
    app = create_app(
        Approvals(BrokenApprovalStore()),
        state_store=state,
        audit_path=tmp_path / "audit.log",
        token=TOKEN,
    )
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        for method, path in (
            ("GET", "/api/requests"),
            ("GET", "/api/requests/abc"),
            ("POST", "/api/requests/abc/approve"),
            ("POST", "/api/requests/abc/deny"),
            ("GET", "/api/state"),
        ):
            response = client.request(method, path, headers=JSON, json={"by": "alice"})
            assert response.status_code == 503, path
            assert_protected(response)
            assert "is down" in response.json()["error"]
            assert "Traceback" not in response.text
    state.close()


class FailingSink(JsonlSink):
    def append(self, record: AuditRecord) -> AuditRecord:
        raise AuditError("disk full")


def test_a_decision_whose_audit_fails_is_kept_and_said_so(tmp_path: Path) -> None:
    store = InMemoryApprovalStore()
    request = new_request()
    store.create(request)
    app = create_app(
        Approvals(store, audit=AuditLog(FailingSink(tmp_path / "audit.log"))),
        state_store=SQLiteStateStore(tmp_path / "state.db"),
        audit_path=tmp_path / "audit.log",
        token=TOKEN,
    )
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        response = client.post(
            f"/api/requests/{request.id}/approve", headers=JSON, json={"by": "alice"}
        )
        assert response.status_code == 500
        assert "could not be written" in response.json()["error"]
        assert_protected(response)
    found = store.get(request.id, time.time())
    assert found is not None
    assert found.status.value == "approved"


class ExplodingApprovalStore(InMemoryApprovalStore):
    def pending(self, now: float) -> list[ApprovalRequest]:
        raise RuntimeError("secret internal detail")


def test_an_unexpected_error_is_a_500_json_without_details(tmp_path: Path) -> None:
    app = create_app(
        Approvals(ExplodingApprovalStore()),
        state_store=SQLiteStateStore(tmp_path / "state.db"),
        audit_path=tmp_path / "audit.log",
        token=TOKEN,
    )
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        response = client.get("/api/requests", headers=AUTH)
    assert response.status_code == 500
    assert_protected(response)
    assert "secret internal detail" not in response.text
    assert set(response.json()) == {"error"}


# --- the command ----------------------------------------------------------------------------


def test_serve_without_starlette_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "starlette", None)
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2
    assert "pip install 'limenex[serve]'" in result.output


def test_serve_refuses_a_short_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIMENEX_TOKEN", "short")
    result = CliRunner().invoke(main, ["serve", "--url", f"sqlite:///{tmp_path}/s.db"])
    assert result.exit_code == 1
    assert "too short" in result.output


def test_serve_is_listed_with_its_options() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--url", "--audit-log", "--host", "--port"):
        assert option in result.output
    assert "127.0.0.1" in result.output
    assert "8765" in result.output


async def test_approving_through_the_api_lets_an_engine_resume_once(inbox: Inbox) -> None:
    """The acceptance path with the JSON API: escalate, approve over HTTP, resume once."""
    from limenex.core.engine import EscalationRequired, PolicyEngine
    from limenex.core.policy_store import InMemoryPolicyStore
    from limenex.skills.finance import make_spend

    policy = InMemoryPolicyStore.from_yaml(
        "finance.spend:\n  policies:\n    - {type: deterministic, dimension: amount_usd,"
        " param: amount_usd, operator: lte, value: 100, stateful: false,"
        " breach_verdict: ESCALATE}\n"
    )
    engine = PolicyEngine(policy, inbox.url, audit_logger=inbox.audit)
    paid: list[Decimal] = []
    spend = make_spend(engine, {"stripe": lambda amount_usd: paid.append(amount_usd) or "ok"})
    with pytest.raises(EscalationRequired) as paused:
        await spend(agent_id="agent-7", service="stripe", amount_usd=Decimal("120.50"))
    request_id = paused.value.request_id
    listed = inbox.client.get("/api/requests", headers=AUTH).json()
    assert [r["id"] for r in listed] == [request_id]
    refused = inbox.client.post(f"/api/requests/{request_id}/approve", json={"by": "ana"})
    assert refused.status_code == 401
    assert inbox.status(str(request_id)) == "pending"
    approved = inbox.client.post(
        f"/api/requests/{request_id}/approve", headers=JSON, content=json.dumps({"by": "ana"})
    )
    assert approved.status_code == 200, approved.text
    assert await engine.resume(str(request_id)) == "ok"
    assert paid == [Decimal("120.50")]
    again = inbox.client.post(
        f"/api/requests/{request_id}/approve", headers=JSON, content=json.dumps({"by": "ana"})
    )
    assert (again.status_code, again.json()["why"]) == (409, "used")
    engine.close()
    assert inbox.audit_events() == ["escalated", "approved", "allowed", "resumed", "executed"]
    assert verify(inbox.audit_path).ok


def test_the_page_shows_server_made_text_exact_and_free_of_hidden_characters(
    inbox: Inbox,
) -> None:
    """JavaScript would round 12345678901234567891 and show a Decimal like any string; a
    right-to-left override could make "100" read as "001"."""
    from limenex.approvals import decimal_paths, request_from_decision
    from limenex.core.decision import Decision, Verdict

    params = {"big": 12345678901234567891, "amount": Decimal("1.10"), "to": "ana\u202egpj.exe"}
    decision = Decision(Verdict.ESCALATE, "finance.spend", "agent\x1b[2J", "why")
    request = request_from_decision(decision, params, now=time.time(), ttl=60)
    assert request.decimals == decimal_paths(params)
    inbox.store.create(request)
    shown = inbox.client.get(f"/api/requests/{request.id}", headers=AUTH).json()["display"]
    assert '"big": 12345678901234567891' in shown["params"]
    assert shown["decimals"] == "amount"
    assert "\\u202e" in shown["params"]
    assert "\u202e" not in shown["params"]
    assert shown["agent_id"] == "agent\\u001b[2J"
