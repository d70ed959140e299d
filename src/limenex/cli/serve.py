"""``limenex serve``: the approval inbox over HTTP (see :mod:`limenex.server`).

Binds 127.0.0.1:8765 by default. Every API call needs the token: ``$LIMENEX_TOKEN``, or one
made at start and printed with the URL. Approvals and denials are recorded in the audit log
(``--audit-log``, default beside the state: ``limenex.audit.path_for``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import sys

import click

from limenex.cli.state import _store, _url_option

__all__ = ["serve"]

INSTALL_HINT = "limenex serve needs Starlette and uvicorn: pip install 'limenex[serve]'"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@_url_option
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False),
    help="The hash-chained audit log decisions are appended to (default: beside the state).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option(
    "--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="The port."
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    help="Another name the server is reached by (Host header), when not on loopback.",
)
def serve(
    url: str, audit_log: str | None, host: str, port: int, allow_hosts: tuple[str, ...]
) -> None:
    """Serve the approval inbox: a web page and a JSON API to approve or deny requests.

    The token comes from $LIMENEX_TOKEN (at least 16 characters), else a new one is made
    and printed. Keep the default 127.0.0.1: the server speaks plain HTTP.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        click.echo(INSTALL_HINT, err=True)
        sys.exit(2)

    from limenex.approvals import Approvals, approval_store_for
    from limenex.audit import AuditError, AuditLog, JsonlSink, path_for, redact_from_env
    from limenex.core.errors import LimenexError
    from limenex.server import create_app

    token = os.environ.get("LIMENEX_TOKEN", "")
    generated = not token
    if generated:
        token = secrets.token_urlsafe(32)
    elif len(token) < 16:
        raise click.ClickException("$LIMENEX_TOKEN is too short: use at least 16 characters")

    with _store(url, must_exist=False) as store:
        try:
            approval_store = approval_store_for(store)
        except LimenexError as exc:
            raise click.ClickException(str(exc)) from exc
        audit_path = audit_log or str(path_for(store))
        sink = JsonlSink(audit_path)
        try:
            sink.probe()  # refuse to start, rather than fail on the first decision
        except AuditError as exc:
            raise click.ClickException(str(exc)) from exc
        audit = AuditLog(sink, redact=redact_from_env())
        approvals = Approvals(approval_store, audit=audit)
        app = create_app(
            approvals,
            state_store=store,
            audit_path=audit_path,
            token=token,
            host=host,
            port=port,
            allowed_hosts=allow_hosts,
        )
        shown = f"[{host}]" if ":" in host else host
        if not _is_loopback(host):
            click.secho(
                f"WARNING: serving on {host}, not on loopback: anyone who can reach this"
                " address can try the token, and plain HTTP sends it in clear. Put a TLS"
                " proxy in front, or bind 127.0.0.1. Name the host clients use with"
                " --allow-host.",
                fg="red",
                bold=True,
                err=True,
            )
        click.echo(f"Limenex inbox: http://{shown}:{port}/")
        click.echo(
            f"Token: {token}" if generated else "Token: the value of $LIMENEX_TOKEN",
        )
        click.echo(f"Audit log: {audit_path}")
        sys.stdout.flush()
        try:
            uvicorn.run(
                app,
                host=host,
                port=port,
                log_level="info",
                server_header=False,
                proxy_headers=False,
            )
        finally:
            with contextlib.suppress(Exception):
                audit.close()
            with contextlib.suppress(Exception):
                approval_store.close()
