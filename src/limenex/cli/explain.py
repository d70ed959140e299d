"""``limenex explain``: the verdict a call would get now, and why, policy by policy.

Reads the policy file and the state store, changes nothing: no total, no reservation, no
approval request, no audit record. No model is asked: a semantic rule the verdict depends
on is shown as not judged.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from limenex.cli.state import local_path
from limenex.core.errors import LimenexError, PolicyFileError
from limenex.core.explain import Explanation
from limenex.core.policy_store import DEFAULT_POLICY_PATH, LocalFilePolicyStore
from limenex.core.state import StateStore

__all__ = ["explain", "parse_param"]


def parse_param(text: str) -> tuple[str, Any]:
    """``name=value``: the value is read as JSON when it is JSON, else kept as text.

    ``amount_usd=30`` gives the number 30 (``0.1`` the exact ``Decimal("0.1")``),
    ``service=openai`` the text ``"openai"``, ``code='"42"'`` the text ``"42"``.
    """
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise click.BadParameter(f"expected name=value, got {text!r}", param_hint="--param")
    try:
        value: Any = json.loads(raw, parse_float=Decimal, parse_constant=_refuse_constant)
    except ValueError:
        value = raw
    return name.strip(), value


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity stay text: the engine would refuse them anyway


@click.command()
@click.argument("skill")
@click.option("--agent", "agent_id", required=True, help="The agent making the call.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A call argument (repeat it); VALUE is read as JSON when it is JSON, else as text.",
)
@click.option(
    "--policies",
    default=DEFAULT_POLICY_PATH,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The policy file.",
)
@click.option(
    "--state",
    "state_url",
    envvar="LIMENEX_STATE_URL",
    default=None,
    help="The state store URL (default: $LIMENEX_STATE_URL, else state.db beside the policies).",
)
@click.option(
    "--at",
    "at",
    default=None,
    help="Explain the call at this moment (ISO 8601 with offset) instead of now: schedules "
    "and windows read this clock; the totals are those recorded so far.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def explain(
    skill: str,
    agent_id: str,
    params: tuple[str, ...],
    policies: str,
    state_url: str | None,
    at: str | None,
    as_json: bool,
) -> None:
    """Show the verdict SKILL would get for this call, with a per-policy trace.

    Every policy is listed with what it compared (recorded total, proposed amount, limit)
    and its result, also the policies after the one that decides. Changes no state.
    """
    arguments = dict(parse_param(p) for p in params)
    moment = _moment(at)
    try:
        policy_store = LocalFilePolicyStore(policies, reload_interval=None)
    except PolicyFileError as exc:
        raise click.ClickException(f"✗ Invalid — {exc}") from None
    url = state_url or f"sqlite:///{Path(policies).parent / 'state.db'}"
    note, store = _open(url)
    try:
        explained = asyncio.run(_explain(policy_store, store, skill, agent_id, arguments, moment))
    except LimenexError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # never a traceback: say what failed
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    finally:
        store.close()
    if as_json:
        out = explained.to_dict()
        out["state"] = note or "read"
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    click.echo(explained.render())
    if note:
        click.echo(f"\n  ({note})")


async def _explain(
    policy_store: LocalFilePolicyStore,
    store: StateStore,
    skill: str,
    agent_id: str,
    params: dict[str, Any],
    moment: float | None,
) -> Explanation:
    from limenex.core.engine import PolicyEngine
    from limenex.testing import FrozenClock

    clock = None if moment is None else FrozenClock(moment)
    engine = PolicyEngine(policy_store, state_store=store, audit_logger=False, clock=clock)
    try:
        return await engine.explain(skill, agent_id, params, judge=False)
    finally:
        await store.aclose()


def _open(url: str) -> tuple[str | None, StateStore]:
    """The store at ``url``; a file or SQLite store that does not exist is not created."""
    from limenex.stores import from_url, redacted

    path = local_path(url)
    if path and not os.path.exists(path):
        return f"no state recorded yet at {path}: every total is 0", from_url("memory://")
    try:
        return None, from_url(url)
    except LimenexError as exc:
        raise click.ClickException(f"{redacted(url)}: {exc}") from None


def _moment(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {text!r}", param_hint="--at") from None
    if moment.tzinfo is None:
        raise click.BadParameter(
            f"{text!r} has no UTC offset; add one, e.g. {text}+00:00", param_hint="--at"
        )
    if not _EARLIEST <= moment < _LATEST:
        raise click.BadParameter(
            f"{text!r} is outside the years 1970 to 8999 that state windows can count",
            param_hint="--at",
        )
    return moment.timestamp()


_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)
