"""``limenex approvals list|show|approve|deny``: the humans' side of an ESCALATE.

Every command takes ``--url`` (the state store, as for ``limenex state``: default
``$LIMENEX_STATE_URL``, else ``sqlite:///.limenex/state.db``), whose approval store holds the
requests (:func:`limenex.approvals.approval_store_for`), and ``--json``. A store that does not
exist yet is refused, never created.

``approve`` and ``deny`` go through :class:`~limenex.approvals.Approvals`, as the engine and
the HTTP inbox do: the decision is kept in the store, then an ``approved`` or ``denied``
record is appended to the hash-chained audit log (``--audit-log``, default ``audit.log``
beside a file or SQLite state store, else ``.limenex/audit.log``: the one the engine writes
and ``limenex audit verify`` checks). They need ``--by`` (who decides) and take ``--note``.

Exit codes: 0 done; 1 a refusal (no such request, already approved, denied, expired or
used: the message on stderr, or ``{"error", "why"}`` with ``--json``) or a store or audit log
that failed (a clear message, no traceback, as ``limenex state`` does); 2 a usage error
(``--by`` missing or empty).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from limenex.approvals.request import visible
from limenex.cli.state import F, _json_option, _store, _table, _url_option, _when
from limenex.core.errors import LimenexError

if TYPE_CHECKING:
    from limenex.approvals import Approvals

__all__ = ["approvals"]

_PARAMS_WIDTH = 60
_ID_MAY_START_WITH_A_DASH: dict[str, Any] = {
    "ignore_unknown_options": True,
    "help_option_names": ["--help"],
}
"""Request ids are URL-safe base64: ``-Qx3...`` and ``-h4...`` are IDs, not options (so these
commands take ``--help`` but not ``-h``, and have no other short option)."""


def _audit_log_option(fn: F) -> F:
    return click.option(
        "--audit-log",
        default=None,
        type=click.Path(dir_okay=False),
        help="The hash-chained audit log approve and deny append to (list and show take it"
        " too, so that one set of options serves every command, and do not touch it)"
        "  [default: audit.log beside a file or SQLite state store, else .limenex/audit.log].",
    )(fn)


def _note_option(fn: F) -> F:
    return click.option("--note", default="", help="Why: kept with the request and audited.")(fn)


def _by_option(fn: F) -> F:
    return click.option("--by", "by", required=True, help="Who decides (recorded and audited).")(fn)


@contextlib.contextmanager
def _approvals(
    url: str, audit_log: str | None = None, *, changes: bool = False
) -> Iterator[tuple[Approvals, Path | None]]:
    """Open the state store and its approval store; with ``changes``, the audited facade.

    Yields ``(Approvals, audit log path or None)``. Store failures become a clear
    ``ClickException`` (exit 1), as in ``limenex state``.
    """
    from limenex.approvals import Approvals, approval_store_for
    from limenex.audit import AuditLog, JsonlSink, path_for, redact_from_env

    with _store(url, must_exist=not _requests_kept(url), changes=changes) as state:
        store = approval_store_for(state)
        try:
            if not changes:
                yield Approvals(store), None
                return
            path = Path(audit_log) if audit_log is not None else path_for(state)
            _check_writable(path)
            log = AuditLog(JsonlSink(path), redact=redact_from_env())
            try:
                yield Approvals(store, audit=log), path
            finally:
                log.close()
        finally:
            with contextlib.suppress(LimenexError):
                store.close()


def _requests_kept(url: str) -> bool:
    """A file state store's requests are in a file of their own (``X/state.approvals.json``
    beside ``X/state.json``), which exists before the state file does when nothing has been
    counted yet: then the store is there, though ``_store`` would not find its state file."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "file":
        return False
    path = rest.partition("?")[0] or ".limenex/state.json"
    return Path(os.path.splitext(path)[0] + ".approvals.json").exists()


def _check_writable(path: Path) -> None:
    """Refuse before deciding anything if the audit log cannot be opened for appending."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    except OSError as exc:
        raise click.ClickException(f"cannot open the audit log {path}: {exc}") from exc


def _refuse(as_json: bool, message: str, why: str) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": message, "why": why}, indent=2))
    else:
        click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(1)


def _compact(value: Any) -> str:
    """One line of JSON, as a human should read it (see :func:`visible`)."""
    return visible(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def _short(text: str, width: int = _PARAMS_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _in(seconds: float) -> str:
    """``in 59m`` / ``3h ago``: a rough human distance."""
    ahead = seconds >= 0
    left = abs(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if left >= size:
            amount = f"{int(left // size)}{unit}"
            break
    else:
        amount = f"{int(left)}s"
    return f"in {amount}" if ahead else f"{amount} ago"


def _time(epoch: float | None, now: float) -> str:
    return "-" if epoch is None else f"{_when(epoch)} ({_in(epoch - now)})"


@click.group()
def approvals() -> None:
    """Approval requests: list those waiting, show one, approve or deny it."""


@approvals.command(name="list")
@_url_option
@_audit_log_option
@_json_option
def list_command(url: str, audit_log: str | None, as_json: bool) -> None:
    """The requests waiting for a human, oldest first."""
    with _approvals(url) as (service, _):
        requests = service.pending_sync()
        now = service.clock()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in requests], indent=2, ensure_ascii=False))
        return
    if not requests:
        click.echo("no pending approval requests")
        return
    rows = [
        [
            r.id,
            visible(r.skill_id),
            visible(r.agent_id),
            _short(_compact(r.params)),
            _short(visible(r.reason)),
            _time(r.expires_at, now),
        ]
        for r in requests
    ]
    click.echo(_table(rows, ["ID", "SKILL", "AGENT", "PARAMS", "REASON", "EXPIRES"]))


@approvals.command(context_settings=_ID_MAY_START_WITH_A_DASH)
@click.argument("request_id", metavar="ID")
@_url_option
@_audit_log_option
@_json_option
def show(request_id: str, url: str, audit_log: str | None, as_json: bool) -> None:
    """Every field of one request (its status as it reads now)."""
    with _approvals(url) as (service, _):
        request = service.get_sync(request_id)
        now = service.clock()
    if request is None:
        _refuse(as_json, f"there is no approval request {request_id!r}", "unknown")
    data = request.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    times = ("created_at", "expires_at", "decided_at", "used_at")
    width = max(len(key) for key in data)
    for key, value in data.items():
        if key in times:
            text = _time(value, now)
        elif isinstance(value, str):
            text = visible(value) if value else "-"
        elif value is None:
            text = "-"
        else:
            text = _compact(value)
        click.echo(f"{key.ljust(width)}  {text}")


def _decide(
    action: str,
    request_id: str,
    by: str,
    note: str,
    url: str,
    audit_log: str | None,
    as_json: bool,
) -> None:
    from limenex.approvals import ApprovalRefused
    from limenex.audit import AuditError

    if not by.strip():
        raise click.BadParameter("name who decides", param_hint="--by")
    with _approvals(url, audit_log, changes=True) as (service, path):
        decide = service.approve_sync if action == "approve" else service.deny_sync
        try:
            done = decide(request_id, by, note)
        except ApprovalRefused as exc:
            _refuse(as_json, str(exc), exc.why)
        except AuditError as exc:  # the decision was kept; its record was not
            raise click.ClickException(f"{exc}\nRecord it by hand in {path}.") from exc
    if as_json:
        click.echo(json.dumps(done.to_dict(), indent=2, ensure_ascii=False))
        return
    verb = "approved" if action == "approve" else "denied"
    click.echo(
        f"{verb} {done.id}: {visible(done.skill_id)} for {visible(done.agent_id)}"
        f" {_compact(done.params)}"
        f" by {by}{f' ({note})' if note else ''}; recorded in {path}"
    )


@approvals.command(context_settings=_ID_MAY_START_WITH_A_DASH)
@click.argument("request_id", metavar="ID")
@_by_option
@_note_option
@_audit_log_option
@_url_option
@_json_option
def approve(
    request_id: str, by: str, note: str, audit_log: str | None, url: str, as_json: bool
) -> None:
    """Approve a pending request: the agent's resumed call may then run, once."""
    _decide("approve", request_id, by, note, url, audit_log, as_json)


@approvals.command(context_settings=_ID_MAY_START_WITH_A_DASH)
@click.argument("request_id", metavar="ID")
@_by_option
@_note_option
@_audit_log_option
@_url_option
@_json_option
def deny(
    request_id: str, by: str, note: str, audit_log: str | None, url: str, as_json: bool
) -> None:
    """Deny a pending request: it can never run."""
    _decide("deny", request_id, by, note, url, audit_log, as_json)
