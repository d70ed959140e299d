"""``limenex audit tail|verify``: read and check the hash-chained audit log.

Both take ``--path`` (default ``.limenex/audit.log``, the file an
``AuditLog(JsonlSink(...))`` writes) or ``--sql URL`` (with ``--table``: the table an
``AuditLog(SQLSink(...))`` writes, see :mod:`limenex.audit.sql`), and ``--json``. ``verify``
exits 0 only when every record is intact and chained; otherwise it names the first broken
line (for a table, the first bad seq) on stderr and exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from limenex.audit import DEFAULT_PATH, AuditError, read_tail, verify

__all__ = ["audit"]

F = TypeVar("F", bound=Callable[..., Any])


def _path_option(fn: F) -> F:
    return click.option(
        "--path",
        default=DEFAULT_PATH,
        show_default=True,
        type=click.Path(dir_okay=True),
        help="The audit log (JSONL, one record per line).",
    )(fn)


def _sql_options(fn: F) -> F:
    fn = click.option(
        "--table",
        default=None,
        help="The audit table of --sql  [default: limenex_audit].",
    )(fn)
    return click.option(
        "--sql",
        "sql_url",
        metavar="URL",
        help="Read the audit table of this database instead of a file"
        " (sqlite:///..., postgresql://...?schema=...). Not with --path.",
    )(fn)


def _json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


def _sql_target(sql_url: str | None, table: str | None) -> tuple[str, str] | None:
    """``(url, table)`` when reading a table; refuses --sql with --path, --table alone."""
    ctx = click.get_current_context()
    given = ctx.get_parameter_source("path") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
        None,
    )
    if sql_url is None:
        if table is not None:
            raise click.UsageError("--table goes with --sql")
        return None
    if given:
        raise click.UsageError("give --path or --sql, not both")
    from limenex.audit.sql import DEFAULT_TABLE

    return sql_url, DEFAULT_TABLE if table is None else table


def _plural(n: int) -> str:
    return f"{n} record" if n == 1 else f"{n} records"


@click.group()
def audit() -> None:
    """Read the audit log and check that no record was edited, dropped or reordered."""


@audit.command()
@_path_option
@_sql_options
@click.option("-n", "--lines", "count", default=20, show_default=True, type=click.IntRange(0))
@_json_option
def tail(path: str, sql_url: str | None, table: str | None, count: int, as_json: bool) -> None:
    """The last records, oldest first (not verified: run `limenex audit verify` for that)."""
    target = _sql_target(sql_url, table)
    if target is None and not Path(path).exists():
        raise click.ClickException(f"no audit log at {path} (nothing recorded yet?)")
    try:
        if target is None:
            lines = read_tail(path, count)
        else:
            from limenex.audit.sql import tail_sql

            lines = tail_sql(target[0], count, target[1])
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    records: list[dict[str, Any] | None] = []
    for _, raw in lines:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        records.append(data if isinstance(data, dict) else None)
    if as_json:
        out = [
            r if r is not None else {"unreadable": raw.decode("utf-8", "replace")}
            for r, (_, raw) in zip(records, lines, strict=True)
        ]
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    if not lines:
        click.echo("no records")
        return
    for record, (_, raw) in zip(records, lines, strict=True):
        click.echo(_line(record) if record is not None else f"?  unreadable: {raw!r}")


def _line(record: dict[str, Any]) -> str:
    """``#seq time event verdict skill agent: reason`` on one line.

    A record about no call (``policies_reloaded``) has an empty verdict, skill and agent:
    they are left out. A call that shadow-mode policies would have decided otherwise ends
    with ``[shadow: ESCALATE by policy 2]``.
    """
    parts = [
        f"#{record.get('seq', '?')}",
        str(record.get("time", "?")),
        str(record.get("event", "?")),
        str(record.get("verdict", "?")),
        str(record.get("skill_id", "?")),
        str(record.get("agent_id", "?")),
    ]
    reason = record.get("reason")
    text = "  ".join(part for part in parts if part)
    line = f"{text}: {reason}" if reason else text
    shadow = (record.get("extra") or {}).get("shadow")
    if isinstance(shadow, dict) and isinstance(shadow.get("policy_index"), int):
        line += f"  [shadow: {shadow.get('verdict')} by policy {shadow['policy_index'] + 1}]"
    return line


@audit.command(name="verify")
@_path_option
@_sql_options
@click.option(
    "--expect-head",
    metavar="HASH",
    help="A head hash kept from an earlier verify (--json prints it): fail unless the chain"
    " still holds that record, so records cut off the end are found too.",
)
@_json_option
def verify_command(
    path: str, sql_url: str | None, table: str | None, expect_head: str | None, as_json: bool
) -> None:
    """Check every record's hash and its link to the one before; exit 1 at the first break."""
    target = _sql_target(sql_url, table)
    if target is None and not Path(path).exists():
        _fail(as_json, f"✗ No audit log at {path}", {"error": f"no audit log at {path}"})
    try:
        if target is None:
            result = verify(path, expect_head)
        else:
            from limenex.audit.sql import verify_sql

            result = verify_sql(*target, expect_head=expect_head)
    except AuditError as exc:
        _fail(as_json, f"✗ {exc}", {"error": str(exc)})
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "count": result.count,
                    "first_bad_line": result.first_bad_line,
                    "why": result.why,
                    "head": result.head,
                },
                indent=2,
            )
        )
        if not result.ok:
            raise click.exceptions.Exit(1)
        return
    where = "line" if target is None else "seq"
    if not result.ok and result.first_bad_line is None:
        click.echo(f"✗ Audit log incomplete: {result.why}", err=True)
        raise click.exceptions.Exit(1)
    if not result.ok:
        click.echo(f"✗ Audit log broken at {where} {result.first_bad_line}: {result.why}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"✓ Audit log intact — {_plural(result.count)}")


def _fail(as_json: bool, text: str, data: dict[str, Any]) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"ok": False, **data}, indent=2))
    else:
        click.echo(text, err=True)
    raise click.exceptions.Exit(1)
