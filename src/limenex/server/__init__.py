"""``limenex serve``: the approval inbox, as a small HTTP API and one web page (SPEC §5).

:func:`create_app` builds the Starlette application; ``limenex serve`` runs it with uvicorn
on 127.0.0.1 (``pip install 'limenex[serve]'``). Routes::

    GET  /                              the inbox page (static: it holds no data)
    GET  /inbox.js, /inbox.css          its script and style (no inline script anywhere)
    GET  /api/requests                  pending requests, oldest first (each ``to_dict()``)
    GET  /api/requests/{id}             one request, in whatever status (404 if unknown)
    POST /api/requests/{id}/approve     body ``{"by": "...", "note": "..."}``
    POST /api/requests/{id}/deny        the same
    GET  /api/audit?n=50                the last records of the audit log, parsed
    GET  /api/state                     the live totals, as ``limenex state show --json``

Every ``/api/`` route needs ``Authorization: Bearer <token>`` (compared in constant time).
Approvals and denials go through :class:`~limenex.approvals.Approvals`, so each one is
kept in the store and then recorded in the audit log, as from the CLI or the engine.

What protects the API from other web pages the approver's browser has open:

* the Host header must name this server (its bound host, ``localhost`` or ``127.0.0.1``,
  on its port): a DNS-rebinding page cannot reach it under its own name;
* ``Sec-Fetch-Site: cross-site`` (or ``same-site``) and any ``Origin`` other than the
  server's own are refused with 403;
* a POST must be ``Content-Type: application/json``, which no HTML form can send (415);
* every response says ``Cache-Control: no-store``, ``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY`` and a Content-Security-Policy that allows only this server's
  own script, style and fetches.

Errors are always JSON ``{"error": ...}``: 400 bad input, 401 no or wrong token, 403
refused origin, 404 unknown, 409 the request's status does not allow it (with ``why``, as
:class:`~limenex.approvals.ApprovalRefused`), 415 not JSON, 503 the store failed, 500 the
decision was kept but its audit record could not be written (or anything unexpected).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Collection
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from limenex.approvals import ApprovalRefused, ApprovalRequest, Approvals
from limenex.approvals.request import display_json, visible
from limenex.audit import AuditError, read_tail
from limenex.core.errors import StateStoreError
from limenex.core.state import StateStore

__all__ = ["MAX_AUDIT_RECORDS", "SECURITY_HEADERS", "create_app", "loopback_hosts"]

log = logging.getLogger("limenex.server")

MAX_AUDIT_RECORDS = 1000
"""The most records ``GET /api/audit`` returns at once."""

_MAX_BY = 200
_MAX_NOTE = 4000
_MAX_ID = 200

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
"""Headers on every response of the server, whatever its status."""

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def loopback_hosts(host: str, port: int, extra: Collection[str] = ()) -> frozenset[str]:
    """The Host header values the server answers: ``host``, localhost and 127.0.0.1 on ``port``.

    ``extra`` adds names (without a port: ``inbox.example.internal``) for a server bound to
    another interface. On port 80 the bare names are accepted too (browsers leave it out).
    """
    names = {_bracketed(n.strip().lower()) for n in (host, *_LOOPBACK_NAMES, *extra)}
    names.discard("")
    hosts = {f"{n}:{port}" for n in names}
    if port == 80:
        hosts |= names
    return frozenset(hosts)


def _bracketed(name: str) -> str:
    """An IPv6 address as a Host header spells it: ``[::1]``."""
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def _error(status: int, message: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": message, **fields}, status_code=status)


class _Guard:
    """The checks every request passes before a route sees it, and the headers of every reply.

    Outermost middleware: even a 404, 405 or 500 reply carries :data:`SECURITY_HEADERS`.
    """

    def __init__(self, app: ASGIApp, *, token: str, hosts: frozenset[str]) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "").strip().lower()
        if host not in self.hosts:
            return _error(400, "this server does not answer to that Host header")
        path: str = scope["path"]
        if not (path == "/api" or path.startswith("/api/")):
            return None
        if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
            return _error(403, "requests from other sites are refused")
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}":
            return _error(403, "requests from other origins are refused")
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), self.token
        ):
            response = _error(401, "a valid token is required: Authorization: Bearer <token>")
            response.headers["WWW-Authenticate"] = 'Bearer realm="limenex"'
            return response
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return _error(415, "send the body as Content-Type: application/json")
        return None


Endpoint = Callable[[Request], Awaitable[Response]]
Decide = Callable[[str, str, str | None], Awaitable[ApprovalRequest]]


def _json_errors(endpoint: Endpoint) -> Endpoint:
    """Turn the failures of ``endpoint`` into JSON replies: never a traceback page."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApprovalRefused as exc:
            status = 404 if exc.why == "unknown" else 409
            return _error(status, str(exc), why=exc.why, request_id=exc.request_id)
        except AuditError as exc:
            log.error("audit log failure: %s", exc)
            return _error(500, str(exc))
        except StateStoreError as exc:
            log.error("store failure: %s", exc)
            return _error(503, f"the store is unavailable: {exc}")
        except Exception:
            log.exception("unexpected failure on %s %s", request.method, request.url.path)
            return _error(500, "internal error (see the server's log)")

    return guarded


def _view(request: ApprovalRequest) -> dict[str, Any]:
    """``to_dict()``, plus ``display``: the texts the page shows a human, made safe to read.

    JavaScript would round integers beyond 2**53 and show a ``Decimal`` like any string, and
    a control or bidirectional character could make text read as something else; the page
    shows these server-made texts instead (see :func:`~limenex.approvals.request.visible`).
    """
    data = request.to_dict()
    decimals = visible(", ".join(".".join(map(str, path)) for path in request.decimals))
    data["display"] = {
        "skill_id": visible(request.skill_id),
        "agent_id": visible(request.agent_id),
        "reason": visible(request.reason),
        "params": display_json(request.params),
        "policy": "—" if request.policy is None else display_json(request.policy),
        "decimals": decimals or "—",
        "note": visible(request.note),
        "decided_by": visible(request.decided_by or ""),
        "action": visible(request.action) or "—",
    }
    return data


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def create_app(
    approvals: Approvals,
    *,
    state_store: StateStore,
    audit_path: str | os.PathLike[str],
    token: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    allowed_hosts: Collection[str] = (),
) -> Starlette:
    """The inbox application over ``approvals`` (give it an ``audit=`` log: decisions are
    recorded through it), ``state_store`` (read for ``/api/state``) and the audit log at
    ``audit_path`` (read for ``/api/audit``).

    ``token`` is the bearer token every ``/api/`` request must present; ``host`` and
    ``port`` are where the server is bound (they make the Host and Origin checks), and
    ``allowed_hosts`` more names it may be reached by (see :func:`loopback_hosts`).
    """
    if not isinstance(token, str) or len(token) < 16:
        raise ValueError("the token must be a string of at least 16 characters")
    audit_file = Path(audit_path)
    page = _static("inbox.html")
    script = _static("inbox.js")
    style = _static("inbox.css")

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def inbox_js(request: Request) -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8")

    async def inbox_css(request: Request) -> Response:
        return Response(style, media_type="text/css; charset=utf-8")

    async def list_requests(request: Request) -> Response:
        pending = await approvals.pending()
        return JSONResponse([_view(r) for r in pending])

    async def get_request(request: Request) -> Response:
        request_id = str(request.path_params["request_id"])
        found = None if len(request_id) > _MAX_ID else await approvals.get(request_id)
        if found is None:
            return _error(404, f"no approval request {request_id!r}", why="unknown")
        return JSONResponse(_view(found))

    async def approve(request: Request) -> Response:
        return await decide(request, approvals.approve)

    async def deny(request: Request) -> Response:
        return await decide(request, approvals.deny)

    async def decide(request: Request, act: Decide) -> Response:
        request_id = str(request.path_params["request_id"])
        if len(request_id) > _MAX_ID:
            return _error(404, f"no approval request {request_id!r}", why="unknown")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, 'send a JSON object: {"by": "your name", "note": "..."}')
        by, note = body.get("by"), body.get("note", "")
        if not isinstance(by, str) or not by.strip():
            return _error(400, '"by" must name the approver')
        if len(by) > _MAX_BY:
            return _error(400, f'"by" is longer than {_MAX_BY} characters')
        if note is None:
            note = ""
        if not isinstance(note, str):
            return _error(400, '"note" must be text')
        if len(note) > _MAX_NOTE:
            return _error(400, f'"note" is longer than {_MAX_NOTE} characters')
        done = await act(request_id, by.strip(), note)
        return JSONResponse(_view(done))

    async def audit_tail(request: Request) -> Response:
        raw = request.query_params.get("n", "50")
        try:
            count = int(raw)
        except ValueError:
            return _error(400, f"n must be a whole number, got {raw!r}")
        if not 0 <= count <= MAX_AUDIT_RECORDS:
            return _error(400, f"n must be between 0 and {MAX_AUDIT_RECORDS}")
        return JSONResponse(await run_in_threadpool(_audit_records, audit_file, count))

    async def state(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_totals_json, state_store, approvals.clock))

    api = _json_errors
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/inbox.js", inbox_js, methods=["GET"]),
        Route("/inbox.css", inbox_css, methods=["GET"]),
        Route("/api/requests", api(list_requests), methods=["GET"]),
        Route("/api/requests/{request_id}", api(get_request), methods=["GET"]),
        Route("/api/requests/{request_id}/approve", api(approve), methods=["POST"]),
        Route("/api/requests/{request_id}/deny", api(deny), methods=["POST"]),
        Route("/api/audit", api(audit_tail), methods=["GET"]),
        Route("/api/state", api(state), methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "not found")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, "method not allowed")

    async def failed(request: Request, exc: Exception) -> Response:
        return _error(500, "internal error (see the server's log)")

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: not_allowed, 500: failed},
    )
    app.add_middleware(_Guard, token=token, hosts=loopback_hosts(host, port, allowed_hosts))
    return app


def _audit_records(path: Path, count: int) -> list[dict[str, Any]]:
    """The last ``count`` records of the audit log at ``path``; none when it is not there yet."""
    if not path.exists():
        return []
    return [_record(raw) for _, raw in read_tail(path, count)]


def _record(raw: bytes) -> dict[str, Any]:
    """One audit line as its record, or ``{"unreadable": text}`` (as ``limenex audit tail``)."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return data
    return {"unreadable": raw.decode("utf-8", "replace")}


def _totals_json(store: StateStore, clock: Callable[[], float]) -> list[dict[str, str]]:
    """What ``limenex state show --json`` prints, for ``store`` at ``clock()``."""
    from limenex.cli.state import _key_json

    return [{**_key_json(k), "total": str(v)} for k, v in sorted(store.totals(clock()))]
