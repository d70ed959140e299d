"""One approval request: what an agent asked for, why it was escalated, and what a human said.

An :class:`ApprovalRequest` is an immutable value. Its ``params`` are *canonical JSON data*:
mappings with string keys (kept sorted), lists, strings, booleans, ``None``, ``int`` and
finite ``float``; a :class:`~decimal.Decimal` becomes its exact text (``Decimal("1.10")`` →
``"1.10"``, never rounded, and never the same text as ``Decimal("1.1")``: a fingerprint that
differs refuses, which is the safe side). Where each decimal was is kept in ``decimals`` (its
path of keys and list positions), so :meth:`ApprovalRequest.call_params` gives the executor
``Decimal("1.10")`` back, not text. The ``fingerprint`` is the SHA-256 of the canonical JSON
text of ``{"agent_id", "decimals", "params", "skill_id"}``: a resumed call must present the
same one.

The status machine::

    pending ──approve──▶ approved ──consume──▶ used
       │                    │
       ├──deny──▶ denied    └── expires_at reached ──▶ expired (read as such, never stored)
       └── expires_at reached ──▶ expired

``denied`` and ``used`` are final; nothing ever goes back. A pending or approved request whose
``expires_at`` is at or before ``now`` *reads* as expired (:meth:`ApprovalRequest.at`).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import enum
import hashlib
import json
import math
import secrets
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from limenex.core.errors import InvalidArgumentError, LimenexConfigError, StateStoreError

if TYPE_CHECKING:
    from limenex.core.decision import Decision

__all__ = [
    "ROW_COLUMNS",
    "ApprovalRefused",
    "ApprovalRequest",
    "ApprovalStatus",
    "ApprovalStoreError",
    "canonical_json",
    "canonical_params",
    "decimal_paths",
    "display_json",
    "fingerprint",
    "from_row",
    "new_request_id",
    "policies_digest",
    "request_from_decision",
    "request_id_for",
    "request_key",
    "to_row",
    "visible",
]


class ApprovalStatus(enum.StrEnum):
    """Where a request is in its life. ``denied``, ``expired`` and ``used`` are final."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    USED = "used"


class ApprovalRefused(LimenexConfigError):
    """An approve, deny or consume that the request's status does not allow.

    ``request_id`` names the request; ``why`` is a short code of the reason: ``"unknown"``,
    ``"pending"`` (not approved yet), ``"approved"``, ``"denied"``, ``"expired"``,
    ``"used"`` or ``"fingerprint"`` (the action presented is not the one approved).
    Retrying does not help: the request has to be escalated again.
    """

    def __init__(self, message: str, *, request_id: str, why: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.why = why


class ApprovalStoreError(StateStoreError):
    """The approval store is unreachable, or an operation on it failed."""


_REASONS = {
    ApprovalStatus.PENDING: "has not been approved yet",
    ApprovalStatus.APPROVED: "was already approved",
    ApprovalStatus.DENIED: "was denied",
    ApprovalStatus.EXPIRED: "has expired",
    ApprovalStatus.USED: "was already used",
}


def refused(request_id: str, status: ApprovalStatus | None, action: str) -> ApprovalRefused:
    """The :class:`ApprovalRefused` for ``action`` on a request in ``status`` (None: unknown)."""
    if status is None:
        return ApprovalRefused(
            f"cannot {action} approval request {request_id!r}: there is no such request",
            request_id=request_id,
            why="unknown",
        )
    return ApprovalRefused(
        f"cannot {action} approval request {request_id!r}: it {_REASONS[status]}",
        request_id=request_id,
        why=status.value,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """A persisted approval request. Times are epoch seconds; see the module docstring.

    ``policy`` is the breached policy as its YAML mapping (``None`` when there was none) and
    ``policy_index`` its position in the skill's list. ``decided_by``, ``decided_at`` and
    ``note`` are set by the approve or deny; ``used_at`` by the consume.
    """

    id: str
    skill_id: str
    agent_id: str
    params: dict[str, Any]
    fingerprint: str
    policy: dict[str, Any] | None
    policy_index: int | None
    reason: str
    created_at: float
    expires_at: float
    decimals: tuple[tuple[str | int, ...], ...] = ()
    action: str = ""
    waived: tuple[int, ...] = ()
    policies_digest: str = ""
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_by: str | None = None
    decided_at: float | None = None
    note: str = ""
    used_at: float | None = None

    def at(self, now: float) -> ApprovalRequest:
        """This request as it reads at ``now``: pending or approved turn expired at expiry."""
        if self.status in _LIVE and self.expires_at <= now:
            return dataclasses.replace(self, status=ApprovalStatus.EXPIRED)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping of every field (the status as its string value)."""
        return {
            "id": self.id,
            "skill_id": self.skill_id,
            "agent_id": self.agent_id,
            "params": json.loads(canonical_json(self.params)),
            "fingerprint": self.fingerprint,
            "policy": None if self.policy is None else json.loads(canonical_json(self.policy)),
            "policy_index": self.policy_index,
            "reason": self.reason,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decimals": [list(path) for path in self.decimals],
            "action": self.action,
            "waived": list(self.waived),
            "policies_digest": self.policies_digest,
            "status": self.status.value,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "note": self.note,
            "used_at": self.used_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ApprovalRequest:
        """The request :meth:`to_dict` described; ``ValueError``/``KeyError`` if malformed."""
        return cls(
            id=str(data["id"]),
            skill_id=str(data["skill_id"]),
            agent_id=str(data["agent_id"]),
            params=dict(data["params"]),
            fingerprint=str(data["fingerprint"]),
            policy=None if data["policy"] is None else dict(data["policy"]),
            policy_index=None if data["policy_index"] is None else int(data["policy_index"]),
            reason=str(data["reason"]),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            decimals=_paths(data.get("decimals") or ()),
            action=str(data.get("action") or ""),
            waived=tuple(sorted({int(i) for i in data.get("waived") or ()})),
            policies_digest=str(data.get("policies_digest") or ""),
            status=ApprovalStatus(data["status"]),
            decided_by=None if data["decided_by"] is None else str(data["decided_by"]),
            decided_at=None if data["decided_at"] is None else float(data["decided_at"]),
            note=str(data["note"]),
            used_at=None if data.get("used_at") is None else float(data["used_at"]),
        )

    def call_params(self) -> dict[str, Any]:
        """The params as the call had them: every decimal (see ``decimals``) a ``Decimal`` again."""
        params: Any = json.loads(canonical_json(self.params))  # a deep copy
        for path in self.decimals:
            holder = params
            for part in path[:-1]:
                holder = holder[part]
            holder[path[-1]] = Decimal(holder[path[-1]])
        return dict(params)


_LIVE = frozenset({ApprovalStatus.PENDING, ApprovalStatus.APPROVED})

ROW_COLUMNS = (
    "id",
    "skill_id",
    "agent_id",
    "params",
    "fingerprint",
    "policy",
    "policy_index",
    "reason",
    "created_at",
    "expires_at",
    "decimals",
    "action",
    "waived",
    "policies_digest",
    "status",
    "decided_by",
    "decided_at",
    "note",
    "used_at",
)
"""The columns of a request in an SQL table, in order (``params``, ``policy``, ``decimals``
as canonical JSON text)."""

_JSON_COLUMNS = frozenset({"params", "policy", "decimals", "waived"})


def to_row(request: ApprovalRequest) -> tuple[Any, ...]:
    """``request`` as the values of :data:`ROW_COLUMNS`."""
    data = request.to_dict()
    return tuple(
        canonical_json(data[name])
        if name in _JSON_COLUMNS and data[name] is not None
        else data[name]
        for name in ROW_COLUMNS
    )


def from_row(row: tuple[Any, ...]) -> ApprovalRequest:
    """The request a row of :data:`ROW_COLUMNS` holds; ``ValueError``/``KeyError``/``TypeError``
    when it is malformed."""
    data = dict(zip(ROW_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        if data[name] is not None:
            data[name] = json.loads(data[name])
    return ApprovalRequest.from_dict(data)


def _paths(value: Any) -> tuple[tuple[str | int, ...], ...]:
    paths = []
    for path in value:
        if not isinstance(path, list | tuple) or not path:
            raise ValueError(f"a decimal path must be a non-empty list, got {path!r}")
        for part in path:
            if type(part) not in (str, int):
                raise ValueError(f"a decimal path holds {part!r}")
        paths.append(tuple(path))
    return tuple(paths)


def decimal_paths(
    value: Any, _prefix: tuple[str | int, ...] = ()
) -> tuple[tuple[str | int, ...], ...]:
    """Where ``value`` holds a ``Decimal``: each path of keys and list positions, in key order."""
    if isinstance(value, Decimal):
        return (_prefix,)
    found: list[tuple[str | int, ...]] = []
    if isinstance(value, Mapping):
        for key in sorted(k for k in value if isinstance(k, str)):
            found.extend(decimal_paths(value[key], (*_prefix, key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found.extend(decimal_paths(item, (*_prefix, i)))
    return tuple(found)


# --- canonical data -----------------------------------------------------------------------


def canonical_params(value: Any, *, _where: str = "params") -> Any:
    """``value`` as canonical JSON data (see the module docstring).

    Raises :class:`~limenex.core.errors.InvalidArgumentError` for what JSON cannot hold
    exactly: non-string keys, NaN or infinite numbers, bytes, sets and other objects.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{_where} is not finite: {value!r}", argument=_where)
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidArgumentError(f"{_where} is not finite: {value!r}", argument=_where)
        return format(value, "f")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in sorted(value, key=_key(_where)):
            out[key] = canonical_params(value[key], _where=f"{_where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [canonical_params(v, _where=f"{_where}[{i}]") for i, v in enumerate(value)]
    raise InvalidArgumentError(
        f"{_where} cannot be kept in an approval request: {type(value).__name__} is not JSON data",
        argument=_where,
    )


def _key(where: str) -> Any:
    def check(key: object) -> str:
        if not isinstance(key, str):
            raise InvalidArgumentError(
                f"{where} has a key that is not a string: {key!r}", argument=where
            )
        return key

    return check


def canonical_json(value: Any) -> str:
    """The canonical JSON text of canonical data: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def fingerprint(skill_id: str, agent_id: str, params: Mapping[str, Any], action: str = "") -> str:
    """SHA-256 (hex) of the canonical JSON of ``skill_id``, ``agent_id``, ``params``, ``action``.

    Where the params hold decimals is hashed too: ``Decimal("1.10")`` and the text ``"1.10"``
    are different actions. ``action`` names the function that performs it when the skill
    alone does not (``@engine.governed`` functions: module and qualified name).
    """
    text = canonical_json(
        {
            "action": action,
            "agent_id": agent_id,
            "decimals": [list(path) for path in decimal_paths(params)],
            "params": canonical_params(params),
            "skill_id": skill_id,
        }
    )
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"params hold text that is not valid Unicode ({exc})", argument="params"
        ) from exc
    return hashlib.sha256(data).hexdigest()


def visible(text: str) -> str:
    """``text`` safe to show a human: control and format characters as ``\\uXXXX``.

    Params are the agent's text: terminal escape sequences or bidirectional overrides in them
    could make a request read differently from what it is. Newlines stay (``\\n`` stays
    visible in JSON anyway).
    """
    return "".join(
        f"\\u{ord(c):04x}" if c != "\n" and unicodedata.category(c) in _HIDDEN else c for c in text
    )


_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def display_json(value: Any) -> str:
    """JSON data as a human should read it: exact numbers, sorted keys, :func:`visible`."""
    return visible(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def policies_digest(policies: Iterable[Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of policies, in order: each its ``to_yaml_dict()``
    with the limit as its exact decimal text (two limits never share a digest)."""
    exact = []
    for policy in policies:
        data = policy.to_yaml_dict()
        value = getattr(policy, "value", None)
        if value is not None:
            data["value"] = format(value, "f")
        exact.append(data)
    text = canonical_json(canonical_params(exact, _where="policies"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_request_id() -> str:
    """The id of a new request: 128 random bits, URL-safe, or the keyed id (see below)."""
    key = _REQUEST_KEY.get()
    return secrets.token_urlsafe(16) if key is None else request_id_for(key)


_REQUEST_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "limenex_request_key", default=None
)


def request_id_for(key: str) -> str:
    """The request id an escalation made under ``request_key(key)`` gets."""
    digest = hashlib.sha256(b"limenex.request-key\0" + key.encode("utf-8")).digest()
    return "k" + base64.urlsafe_b64encode(digest[:16]).decode("ascii").rstrip("=")


@contextlib.contextmanager
def request_key(key: str) -> Iterator[str]:
    """Within this block, an escalation's request id is derived from ``key``; yields that id.

    For integrations whose framework runs a tool again when it resumes (LangGraph re-runs
    the node after ``interrupt``): keyed by the framework's tool call, the second run finds
    the request the first one made instead of escalating again. The key must name one tool
    call (thread, call id...). A second escalation under a key whose request exists is
    refused by the store, so the call is BLOCKed: it never makes two requests.
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError("a request key must be a non-empty string", argument="key")
    token = _REQUEST_KEY.set(key)
    try:
        yield request_id_for(key)
    finally:
        _REQUEST_KEY.reset(token)


def request_from_decision(
    decision: Decision,
    params: Mapping[str, Any],
    *,
    now: float,
    ttl: float,
    action: str = "",
    waived: tuple[int, ...] = (),
    policies_digest: str = "",
) -> ApprovalRequest:
    """A new pending request for an ESCALATE ``decision`` on ``params``, expiring after ``ttl``.

    ``waived`` lists the policies a human already approved this exact call against (the
    request comes from resuming an earlier one); ``policies_digest`` identifies the skill's
    policies as they were, so an approval never outlives an edit of them.

    Raises :class:`~limenex.core.errors.InvalidArgumentError` when the decision is not an
    ESCALATE, ``ttl`` is not a positive number of seconds, or the params are not JSON data.
    """
    from limenex.core.decision import Verdict

    if decision.verdict is not Verdict.ESCALATE:
        raise InvalidArgumentError(
            f"only an ESCALATE decision makes an approval request, got {decision.verdict.value}",
            argument="decision",
        )
    if not _seconds(ttl) or ttl <= 0:
        raise InvalidArgumentError(
            f"ttl must be a positive number of seconds, got {ttl!r}", argument="ttl"
        )
    if not _seconds(now):
        raise InvalidArgumentError(f"now must be epoch seconds, got {now!r}", argument="now")
    if not isinstance(params, Mapping):
        raise InvalidArgumentError(
            f"params must be a mapping, got {type(params).__name__}", argument="params"
        )
    canonical = canonical_params(params)
    policy = decision.to_dict()["policy"]
    return ApprovalRequest(
        id=new_request_id(),
        skill_id=decision.skill_id,
        agent_id=decision.agent_id,
        params=canonical,
        fingerprint=fingerprint(decision.skill_id, decision.agent_id, params, action),
        policy=None if policy is None else canonical_params(policy, _where="policy"),
        policy_index=decision.policy_index,
        reason=decision.reason,
        created_at=float(now),
        expires_at=float(now) + float(ttl),
        decimals=decimal_paths(params),
        action=action,
        waived=tuple(sorted(set(waived))),
        policies_digest=policies_digest,
    )


def _seconds(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
