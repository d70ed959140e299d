"""``limenex mcp-proxy``: govern every tool of an MCP server (see :mod:`limenex.integrations.mcp`).

::

    limenex mcp-proxy --policies .limenex/policies.yaml -- python server.py

The policy file is loaded and checked before the upstream starts. State is kept in
``--state`` (a store URL), else where the engine keeps it: SQLite in ``state.db`` beside
the policy file; the audit log beside the state, as for every engine.

Exit codes: 0 when the client closed the connection; 1 an invalid policy file, a state
store that cannot be opened, or an upstream that cannot be started (a message on stderr);
2 a usage error, or the MCP SDK missing; 143 (128 + 15) after SIGTERM and 130 (128 + 2) after
SIGINT, once the upstream was stopped (its stdin closed, then SIGTERM and SIGKILL if it
lingers: the MCP SDK's shutdown).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import click

from limenex.core.policy_store import DEFAULT_POLICY_PATH

__all__ = ["mcp_proxy"]

INSTALL_HINT = "limenex mcp-proxy needs the MCP SDK: pip install 'limenex[mcp]'"


def _say(message: str) -> None:
    click.echo(f"limenex mcp-proxy: {message}", err=True)


def _approve_hint(state: str | None, policies: Path) -> str:
    """The ``--url`` the ``limenex approvals`` commands need to reach the proxy's store."""
    from limenex.stores import redacted

    if state is not None:
        return f" --url {shlex.quote(redacted(state))}"
    db = (policies.parent / "state.db").resolve()
    if db == Path(".limenex", "state.db").resolve():
        return ""  # the approvals commands' own default, from here
    return f" --url {shlex.quote('sqlite:///' + str(db))}"


def _leaves(group: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(group, BaseExceptionGroup):
        return [leaf for exc in group.exceptions for leaf in _leaves(exc)]
    return [group]


@click.command(
    name="mcp-proxy",
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
)
@click.option(
    "--policies",
    default=DEFAULT_POLICY_PATH,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The policy file; tool T is governed as the skill <prefix>T.",
)
@click.option(
    "--state",
    default=None,
    help="The state store URL (memory://, file://, sqlite:///, redis://, postgresql://)"
    "  [default: SQLite in state.db beside the policy file].",
)
@click.option(
    "--agent-id",
    default="mcp-client",
    show_default=True,
    help="The agent id every call is governed for (what per-agent limits count).",
)
@click.option(
    "--prefix",
    default="mcp.",
    show_default=True,
    help="Put before a tool's name to make its skill id.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def mcp_proxy(
    policies: str, state: str | None, agent_id: str, prefix: str, command: tuple[str, ...]
) -> None:
    """Serve an MCP server's tools over stdio, each call governed by the policy file.

    COMMAND starts the upstream MCP server (stdio), after `--`:

        limenex mcp-proxy --policies .limenex/policies.yaml -- python server.py

    Allowed calls are forwarded and answered unchanged. A BLOCK, an ESCALATE (with its
    approval request id), a tool without an entry in the policy file, or arguments that do
    not fit are answered with a tool error, and never reach the upstream. After a human
    approves a request (`limenex approvals approve ID --by NAME`), the same call made again
    runs once. Closing stdin, SIGTERM or SIGINT stops the proxy and the upstream.
    """
    try:
        import anyio

        from limenex.integrations import mcp as proxy_module
    except ImportError:
        _say(INSTALL_HINT)
        sys.exit(2)

    from limenex.core.engine import PolicyEngine
    from limenex.core.errors import LimenexError, PolicyFileError
    from limenex.core.policy_store import LocalFilePolicyStore

    if not agent_id:
        raise click.BadParameter("must not be empty", param_hint="--agent-id")
    try:
        store = LocalFilePolicyStore(policies)
    except PolicyFileError as exc:
        _say(f"invalid policy file: {exc}")
        sys.exit(1)
    try:
        engine = PolicyEngine(store, state_store=state)
    except LimenexError as exc:
        _say(f"cannot open the state store: {exc}")
        sys.exit(1)

    def ready(proxy: Any, tools: list[Any]) -> None:
        for line in proxy.coverage(tools):
            _say(f"note: {line}")
        _say(
            f"governing {len(tools)} tools of `{shlex.join(command)}` as {prefix}<tool> "
            f"for agent {agent_id!r}; serving on stdio"
        )

    stopped_by: list[int] = []

    async def main() -> None:
        async with anyio.create_task_group() as group:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        stopped_by.append(signum)
                        group.cancel_scope.cancel()  # leaving run_proxy stops the upstream
                        return

            group.start_soon(stop_on_signal)
            await proxy_module.run_proxy(
                engine,
                list(command),
                agent_id=agent_id,
                prefix=prefix,
                approve_hint=_approve_hint(state, Path(policies)),
                env=os.environ,
                on_ready=ready,
            )
            group.cancel_scope.cancel()

    status = 0
    try:
        anyio.run(main)
    except* proxy_module.UpstreamError as group:
        for leaf in _leaves(group):
            _say(str(leaf))
        status = 1
    except* KeyboardInterrupt:
        status = 128 + signal.SIGINT
    finally:
        with contextlib.suppress(Exception):
            engine.close()
    if stopped_by and not status:
        _say(f"stopped by {signal.Signals(stopped_by[0]).name}; the upstream was stopped")
        status = 128 + stopped_by[0]
    if status:
        sys.exit(status)
