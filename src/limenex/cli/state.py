"""``limenex state show|pending|adjust|reset|migrate``: inspect and operate any store by URL.

Every command takes ``--url`` (default: ``$LIMENEX_STATE_URL``, else
``sqlite:///.limenex/state.db``, where the engine keeps state beside
``.limenex/policies.yaml``) and prints a table, or JSON with ``--json``. Totals are printed
as exact decimal strings, never as floats.

``adjust`` is the operator's way to refund or correct a total (agents never can): it needs
a ``--reason``, and appends a record of who changed what, from which total to which, to the
hash-chained audit log (``--audit-log``, default ``.limenex/audit.log``, the one
``limenex audit verify`` checks) before it prints.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import time
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import click

from limenex.audit import DEFAULT_PATH as DEFAULT_AUDIT_LOG
from limenex.core.errors import LimenexError
from limenex.core.evaluation import to_decimal
from limenex.core.state import Check, CounterKey, StateStore
from limenex.core.window import Window

__all__ = ["state"]

DEFAULT_URL = "sqlite:///.limenex/state.db"
F = TypeVar("F", bound=Callable[..., Any])


def _url_option(fn: F) -> F:
    return click.option(
        "--url",
        envvar="LIMENEX_STATE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The state store (memory://, file://, sqlite:///, redis://, postgresql://).",
    )(fn)


def _audit_log_option(fn: F) -> F:
    return click.option(
        "--audit-log",
        default=DEFAULT_AUDIT_LOG,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="The hash-chained audit log the change is appended to.",
    )(fn)


def _json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


@contextlib.contextmanager
def _store(url: str, *, must_exist: bool = True, changes: bool = False) -> Iterator[StateStore]:
    """Open the store; a file store that does not exist yet is not silently created.

    ``changes``: the command changes totals, which a ``memory://`` store would forget at once.
    """
    from limenex.stores import from_url, redacted

    if changes and url.partition("://")[0].lower() == "memory":
        raise click.ClickException(
            "memory:// lives inside one process: there is nothing here to change"
        )
    if must_exist:
        path = local_path(url)
        if path and not Path(path).exists():
            raise click.ClickException(f"no state store at {path} (nothing recorded yet?)")
    try:
        store = from_url(url)
    except LimenexError as exc:
        raise click.ClickException(f"{redacted(url)}: {exc}") from exc
    try:
        yield store
    except LimenexError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        with contextlib.suppress(LimenexError):
            store.close()


def local_path(url: str) -> str:
    """The file a ``file://`` or ``sqlite:///`` URL names, else ``""`` (``from_url`` judges
    the rest, a malformed ``sqlite://`` URL included)."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in ("file", "sqlite"):
        return ""
    path = rest.partition("?")[0]
    if scheme == "sqlite":  # sqlite:///relative.db
        path = path[1:] if path.startswith("/") else ""
    return path


def _key_json(key: CounterKey) -> dict[str, str]:
    return {
        "dimension": key.dimension,
        "scope": key.scope,
        "subject": key.subject,
        "window": key.window,
    }


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@click.group()
def state() -> None:
    """Inspect and operate the state store: totals, pending reservations, refunds."""


@state.command()
@_url_option
@click.option("--dimension", help="Only this dimension's totals.")
@_json_option
def show(url: str, dimension: str | None, as_json: bool) -> None:
    """Every live total (expired windows left out)."""
    with _store(url) as store:
        totals = sorted(store.totals(time.time()))
    if dimension is not None:
        totals = [(k, v) for k, v in totals if k.dimension == dimension]
    if as_json:
        click.echo(json.dumps([{**_key_json(k), "total": str(v)} for k, v in totals], indent=2))
        return
    if not totals:
        click.echo("no totals recorded")
        return
    rows = [[k.dimension, k.scope, k.subject, k.window or "-", str(v)] for k, v in totals]
    click.echo(_table(rows, ["DIMENSION", "SCOPE", "SUBJECT", "WINDOW", "TOTAL"]))


@state.command()
@_url_option
@_json_option
def pending(url: str, as_json: bool) -> None:
    """Reservations whose action is running (or whose owner died before its lease ends)."""
    with _store(url) as store:
        records = store.pending(time.time())
    if as_json:
        out = [
            {
                "id": r.id,
                "created_at": r.created_at,
                "expires_at": r.expires_at,
                "owner": r.owner,
                "amounts": [{**_key_json(k), "amount": str(a)} for k, a in r.amounts],
            }
            for r in records
        ]
        click.echo(json.dumps(out, indent=2))
        return
    if not records:
        click.echo("no pending reservations")
        return
    rows = [
        [
            r.id,
            r.owner,
            _when(r.created_at),
            _when(r.expires_at),
            ", ".join(
                f"{k.dimension}[{k.subject}{'/' + k.window if k.window else ''}] +{a}"
                for k, a in r.amounts
            ),
        ]
        for r in records
    ]
    click.echo(_table(rows, ["ID", "OWNER", "CREATED", "EXPIRES", "AMOUNTS"]))


def _amount(text: str) -> Decimal:
    """DELTA as the engine would count it: finite, below 1E+30, at most 18 decimal places."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise click.BadParameter(f"{text!r} is not a number", param_hint="DELTA") from None
    try:
        return to_decimal("DELTA", value)
    except LimenexError as exc:
        raise click.BadParameter(str(exc).replace("argument ", "", 1), param_hint="DELTA") from None


def _subject(scope: str, subject: str) -> str:
    """The subject as the engine spells it for ``scope``; refuse what no policy can count.

    ``agent``: the agent id. ``global``: "". Any other scope: the sorted param names joined
    by '+', the subject a JSON array of one string or integer per name, in that order, which
    is written back compactly (``["agent-1","bob@example.com"]``), as the engine writes it.
    """
    if scope == "agent":
        if not subject:
            raise click.BadParameter("give the agent id", param_hint="SUBJECT")
        return subject
    if scope == "global":
        if subject:
            raise click.BadParameter(
                f'the global scope has one total, whose subject is "", got {subject!r}',
                param_hint="SUBJECT",
            )
        return ""
    names = scope.split("+")
    canonical = "+".join(sorted(set(names)))
    if not all(names) or "global" in names or scope != canonical:
        raise click.BadParameter(
            f"{scope!r} is not a scope a policy counts by: use agent, global, or the scope's"
            f" names sorted and joined by '+' ({canonical!r})",
            param_hint="--scope",
        )
    try:
        values = json.loads(subject)
    except ValueError:
        values = None
    if type(values) is not list or not all(type(v) in (str, int) for v in values):
        raise click.BadParameter(
            f"for the scope {scope!r}, give a JSON array of its values, got {subject!r}",
            param_hint="SUBJECT",
        )
    if len(values) != len(names):
        raise click.BadParameter(
            f"the scope {scope!r} needs {len(names)} values ({', '.join(names)}),"
            f" got {len(values)}",
            param_hint="SUBJECT",
        )
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


@state.command(context_settings={"ignore_unknown_options": True})  # DELTA may be -12.5
@click.argument("dimension")
@click.argument("subject")
@click.argument("delta")
@click.option(
    "--scope",
    default="agent",
    show_default=True,
    help="agent, global, or the scope names joined by '+' (agent+recipient).",
)
@click.option(
    "--window",
    "window_spec",
    default="",
    help="The policy's window (24h, day...); empty for a plain total.",
)
@click.option("--reason", required=True, help="Why: recorded in the audit log.")
@_audit_log_option
@_url_option
@_json_option
def adjust(
    dimension: str,
    subject: str,
    delta: str,
    scope: str,
    window_spec: str,
    reason: str,
    audit_log: str,
    url: str,
    as_json: bool,
) -> None:
    """Add DELTA to a total (negative: a refund). Never below zero or the pending amounts.

    SUBJECT is the agent id for the agent scope, "" for global, and a JSON array of the
    scope's values otherwise, in the order of the scope's sorted names
    (--scope agent+recipient '["agent-1", "bob@example.com"]'). The store must exist: a
    mistyped --url is refused, not made into a new, empty store.
    """
    amount = _amount(delta)
    if not reason.strip():
        raise click.BadParameter("give the reason for the adjustment", param_hint="--reason")
    try:
        window = Window.parse(window_spec) if window_spec else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--window") from None
    if not dimension:
        raise click.BadParameter("give the dimension", param_hint="DIMENSION")
    key = CounterKey(dimension, scope, _subject(scope, subject), window_spec)
    with _audit_log(audit_log) as append, _store(url, changes=True) as store:
        now = time.time()
        probe = Check(0, key, window, Decimal(0), "gte", Decimal(0))
        before = store.peek([probe], now)[0]
        after = store.adjust(key, amount, now, window)
        record = {
            "time": now,
            "event": "state.adjusted",
            **_key_json(key),
            "delta": str(amount),
            "before": str(before),
            "after": str(after),
            "reason": reason,
            "operator": _operator(),
            "store": _redacted(url),
        }
        done = (
            f"{dimension} [{scope} {key.subject or '(global)'}"
            f"{' ' + window_spec if window_spec else ''}]: {before} -> {after}"
        )
        append(record, done)
    click.echo(json.dumps(record, indent=2) if as_json else done)


@state.command()
@click.option("--dimension", help="Only this dimension (default: everything).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_audit_log_option
@_url_option
@_json_option
def reset(dimension: str | None, yes: bool, audit_log: str, url: str, as_json: bool) -> None:
    """Forget totals and pending reservations (of one dimension, or all)."""
    if dimension == "":
        raise click.BadParameter(
            "give a dimension's name, or leave it out", param_hint="--dimension"
        )
    what = (
        f"every total of {dimension!r}"
        if dimension is not None
        else "EVERY total and pending reservation"
    )
    if not yes:
        click.confirm(f"Forget {what} in {_redacted(url)}?", abort=True)
    with _audit_log(audit_log) as append, _store(url, changes=True) as store:
        store.reset(dimension)
        record = {
            "time": time.time(),
            "event": "state.reset",
            "dimension": dimension,
            "operator": _operator(),
            "store": _redacted(url),
        }
        append(record, f"forgot {what}")
    click.echo(json.dumps(record, indent=2) if as_json else f"forgot {what}")


@state.command()
@_url_option
@_json_option
def migrate(url: str, as_json: bool) -> None:
    """Create or upgrade the store's schema (PostgreSQL; other stores need nothing)."""
    with _store(url, must_exist=False) as store:
        upgrade = getattr(store, "migrate", None)
        if upgrade is not None:
            upgrade()
    if as_json:
        click.echo(json.dumps({"store": _redacted(url), "migrated": upgrade is not None}))
    elif upgrade is None:
        click.echo(f"{type(store).__name__}: nothing to migrate")
    else:
        click.echo(f"{_redacted(url)}: schema up to date")


def _redacted(url: str) -> str:
    from limenex.stores import redacted

    return redacted(url)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return f"uid:{os.getuid()}"


@contextlib.contextmanager
def _audit_log(path: str) -> Iterator[Callable[[dict[str, Any], str], None]]:
    """Check the audit log can be written *before* the change, so that one we cannot write
    stops it first.

    Yields ``append(fields, done)``: it appends one hash-chained record to the same log the
    engine writes (``limenex audit verify`` checks both) and makes it durable. ``fields`` go
    in the record's ``params``, except ``event``, ``reason`` and ``operator``. If the append
    fails (a full disk), the change has happened all the same: the error says so, with
    ``done`` (what changed) and the record, for the operator to log by hand.
    """
    from limenex.audit import AuditError, AuditRecord, JsonlSink

    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    except OSError as exc:
        raise click.ClickException(f"cannot open the audit log {path}: {exc}") from exc
    sink = JsonlSink(target)

    def append(fields: dict[str, Any], done: str) -> None:
        params = {
            k: v for k, v in fields.items() if k not in ("event", "reason", "operator", "time")
        }
        record = AuditRecord(
            time=datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
            event=str(fields["event"]),
            skill_id="",
            agent_id="",
            params=json.loads(json.dumps(params)),
            verdict="",
            reason=str(fields.get("reason", done)),
            extra={"operator": fields.get("operator", "")},
        )
        try:
            sink.append(record)
        except AuditError as exc:
            raise click.ClickException(
                f"{done}\nThe change WAS made but was NOT recorded in the audit log {path}"
                f" ({exc}). Record it by hand:\n{json.dumps(fields, sort_keys=True)}"
            ) from exc

    try:
        yield append
    finally:
        sink.close()
