"""``limenex state show|pending|adjust|reset|migrate`` against every durable store."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limenex.cli import main
from limenex.core.state import Check, CounterKey, Reservation
from limenex.core.window import Window
from limenex.stores import from_url
from servers import POSTGRES_URL, REDIS_URL, RUN

KEY = CounterKey("spend_usd", "agent", "agent-1", "")
DAILY = CounterKey("sends", "agent+recipient", '["agent-1","bob@example.com"]', "day")


@pytest.fixture(params=["file", "sqlite", "redis", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind, name = request.param, tmp_path.name.replace("-", "_")
    return {
        "file": f"file://{tmp_path}/state.json",
        "sqlite": f"sqlite:///{tmp_path}/state.db",
        "redis": f"{REDIS_URL}?prefix={RUN}:cli:{name}",
        "postgres": f"{POSTGRES_URL}?schema={RUN}_cli_{name}",
    }[kind]


def record(url: str, key: CounterKey, amount: str, *, commit: bool = True) -> Reservation:
    store = from_url(url)
    try:
        window = Window.parse(key.window) if key.window else None
        check = Check(0, key, window, Decimal(amount), "lte", Decimal(10**6))
        reservation = store.reserve([check], time.time())
        assert isinstance(reservation, Reservation)
        if commit:
            store.commit(reservation)
        return reservation
    finally:
        store.close()


def flat(line: str) -> dict[str, Any]:
    """An audit record's fields, with its params and extra lifted to the top."""
    record = json.loads(line)
    return {**record, **record["params"], **record["extra"]}


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(main, ["state", *args])
    assert (result.exit_code == 0) is ok, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.output


def test_show_lists_every_total_exactly(url: str) -> None:
    record(url, KEY, "30.10")
    record(url, DAILY, "1")
    table = run("show", "--url", url)
    assert table.splitlines()[0].split() == ["DIMENSION", "SCOPE", "SUBJECT", "WINDOW", "TOTAL"]
    assert "spend_usd  agent            agent-1" in table
    assert table.splitlines()[2].split()[-1] == "30.10"
    rows = json.loads(run("show", "--url", url, "--json"))
    assert {(r["dimension"], r["subject"], r["window"], r["total"]) for r in rows} == {
        ("spend_usd", "agent-1", "", "30.10"),
        ("sends", '["agent-1","bob@example.com"]', "day", "1"),
    }
    only = json.loads(run("show", "--url", url, "--json", "--dimension", "sends"))
    assert [r["dimension"] for r in only] == ["sends"]


def test_pending_lists_reservations_still_running(url: str) -> None:
    held = record(url, KEY, "5", commit=False)
    assert held.id in run("pending", "--url", url)
    (entry,) = json.loads(run("pending", "--url", url, "--json"))
    assert entry["id"] == held.id
    assert entry["amounts"] == [
        {"dimension": "spend_usd", "scope": "agent", "subject": "agent-1", "window": "",
         "amount": "5"}
    ]  # fmt: skip
    assert entry["expires_at"] > entry["created_at"]


def test_adjust_refunds_with_a_reason_and_appends_an_audit_record(url: str, tmp_path: Path) -> None:
    record(url, KEY, "30")
    log = tmp_path / "audit.log"
    out = run("adjust", "spend_usd", "agent-1", "-12.5", "--reason", "refund #42",
              "--url", url, "--audit-log", str(log))  # fmt: skip
    assert out.strip() == "spend_usd [agent agent-1]: 30 -> 17.5"
    (entry,) = [flat(line) for line in log.read_text().splitlines()]
    assert entry["event"] == "state.adjusted"
    assert (entry["before"], entry["delta"], entry["after"]) == ("30", "-12.5", "17.5")
    assert entry["reason"] == "refund #42"
    assert entry["operator"]
    rows = json.loads(run("show", "--url", url, "--json"))
    assert [r["total"] for r in rows] == ["17.5"]
    # A refund never takes a total below zero.
    out = run("adjust", "spend_usd", "agent-1", "-100", "--reason", "x", "--url", url,
              "--audit-log", str(log))  # fmt: skip
    assert out.strip().endswith("-> 0")


def test_adjust_refuses_bad_input_and_changes_nothing(url: str, tmp_path: Path) -> None:
    record(url, KEY, "30")
    log = tmp_path / "audit.log"
    base = ["--url", url, "--audit-log", str(log)]
    assert "give the reason" in run("adjust", "spend_usd", "agent-1", "-1", "--reason", " ",
                                    *base, ok=False)  # fmt: skip
    assert "Missing option '--reason'" in run("adjust", "spend_usd", "agent-1", "-1", *base,
                                              ok=False)  # fmt: skip
    for bad in ("ten", "NaN", "Infinity"):
        out = run("adjust", "spend_usd", "agent-1", bad, "--reason", "r", *base, ok=False)
        assert "DELTA" in out
    out = run("adjust", "spend_usd", "agent-1", "1", "--reason", "r", "--window", "fortnight",
              *base, ok=False)  # fmt: skip
    assert "invalid window 'fortnight'" in out
    assert not log.exists()
    assert [r["total"] for r in json.loads(run("show", "--url", url, "--json"))] == ["30"]


def test_an_unwritable_audit_log_stops_the_adjustment_before_it_happens(
    url: str, tmp_path: Path
) -> None:
    record(url, KEY, "30")
    (tmp_path / "a-file").write_text("")
    out = run("adjust", "spend_usd", "agent-1", "-5", "--reason", "r", "--url", url,
              "--audit-log", str(tmp_path / "a-file" / "audit.log"), ok=False)  # fmt: skip
    assert "cannot open the audit log" in out
    assert [r["total"] for r in json.loads(run("show", "--url", url, "--json"))] == ["30"]


def test_reset_asks_first_and_forgets_one_dimension_or_all(url: str, tmp_path: Path) -> None:
    record(url, KEY, "30")
    record(url, DAILY, "2")
    log = ["--audit-log", str(tmp_path / "audit.log")]
    out = CliRunner().invoke(main, ["state", "reset", "--url", url, *log], input="n\n")
    assert out.exit_code == 1
    assert "Aborted" in out.output
    assert len(json.loads(run("show", "--url", url, "--json"))) == 2
    run("reset", "--url", url, "--dimension", "sends", "--yes", *log)
    assert [r["dimension"] for r in json.loads(run("show", "--url", url, "--json"))] == [
        "spend_usd"
    ]
    run("reset", "--url", url, "--yes", *log)
    assert run("show", "--url", url).strip() == "no totals recorded"
    lines = (tmp_path / "audit.log").read_text().splitlines()
    events = [flat(line)["event"] for line in lines]
    assert events == ["state.reset", "state.reset"]


def test_migrate_creates_the_schema_or_says_there_is_nothing_to_do(url: str) -> None:
    out = run("migrate", "--url", url)
    networked = url.startswith("postgresql://")
    assert ("schema up to date" in out) is networked
    assert ("nothing to migrate" in out) is not networked
    assert run("migrate", "--url", url) == out  # idempotent
    assert json.loads(run("migrate", "--url", url, "--json"))["migrated"] is networked


def test_reset_speaks_json_too(url: str, tmp_path: Path) -> None:
    record(url, KEY, "30")
    out = run("reset", "--url", url, "--yes", "--json", "--audit-log", str(tmp_path / "a.jsonl"))
    assert json.loads(out)["event"] == "state.reset"
    assert json.loads(run("show", "--url", url, "--json")) == []


def test_show_does_not_create_a_missing_file_store(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/none.db", f"file://{tmp_path}/none.json"):
        assert "no state store at" in run("show", "--url", url, ok=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_is_a_clear_error_without_a_traceback() -> None:
    out = run("show", "--url", "redis://127.0.0.1:1/0?connect_timeout=0.5", ok=False)
    assert "127.0.0.1:1" in out
    assert "Traceback" not in out


def test_the_url_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    record(url, KEY, "3")
    monkeypatch.setenv("LIMENEX_STATE_URL", url)
    assert json.loads(run("show", "--json"))[0]["total"] == "3"


def test_adjust_reaches_the_total_the_engine_counts_however_the_subject_is_spelled(
    url: str, tmp_path: Path
) -> None:
    """The help's own example subject has a space after the comma; the engine writes none."""
    record(url, DAILY, "3")
    log = ["--audit-log", str(tmp_path / "audit.log")]
    subject = '["agent-1", "bob@example.com"]'
    out = run("adjust", "sends", subject, "-1", "--scope", "agent+recipient", "--window", "day",
              "--reason", "r", "--url", url, *log)  # fmt: skip
    assert out.strip().endswith("3 -> 2")
    rows = json.loads(run("show", "--url", url, "--json"))
    assert [(r["subject"], r["total"]) for r in rows] == [(DAILY.subject, "2")]  # no ghost key
    (entry,) = [flat(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert entry["subject"] == DAILY.subject


@pytest.mark.parametrize(
    ("scope", "subject", "message"),
    [
        ("recipient+agent", '["bob@example.com","agent-1"]', "agent+recipient"),
        ("agent+recipient", '["agent-1"]', "2 values"),
        ("agent+recipient", "agent-1", "JSON array"),
        ("agent+recipient", '["agent-1", 1.5]', "JSON array"),
        ("global", "agent-1", "global"),
        ("agent", "", "SUBJECT"),
    ],
)
def test_adjust_refuses_a_key_no_policy_can_count(
    scope: str, subject: str, message: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    record(url, KEY, "30")
    log = tmp_path / "audit.log"
    out = run("adjust", "spend_usd", subject, "5", "--scope", scope, "--reason", "r",
              "--url", url, "--audit-log", str(log), ok=False)  # fmt: skip
    assert message in out
    assert not log.exists()
    assert [r["total"] for r in json.loads(run("show", "--url", url, "--json"))] == ["30"]


@pytest.mark.parametrize("delta", ["1e40", "0.0000000000000000001", "-1e40"])
def test_adjust_refuses_a_delta_the_engine_could_not_count(delta: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    record(url, KEY, "30")
    log = tmp_path / "audit.log"
    out = run("adjust", "spend_usd", "agent-1", delta, "--reason", "r", "--url", url,
              "--audit-log", str(log), ok=False)  # fmt: skip
    assert "DELTA" in out
    assert not log.exists()


def test_adjust_and_reset_do_not_create_a_missing_store(tmp_path: Path) -> None:
    """A mistyped --url (or the default one, run from the wrong folder) must not make a new
    empty store and audit an adjustment of it."""
    log = tmp_path / "audit.log"
    for url in (f"sqlite:///{tmp_path}/none.db", f"SQLITE:///{tmp_path}/none.db",
                f"file://{tmp_path}/none.json"):  # fmt: skip
        out = run("adjust", "spend_usd", "agent-1", "-5", "--reason", "r", "--url", url,
                  "--audit-log", str(log), ok=False)  # fmt: skip
        assert "no state store at" in out
        assert "no state store at" in run("show", "--url", url, ok=False)
        out = run("reset", "--yes", "--url", url, "--audit-log", str(log), ok=False)
        assert "no state store at" in out
    assert "three slashes" in run("show", "--url", "sqlite://relative.db", ok=False)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["audit.log"])
    assert not log.exists() or log.read_text() == ""


def test_adjust_and_reset_refuse_a_store_that_lives_in_one_process(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    out = run("adjust", "spend_usd", "agent-1", "5", "--reason", "r", "--url", "memory://",
              "--audit-log", str(log), ok=False)  # fmt: skip
    assert "memory://" in out
    assert "memory://" in run("reset", "--yes", "--url", "memory://", "--audit-log", str(log),
                              ok=False)  # fmt: skip
    assert not log.exists() or log.read_text() == ""


def test_reset_refuses_an_empty_dimension_name(tmp_path: Path) -> None:
    """``--dimension ""`` asked "Forget EVERY total...?", reset nothing, and said it had."""
    url = f"sqlite:///{tmp_path}/state.db"
    record(url, KEY, "30")
    log = tmp_path / "audit.log"
    out = run("reset", "--dimension", "", "--yes", "--url", url, "--audit-log", str(log),
              ok=False)  # fmt: skip
    assert "--dimension" in out
    assert "forgot" not in out
    assert not log.exists() or log.read_text() == ""
    assert [r["total"] for r in json.loads(run("show", "--url", url, "--json"))] == ["30"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_audit_log_that_fails_after_the_change_says_the_change_was_made(
    tmp_path: Path,
) -> None:
    """The log opens, but the write fails (disk full): the adjustment has happened, and the
    operator must be told so plainly, not shown a traceback."""
    url = f"sqlite:///{tmp_path}/state.db"
    record(url, KEY, "30")
    result = CliRunner().invoke(main, ["state", "adjust", "spend_usd", "agent-1", "-5",
                                       "--reason", "r", "--url", url, "--audit-log",
                                       "/dev/full"])  # fmt: skip
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "30 -> 25" in result.output
    assert "NOT recorded in the audit log" in result.output
    result = CliRunner().invoke(main, ["state", "reset", "--yes", "--url", url, "--audit-log",
                                       "/dev/full"])  # fmt: skip
    assert isinstance(result.exception, SystemExit), result.exception
    assert "NOT recorded in the audit log" in result.output


def test_adjustments_and_resets_chain_into_a_log_that_verifies(url: str, tmp_path: Path) -> None:
    from limenex.audit import verify

    record(url, KEY, "30")
    log = tmp_path / "audit.log"
    run("adjust", "spend_usd", "agent-1", "-1", "--reason", "r", "--url", url,
        "--audit-log", str(log))  # fmt: skip
    run("reset", "--url", url, "--yes", "--audit-log", str(log))
    result = verify(log)
    assert result.ok, result
    assert result.count == 2
