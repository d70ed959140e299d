"""An ordinary MCP server, knowing nothing of Limenex: the upstream ``limenex mcp-proxy`` runs.

Every tool call it receives is appended, as one JSON line ``{"tool": ..., "arguments": ...}``,
to the file named by ``--log PATH`` (or ``$UPSTREAM_LOG``), so a test can prove which calls
reached it and which never did.

Besides its tools it offers a prompt, a resource, a resource template and completions (which
the proxy passes through), tools whose names no policy file can hold as a skill id, and a
tool that adds a tool and tells the client so (``notifications/tools/list_changed``).

    python upstream_server.py --log calls.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import (
    Completion,
    CompletionArgument,
    CompletionContext,
    PromptReference,
    ResourceTemplateReference,
)

server = MCPServer("upstream-bank", instructions="A pretend bank for tests.")
_log_path = os.environ.get("UPSTREAM_LOG", "")


def _record(tool: str, arguments: dict[str, Any]) -> None:
    if _log_path:
        with open(_log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"tool": tool, "arguments": arguments}, sort_keys=True) + "\n")


@server.tool()
def pay(amount: float, to: str) -> str:
    """Pay ``amount`` dollars to ``to``."""
    _record("pay", {"amount": amount, "to": to})
    return f"paid {amount:.2f} to {to}"


@server.tool()
def read_note(name: str) -> str:
    """Read the note called ``name``."""
    _record("read_note", {"name": name})
    return f"note {name}: remember the milk"


@server.tool()
def delete_everything() -> str:
    """Delete every file (pretend)."""
    _record("delete_everything", {})
    return "deleted everything"


@server.tool()
def crash() -> str:
    """Exit the server process at once, mid-call, as a crashing server would."""
    _record("crash", {})
    os._exit(3)


@server.tool()
def echo(payload: Any = None) -> str:
    """Take any JSON ``payload``; say how long its JSON text is."""
    _record("echo", {"payload": payload})
    return f"echoed {len(json.dumps(payload))} characters"


# Names a policy file can hold as a skill id (``mcp.pay-now``, ``mcp.a/b``), and names it
# cannot (not ASCII letters, digits and ``_ . : / -``).
def _odd_tool(name: str) -> Callable[[str], str]:
    def odd(note: str = "") -> str:
        _record(name, {"note": note})
        return f"{name} ran"

    return odd


for _odd in ("pay-now", "a/b", "名前", "with space"):
    server.add_tool(_odd_tool(_odd), name=_odd, description=f"The tool called {_odd!r}.")


def later(word: str) -> str:
    """A tool that exists only after ``add_later`` ran."""
    _record("later", {"word": word})
    return word


@server.tool()
async def add_later(ctx: Context) -> str:
    """Add the tool ``later``, then tell the client the tool list changed."""
    _record("add_later", {})
    server.add_tool(later)
    await ctx.session.send_tool_list_changed()
    return "added later"


@server.prompt(title="Greeting")
def greet(name: str, tone: str = "warm") -> str:
    """Greet someone."""
    return f"Write a {tone} greeting to {name}."


@server.resource("note://groceries", name="groceries", mime_type="text/plain")
def groceries() -> str:
    """The grocery list."""
    return "milk, eggs"


@server.resource("note://{title}", name="note", mime_type="text/plain")
def note(title: str) -> str:
    """Any note, by title."""
    return f"the note {title}"


@server.completion()
async def complete(
    ref: PromptReference | ResourceTemplateReference,
    argument: CompletionArgument,
    context: CompletionContext | None,
) -> Completion | None:
    options = ["groceries", "garden", "taxes"]
    return Completion(values=[o for o in options if o.startswith(argument.value)], total=3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", default=_log_path)
    parser.add_argument("--pid-file", default="", help="write this process's id there")
    options = parser.parse_args()
    _log_path = options.log
    if options.pid_file:
        with open(options.pid_file, "w", encoding="utf-8") as pid_file:
            pid_file.write(str(os.getpid()))
    server.run()
