"""The audit log in a table: SQLSink, verify_sql and tail_sql on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limenex.audit import AuditError, AuditLog, AuditRecord, record_hash, verify_lines
from limenex.audit.sql import DEFAULT_TABLE, SQLSink, tail_sql, verify_sql
from limenex.cli import main
from limenex.core.decision import Decision, Verdict
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore
from servers import POSTGRES_URL, RUN

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 100
      breach_verdict: ESCALATE
"""

BACKENDS = ["sqlite", "postgres"]
_numbers = itertools.count()


def allow(agent: str = "agent-1") -> Decision:
    return Decision(Verdict.ALLOW, "finance.spend", agent, "within every policy")


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    return f"{POSTGRES_URL}?schema={RUN}_audit_{next(_numbers)}"


def write(url: str, n: int, table: str = DEFAULT_TABLE) -> None:
    log = AuditLog(SQLSink(url, table))
    try:
        for i in range(n):
            log.write("decision", allow(), {"amount_usd": Decimal(f"{i}.10"), "i": i})
    finally:
        log.close()


def rows(url: str, table: str = DEFAULT_TABLE) -> list[tuple[int, str, str]]:
    return [(seq, digest, line) for seq, digest, line in run_sql(url, [], table, fetch=True)]


def run_sql(
    url: str,
    statements: Sequence[tuple[str, Sequence[Any]]],
    table: str = DEFAULT_TABLE,
    *,
    fetch: bool = False,
) -> list[tuple[Any, ...]]:
    """Run ``statements`` (``{t}`` is the table) on the database, as a tamperer would."""
    select = "SELECT seq, hash, line FROM {t} ORDER BY seq"
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            for text, args in statements:
                conn.execute(text.format(t=f'"{table}"').replace("%s", "?"), args)
            return conn.execute(select.format(t=f'"{table}"')).fetchall() if fetch else []
        finally:
            conn.close()
    import psycopg

    base, _, query = url.partition("?")
    schema = query.removeprefix("schema=")
    with psycopg.connect(base, autocommit=True) as pg:
        qualified = f'"{schema}"."{table}"'
        for text, args in statements:
            pg.execute(text.format(t=qualified), args)  # type: ignore[arg-type]
        return pg.execute(select.format(t=qualified)).fetchall() if fetch else []  # type: ignore[arg-type]


# --- the chain ----------------------------------------------------------------------------------


def test_records_chain_and_verify(url: str) -> None:
    write(url, 5)
    table = rows(url)
    assert [seq for seq, _, _ in table] == [1, 2, 3, 4, 5]
    records = [json.loads(line) for _, _, line in table]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert all(
        digest == r["hash"] == record_hash(r)
        for (_, digest, _), r in zip(table, records, strict=True)
    )
    assert [r["prev"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    assert records[2]["params"] == {"amount_usd": "2.10", "i": 2}
    result = verify_sql(url)
    assert (result.ok, result.count, result.head) == (True, 5, records[-1]["hash"])
    # The rows are the lines a JsonlSink writes: the file's verifier agrees.
    assert verify_lines((line + "\n").encode() for _, _, line in table).ok


def test_reopening_resumes_the_chain_and_tail_reads_the_end(url: str) -> None:
    write(url, 3)
    write(url, 2)
    assert (verify_sql(url).ok, verify_sql(url).count) == (True, 5)
    last = tail_sql(url, 2)
    assert [seq for seq, _ in last] == [4, 5]
    assert [json.loads(line)["params"]["i"] for _, line in last] == [0, 1]
    assert len(tail_sql(url, 100)) == 5
    assert tail_sql(url, 0) == []


def test_append_many_is_one_chain(url: str) -> None:
    sink = SQLSink(url)
    try:
        sink.append(AuditRecord.from_decision("decision", allow(), {}))
        done = sink.append_many(
            [AuditRecord.from_decision("decision", allow(), {"i": i}) for i in range(3)]
        )
    finally:
        sink.close()
    assert [r.seq for r in done] == [2, 3, 4]
    assert (verify_sql(url).ok, verify_sql(url).count) == (True, 4)


def test_tables_are_separate(url: str) -> None:
    write(url, 2, "audit_a")
    write(url, 3, "audit_b")
    assert verify_sql(url, "audit_a").count == 2
    assert verify_sql(url, "audit_b").count == 3


def test_an_empty_table_verifies(url: str) -> None:
    sink = SQLSink(url)
    sink.append_many([])
    sink.close()
    write(url, 1)
    run_sql(url, [("DELETE FROM {t}", ())])
    assert (verify_sql(url).ok, verify_sql(url).count) == (True, 0)


# --- tampering ------------------------------------------------------------------------------------


def _forged_third(table: list[tuple[int, str, str]]) -> str:
    record = json.loads(table[1][2])
    record["seq"], record["prev"] = 3, record["hash"]
    record["hash"] = record_hash(record)
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize(
    ("change", "bad", "why"),
    [
        ("edit", 3, "hash mismatch: the record was edited"),
        ("delete", 4, "seq 5 where 4 was expected"),
        ("delete-first", 1, "seq 2 where 1 was expected"),
        ("swap", 3, "seq 4 where 3 was expected"),
        ("insert-copy", 7, "seq 2 where 7 was expected"),
        ("insert-forged", 4, "seq 3 where 4 was expected"),
        ("hash-column", 2, "the row's seq or hash column does not match its record"),
        ("seq-column", 6, "the row's seq or hash column does not match its record"),
        ("garble", 5, "not a valid JSON record"),
    ],
)
def test_tampering_is_detected_at_the_first_bad_seq(
    url: str, change: str, bad: int, why: str
) -> None:
    write(url, 6)
    table = rows(url)
    line = {seq: text for seq, _, text in table}
    statements: list[tuple[str, Sequence[Any]]] = {
        "edit": [
            (
                "UPDATE {t} SET line = %s WHERE seq = 3",
                (line[3].replace('"amount_usd":"2.10"', '"amount_usd":"0.01"'),),
            )
        ],
        "delete": [("DELETE FROM {t} WHERE seq = 4", ())],
        "delete-first": [("DELETE FROM {t} WHERE seq = 1", ())],
        "swap": [
            ("UPDATE {t} SET line = %s WHERE seq = 3", (line[4],)),
            ("UPDATE {t} SET line = %s WHERE seq = 4", (line[3],)),
        ],
        "insert-copy": [
            ("INSERT INTO {t} (seq, hash, line) VALUES (7, %s, %s)", (table[1][1], line[2]))
        ],
        "insert-forged": [
            ("UPDATE {t} SET seq = seq + 1000 WHERE seq >= 3", ()),
            ("UPDATE {t} SET seq = seq - 999 WHERE seq >= 1000", ()),
            (
                "INSERT INTO {t} (seq, hash, line) VALUES (3, %s, %s)",
                (json.loads(_forged_third(table))["hash"], _forged_third(table)),
            ),
        ],
        "hash-column": [("UPDATE {t} SET hash = %s WHERE seq = 2", ("f" * 64,))],
        "seq-column": [("UPDATE {t} SET seq = 100 WHERE seq = 6", ())],
        "garble": [("UPDATE {t} SET line = %s WHERE seq = 5", ("{not json",))],
    }[change]
    run_sql(url, statements)
    result = verify_sql(url)
    assert not result.ok
    assert result.first_bad_line == bad, result.why
    assert result.count == bad - 1
    assert why in (result.why or "")
    after = rows(url)  # the head is the hash of the last good row, as it is now
    assert result.head == (after[bad - 2][1] if bad > 1 else "0" * 64)


def test_a_broken_last_row_stops_appends(url: str) -> None:
    write(url, 2)
    run_sql(url, [("UPDATE {t} SET hash = %s WHERE seq = 2", ("not a hash",))])
    sink = SQLSink(url)
    with pytest.raises(AuditError, match="no valid seq/hash"):
        sink.append(AuditRecord.from_decision("decision", allow(), {}))
    sink.close()
    assert len(rows(url)) == 2


# --- processes ------------------------------------------------------------------------------------


def _append_worker(url: str, worker: int, start: Any) -> None:
    start.wait()
    log = AuditLog(SQLSink(url))
    for i in range(50):
        log.write("decision", allow(f"worker-{worker}"), {"i": i})
    log.close()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_processes_append_concurrently_without_forking_the_chain(url: str, method: str) -> None:
    context = multiprocessing.get_context(method)
    parent = AuditLog(SQLSink(url))  # open across the fork: the children must not share it
    parent.write("decision", allow("parent"), {"i": 0})
    start = context.Event()
    workers = [context.Process(target=_append_worker, args=(url, n, start)) for n in range(4)]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    parent.write("decision", allow("parent"), {"i": 1})  # its connection still works
    parent.close()
    result = verify_sql(url)
    assert (result.ok, result.count) == (True, 202), result.why
    records = [json.loads(line) for _, _, line in rows(url)]
    assert [r["seq"] for r in records] == list(range(1, 203))
    assert len({r["prev"] for r in records}) == 202
    for worker in range(4):
        mine = [r["params"]["i"] for r in records if r["agent_id"] == f"worker-{worker}"]
        assert mine == list(range(50))


# --- failures -------------------------------------------------------------------------------------


def test_an_unreachable_server_raises_audit_error() -> None:
    url = "postgresql://postgres@127.0.0.1:1/test?schema=x&connect_timeout=2"
    sink = SQLSink(url)
    with pytest.raises(AuditError, match=r"127\.0\.0\.1"):
        sink.append(AuditRecord.from_decision("decision", allow(), {}))
    sink.close()
    with pytest.raises(AuditError):
        verify_sql(url)
    with pytest.raises(AuditError):
        tail_sql(url, 5)


def test_an_unwritable_sqlite_path_raises_audit_error(tmp_path: Path) -> None:
    (tmp_path / "a-dir.db").mkdir()
    sink = SQLSink(f"sqlite:///{tmp_path}/a-dir.db")
    with pytest.raises(AuditError):
        sink.append(AuditRecord.from_decision("decision", allow(), {}))


def test_reading_a_missing_table_creates_nothing(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path}/none.db"
    with pytest.raises(AuditError, match="no audit database"):
        verify_sql(missing)
    with pytest.raises(AuditError, match="no audit database"):
        tail_sql(missing, 3)
    assert list(tmp_path.iterdir()) == []
    schema = f"{RUN}_audit_missing"
    with pytest.raises(AuditError, match="no audit table"):
        verify_sql(f"{POSTGRES_URL}?schema={schema}")
    import psycopg

    with psycopg.connect(POSTGRES_URL) as pg:
        found = pg.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    assert found is None


@pytest.mark.parametrize(
    ("url", "table", "message"),
    [
        ("sqlite:///x.db", 'a"; DROP TABLE x; --', "invalid audit table name"),
        ("sqlite:///x.db", "", "invalid audit table name"),
        ("sqlite://x.db", DEFAULT_TABLE, "three slashes"),
        ("sqlite:///x.db?timeout=3", DEFAULT_TABLE, "no options"),
        ("mysql://x", DEFAULT_TABLE, "known schemes"),
        ("postgresql://u@h/db?schema=a-b", DEFAULT_TABLE, "invalid audit schema name"),
    ],
)
def test_bad_urls_and_names_are_refused(url: str, table: str, message: str) -> None:
    with pytest.raises(AuditError, match=message):
        SQLSink(url, table)


def test_the_password_is_never_shown() -> None:
    sink = SQLSink("postgresql://postgres:s3cret@127.0.0.1:1/test")
    assert "s3cret" not in repr(sink)
    with pytest.raises(AuditError) as caught:
        sink.append(AuditRecord.from_decision("decision", allow(), {}))
    assert "s3cret" not in str(caught.value)


def test_importing_the_audit_package_does_not_import_psycopg() -> None:
    code = "import sys, limenex.audit, limenex.audit.sql;sys.exit('psycopg' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- the engine hook ------------------------------------------------------------------------------


def test_an_sql_audit_log_is_the_engines_audit_logger(url: str) -> None:
    log = AuditLog(SQLSink(url), redact=["card"])
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store="memory://",
        audit_logger=log,
    )
    ran: list[str] = []
    params = {"amount_usd": 60, "card": "4242"}
    engine.execute_sync("finance.spend", "agent-1", params, lambda: ran.append("a"))
    with pytest.raises(EscalationRequired):
        engine.execute_sync("finance.spend", "agent-1", params, lambda: ran.append("b"))
    log.close()
    assert ran == ["a"]
    result = verify_sql(url)
    assert result.ok, result.why
    table = rows(url)
    assert result.count == len(table) >= 2
    verdicts = [json.loads(line)["verdict"] for _, _, line in table]
    assert verdicts[0] == "ALLOW"
    assert verdicts[-1] == "ESCALATE"
    assert all("4242" not in line for _, _, line in table)


def test_a_failing_sql_sink_blocks_the_call() -> None:
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(POLICY),
        state_store="memory://",
        audit_logger=AuditLog(SQLSink("postgresql://postgres@127.0.0.1:1/test")),
    )
    ran: list[int] = []
    with pytest.raises(BlockedError) as info:
        engine.execute_sync("finance.spend", "agent-1", {"amount_usd": 5}, lambda: ran.append(1))
    assert ran == []
    assert isinstance(info.value.__cause__, AuditError)


# --- the CLI --------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["audit", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_verify_and_tail_a_table(url: str) -> None:
    write(url, 3)
    assert cli("verify", "--sql", url) == (0, "✓ Audit log intact — 3 records\n", "")
    code, out, _ = cli("verify", "--sql", url, "--json")
    assert code == 0
    assert (json.loads(out)["ok"], json.loads(out)["count"]) == (True, 3)
    code, out, _ = cli("tail", "--sql", url, "-n", "2")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["#2", "#3"]
    code, out, _ = cli("tail", "--sql", url, "--json")
    assert [r["seq"] for r in json.loads(out)] == [1, 2, 3]

    run_sql(url, [("DELETE FROM {t} WHERE seq = 2", ())])
    code, out, err = cli("verify", "--sql", url)
    assert (code, out) == (1, "")
    assert err.startswith("✗ Audit log broken at seq 2: seq 3 where 2 was expected")
    code, out, _ = cli("verify", "--sql", url, "--json")
    assert code == 1
    assert json.loads(out)["first_bad_line"] == 2


def test_cli_table_option(url: str) -> None:
    write(url, 2, "other_audit")
    assert cli("verify", "--sql", url, "--table", "other_audit")[0] == 0
    code, _, err = cli("verify", "--sql", url)  # the default table does not exist
    assert code == 1
    assert "no audit table" in err


def test_cli_refuses_path_with_sql_and_a_missing_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/none.db"
    for command in ("verify", "tail"):
        code, _, err = cli(command, "--sql", url, "--path", str(tmp_path / "a.log"))
        assert code == 2
        assert "not both" in err
        code, _, err = cli(command, "--table", "t")
        assert code == 2
        assert "--table goes with --sql" in err
    code, _, err = cli("verify", "--sql", url)
    assert code == 1
    assert "no audit database" in err
    code, _, err = cli("tail", "--sql", url)
    assert code == 1
    assert "no audit database" in err
    assert list(tmp_path.iterdir()) == []
