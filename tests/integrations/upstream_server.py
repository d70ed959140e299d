"""An ordinary MCP server, knowing nothing of Limenex: the upstream ``limenex mcp-proxy`` runs.

Every tool call it receives is appended, as one JSON line ``{"tool": ..., "arguments": ...}``,
to the file named by ``--log PATH`` (or ``$UPSTREAM_LOG``), so a test can prove which calls
reached it and which never did.

    python upstream_server.py --log calls.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from mcp.server.mcpserver import MCPServer

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
