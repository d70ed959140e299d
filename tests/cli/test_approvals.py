"""``limenex approvals list|show|approve|deny`` on an SQLite state database."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limenex.approvals import (
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStore,
    approval_store_for,
    request_from_decision,
)
from limenex.audit import verify
from limenex.cli import main
from limenex.core.decision import Decision, Verdict
from limenex.core.policy import DeterministicPolicy
from limenex.core.stores import LocalFileStateStore, SQLiteStateStore

POLICY = DeterministicPolicy.model_validate(
    {
        "type": "deterministic",
        "dimension": "spend_usd",
        "param": "amount_usd",
        "operator": "lte",
        "value": 100,
        "breach_verdict": "ESCALATE",
    }
)
PARAMS = {"service": "bank", "amount_usd": Decimal("120.50")}


def escalation(skill: str = "finance.spend", agent: str = "agent-1") -> Decision:
    return Decision(
        Verdict.ESCALATE,
        skill,
        agent,
        "amount_usd 120.50 is above 100: a human must approve",
        policy=POLICY,
        policy_index=0,
    )


class Fixture:
    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "state.db"
        self.url = f"sqlite:///{self.db}"
        self.log = tmp_path / "audit.log"  # audit.log beside state.db: the default
        self.state = SQLiteStateStore(self.db)
        self.store: ApprovalStore = approval_store_for(self.state)

    def request(
        self,
        *,
        agent: str = "agent-1",
        created: float | None = None,
        ttl: float = 3600.0,
        params: dict[str, Any] | None = None,
    ) -> ApprovalRequest:
        request = request_from_decision(
            escalation(agent=agent),
            PARAMS if params is None else params,
            now=time.time() if created is None else created,
            ttl=ttl,
        )
        self.store.create(request)
        return request


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Fixture]:
    fixture = Fixture(tmp_path)
    yield fixture
    fixture.store.close()
    fixture.state.close()


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def approvals(*args: str, ok: bool = True) -> tuple[int, str, str]:
    code, out, err = cli("approvals", *args)
    assert (code == 0) is ok, (code, out, err)
    assert "Traceback" not in out + err
    return code, out, err


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- list and show ------------------------------------------------------------------------------


def test_list_shows_pending_requests_oldest_first(env: Fixture) -> None:
    now = time.time()
    second = env.request(agent="agent-2", created=now - 10)
    first = env.request(agent="agent-1", created=now - 20)
    env.request(created=now - 7200)  # expired an hour ago: not pending
    decided = env.request(created=now - 5)
    env.store.deny(decided.id, "carol", now)

    _, out, _ = approvals("list", "--url", env.url)
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "SKILL", "AGENT", "PARAMS", "REASON", "EXPIRES"]
    assert len(lines) == 3
    assert lines[1].startswith(first.id)
    assert lines[2].startswith(second.id)
    assert '{"amount_usd":"120.50","service":"bank"}' in lines[1]
    assert "finance.spend" in lines[1]
    assert "agent-1" in lines[1]
    assert "a human must approve" in lines[1]
    assert "(in 59m)" in lines[1]  # expires: a human time
    assert time.strftime("%Y-%m-%dT", time.gmtime(first.expires_at)) in lines[1]

    _, out, _ = approvals("list", "--url", env.url, "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [first.id, second.id]
    assert rows[0] == first.to_dict()


def test_list_of_a_store_without_requests(env: Fixture) -> None:
    assert approvals("list", "--url", env.url)[1] == "no pending approval requests\n"
    assert json.loads(approvals("list", "--url", env.url, "--json")[1]) == []


def test_show_prints_every_field(env: Fixture) -> None:
    request = env.request()
    _, out, _ = approvals("show", request.id, "--url", env.url)
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert set(fields) == set(request.to_dict())
    assert fields["id"] == request.id
    assert fields["status"] == "pending"
    assert fields["fingerprint"] == request.fingerprint
    assert fields["params"] == '{"amount_usd":"120.50","service":"bank"}'
    assert '"dimension":"spend_usd"' in fields["policy"]
    assert fields["decided_by"] == "-"
    assert "(in 59m)" in fields["expires_at"]

    _, out, _ = approvals("show", request.id, "--url", env.url, "--json")
    assert json.loads(out) == request.to_dict()


def test_show_an_unknown_id_fails_clearly(env: Fixture) -> None:
    code, out, err = approvals("show", "nope", "--url", env.url, ok=False)
    assert (code, out) == (1, "")
    assert "no approval request 'nope'" in err
    code, out, _ = approvals("show", "nope", "--url", env.url, "--json", ok=False)
    assert code == 1
    assert json.loads(out)["why"] == "unknown"


def test_show_reads_an_expired_request_as_expired(env: Fixture) -> None:
    request = env.request(created=time.time() - 7200)
    _, out, _ = approvals("show", request.id, "--url", env.url, "--json")
    assert json.loads(out)["status"] == "expired"


# --- approve and deny -----------------------------------------------------------------------------


def test_approve_is_kept_audited_and_seen_by_other_processes(env: Fixture) -> None:
    request = env.request()
    _, out, _ = approvals(
        "approve", request.id, "--by", "alice", "--note", "vendor checked", "--url", env.url
    )
    assert out.startswith(f"approved {request.id}: finance.spend for agent-1")
    assert "by alice (vendor checked)" in out
    assert str(env.log) in out

    # This process's store object (another view of the same database) sees the approval...
    seen = env.store.get(request.id, time.time())
    assert seen is not None
    assert (seen.status, seen.decided_by, seen.note) == (
        ApprovalStatus.APPROVED,
        "alice",
        "vendor checked",
    )
    # ...and can consume it, once.
    assert env.store.consume(request.id, request.fingerprint, time.time()).status == "used"

    (record,) = audit_records(env.log)
    assert record["event"] == "approved"
    assert record["extra"]["request_id"] == request.id
    assert record["extra"]["decided_by"] == "alice"
    assert record["extra"]["note"] == "vendor checked"
    assert (record["skill_id"], record["agent_id"]) == ("finance.spend", "agent-1")
    assert cli("audit", "verify", "--path", str(env.log)) == (
        0,
        "✓ Audit log intact — 1 record\n",
        "",
    )
    assert approvals("list", "--url", env.url)[1] == "no pending approval requests\n"


def test_deny_is_kept_and_audited(env: Fixture) -> None:
    request = env.request()
    _, out, _ = approvals("deny", request.id, "--by", "bob", "--url", env.url, "--json")
    data = json.loads(out)
    assert (data["id"], data["status"], data["decided_by"]) == (request.id, "denied", "bob")
    assert data["note"] == ""
    seen = env.store.get(request.id, time.time())
    assert seen is not None
    assert seen.status is ApprovalStatus.DENIED
    (record,) = audit_records(env.log)
    assert (record["event"], record["extra"]["status"]) == ("denied", "denied")
    assert verify(env.log).ok


def test_approve_json_is_the_request(env: Fixture) -> None:
    request = env.request()
    _, out, _ = approvals("approve", request.id, "--by", "alice", "--url", env.url, "--json")
    data = json.loads(out)
    assert data["status"] == "approved"
    assert data["fingerprint"] == request.fingerprint
    assert {k: v for k, v in data.items() if k not in ("status", "decided_by", "decided_at")} == {
        k: v
        for k, v in request.to_dict().items()
        if k not in ("status", "decided_by", "decided_at")
    }


def test_the_audit_log_can_be_chosen(env: Fixture, tmp_path: Path) -> None:
    request = env.request()
    log = tmp_path / "elsewhere" / "decisions.log"
    approvals("approve", request.id, "--by", "alice", "--url", env.url, "--audit-log", str(log))
    assert [r["event"] for r in audit_records(log)] == ["approved"]
    assert not env.log.exists()
    assert cli("audit", "verify", "--path", str(log))[0] == 0


def test_decisions_chain_onto_the_engines_log(env: Fixture) -> None:
    """The CLI appends to the log the engine writes: one chain, which verifies."""
    first, second = env.request(), env.request(agent="agent-2")
    approvals("approve", first.id, "--by", "alice", "--url", env.url)
    approvals("deny", second.id, "--by", "alice", "--url", env.url)
    records = audit_records(env.log)
    assert [(r["seq"], r["event"]) for r in records] == [(1, "approved"), (2, "denied")]
    assert records[1]["prev"] == records[0]["hash"]
    assert verify(env.log).count == 2


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_every_refusal_exits_1_with_a_clear_message(env: Fixture, action: str) -> None:
    now = time.time()
    approved = env.request()
    env.store.approve(approved.id, "carol", now)
    denied = env.request()
    env.store.deny(denied.id, "carol", now)
    expired = env.request(created=now - 7200)
    used = env.request()
    env.store.approve(used.id, "carol", now)
    env.store.consume(used.id, used.fingerprint, now)
    verb = "approve" if action == "approve" else "deny"
    cases = [
        ("nope", "unknown", "there is no such request"),
        (approved.id, "approved", "it was already approved"),
        (denied.id, "denied", "it was denied"),
        (expired.id, "expired", "it has expired"),
        (used.id, "used", "it was already used"),
    ]
    for request_id, why, message in cases:
        code, out, err = approvals(action, request_id, "--by", "dave", "--url", env.url, ok=False)
        assert (code, out) == (1, "")
        assert err.startswith(f"Error: cannot {verb} approval request {request_id!r}")
        assert message in err
        code, out, err = approvals(
            action, request_id, "--by", "dave", "--url", env.url, "--json", ok=False
        )
        assert code == 1
        assert json.loads(out) == {
            "error": f"cannot {verb} approval request {request_id!r}: {message}",
            "why": why,
        }
    # Nothing was decided, nothing audited.
    assert not env.log.exists() or env.log.read_text() == ""
    after = env.store.get(approved.id, time.time())
    assert after is not None
    assert after.decided_by == "carol"


@pytest.mark.parametrize("action", ["approve", "deny"])
@pytest.mark.parametrize("by", [None, "", "   "])
def test_by_is_required_and_not_empty(env: Fixture, action: str, by: str | None) -> None:
    request = env.request()
    args = [action, request.id, "--url", env.url] + ([] if by is None else ["--by", by])
    code, _, err = approvals(*args, ok=False)
    assert code == 2
    assert "--by" in err
    seen = env.store.get(request.id, time.time())
    assert seen is not None
    assert seen.status is ApprovalStatus.PENDING
    assert not env.log.exists()


def test_an_unwritable_audit_log_stops_the_decision(env: Fixture, tmp_path: Path) -> None:
    request = env.request()
    (tmp_path / "a-file").write_text("")
    code, _, err = approvals(
        "approve",
        request.id,
        "--by",
        "alice",
        "--url",
        env.url,
        "--audit-log",
        str(tmp_path / "a-file" / "audit.log"),
        ok=False,
    )
    assert code == 1
    assert "cannot open the audit log" in err
    seen = env.store.get(request.id, time.time())
    assert seen is not None
    assert seen.status is ApprovalStatus.PENDING


@pytest.mark.parametrize("request_id", ["-hX2bq", "-Pq9", "--zz7", "-h"])
def test_an_id_that_starts_with_a_dash_is_an_id(env: Fixture, request_id: str) -> None:
    """Ids are URL-safe base64: one in 64 starts with '-', and must not read as an option."""
    request = dataclasses.replace(env.request(params={"n": 1}), id=request_id)
    env.store.create(request)
    assert json.loads(approvals("show", request_id, "--url", env.url, "--json")[1])["id"] == (
        request_id
    )
    _, out, _ = approvals("approve", request_id, "--by", "alice", "--url", env.url)
    assert out.startswith(f"approved {request_id}: ")
    code, _, err = approvals("deny", request_id, "--by", "alice", "--url", env.url, ok=False)
    assert code == 1
    assert "was already approved" in err


# --- stores -------------------------------------------------------------------------------------


def test_a_missing_store_is_refused_not_created(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/none.db", f"file://{tmp_path}/none.json"):
        for args in (
            ("list",),
            ("show", "x"),
            ("approve", "x", "--by", "alice"),
            ("deny", "x", "--by", "alice"),
        ):
            code, _, err = approvals(*args, "--url", url, ok=False)
            assert code == 1
            assert "no state store at" in err
    assert list(tmp_path.iterdir()) == []


def test_store_errors_are_clear_errors_without_a_traceback(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database" * 10)
    for url in (f"sqlite:///{corrupt}", "postgresql://postgres@127.0.0.1:1/test"):
        for args in (("list",), ("show", "x"), ("approve", "x", "--by", "alice")):
            code, out, err = approvals(*args, "--url", url, "--audit-log",
                                       str(tmp_path / "audit.log"), ok=False)  # fmt: skip
            assert code == 1, (url, args, out, err)
            assert err.startswith("Error: "), err
    assert corrupt.read_bytes() == b"this is not an SQLite database" * 10
    assert not (tmp_path / "audit.log").exists() or (tmp_path / "audit.log").read_text() == ""


def test_a_file_store_whose_requests_exist_before_its_totals(tmp_path: Path) -> None:
    """An ESCALATE counts nothing: the requests' file may be there before ``state.json``."""
    state = LocalFileStateStore(tmp_path / "state.json")
    store = approval_store_for(state)
    request = request_from_decision(escalation(), PARAMS, now=time.time(), ttl=60)
    store.create(request)
    store.close()
    assert not (tmp_path / "state.json").exists()
    url = f"file://{tmp_path}/state.json"
    assert json.loads(approvals("list", "--url", url, "--json")[1])[0]["id"] == request.id
    approvals("approve", request.id, "--by", "alice", "--url", url)
    seen = approval_store_for(state).get(request.id, time.time())
    assert seen is not None
    assert seen.status is ApprovalStatus.APPROVED
    assert [r["event"] for r in audit_records(tmp_path / "audit.log")] == ["approved"]


def test_memory_store_lists_nothing_and_refuses_decisions(tmp_path: Path) -> None:
    assert approvals("list", "--url", "memory://")[1] == "no pending approval requests\n"
    code, _, err = approvals("approve", "x", "--by", "a", "--url", "memory://", ok=False)
    assert code == 1
    assert "memory://" in err


def test_the_url_comes_from_the_environment(env: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    request = env.request()
    monkeypatch.setenv("LIMENEX_STATE_URL", env.url)
    assert json.loads(approvals("list", "--json")[1])[0]["id"] == request.id
    approvals("approve", request.id, "--by", "alice")
    assert [r["event"] for r in audit_records(env.log)] == ["approved"]


def test_the_help_lists_the_commands() -> None:
    _, out, _ = cli("approvals", "--help")
    for command in ("list", "show", "approve", "deny"):
        assert command in out
    _, out, _ = cli("--help")
    assert "approvals" in out
