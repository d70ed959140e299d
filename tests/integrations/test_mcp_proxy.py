"""``limenex mcp-proxy`` end to end: the real MCP client, the real proxy, the real upstream.

Each test starts ``python -m limenex mcp-proxy ... -- python upstream_server.py`` as a
subprocess and talks to it with the MCP SDK's ``stdio_client`` and ``ClientSession``; the
upstream logs every call it receives, so what never reached it is proven, not assumed.
Humans act through the real ``limenex approvals`` command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.session import MessageHandlerFnT
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    CallToolRequest,
    CallToolRequestParams,
    CallToolResult,
    PromptReference,
    ResourceTemplateReference,
    TextContent,
    ToolListChangedNotification,
)

from limenex.approvals import ApprovalStatus, approval_store_for
from limenex.core.engine import PolicyEngine
from limenex.core.errors import PolicyFileError
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.integrations.mcp import McpProxy
from limenex.stores import from_url

pytestmark = pytest.mark.slow

UPSTREAM = Path(__file__).with_name("upstream_server.py")
POLICIES = """\
mcp.pay:
  policies:
    - type: deterministic
      dimension: spend
      param: amount
      operator: lte
      value: 100
      breach_verdict: ESCALATE
mcp.read_note:
  policies: []
mcp.delete_everything:
  policies:
    - {type: deterministic, dimension: deletions, operator: lt, value: 1, breach_verdict: BLOCK}
"""
REQUEST_ID = re.compile(r"approval request ([A-Za-z0-9_-]+)")


def write_policies(text: str = POLICIES) -> Path:
    path = Path(".limenex", "policies.yaml")
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def upstream_calls(log: Path = Path("calls.jsonl")) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def proxy_command(*options: str, upstream: tuple[str, ...] | None = None) -> list[str]:
    if upstream is None:
        upstream = (sys.executable, str(UPSTREAM), "--log", str(Path("calls.jsonl").resolve()))
    return [sys.executable, "-m", "limenex", "mcp-proxy", *options, "--", *upstream]


def exists(*parts: str) -> bool:
    return Path(*parts).exists()


def open_log(path: str) -> TextIO:
    return open(path, "a", encoding="utf-8")


@contextlib.asynccontextmanager
async def connect(
    command: list[str],
    stderr: str = "proxy.stderr",
    message_handler: MessageHandlerFnT | None = None,
) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session with ``command``, which runs in this folder."""
    params = StdioServerParameters(command=command[0], args=command[1:], cwd=os.getcwd())
    with open_log(stderr) as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write, message_handler=message_handler) as session,
        ):
            await session.initialize()
            yield session


def proxy(
    *options: str, message_handler: MessageHandlerFnT | None = None
) -> contextlib.AbstractAsyncContextManager[ClientSession]:
    return connect(
        proxy_command("--policies", ".limenex/policies.yaml", *options),
        message_handler=message_handler,
    )


def text(result: CallToolResult) -> str:
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def refused(result: CallToolResult, verdict: str) -> str:
    """The refusal's text, checked to be a tool error naming ``verdict``."""
    assert result.is_error is True
    assert result.structured_content is None
    message = text(result)
    assert message.startswith(f"{verdict}: "), message
    return message


def request_id_in(result: CallToolResult) -> str:
    found = REQUEST_ID.search(refused(result, "ESCALATE"))
    assert found is not None
    return found.group(1)


def request_status(request_id: str) -> ApprovalStatus | None:
    state = from_url("sqlite:///.limenex/state.db")
    store = approval_store_for(state)
    try:
        request = store.get(request_id, time.time())
        return None if request is None else request.status
    finally:
        store.close()
        state.close()


async def approvals_cli(action: str, request_id: str) -> None:
    """``limenex approvals approve|deny ID --by alice``, as the human runs it."""
    done = await anyio.run_process(
        [sys.executable, "-m", "limenex", "approvals", action, request_id, "--by", "alice"],
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()


async def test_offers_the_upstreams_tools_and_returns_allowed_results_unchanged() -> None:
    write_policies()
    direct_command = [sys.executable, str(UPSTREAM), "--log", "direct.jsonl"]
    async with connect(direct_command, "direct.stderr") as upstream:
        expected_tools = (await upstream.list_tools()).model_dump(by_alias=True)
        expected_note = await upstream.call_tool("read_note", {"name": "groceries"})
    async with proxy() as session:
        init_tools = await session.list_tools()
        note = await session.call_tool("read_note", {"name": "groceries"})
        paid = await session.call_tool("pay", {"amount": 40, "to": "bob"})
    assert init_tools.model_dump(by_alias=True) == expected_tools
    assert [tool.name for tool in init_tools.tools] == [
        "pay",
        "read_note",
        "delete_everything",
        "crash",
        "echo",
        "pay-now",
        "a/b",
        "名前",
        "with space",
        "add_later",
    ]
    assert note.model_dump(by_alias=True) == expected_note.model_dump(by_alias=True)
    assert note.is_error is False
    assert paid.structured_content == {"result": "paid 40.00 to bob"}
    assert upstream_calls() == [
        {"tool": "read_note", "arguments": {"name": "groceries"}},
        {"tool": "pay", "arguments": {"amount": 40.0, "to": "bob"}},
    ]


async def test_refused_calls_never_reach_the_upstream() -> None:
    write_policies()
    url = "sqlite:///elsewhere.db"
    async with proxy("--state", url, "--agent-id", "bot-7") as session:
        escalated = await session.call_tool("pay", {"amount": 150, "to": "bob"})
        blocked = await session.call_tool("delete_everything", {})
        ungoverned = await session.call_tool("crash", {})
        wrong_type = await session.call_tool("pay", {"amount": "lots", "to": "bob"})
        missing = await session.call_tool("pay", {"to": "bob"})
        negative = await session.call_tool("pay", {"amount": -5, "to": "bob"})
        allowed = await session.call_tool("read_note", {"name": "a"})
    assert "mcp.delete_everything" in refused(blocked, "BLOCK")
    assert "(policy 1, BLOCK)" in refused(blocked, "BLOCK")
    message = refused(ungoverned, "BLOCK")
    assert "'crash' is ungoverned" in message
    assert "'mcp.crash' has no entry in the Limenex policy file" in message
    assert "invalid argument 'amount'" in refused(wrong_type, "BLOCK")
    assert "invalid argument 'amount'" in refused(missing, "BLOCK")
    assert "invalid argument 'amount'" in refused(negative, "BLOCK")  # the engine's own check
    assert allowed.is_error is False
    request_id = request_id_in(escalated)
    assert "for agent 'bot-7'" in text(escalated)
    assert f"limenex approvals approve {request_id} --by NAME --url {url}" in text(escalated)
    assert exists("elsewhere.db")  # --state, not the default
    assert not exists(".limenex", "state.db")
    assert upstream_calls() == [{"tool": "read_note", "arguments": {"name": "a"}}]


async def test_an_approved_escalation_runs_once_when_the_call_is_made_again() -> None:
    write_policies()
    async with proxy() as session:
        first = await session.call_tool("pay", {"amount": 60, "to": "bob"})
        escalated = await session.call_tool("pay", {"amount": 50, "to": "bob"})
        request_id = request_id_in(escalated)
        assert "would reach 110 (60 recorded + 50 proposed)" in text(escalated)
        assert f"limenex approvals approve {request_id} --by NAME" in text(escalated)

        again = await session.call_tool("pay", {"amount": 50, "to": "bob"})
        assert request_id_in(again) == request_id  # no duplicate request
        assert request_status(request_id) is ApprovalStatus.PENDING

        await approvals_cli("approve", request_id)
        resumed = await session.call_tool("pay", {"amount": 50, "to": "bob"})
        assert request_status(request_id) is ApprovalStatus.USED

        once_more = await session.call_tool("pay", {"amount": 50, "to": "bob"})
    assert first.is_error is False
    assert resumed.is_error is False
    assert resumed.structured_content == {"result": "paid 50.00 to bob"}
    assert "160 (110 recorded + 50 proposed)" in text(once_more)
    assert request_id_in(once_more) != request_id  # a new request: the approval was used
    assert upstream_calls() == [
        {"tool": "pay", "arguments": {"amount": 60.0, "to": "bob"}},
        {"tool": "pay", "arguments": {"amount": 50.0, "to": "bob"}},
    ]


async def test_requests_outlive_the_proxy_and_a_denial_is_reported() -> None:
    write_policies()
    async with proxy() as session:
        await session.call_tool("pay", {"amount": 90, "to": "bob"})
        to_approve = request_id_in(await session.call_tool("pay", {"amount": 20, "to": "ann"}))
        to_deny = request_id_in(await session.call_tool("pay", {"amount": 30, "to": "eve"}))
    await approvals_cli("approve", to_approve)
    await approvals_cli("deny", to_deny)
    async with proxy() as session:  # a new process: it knows the requests from the store
        approved = await session.call_tool("pay", {"amount": 20, "to": "ann"})
        denied = await session.call_tool("pay", {"amount": 30, "to": "eve"})
    assert approved.structured_content == {"result": "paid 20.00 to ann"}
    message = refused(denied, "BLOCK")
    assert f"a human (alice) denied approval request {to_deny}" in message
    assert upstream_calls() == [
        {"tool": "pay", "arguments": {"amount": 90.0, "to": "bob"}},
        {"tool": "pay", "arguments": {"amount": 20.0, "to": "ann"}},
    ]


async def test_an_upstream_that_dies_fails_every_call() -> None:
    write_policies(POLICIES + "mcp.crash:\n  policies: []\n")
    async with proxy() as session:
        crashed = await session.call_tool("crash", {})
        after = await session.call_tool("read_note", {"name": "a"})
    assert crashed.is_error is True
    assert "closed the connection during the call to 'crash'" in text(crashed)
    assert after.is_error is True
    assert "the upstream MCP server is not running" in text(after)
    assert upstream_calls() == [{"tool": "crash", "arguments": {}}]


def run_proxy_cli(*args: str, upstream: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        proxy_command(*args, upstream=upstream),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_invalid_policy_file_is_refused_before_the_upstream_starts() -> None:
    Path("bad.yaml").write_text(
        "mcp.pay:\n  policies:\n    - type: deterministic\n      dimension: spend\n"
        "      parm: amount\n      operator: lte\n      value: 1\n"
        "      breach_verdict: BLOCK\n",
        encoding="utf-8",
    )
    starts = (sys.executable, "-c", "open('upstream-started', 'w').close()")
    done = run_proxy_cli("--policies", "bad.yaml", upstream=starts)
    assert done.returncode == 1
    assert "invalid policy file: bad.yaml:5: parm: unknown key" in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path("upstream-started").exists()


def test_an_upstream_that_cannot_start_is_a_clear_error() -> None:
    write_policies()
    missing = run_proxy_cli(
        "--policies", ".limenex/policies.yaml", upstream=("no-such-mcp-server-xyz",)
    )
    assert missing.returncode == 1
    assert "cannot start the upstream MCP server `no-such-mcp-server-xyz`" in missing.stderr
    exits = (sys.executable, "-c", "import sys; sys.exit('no config')")
    exited = run_proxy_cli("--policies", ".limenex/policies.yaml", upstream=exits)
    assert exited.returncode == 1
    assert "no config" in exited.stderr  # the upstream's own stderr
    assert "did not complete the MCP handshake" in exited.stderr
    assert "Traceback" not in missing.stderr + exited.stderr


def test_closing_stdin_stops_the_proxy_and_the_upstream() -> None:
    write_policies()
    upstream = (sys.executable, str(UPSTREAM), "--pid-file", "upstream.pid")
    command = proxy_command("--policies", ".limenex/policies.yaml", upstream=upstream)
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        assert process.stdin is not None
        for line in process.stderr:  # the proxy says when the upstream answered
            if "serving on stdio" in line:
                break
        process.stdin.close()
        assert process.wait(timeout=30) == 0
    pid = int(Path("upstream.pid").read_text(encoding="utf-8"))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_prompts_resources_completions_and_list_changed_pass_through() -> None:
    write_policies(POLICIES + "mcp.add_later:\n  policies: []\nmcp.later:\n  policies: []\n")

    async def offered(session: ClientSession) -> list[Any]:
        """Everything but tools, as the client sees it (errors included)."""
        seen: list[Any] = [
            await session.list_prompts(),
            await session.get_prompt("greet", {"name": "ann", "tone": "dry"}),
            await session.list_resources(),
            await session.list_resource_templates(),
            await session.read_resource("note://groceries"),
            await session.read_resource("note://taxes"),
            await session.complete(PromptReference(name="greet"), {"name": "name", "value": "g"}),
            await session.complete(
                ResourceTemplateReference(uri="note://{title}"), {"name": "title", "value": "t"}
            ),
        ]
        for failing in (session.get_prompt("no-such-prompt"), session.read_resource("x://y")):
            with pytest.raises(MCPError) as error:
                await failing
            seen.append((error.value.code, error.value.message))
        return [
            item if isinstance(item, tuple) else item.model_dump(by_alias=True) for item in seen
        ]

    direct_command = [sys.executable, str(UPSTREAM), "--log", "direct.jsonl"]
    async with connect(direct_command, "direct.stderr") as upstream:
        expected = await offered(upstream)
    assert expected[0]["prompts"][0]["name"] == "greet"
    assert expected[4]["contents"][0]["text"] == "milk, eggs"
    assert expected[6]["completion"]["values"] == ["groceries", "garden"]

    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    async with proxy(message_handler=on_message) as session:
        assert await offered(session) == expected
        not_yet = await session.call_tool("later", {"word": "hi"})
        assert "the upstream MCP server has no tool 'later'" in refused(not_yet, "BLOCK")
        added = await session.call_tool("add_later", {})
        assert added.is_error is False
        with anyio.fail_after(20):
            await changed.wait()  # the upstream's notification reached the client
        names = [tool.name for tool in (await session.list_tools()).tools]
        later = await session.call_tool("later", {"word": "hi"})  # the proxy listed anew
    assert "later" in names
    assert later.is_error is False
    assert text(later) == "hi"
    assert upstream_calls() == [
        {"tool": "add_later", "arguments": {}},
        {"tool": "later", "arguments": {"word": "hi"}},
    ]


def test_a_signal_stops_the_proxy_and_the_upstream() -> None:
    """SIGTERM or SIGINT alone (the client keeps stdin open) stops the proxy, exit status
    128 + the signal's number, and the upstream with it. One proxy per signal, side by side."""
    write_policies()
    signals = [signal.SIGTERM, signal.SIGINT]
    processes = [
        subprocess.Popen(
            proxy_command(
                "--policies",
                ".limenex/policies.yaml",
                upstream=(sys.executable, str(UPSTREAM), "--pid-file", f"{signum.name}.pid"),
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for signum in signals
    ]
    try:
        pids = []
        for signum, process in zip(signals, processes, strict=True):
            assert process.stderr is not None
            for line in process.stderr:  # the proxy says when the upstream answered
                if "serving on stdio" in line:
                    break
            pids.append(int(Path(f"{signum.name}.pid").read_text(encoding="utf-8")))
            os.kill(pids[-1], 0)  # running
        for signum, process in zip(signals, processes, strict=True):
            process.send_signal(signum)
        statuses = [process.wait(timeout=30) for process in processes]
        said = [process.communicate()[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert statuses == [128 + signal.SIGTERM, 128 + signal.SIGINT]
    for signum, text_said in zip(signals, said, strict=True):
        assert f"stopped by {signum.name}; the upstream was stopped" in text_said
        assert "Traceback" not in text_said
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # stopped and reaped, not orphaned
            os.kill(pid, 0)


def test_skill_ids_accept_dashes_and_slashes_but_not_spaces_or_other_letters() -> None:
    for name, valid in [("pay-now", True), ("a/b", True), ("名前", False), ("with space", False)]:
        Path("p.yaml").write_text(f'"mcp.{name}":\n  policies: []\n', encoding="utf-8")
        if valid:
            assert LocalFilePolicyStore("p.yaml").get(f"mcp.{name}") is not None
        else:
            with pytest.raises(PolicyFileError, match="not a valid skill id"):
                LocalFilePolicyStore("p.yaml")


async def test_tool_names_no_skill_id_can_hold_are_refused() -> None:
    write_policies(
        POLICIES + '"mcp.pay-now":\n  policies: []\n"mcp.a/b":\n  policies:\n'
        "    - {type: deterministic, dimension: ab, operator: lt, value: 1, "
        "breach_verdict: BLOCK}\n"
    )
    async with proxy() as session:
        dash = await session.call_tool("pay-now", {"note": "x"})
        slash = await session.call_tool("a/b", {"note": "x"})
        kanji = await session.call_tool("名前", {"note": "x"})
        space = await session.call_tool("with space", {"note": "x"})
    assert dash.is_error is False
    assert text(dash) == "pay-now ran"
    assert "mcp.a/b" in refused(slash, "BLOCK")  # governed under its exact name
    assert "(policy 1, BLOCK)" in text(slash)
    for result, name in [(kanji, "名前"), (space, "with space")]:
        message = refused(result, "BLOCK")
        assert f"tool '{name}' cannot be governed: 'mcp.{name}' is not a valid skill id" in message
        assert "was not forwarded" in message
    said = await anyio.Path("proxy.stderr").read_text(encoding="utf-8")
    assert "note: tool '名前' cannot be governed: 'mcp.名前' is not a valid skill id" in said
    assert "note: tool 'with space' cannot be governed" in said
    assert "note: tool 'pay-now'" not in said
    assert upstream_calls() == [{"tool": "pay-now", "arguments": {"note": "x"}}]


async def test_odd_large_and_agent_naming_arguments() -> None:
    write_policies(POLICIES + "mcp.echo:\n  policies: []\n")
    big = "x" * 1_000_000
    nested: Any = "leaf"
    for _ in range(150):
        nested = {"a": nested}
    async with proxy("--agent-id", "bot-7") as session:
        not_an_object = CallToolRequest(
            params=CallToolRequestParams.model_construct(name="pay", arguments=[["amount", 5]])
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic: the list is not the dict it expects
            with pytest.raises(MCPError) as error:  # the SDK's server refuses it, not the proxy
                await session.send_request(not_an_object, CallToolResult)
        assert error.value.code == INVALID_PARAMS
        large = await session.call_tool("echo", {"payload": big})
        deep = await session.call_tool("echo", {"payload": nested})
        first = await session.call_tool("pay", {"amount": 60, "to": "bob", "agent_id": "a1"})
        second = await session.call_tool("pay", {"amount": 50, "to": "bob", "agent_id": "a2"})
        huge = await session.call_tool("pay", {"amount": 500, "to": big, "agent_id": "a3"})
        alive = await session.call_tool("read_note", {"name": "n"})
    assert text(large) == f"echoed {len(big) + 2} characters"
    assert deep.is_error is False
    assert first.is_error is False
    message = refused(second, "ESCALATE")  # both count for bot-7: 60 + 50 > 100
    assert "would reach 110 (60 recorded + 50 proposed)" in message
    assert "for agent 'bot-7'" in message
    assert "for agent 'bot-7'" in refused(huge, "ESCALATE")
    assert alive.is_error is False
    calls = upstream_calls()
    assert [call["tool"] for call in calls] == ["echo", "echo", "pay", "read_note"]
    assert calls[0]["arguments"] == {"payload": big}
    assert calls[1]["arguments"] == {"payload": nested}
    assert calls[2]["arguments"] == {"amount": 60.0, "to": "bob"}


async def test_the_proxy_refuses_what_the_wire_would_not_carry() -> None:
    """``McpProxy.call`` in-process: arguments the SDK's server would refuse or not parse."""
    write_policies(POLICIES + "mcp.echo:\n  policies: []\n")
    engine = PolicyEngine(LocalFilePolicyStore(".limenex/policies.yaml"), state_store="memory://")
    mcp_proxy = McpProxy(engine, agent_id="bot-7")
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = {"a": deep}
    upstream = [
        sys.executable,
        str(UPSTREAM),
        "--log",
        str(await anyio.Path("calls.jsonl").absolute()),
    ]
    try:
        with open_log("upstream.stderr") as errlog:
            async with mcp_proxy.connect(upstream, errlog=errlog):
                pairs = await mcp_proxy.call("pay", [("amount", 500), ("to", "bob")])  # type: ignore[arg-type]
                text_args = await mcp_proxy.call("pay", "amount")  # type: ignore[arg-type]
                too_deep = await mcp_proxy.call("echo", {"payload": deep})
                allowed = await mcp_proxy.call("echo", {"payload": 1})
    finally:
        engine.close()
    message = refused(pairs, "BLOCK")
    assert "the arguments of tool 'pay' must be a JSON object, not list" in message
    assert "must be a JSON object, not str" in refused(text_args, "BLOCK")
    assert "nested too deeply" in refused(too_deep, "BLOCK")
    assert allowed.is_error is False
    assert upstream_calls() == [{"tool": "echo", "arguments": {"payload": 1}}]
