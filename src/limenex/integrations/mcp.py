"""Govern any MCP server's tools: the proxy behind ``limenex mcp-proxy``.

:class:`McpProxy` starts the *upstream* MCP server as a subprocess (stdio), and serves the
client (the agent) the same tools: same names, descriptions and schemas. Each
``tools/call`` is governed as the skill ``<prefix><tool>`` (``mcp.pay``) for one agent id,
with the call's arguments as its params:

* **ALLOW**: the call is forwarded and the upstream's result returned unchanged. The amount
  stays counted even when that result is a tool error (``isError``): the upstream got the
  call, and Limenex cannot know what it did. A JSON-RPC error answer (the upstream refused
  the request itself) releases it, as a failing executor does.
* **BLOCK**, **ESCALATE**, a tool without an entry in the policy file, arguments that do not
  fit the tool's input schema or that a policy cannot read: a tool error (``isError``) the
  model can read, naming the verdict and the reason; the upstream never sees the call.
* **Approvals.** An ESCALATE keeps an approval request whose id is derived (with
  :func:`~limenex.approvals.request.request_key`) from the fingerprint of the call (skill,
  agent, arguments) and a generation number: ``k(fp, 0)``, ``k(fp, 1)``... The same call
  made again finds the latest request of its chain in the approval store, so it works
  across proxy restarts and from several proxies sharing one state store: still pending,
  the same request id is returned (never a duplicate); approved, the request is resumed
  (:meth:`~limenex.core.engine.PolicyEngine.resume`: forwarded once, every other policy
  still applies); denied, the denial is reported (once per proxy process; the call made
  again after that asks a human anew); used or expired, the next generation is evaluated
  anew.
* **Tool names**: a tool whose skill id the policy file cannot hold (it accepts ASCII
  letters, digits and ``_ . : / -``: ``pay-now`` and ``a/b`` are governed as ``mcp.pay-now``
  and ``mcp.a/b``; ``名前`` or ``with space`` cannot be) is refused, saying so.
* **Arguments** that are not a JSON object, or nested too deeply to be checked, are refused.
* **Fail closed**: a state or approval store that fails blocks the call (the engine does
  this); an upstream that has gone away fails every call with a tool error.

Prompts, resources (list, templates, read) and completions are passed through unchanged
when the upstream offers them: the MCP model has the user or the application choose those,
not the model, and they act on nothing. ``ping`` is answered by the proxy; the upstream's
``list_changed`` notifications are forwarded. Sampling, elicitation, roots, logging and
resource subscriptions are not offered.

Needs the MCP SDK: ``pip install 'limenex[mcp]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TextIO, cast

from limenex.approvals.request import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    fingerprint,
    request_id_for,
    request_key,
    visible,
)
from limenex.core.engine import Action, PolicyEngine
from limenex.core.errors import (
    BlockedError,
    EscalationRequired,
    InvalidArgumentError,
    LimenexConfigError,
    LimenexError,
    UnregisteredSkillError,
)
from limenex.core.policy import SKILL_ID_PATTERN

INSTALL_HINT = "the MCP proxy needs the MCP SDK: pip install 'limenex[mcp]'"

try:
    import anyio
    import anyio.from_thread
    import anyio.lowlevel
    import mcp.types as types
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel.server import NotificationOptions, Server
    from mcp.server.models import InitializationOptions
    from mcp.server.session import ServerSession
    from mcp.server.stdio import stdio_server
    from mcp.shared.exceptions import MCPError
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(INSTALL_HINT) from exc

__all__ = [
    "ACTION_NAME",
    "DEFAULT_AGENT_ID",
    "DEFAULT_PREFIX",
    "INSTALL_HINT",
    "McpProxy",
    "UpstreamError",
    "run_proxy",
]

log = logging.getLogger("limenex.mcp")

DEFAULT_PREFIX = "mcp."
DEFAULT_AGENT_ID = "mcp-client"
ACTION_NAME = "limenex.mcp-proxy"
"""The action name the proxy's approval requests are kept under (see ``register_action``)."""
_SKILL_ID_RULE = "ASCII letters, digits and _ . : / -, starting with a letter or digit"
"""The skill ids a policy file accepts (:data:`~limenex.core.policy.SKILL_ID_PATTERN`)."""
STARTUP_TIMEOUT = 60.0
"""Seconds the upstream has to answer the MCP handshake."""

Context = ServerRequestContext[Any, Any]


class UpstreamError(LimenexError):
    """The upstream MCP server could not be started, or did not complete the handshake."""


class _UpstreamGone(Exception):
    """The upstream is known to be gone before the call was sent: nothing happened."""


class McpProxy:
    """Governs the tool calls of one client to one upstream MCP server.

    ``approve_hint`` is appended to the ``limenex approvals`` commands an ESCALATE shows
    (e.g. ``" --url sqlite:///path/state.db"``), so the human reaches the proxy's store.
    Use :meth:`connect` to start the upstream, then :meth:`server` (or :func:`run_proxy`
    for both and the stdio loop).
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        agent_id: str = DEFAULT_AGENT_ID,
        prefix: str = DEFAULT_PREFIX,
        approve_hint: str = "",
    ) -> None:
        if not isinstance(agent_id, str) or not agent_id:
            raise LimenexConfigError("agent_id must be a non-empty string")
        self.engine = engine
        self.agent_id = agent_id
        self.prefix = prefix
        self.approve_hint = approve_hint
        self._upstream: ClientSession | None = None
        self._gone = False
        self._client: ServerSession | None = None
        self._tools: dict[str, types.Tool] | None = None
        self._next: dict[str, int] = {}  # call fingerprint -> generation of its latest request
        self._locks: dict[str, anyio.Lock] = {}

    # --- the upstream -----------------------------------------------------------------------

    @property
    def upstream(self) -> ClientSession:
        if self._upstream is None:
            raise LimenexConfigError("the proxy is not connected: use `async with proxy.connect()`")
        return self._upstream

    @contextlib.asynccontextmanager
    async def connect(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        errlog: TextIO | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> AsyncIterator[types.InitializeResult]:
        """Start ``command`` (the upstream MCP server) and complete the MCP handshake.

        The upstream gets this process's environment (``env`` replaces it): the variables a
        client configures for the proxy are the upstream's. Its stderr goes to ``errlog``
        (default ``sys.stderr``). Raises :class:`UpstreamError` when it cannot be started or
        does not answer the handshake within ``startup_timeout`` seconds. Leaving the block closes
        the upstream's stdin, then stops it.
        """
        if not command:
            raise UpstreamError("no upstream command: give one after `--`")
        shown = shlex.join(command)
        params = StdioServerParameters(
            command=command[0],
            args=list(command[1:]),
            env=dict(os.environ if env is None else env),
            cwd=cwd,
        )
        async with contextlib.AsyncExitStack() as stack:
            try:
                read, write = await stack.enter_async_context(
                    stdio_client(params, errlog=sys.stderr if errlog is None else errlog)
                )
            except OSError as exc:
                raise UpstreamError(
                    f"cannot start the upstream MCP server `{shown}`: {exc.strerror or exc}"
                ) from exc
            session = await stack.enter_async_context(
                ClientSession(read, write, message_handler=self._on_upstream_message)
            )
            try:
                with anyio.fail_after(startup_timeout):
                    init = await session.initialize()
            except TimeoutError as exc:
                raise UpstreamError(
                    f"the upstream MCP server `{shown}` did not answer the MCP handshake "
                    f"within {startup_timeout:g} s"
                ) from exc
            except (MCPError, RuntimeError, ValueError) as exc:
                raise UpstreamError(
                    f"the upstream MCP server `{shown}` did not complete the MCP handshake "
                    f"({exc}); did it exit? Its stderr is above."
                ) from exc
            self._upstream, self._gone, self._tools = session, False, None
            try:
                yield init
            finally:
                self._upstream = None

    async def _on_upstream_message(self, message: types.ServerNotification | Exception) -> None:
        """Forward the upstream's list_changed notifications to the client."""
        if isinstance(message, types.ToolListChangedNotification):
            self._tools = None  # listed again at the next call
        client = self._client
        if client is None or isinstance(message, Exception):
            return
        try:
            if isinstance(message, types.ToolListChangedNotification):
                await client.send_tool_list_changed()
            elif isinstance(message, types.PromptListChangedNotification):
                await client.send_prompt_list_changed()
            elif isinstance(message, types.ResourceListChangedNotification):
                await client.send_resource_list_changed()
        except Exception:  # the client went away: nothing to tell
            log.debug("limenex mcp-proxy: could not forward %s", type(message).__name__)

    async def _tool(self, name: str) -> types.Tool | None:
        """The upstream's definition of tool ``name`` (every page listed once, then cached)."""
        if self._tools is None or name not in self._tools:
            tools: dict[str, types.Tool] = {}
            cursor: str | None = None
            while True:
                page = await self.upstream.list_tools(
                    params=None if cursor is None else types.PaginatedRequestParams(cursor=cursor)
                )
                tools.update((tool.name, tool) for tool in page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
            self._tools = tools
        return self._tools.get(name)

    async def _forward(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Send the call to the upstream; its result unchanged."""
        if self._gone:
            raise _UpstreamGone(name)
        request = types.CallToolRequest(
            params=types.CallToolRequestParams(name=name, arguments=arguments)
        )
        try:
            return await self.upstream.send_request(request, types.CallToolResult)
        except MCPError as exc:
            if exc.code != types.CONNECTION_CLOSED:
                raise  # the upstream answered with an error: it refused the request
            self._gone = True
            return _error(
                f"the upstream MCP server closed the connection during the call to {name!r}, "
                "so whether it acted is unknown (any amount stays counted). Later calls fail "
                "until the proxy is restarted."
            )
        except Exception as exc:  # sent: the upstream may have acted, so it stays counted
            log.exception("limenex mcp-proxy: the upstream's answer to %r is unusable", name)
            return _error(
                f"the upstream MCP server's answer to {name!r} could not be read ({exc}); "
                "whether it acted is unknown (any amount stays counted)."
            )

    # --- governed calls ---------------------------------------------------------------------

    async def call(self, name: str, arguments: Mapping[str, Any] | None) -> types.CallToolResult:
        """Govern one call of tool ``name``: the upstream's result, or a refusal (isError)."""
        skill_id = self.prefix + name
        if re.fullmatch(SKILL_ID_PATTERN, skill_id) is None:
            return _error(
                f"BLOCK: tool {visible(name)!r} cannot be governed: {visible(skill_id)!r} is "
                f"not a valid skill id ({_SKILL_ID_RULE}), so no policy file can hold it and "
                "the call was not forwarded. (Only an upstream that renames the tool, or "
                "another --prefix, can make it callable.)"
            )
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            return _error(
                f"BLOCK: invalid argument 'arguments': the arguments of tool {visible(name)!r} "
                f"must be a JSON object, not {type(arguments).__name__}. The call was not "
                "forwarded."
            )
        args = dict(arguments)
        try:
            self.engine.skill(skill_id)
            tool = await self._tool(name)
            if tool is None:
                return _error(
                    f"BLOCK: the upstream MCP server has no tool {name!r}; nothing was called."
                )
            _check_arguments(tool, args)
            key = "mcp-proxy\0" + fingerprint(skill_id, self.agent_id, args, ACTION_NAME)
        except MCPError as exc:  # listing the upstream's tools failed
            if exc.code != types.CONNECTION_CLOSED:
                raise
            self._gone = True
            return _gone(name)
        except UnregisteredSkillError:
            return _error(
                f"BLOCK: tool {name!r} is ungoverned: the skill {skill_id!r} has no entry in "
                "the Limenex policy file, so the call was not forwarded. (An operator governs "
                f"it by adding `{skill_id}:` with its policies, or `policies: []` to allow it.)"
            )
        except InvalidArgumentError as exc:
            return _invalid(exc)
        except BlockedError as exc:
            return _blocked(exc.decision.reason)
        except LimenexConfigError as exc:
            return _error(f"BLOCK: {visible(str(exc))} The call was not forwarded.")
        except RecursionError:
            return _error(
                f"BLOCK: invalid argument 'arguments': the arguments of tool {visible(name)!r} "
                "are nested too deeply to be checked. The call was not forwarded."
            )
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:  # one request per call chain: the same call, concurrently, waits
                return await self._govern(name, skill_id, args, key)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(key, None)

    async def _govern(
        self, name: str, skill_id: str, args: dict[str, Any], key: str
    ) -> types.CallToolResult:
        approvals = self.engine.approvals
        generation = self._next.get(key, 0)
        while True:
            request_id = request_id_for(f"{key}\0{generation}")
            try:
                found = await approvals.get(request_id)
            except Exception as exc:
                return _blocked(
                    f"{skill_id}: blocked because the approval store failed "
                    f"({type(exc).__name__}: {exc})."
                )
            if found is None:
                if generation:
                    self._next[key] = generation
                with request_key(f"{key}\0{generation}"):
                    return await self._evaluate(name, skill_id, args)
            status = found.status
            if status is ApprovalStatus.PENDING:
                self._next[key] = generation
                return self._escalated(found.id, found.reason)
            if status is ApprovalStatus.DENIED:
                self._next[key] = generation + 1  # reported once; asked anew after that
                note = f": {found.note}" if found.note else ""
                return _error(
                    f"BLOCK: a human ({visible(found.decided_by or '')}) denied approval "
                    f"request {found.id}{visible(note)}. The call was not forwarded."
                )
            if status is ApprovalStatus.APPROVED:
                self._next[key] = generation
                with request_key(f"{key}\0{generation + 1}"):
                    resumed = await self._resume(name, skill_id, found)
                if resumed is not None:
                    result, done = resumed
                    if done:  # used, or carried into the next generation's request
                        self._next[key] = generation + 1
                    return result
            generation += 1  # used, expired, or an approval that can no longer be used

    def _register(self, skill_id: str, name: str) -> None:
        """How the engine performs this tool's call, and resumes an approved one."""

        def build(params: dict[str, Any]) -> Action:
            return lambda: self._forward(name, params)

        self.engine.register_action(skill_id, build, name=ACTION_NAME)

    async def _evaluate(
        self, name: str, skill_id: str, args: dict[str, Any]
    ) -> types.CallToolResult:
        self._register(skill_id, name)
        try:
            result = await self.engine.execute(
                skill_id,
                self.agent_id,
                args,
                lambda: self._forward(name, args),
                action_name=ACTION_NAME,
            )
        except EscalationRequired as exc:
            return self._escalated(exc.request_id, exc.decision.reason)
        except BlockedError as exc:
            return _blocked(exc.decision.reason)
        except InvalidArgumentError as exc:
            return _invalid(exc)
        except _UpstreamGone:
            return _gone(name)
        except LimenexConfigError as exc:
            return _error(f"BLOCK: {visible(str(exc))} The call was not forwarded.")
        return _result(result)

    async def _resume(
        self, name: str, skill_id: str, request: ApprovalRequest
    ) -> tuple[types.CallToolResult, bool] | None:
        """Resume an approved request: ``(result, whether the request is done)``, or
        ``None`` when its approval can no longer be used (expired, used elsewhere, policies
        changed since): the call is then evaluated anew."""
        self._register(skill_id, name)
        try:
            result = await self.engine.resume(request.id)
        except ApprovalRefused as exc:
            log.info("limenex mcp-proxy: approval request %s cannot be used: %s", request.id, exc)
            return None
        except EscalationRequired as exc:
            return self._escalated(exc.request_id, exc.decision.reason, again=True), True
        except BlockedError as exc:
            return _blocked(exc.decision.reason, approved=request.id), False
        except InvalidArgumentError as exc:
            return _invalid(exc), False
        except _UpstreamGone:  # the approval was used just before the action ran
            return _gone(name), True
        except LimenexConfigError as exc:
            return _error(f"BLOCK: {visible(str(exc))} The call was not forwarded."), False
        return _result(result), True

    def _escalated(
        self, request_id: str | None, reason: str, *, again: bool = False
    ) -> types.CallToolResult:
        if request_id is None:  # the engine kept no request: nothing a human could approve
            return _blocked(reason)
        hint = self.approve_hint
        first = "It was approved once, but it needs another approval now: " if again else ""
        return _error(
            f"ESCALATE: {visible(reason)} The call was not forwarded: {first}it waits for a "
            f"human to decide approval request {request_id}. To approve it: `limenex "
            f"approvals approve {request_id} --by NAME{hint}` (to refuse it: `limenex approvals "
            f"deny {request_id} --by NAME{hint}`). Once it is approved, call this tool again "
            "with exactly the same arguments: the call then runs, once.",
            escalated=True,
        )

    # --- the server the client talks to ------------------------------------------------------

    def server(self, init: types.InitializeResult) -> Server[Any]:
        """A low-level MCP server offering what the upstream offers (see the module doc)."""
        upstream = self.upstream
        caps = init.capabilities
        handlers: dict[str, Any] = {}

        async def list_tools(
            ctx: Context, params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            self._client = ctx.session
            return await upstream.send_request(
                types.ListToolsRequest(params=params), types.ListToolsResult
            )

        async def call_tool(ctx: Context, params: types.CallToolRequestParams) -> Any:
            self._client = ctx.session
            return await self.call(params.name, params.arguments)

        def passthrough(request: type[Any], result: type[Any]) -> Any:
            async def handle(ctx: Context, params: Any) -> Any:
                self._client = ctx.session
                return await upstream.send_request(request(params=params), result)

            return handle

        if caps.prompts is not None:
            handlers["on_list_prompts"] = passthrough(
                types.ListPromptsRequest, types.ListPromptsResult
            )
            handlers["on_get_prompt"] = passthrough(types.GetPromptRequest, types.GetPromptResult)
        if caps.resources is not None:
            handlers["on_list_resources"] = passthrough(
                types.ListResourcesRequest, types.ListResourcesResult
            )
            handlers["on_list_resource_templates"] = passthrough(
                types.ListResourceTemplatesRequest, types.ListResourceTemplatesResult
            )
            handlers["on_read_resource"] = passthrough(
                types.ReadResourceRequest, types.ReadResourceResult
            )
        if caps.completions is not None:
            handlers["on_completion"] = passthrough(types.CompleteRequest, types.CompleteResult)
        info = init.server_info
        return Server(
            info.name,
            version=info.version,
            title=info.title,
            description=info.description,
            instructions=init.instructions,
            website_url=info.website_url,
            icons=info.icons,
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            **handlers,
        )

    @staticmethod
    def initialization_options(
        server: Server[Any], init: types.InitializeResult
    ) -> InitializationOptions:
        """The server's options, announcing the upstream's list_changed notifications."""
        caps = init.capabilities
        return server.create_initialization_options(
            NotificationOptions(
                prompts_changed=bool(caps.prompts and caps.prompts.list_changed),
                resources_changed=bool(caps.resources and caps.resources.list_changed),
                tools_changed=bool(caps.tools and caps.tools.list_changed),
            )
        )

    def coverage(self, tools: Sequence[types.Tool]) -> list[str]:
        """Lines for the operator: tools that are ungoverned, policies naming no tool."""
        names = {tool.name for tool in tools}
        policy_set = getattr(self.engine.policy_store, "policy_set", None)
        skills = set(getattr(policy_set, "skills", {}) or {})
        lines = [
            f"tool {name!r} cannot be governed: {self.prefix + name!r} is not a valid skill "
            f"id ({_SKILL_ID_RULE}), so its calls will be refused"
            if re.fullmatch(SKILL_ID_PATTERN, self.prefix + name) is None
            else f"tool {name!r} is ungoverned (no {self.prefix + name!r} in the policy "
            "file): its calls will be refused"
            for name in sorted(names)
            if self.prefix + name not in skills
        ]
        lines += [
            f"the policy file governs {skill!r}, but the upstream has no tool "
            f"{skill[len(self.prefix) :]!r}"
            for skill in sorted(skills)
            if skill.startswith(self.prefix) and skill[len(self.prefix) :] not in names
        ]
        return lines


async def run_proxy(
    engine: PolicyEngine,
    command: Sequence[str],
    *,
    agent_id: str = DEFAULT_AGENT_ID,
    prefix: str = DEFAULT_PREFIX,
    approve_hint: str = "",
    env: Mapping[str, str] | None = None,
    errlog: TextIO | None = None,
    streams: tuple[Any, Any] | None = None,
    on_ready: Callable[[McpProxy, list[types.Tool]], None] | None = None,
) -> None:
    """Start the upstream ``command``, then serve the governed proxy until the client leaves.

    Serves over this process's stdin and stdout, or over ``streams`` (``(read, write)``, as
    :func:`mcp.server.stdio.stdio_server` yields them). Returns when the client closes its
    side; the upstream is then stopped. ``on_ready(proxy, tools)`` is called once the
    upstream answered, before serving. Raises :class:`UpstreamError` when the upstream
    cannot be started.
    """
    proxy = McpProxy(engine, agent_id=agent_id, prefix=prefix, approve_hint=approve_hint)
    async with proxy.connect(command, env=env, errlog=errlog) as init:
        server = proxy.server(init)
        options = proxy.initialization_options(server, init)
        if on_ready is not None:
            try:
                tools = (await proxy.upstream.list_tools()).tools
            except MCPError:
                tools = []
            on_ready(proxy, tools)
        if streams is not None:
            await server.run(streams[0], streams[1], options)
            return
        async with _stdin_lines() as lines, stdio_server(stdin=cast(Any, lines)) as (read, write):
            await server.run(read, write, options)


@contextlib.asynccontextmanager
async def _stdin_lines() -> AsyncIterator[AsyncIterator[str]]:
    """This process's stdin, line by line, read by a daemon thread.

    The SDK reads stdin in a worker thread that a cancellation waits for: a proxy told to stop
    (SIGTERM) while its client keeps stdin open would never get to stop the upstream, and
    the process could not exit. This thread is left blocked on its read instead.
    """
    send, receive = anyio.create_memory_object_stream[str](16)
    token = anyio.lowlevel.current_token()
    fd = os.dup(sys.stdin.fileno())  # unbuffered: no lock left held at interpreter exit

    def deliver(line: bytes) -> None:
        anyio.from_thread.run(send.send, line.decode("utf-8", errors="replace"), token=token)

    def pump() -> None:
        try:
            pending: list[bytes] = []
            while chunk := os.read(fd, 1 << 16):
                *lines, rest = chunk.split(b"\n")
                for line in lines:
                    deliver(b"".join([*pending, line]))
                    pending = []
                pending.append(rest)
            if any(pending):
                deliver(b"".join(pending))
        except Exception as exc:  # the loop is gone, or stdin failed: the stream ends either way
            log.debug("limenex mcp-proxy: stopped reading stdin: %r", exc)
        finally:
            os.close(fd)
        with contextlib.suppress(Exception):
            anyio.from_thread.run_sync(send.close, token=token)

    threading.Thread(target=pump, name="limenex-mcp-stdin", daemon=True).start()
    with receive:
        yield receive


# --- results --------------------------------------------------------------------------------


def _error(text: str, *, escalated: bool = False) -> types.CallToolResult:
    meta = {"limenex/verdict": "ESCALATE" if escalated else "BLOCK"}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], is_error=True, _meta=meta
    )


def _blocked(reason: str, *, approved: str | None = None) -> types.CallToolResult:
    kept = (
        f" Approval request {approved} stays approved: calling again with the same arguments"
        " resumes it."
        if approved
        else ""
    )
    return _error(f"BLOCK: {visible(reason)} The call was not forwarded.{kept}")


def _invalid(exc: InvalidArgumentError) -> types.CallToolResult:
    return _error(
        f"BLOCK: invalid argument {visible(exc.argument)!r}: {visible(str(exc))}. "
        "The call was not forwarded."
    )


def _gone(name: str) -> types.CallToolResult:
    return _error(
        f"the upstream MCP server is not running, so {name!r} was not called; restart the "
        "proxy (the MCP client's server entry)."
    )


def _result(result: Any) -> types.CallToolResult:
    if isinstance(result, types.CallToolResult):
        return result
    return _error(f"unexpected result from the upstream: {type(result).__name__}")  # defensive


def _check_arguments(tool: types.Tool, arguments: dict[str, Any]) -> None:
    """Refuse arguments that do not fit the tool's input schema, naming the argument."""
    from jsonschema import (  # type: ignore[import-untyped,unused-ignore]
        exceptions as schema_errors,
    )
    from jsonschema import validators  # type: ignore[import-untyped,unused-ignore]

    schema = tool.input_schema
    try:
        validator_class = validators.validator_for(schema)
        validator_class.check_schema(schema)
        error = schema_errors.best_match(validator_class(schema).iter_errors(arguments))
    except schema_errors.SchemaError:
        log.warning("limenex mcp-proxy: tool %r has an invalid input schema", tool.name)
        return  # the upstream's own problem; the policies still check what they read
    if error is None:
        return
    argument = "arguments"
    if error.path:
        argument = str(error.path[0])
    elif error.validator == "required" and isinstance(error.validator_value, list):
        missing = [name for name in error.validator_value if name not in arguments]
        argument = str(missing[0]) if missing else argument
    elif error.validator == "additionalProperties":
        extra = set(arguments) - set(schema.get("properties", {}))
        argument = str(sorted(extra)[0]) if extra else argument
    raise InvalidArgumentError(
        f"{error.message} (the input schema of tool {tool.name!r})", argument=argument
    )
