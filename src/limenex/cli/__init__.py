"""The ``limenex`` command line. Each command group lives in its own module here.

To add commands, write them in a module of this package and register them below with
``main.add_command``.
"""

from __future__ import annotations

import click

from limenex.cli.approvals import approvals
from limenex.cli.audit import audit
from limenex.cli.explain import explain
from limenex.cli.mcp_proxy import mcp_proxy
from limenex.cli.policy_tests import run_policy_tests
from limenex.cli.serve import serve
from limenex.cli.state import state
from limenex.cli.validate import schema, validate

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="limenex", prog_name="limenex")
def main() -> None:
    """Limenex: deterministic, stateful governance for AI agents' actions."""


main.add_command(validate)
main.add_command(schema)
main.add_command(explain)
main.add_command(state)
main.add_command(audit)
main.add_command(approvals)
main.add_command(serve)
main.add_command(mcp_proxy)
main.add_command(run_policy_tests)
