"""The tamper-evident audit log: one hash-chained JSON record per decision and outcome.

::

    engine hook (event, decision, params)
      └── AuditLog.write       builds an AuditRecord (decimals as exact strings, no floats)
          ├── Redactor         replaces configured params (``card``, ``payload.card.number``)
          ├── other processors any ``(AuditRecord) -> AuditRecord``, in order
          └── sink.append      under the sink's lock: ``seq``, ``prev``, ``hash``, then write

Every record carries ``seq`` (1, 2, ...), ``prev`` (the previous record's ``hash``; ``"0" * 64``
for the first) and ``hash``: the SHA-256 of the record's canonical JSON without ``hash``
(sorted keys, no spaces, ASCII only). A line on disk *is* the canonical JSON of the whole
record, so :func:`verify` finds any edited, dropped, inserted, reordered or torn record and
names its line.

:class:`JsonlSink` appends one line per record and fsyncs it before returning: a record the
caller was told is written survives a crash. It holds ``flock`` on the file while it reads the
last record and appends, so threads and processes sharing one file never fork the chain, and
a reopened sink simply goes on from the file's last line. A sink that cannot write raises
:class:`AuditError`; passed to the engine as ``audit_logger=AuditLog(...)``, that blocks the
action (fail closed).

A hash chain proves the records are those that were written, in that order, *up to its
head*: cutting whole records off the end, or rewriting the entire file, leaves a valid chain.
Keep :attr:`VerifyResult.head` (the last hash) somewhere the agent cannot write to detect that.
"""

from __future__ import annotations

import ast
import atexit
import collections
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from limenex.core.decision import Decision, allowed_decision, allowed_reason, decimal_text
from limenex.core.errors import LimenexRuntimeError

if TYPE_CHECKING:
    from limenex.approvals.request import ApprovalRequest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # JsonlSink refuses to write then

__all__ = [
    "DEFAULT_PATH",
    "GENESIS",
    "REDACTED",
    "REDACT_ENV",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "BufferedAuditLog",
    "JsonlSink",
    "MemorySink",
    "Processor",
    "Redactor",
    "VerifyResult",
    "canonical_json",
    "chain_body",
    "path_for",
    "read_tail",
    "record_hash",
    "redact_from_env",
    "verify",
    "verify_lines",
]

_log = logging.getLogger("limenex")

DEFAULT_PATH = ".limenex/audit.log"
"""Where the CLI reads and writes the audit log unless told otherwise."""


REDACT_ENV = "LIMENEX_AUDIT_REDACT"
"""The environment variable that lists params to redact (``card,payload.card.number``)."""


def redact_from_env() -> tuple[str, ...]:
    """The fields :data:`REDACT_ENV` lists (commas or spaces between them).

    The engine's default audit log, ``limenex approvals`` and ``limenex serve`` all read it,
    so records written by each of them redact the same params.
    """
    text = os.environ.get(REDACT_ENV, "")
    return tuple(field for field in re.split(r"[,\s]+", text) if field)


def path_for(state_store: object = None) -> Path:
    """The default audit log of an engine or tool using ``state_store``.

    ``audit.log`` in the folder of a file or SQLite state store (so it sits beside
    ``state.json`` / ``state.db``), else :data:`DEFAULT_PATH` in the working directory.
    """
    from limenex.core.stores import LocalFileStateStore, SQLiteStateStore

    if isinstance(state_store, LocalFileStateStore | SQLiteStateStore):
        return Path(state_store.path).parent / "audit.log"
    return Path(DEFAULT_PATH)


GENESIS = "0" * 64
"""The ``prev`` of the first record of a chain."""

REDACTED = "[redacted]"
"""What a redacted param is replaced with."""

SCHEMA_VERSION = 1


class AuditError(LimenexRuntimeError):
    """The audit log could not be written or read. Before an action, the action is blocked."""


# --- records ------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed and written: sorted keys, no spaces, ASCII only."""
    return _ENCODER.encode(value)


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: decimals and floats become exact strings, never floats.

    Anything JSON has no type for (dates, bytes, objects) is recorded as its ``str()``, so an
    unusual argument never makes the audit (and with it the call) fail.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return value if value.bit_length() <= _MAX_INT_BITS else _text(value)
    if kind is dict:
        return {k if type(k) is str else _text(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value) if value.bit_length() <= _MAX_INT_BITS else _text(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        if abs(value.adjusted()) > _MAX_DECIMAL_DIGITS:  # exact, but no one reads 1E+100000000
            return str(value)
        return format(value, "f")
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {_text(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        if isinstance(value, set | frozenset):
            items.sort(key=canonical_json)
        return items
    return _text(value)


_MAX_DECIMAL_DIGITS = 1000
_MAX_INT_BITS = 4000 * 3  # about 3,600 digits: below Python's limit on int -> str conversion


def _text(value: Any) -> str:
    """``str(value)``, or a placeholder when that fails or is too long to be useful."""
    if isinstance(value, int):
        return f"<int of {value.bit_length()} bits>"
    try:
        return str(value)
    except Exception as exc:
        return f"<{type(value).__name__} that cannot be shown: {type(exc).__name__}>"


def _iso(epoch: float) -> str:
    """``epoch`` as ISO 8601 UTC with microseconds (``2026-01-01T00:00:00.000000Z``)."""
    micros = round(epoch * 1_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    text = _iso_seconds.get(seconds)
    if text is None:
        moment = _dt.datetime.fromtimestamp(seconds, _dt.UTC)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S")
        if len(_iso_seconds) > 64:
            _iso_seconds.clear()
        _iso_seconds[seconds] = text
    return f"{text}.{fraction:06d}Z"


_iso_seconds: dict[int, str] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit record. Every number that may be money is an exact decimal string.

    ``time`` is ISO 8601 UTC with microseconds; ``params`` the call's params as JSON data
    (after redaction once it has passed the pipeline); ``policy`` the breached policy's YAML
    mapping. ``seq``, ``prev`` and ``hash`` are ``None`` until a sink chains the record.
    """

    time: str
    event: str
    skill_id: str
    agent_id: str
    params: dict[str, Any]
    verdict: str
    reason: str
    policy: dict[str, Any] | None = None
    policy_index: int | None = None
    observed: str | None = None
    projected: str | None = None
    limit: str | None = None
    fail_closed: bool = False
    latency_ms: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq: int | None = None
    prev: str | None = None
    hash: str | None = None
    _line: str | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def from_decision(
        cls,
        event: str,
        decision: Decision,
        params: Mapping[str, Any],
        *,
        at: float | None = None,
        latency_ms: float | Decimal | None = None,
        extra: Mapping[str, Any] | None = None,
        state: StateChange | None = None,
    ) -> AuditRecord:
        """The record of ``event`` for ``decision``; ``at`` defaults to now (epoch seconds).

        ``state`` is the call's ``(checks, totals before)``: it becomes ``extra["state"]``, one
        entry per counter with its total ``before`` and ``after`` the call's amount.
        """
        details = _jsonable(extra) if extra else {}
        if state is not None:  # JSON data already: exact decimal strings
            details["state"] = _state_entries(*state)
        return cls(
            time=_iso(time.time() if at is None else at),
            event=event,
            skill_id=decision.skill_id,
            agent_id=decision.agent_id,
            params=_jsonable(params),
            verdict=decision.verdict.value,
            reason=decision.reason,
            policy=None if decision.policy is None else _jsonable(decision.policy.to_yaml_dict()),
            policy_index=decision.policy_index,
            observed=decimal_text(decision.observed),
            projected=decimal_text(decision.projected),
            limit=decimal_text(decision.limit),
            fail_closed=decision.fail_closed,
            latency_ms=None if latency_ms is None else _latency(latency_ms),
            extra=details,
        )

    @classmethod
    def from_request(
        cls,
        event: str,
        request: ApprovalRequest,
        *,
        at: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """The record of ``event`` (``approved``, ``denied``...) on an approval request.

        ``extra`` holds ``request_id``, ``status``, ``decided_by`` and ``note`` from the
        request, then the given ``extra``.
        """
        details = {
            "request_id": request.id,
            "status": request.status.value,
            "decided_by": request.decided_by,
            "note": request.note,
            **(extra or {}),
        }
        return cls(
            time=_iso(time.time() if at is None else at),
            event=event,
            skill_id=request.skill_id,
            agent_id=request.agent_id,
            params=_jsonable(request.params),
            verdict="ESCALATE",
            reason=request.reason,
            policy=request.policy,
            policy_index=request.policy_index,
            extra=_jsonable(details),
        )

    @classmethod
    def from_event(
        cls,
        event: str,
        reason: str,
        *,
        at: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """The record of ``event`` that is about no call (``policies_reloaded``...).

        It has no skill, agent, params or verdict (each empty); ``reason`` says what
        happened and ``extra`` holds the details.
        """
        return cls(
            time=_iso(time.time() if at is None else at),
            event=event,
            skill_id="",
            agent_id="",
            params={},
            verdict="",
            reason=reason,
            extra=_jsonable(dict(extra or {})),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping that is hashed and written (``hash`` left out while unset)."""
        out: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "time": self.time,
            "event": self.event,
            "skill_id": self.skill_id,
            "agent_id": self.agent_id,
            "params": self.params,
            "verdict": self.verdict,
            "reason": self.reason,
            "policy": self.policy,
            "policy_index": self.policy_index,
            "observed": self.observed,
            "projected": self.projected,
            "limit": self.limit,
            "fail_closed": self.fail_closed,
            "latency_ms": self.latency_ms,
            "extra": self.extra,
            "seq": self.seq,
            "prev": self.prev,
        }
        if self.hash is not None:
            out["hash"] = self.hash
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """The record a line of the log holds (as :meth:`to_dict` wrote it)."""
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except TypeError as exc:
            raise AuditError(f"not an audit record: {exc}") from exc

    def chained(self, seq: int, prev: str) -> AuditRecord:
        """This record as number ``seq`` of a chain whose previous hash is ``prev``.

        The canonical JSON is made once, in two halves split where ``hash`` sorts: joined,
        they are the hashed body; with the hash between them, the line (kept for
        :meth:`line`).
        """
        digest, line = chain_body(self.to_dict(), seq, prev)
        return self._linked(seq, prev, digest, line)

    def _linked(self, seq: int, prev: str, digest: str, line: str) -> AuditRecord:
        linked = object.__new__(AuditRecord)
        for name in _FIELDS:
            object.__setattr__(linked, name, getattr(self, name))
        object.__setattr__(linked, "seq", seq)
        object.__setattr__(linked, "prev", prev)
        object.__setattr__(linked, "hash", digest)
        object.__setattr__(linked, "_line", line)
        return linked

    def line(self) -> str:
        """The canonical JSON line (without the newline) a sink writes."""
        return self._line or canonical_json(self.to_dict())


StateChange = (
    tuple[Sequence[Any], Sequence[Decimal]] | tuple[Sequence[Any], Sequence[Decimal], Sequence[Any]]
)
"""``(checks, observed[, steps])``: the state checks of a call, each one's total before it,
and the skill's compiled steps (which name the param each counter adds)."""


def _state_entries(
    checks: Sequence[Any], observed: Sequence[Decimal], steps: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """One entry per counter the call moved; ``param``: the param it adds (``None``: calls)."""
    entries: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for check, before in zip(checks, observed, strict=True):
        if check.key in seen:  # two policies on one counter: it moved once
            continue
        seen.add(check.key)
        dimension, scope, subject, window = check.key
        entries.append(
            {
                "dimension": dimension,
                "scope": scope,
                "subject": subject,
                "window": window or None,
                "param": getattr(steps[check.policy_index], "param", None) if steps else None,
                "before": format(before, "f"),
                "after": format(before + check.amount, "f"),
            }
        )
    return entries


def chain_body(body: Mapping[str, Any], seq: int, prev: str) -> tuple[str, str]:
    """``(hash, line)`` of a record's body (:meth:`AuditRecord.to_dict`) as number ``seq``.

    The canonical JSON is made once, in two halves split where ``hash`` sorts: joined, they
    are the hashed text; with the hash between them, the line.
    """
    head = {key: body[key] for key in _BEFORE_HASH}
    tail = {key: value for key, value in body.items() if key not in _HEAD_OR_HASH}
    tail["seq"], tail["prev"] = seq, prev
    first, second = canonical_json(head)[:-1], canonical_json(tail)[1:]
    digest = hashlib.sha256(f"{first},{second}".encode("ascii")).hexdigest()
    return digest, f'{first},"hash":"{digest}",{second}'


_FIELDS = tuple(field.name for field in dataclasses.fields(AuditRecord))
_BEFORE_HASH = ("agent_id", "event", "extra", "fail_closed")
_HEAD_OR_HASH = frozenset((*_BEFORE_HASH, "hash"))
"""The keys of a record that sort before ``hash`` (checked by the tests)."""


def _latency(value: float | Decimal) -> str:
    if type(value) is float and 0 <= value < 1e9:
        return f"{value:.3f}"  # to the microsecond; the fast path of a hot writer
    return format(Decimal(str(value)).quantize(Decimal("0.001")), "f")


# --- processors ---------------------------------------------------------------------------

Processor = Callable[[AuditRecord], AuditRecord]
"""A step of the pipeline: takes a record, returns the (possibly new) record to keep."""


class Redactor:
    """Replaces configured params with ``"[redacted]"`` before anything is hashed or written.

    A field is a top-level param name (``card``) or a dotted path into nested mappings
    (``payload.card.number``); where the path crosses a list, it applies to every item. A
    path that is not there is ignored. The original params are never modified.

    A redacted value can also be quoted elsewhere in the record: in the reason (``recipient
    'ana@example.com' is not in ...``) or in a counter's subject (``scope: [agent, card]``).
    Every whole-word occurrence of it, in the reason and anywhere in ``extra``, is replaced
    too.
    """

    __slots__ = ("_paths", "fields")

    def __init__(self, fields: Iterable[str]) -> None:
        self.fields = tuple(fields)
        for field in self.fields:
            if not field or any(not part for part in field.split(".")):
                raise ValueError(f"redact: {field!r} is not a param name or dotted path")
        self._paths = tuple(tuple(field.split(".")) for field in self.fields)

    def __call__(self, record: AuditRecord) -> AuditRecord:
        params: Any = record.params
        secrets: set[str] = set()
        for path in self._paths:
            params = _redact(params, path, secrets)
        if params is record.params:
            return record
        # The breached policy read a redacted param: its observed and projected values tell it
        # (a per-call value is the param; a total's projected minus observed is the param).
        hidden = isinstance(record.policy, dict) and record.policy.get("param") in self.fields
        if hidden:
            secrets.update(v for v in (record.observed, record.projected) if v is not None)
        forms = {form for text in secrets for form in _spellings(text)}
        forms.discard("")
        observed = REDACTED if hidden and record.observed is not None else record.observed
        projected = REDACTED if hidden and record.projected is not None else record.projected
        extra = _hide_counters(record.extra, self.fields)
        if not forms:
            return dataclasses.replace(
                record, params=params, observed=observed, projected=projected, extra=extra
            )
        pattern = re.compile(
            "|".join(
                rf"(?<!\w){re.escape(text)}(?!\w)" for text in sorted(forms, key=len, reverse=True)
            )
        )
        return dataclasses.replace(
            record,
            params=params,
            observed=observed,
            projected=projected,
            reason=pattern.sub(REDACTED, record.reason),
            extra=_scrub(extra, pattern),
        )

    def __repr__(self) -> str:
        return f"Redactor(fields={list(self.fields)!r})"


def _redact(value: Any, path: Sequence[str], found: set[str]) -> Any:
    """``value`` with ``path`` replaced; the same object when nothing matched (copy on write).

    Adds the text of every value it replaces (each leaf of a replaced mapping or list) to
    ``found``.
    """
    if isinstance(value, list):
        items = [_redact(item, path, found) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if not isinstance(value, dict) or path[0] not in value:
        return value
    head, rest = path[0], path[1:]
    if rest:
        new = _redact(value[head], rest, found)
    else:
        new = REDACTED
        _leaves(value[head], found)
    if new is value[head]:
        return value
    return {**value, head: new}


def _leaves(value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _leaves(item, found)
    elif isinstance(value, list):
        for item in value:
            _leaves(item, found)
    elif value is not None and not isinstance(value, bool):
        found.add(str(value))


def _spellings(text: str) -> set[str]:
    """The ways a value's text can be quoted in a reason or a subject: as is, escaped by
    ``repr`` or JSON, and a number in each form a decimal prints (the engine's amounts have
    at most 18 places)."""
    forms = {
        text,
        repr(text)[1:-1],
        json.dumps(text)[1:-1],
        json.dumps(text, ensure_ascii=False)[1:-1],
    }
    if text[:2] in ("b'", 'b"') and len(text) > 2 and text[-1] == text[1]:
        # bytes, recorded as their str(): a semantic evaluator is shown them decoded
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            raw = ast.literal_eval(text)
            if isinstance(raw, bytes):
                decoded = raw.decode("utf-8", "replace")
                forms |= {decoded, json.dumps(decoded)[1:-1], repr(decoded)[1:-1]}
    try:
        number = Decimal(text)
        if number.is_finite() and abs(number.adjusted()) <= _MAX_DECIMAL_DIGITS:
            forms |= {str(number), format(number, "f"), str(number.normalize())}
            forms.add(format(number.quantize(_QUANTUM), "f"))
    except ArithmeticError:  # not a number, or one no amount could be
        pass
    return forms


_QUANTUM = Decimal(1).scaleb(-18)


def _hide_counters(extra: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """``extra`` with the totals of counters that add a redacted param hidden."""
    state = extra.get("state")
    if not isinstance(state, list) or not any(
        isinstance(e, dict) and e.get("param") in fields for e in state
    ):
        return extra
    hidden = [
        {**e, "before": REDACTED, "after": REDACTED}
        if isinstance(e, dict) and e.get("param") in fields
        else e
        for e in state
    ]
    return {**extra, "state": hidden}


def _scrub(value: Any, pattern: re.Pattern[str]) -> Any:
    """``value`` with every match of ``pattern`` in its strings (keys too) redacted."""
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, dict):
        return {_scrub(k, pattern): _scrub(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(item, pattern) for item in value]
    return value


# --- sinks --------------------------------------------------------------------------------


class AuditSink:
    """Where chained records go. :meth:`append` chains the record and makes it durable.

    Subclasses implement :meth:`append`: under their own lock, read the chain's head, call
    :meth:`AuditRecord.chained`, store the result and return it; raise :class:`AuditError`
    when the record could not be stored.
    """

    def append(self, record: AuditRecord) -> AuditRecord:
        raise NotImplementedError

    def append_many(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Chain and store ``records`` in order; a sink may make them durable at once.

        A sink that overrides it stores all of them or none (the buffered log retries a
        batch that failed). This default appends one by one: override it when a record
        can fail half way.
        """
        return [self.append(record) for record in records]

    def append_bodies(self, bodies: Sequence[dict[str, Any]]) -> None:
        """Chain and store records given as their :meth:`AuditRecord.to_dict` bodies.

        The buffered log's path: a sink that can chain a body without making a record first
        (:class:`JsonlSink`) saves that work. By default, records are made and appended.
        """
        self.append_many([AuditRecord.from_dict(body) for body in bodies])

    def probe(self) -> None:
        """Raise :class:`AuditError` if records could not be stored now (nothing by default)."""

    def close(self) -> None:
        """Release what the sink holds (nothing, by default)."""


class MemorySink(AuditSink):
    """Keeps the chained records in a list (``records``); for tests and short-lived tools."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self._lock = threading.Lock()

    def append(self, record: AuditRecord) -> AuditRecord:
        return self.append_many((record,))[0]

    def append_many(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """All of ``records`` or none: a record that cannot be chained keeps the batch out."""
        with self._lock:
            last = self.records[-1] if self.records else None
            seq = 0 if last is None else last.seq or 0
            prev = GENESIS if last is None else last.hash or GENESIS
            chained = []
            for record in records:
                seq += 1
                link = record.chained(seq, prev)
                prev = link.hash or GENESIS
                chained.append(link)
            self.records.extend(chained)
            return chained

    def lines(self) -> list[str]:
        """The records as the lines a :class:`JsonlSink` would have written."""
        with self._lock:
            return [r.line() for r in self.records]


class JsonlSink(AuditSink):
    """Appends each record as one canonical JSON line to ``path`` and fsyncs it.

    Safe from many threads and processes: the file is locked (``flock``) from reading the
    last record to the end of the write, so every record chains onto the one before it. The
    folder is created on first write; an existing file is continued from its last line. A
    last line that is torn or not a record stops every write (:class:`AuditError`) until a
    human has looked (``limenex audit verify``): the chain is never silently restarted.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Absolute once: a later chdir must not start a second chain in another folder.
        self.path = Path(os.path.abspath(os.fspath(path)))
        self._lock = threading.Lock()
        _sinks.add(self)

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"

    def append(self, record: AuditRecord) -> AuditRecord:
        return self.append_many((record,))[0]

    def append_many(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Chain ``records`` onto the file's last one and write them with one fsync."""
        links = self._write([record.to_dict() for record in records])
        return [record._linked(*link) for record, link in zip(records, links, strict=True)]

    def append_bodies(self, bodies: Sequence[dict[str, Any]]) -> None:
        self._write(bodies)

    def _write(self, bodies: Sequence[Mapping[str, Any]]) -> list[tuple[int, str, str, str]]:
        """Chain and write the bodies; ``(seq, prev, hash, line)`` of each."""
        if fcntl is None:  # pragma: no cover - Windows
            raise AuditError("JsonlSink needs POSIX file locks (fcntl.flock)")
        if not bodies:
            return []
        with self._lock:
            try:
                fd, created = self._open()
            except OSError as exc:
                raise AuditError(f"cannot open the audit log {self.path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                seq, prev = _head(fd, size, self.path)
                chained = []
                for body in bodies:
                    seq += 1
                    digest, line = chain_body(body, seq, prev)
                    chained.append((seq, prev, digest, line))
                    prev = digest
                data = "".join(link[3] + "\n" for link in chained).encode("ascii")
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except OSError:
                    # Never acknowledged: take a partial line back off, so the chain goes on.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
                if created:
                    _fsync_dir(self.path.parent)
                return chained
            except OSError as exc:
                raise AuditError(f"cannot write the audit log {self.path}: {exc}") from exc
            finally:
                os.close(fd)  # also releases the flock

    def probe(self) -> None:
        """Open the log for appending (creating its folder), as a write would; close it."""
        try:
            fd, created = self._open()
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc}") from exc
        os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    def _open(self) -> tuple[int, bool]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags), False
        except FileNotFoundError:
            return os.open(self.path, flags | os.O_CREAT, 0o600), True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _head(fd: int, size: int, path: Path) -> tuple[int, str]:
    """``(seq, hash)`` of the file's last record; ``(0, GENESIS)`` for an empty file."""
    if size == 0:
        return 0, GENESIS
    lines = _last_lines(fd, size, 1)
    raw = lines[-1] if lines else b""
    if not raw.endswith(b"\n"):
        raise AuditError(
            f"{path} ends in a torn record (no newline): a write was interrupted or the file "
            "was edited; run `limenex audit verify` and repair it before anything is appended"
        )
    try:
        data = json.loads(raw)
        seq, digest = data["seq"], data["hash"]
    except (ValueError, TypeError, KeyError) as exc:
        raise AuditError(
            f"{path}: the last line is not an audit record ({exc}); run `limenex audit verify`"
        ) from exc
    if type(seq) is not int or not _is_hash(digest):
        raise AuditError(
            f"{path}: the last record has no valid seq/hash; run `limenex audit verify`"
        )
    return seq, digest


def _is_hash(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _last_lines(fd: int, size: int, n: int, chunk: int = 8192) -> list[bytes]:
    """The last ``n`` lines of the file (each with its newline, the last maybe without)."""
    end = size
    buffer = b""
    while end > 0:
        start = max(0, end - chunk)
        buffer = os.pread(fd, end - start, start) + buffer
        end = start
        # n complete lines need n newlines before the final line's own, or the file's start.
        if buffer.count(b"\n", 0, len(buffer) - 1) >= n:
            break
    lines = [piece + b"\n" for piece in buffer.split(b"\n")]
    lines[-1] = lines[-1][:-1]  # what follows the last newline: a line without one, or nothing
    if not lines[-1]:
        lines.pop()
    if end > 0:
        lines = lines[1:]  # the first piece may be the end of a longer line
    return lines[-n:]


def read_tail(path: str | os.PathLike[str], n: int) -> list[tuple[int | None, bytes]]:
    """The last ``n`` lines of an audit log, raw; reads from the end, not the whole file.

    Each item is ``(seq, line)`` with ``seq`` taken from the line when it parses, else
    ``None``. Raises :class:`AuditError` when the file cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
    try:
        size = os.fstat(fd).st_size
        lines = _last_lines(fd, size, n) if size and n > 0 else []
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
    finally:
        os.close(fd)
    out: list[tuple[int | None, bytes]] = []
    for raw in lines:
        seq: int | None = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            value = json.loads(raw).get("seq")
            seq = value if type(value) is int else None
        out.append((seq, raw.rstrip(b"\n")))
    return out


# --- the log --------------------------------------------------------------------------------


class AuditLog:
    """Builds, redacts and chains a record for every event, and hands it to the sink.

    An instance is the engine's audit hook: ``PolicyEngine(..., audit_logger=AuditLog(sink))``
    calls it as ``(event, decision, params)``. ``redact`` lists params to replace with
    ``"[redacted]"`` (see :class:`Redactor`); ``processors`` run after it, in order. ``clock``
    returns the epoch seconds stamped on each record (``time.time`` by default).
    """

    def __init__(
        self,
        sink: AuditSink,
        redact: Iterable[str] = (),
        *,
        processors: Iterable[Processor] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(sink, AuditSink):
            raise TypeError(f"sink must be an AuditSink, got {type(sink).__name__}")
        fields = tuple(redact)
        self.sink = sink
        self.processors: tuple[Processor, ...] = (
            *((Redactor(fields),) if fields else ()),
            *processors,
        )
        self.clock = clock

    def write(
        self,
        event: str,
        decision: Decision,
        params: Mapping[str, Any],
        *,
        latency_ms: float | Decimal | None = None,
        state: StateChange | None = None,
        **extra: Any,
    ) -> AuditRecord:
        """Record ``event`` for ``decision``; returns the record as written (chained).

        Raises :class:`AuditError` when the record could not be made durable.
        """
        return self.append(
            self._build(event, decision, params, self.clock(), latency_ms, state, extra)
        )

    def _build(
        self,
        event: str,
        decision: Decision,
        params: Mapping[str, Any],
        at: float,
        latency_ms: float | Decimal | None,
        state: StateChange | None,
        extra: Mapping[str, Any],
    ) -> AuditRecord:
        try:
            return AuditRecord.from_decision(
                event, decision, params, at=at, latency_ms=latency_ms, extra=extra, state=state
            )
        except Exception as exc:
            raise AuditError(f"cannot build the audit record of {event!r}: {exc}") from exc

    def write_request(self, event: str, request: ApprovalRequest, **extra: Any) -> AuditRecord:
        """Record ``event`` on an approval request (see :meth:`AuditRecord.from_request`)."""
        try:
            record = AuditRecord.from_request(event, request, at=self.clock(), extra=extra)
        except Exception as exc:
            raise AuditError(f"cannot build the audit record of {event!r}: {exc}") from exc
        return self.append(record)

    def write_event(self, event: str, reason: str, **extra: Any) -> AuditRecord:
        """Record ``event``, about no call (see :meth:`AuditRecord.from_event`)."""
        try:
            record = AuditRecord.from_event(event, reason, at=self.clock(), extra=extra)
        except Exception as exc:
            raise AuditError(f"cannot build the audit record of {event!r}: {exc}") from exc
        return self.append(record)

    def append(self, record: AuditRecord) -> AuditRecord:
        """Run ``record`` through the processors, then chain and store it in the sink."""
        return self.sink.append(self._processed(record))

    def append_many(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """:meth:`append` for many records, stored by the sink at once (one fsync for a file)."""
        return self.sink.append_many([self._processed(record) for record in records])

    def _processed(self, record: AuditRecord) -> AuditRecord:
        try:
            for step in self.processors:
                record = step(record)
        except AuditError:
            raise
        except Exception as exc:
            raise AuditError(f"cannot process the audit record of {record.event!r}: {exc}") from exc
        return record

    def __call__(
        self,
        event: str,
        decision: Decision,
        params: Mapping[str, Any],
        *,
        started: float | None = None,
        state: StateChange | None = None,
        **extra: Any,
    ) -> None:
        """The engine's hook: ``started`` is the call's ``time.perf_counter()`` at its start."""
        latency = None if started is None else (time.perf_counter() - started) * 1000
        self.write(event, decision, params, latency_ms=latency, state=state, **extra)

    def close(self) -> None:
        self.sink.close()


class BufferedAuditLog:
    """An :class:`AuditLog` written by a background thread: the engine's default audit.

    A call only queues its record (no I/O on the call's path); every ``flush_interval``
    seconds a writer thread builds, redacts and chains the queued records and stores them in
    one batch (one ``fsync`` for a :class:`JsonlSink`). It fails closed: once a batch cannot
    be written, every call raises :class:`AuditError` (so the engine blocks it) until a retry
    succeeds; the unwritten records stay queued, in order, and nothing is dropped. When more
    than ``max_pending`` records wait, calls are refused the same way. :meth:`flush` waits
    until everything queued so far is written; it runs at :meth:`close` and at exit.

    A record is durable within about ``flush_interval`` of the call, not before it: when a
    record must be on disk before the action runs, pass an :class:`AuditLog` instead. With
    buffering, the pre-action ``allowed`` record is not kept apart from its outcome: the
    ``executed`` or ``failed`` record carries the same ALLOW decision, with latency and state.
    """

    def __init__(
        self, log: AuditLog, *, flush_interval: float = 0.2, max_pending: int = 100_000
    ) -> None:
        if not isinstance(log, AuditLog):
            raise TypeError(f"log must be an AuditLog, got {type(log).__name__}")
        if not (isinstance(flush_interval, int | float) and 0 < flush_interval <= 60):
            raise ValueError(f"flush_interval must be in (0, 60] seconds, got {flush_interval!r}")
        if type(max_pending) is not int or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        self.log = log
        self.flush_interval = float(flush_interval)
        self.max_pending = max_pending
        self._setup()
        _buffered.add(self)

    def _setup(self) -> None:
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._failure: BaseException | None = None
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"BufferedAuditLog({self.log.sink!r}, {len(self._queue)} queued)"

    @property
    def sink(self) -> AuditSink:
        return self.log.sink

    def __call__(
        self,
        event: str,
        decision: Decision,
        params: Mapping[str, Any],
        *,
        started: float | None = None,
        state: StateChange | None = None,
        **extra: Any,
    ) -> None:
        """Queue the record of ``event``.

        ``allowed`` (asked before an action runs) raises :class:`AuditError` unless the log
        :meth:`admits` calls; its record is the outcome's (see the class docstring). Any other
        record is queued even while the log is failing, to be written when it recovers; only
        a closed log, or one ``max_pending`` records behind, refuses it.
        """
        if event == "allowed":
            if not self.admits():
                self._refuse()
            return
        if self._closed or len(self._queue) >= self.max_pending:
            self._refuse()
        latency = None if started is None else (time.perf_counter() - started) * 1000
        self._put((event, decision, dict(params), time.time(), latency, state, extra))

    def admits(self) -> bool:
        """Whether a call may run now: the log is writing, open and not too far behind.

        The first call starts the writer, after checking that the sink can be written (a log
        that cannot be opened blocks calls from the first one, not after a failed batch).
        """
        if self._thread is None:
            self._start()
        return self._failure is None and not self._closed and len(self._queue) < self.max_pending

    def outcome(
        self,
        event: str,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        started: float | None,
        state: StateChange | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue the ``executed`` or ``failed`` record of an allowed call; never raises.

        The engine's path for an allowed call, after :meth:`admits`: the ALLOW decision is
        made by the writer. The action has happened, so the record is queued even when the
        log is failing or closed (it is written when the log recovers, or at exit).
        """
        latency = None if started is None else (time.perf_counter() - started) * 1000
        details = extra or _NOTHING
        self._queue.append(
            (event, (skill_id, agent_id), dict(params), time.time(), latency, state, details)
        )
        if self._thread is None:
            self._start()

    def write_request(self, event: str, request: ApprovalRequest, **extra: Any) -> None:
        """Queue the record of ``event`` on an approval request (kept while the log fails)."""
        if self._closed or len(self._queue) >= self.max_pending:
            self._refuse()
        self._put((event, request, None, time.time(), None, None, extra))

    def write_event(self, event: str, reason: str, **extra: Any) -> None:
        """Queue the record of ``event``, about no call (kept while the log fails)."""
        if self._closed or len(self._queue) >= self.max_pending:
            self._refuse()
        try:
            record = AuditRecord.from_event(event, reason, extra=extra)
        except Exception as exc:
            raise AuditError(f"cannot build the audit record of {event!r}: {exc}") from exc
        self._put((event, record, {}, time.time(), None, None, _NOTHING))

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._closed:
            raise AuditError("the audit log is closed")
        self._queue.append(item)
        if self._thread is None:
            self._start()

    def _refuse(self) -> None:
        if self._closed:
            raise AuditError("the audit log is closed")
        failure = self._failure
        if failure is not None:
            raise AuditError(f"the audit log cannot be written: {failure}") from failure
        raise AuditError(
            f"the audit log is {len(self._queue)} records behind (max_pending "
            f"{self.max_pending}): the sink is too slow"
        )

    def _start(self) -> None:
        with self._write_lock:
            if self._thread is None:
                self._probe()
                self._thread = threading.Thread(
                    target=self._run, name="limenex-audit-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self._write_queued()

    def _probe(self) -> None:
        try:
            self.log.sink.probe()
        except Exception as exc:
            if self._failure is None:
                _log.error("limenex: the audit log cannot be written: %s", exc)
            self._failure = exc
        else:
            self._failure = None

    def _write_queued(self) -> None:
        with self._write_lock:
            queue = self._queue
            if not queue and self._failure is not None:
                self._probe()  # nothing to retry: find out whether the sink is back
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), 4096))]
                try:
                    bodies = [self._body(item) for item in batch]
                    try:
                        self.log.sink.append_bodies(bodies)
                    except (TypeError, ValueError):  # a body JSON cannot hold (a processor's)
                        checked = [self._writable(b, i) for b, i in zip(bodies, batch, strict=True)]
                        self.log.sink.append_bodies(checked)
                except BaseException as exc:
                    queue.extendleft(reversed(batch))  # kept, in order, for the next try
                    if self._failure is None:
                        _log.error("limenex: the audit log cannot be written: %s", exc)
                    self._failure = exc
                    break
                self._failure = None

    def _record(self, item: tuple[Any, ...]) -> AuditRecord:
        event, subject, params, at, latency, state, extra = item
        if type(subject) is AuditRecord:  # made by write_event
            record = subject
        elif params is None:
            record = AuditRecord.from_request(event, subject, at=at, extra=extra)
        else:
            if type(subject) is tuple:  # an allowed call's outcome (see outcome())
                subject = allowed_decision(*subject)
            record = self.log._build(event, subject, params, at, latency, state, extra)
        return self.log._processed(record)

    def _body(self, item: tuple[Any, ...]) -> dict[str, Any]:
        """The item's record body; an allowed call's outcome straight, when nothing processes."""
        event, subject, params, at, latency, state, extra = item
        if type(subject) is not tuple or self.log.processors:
            return self._record_or_placeholder(item).to_dict()
        try:
            return self._allowed_body(event, subject, params, at, latency, state, extra)
        except Exception:
            return self._record_or_placeholder(item).to_dict()

    @staticmethod
    def _allowed_body(
        event: str,
        subject: tuple[str, str],
        params: Mapping[str, Any],
        at: float,
        latency: float | None,
        state: StateChange | None,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        skill_id, agent_id = subject
        details: dict[str, Any] = _jsonable(extra) if extra else {}
        if state is not None:
            details["state"] = _state_entries(*state)
        return {  # what AuditRecord.from_decision(...).to_dict() gives, without the detour
            "v": SCHEMA_VERSION,
            "time": _iso(at),
            "event": event,
            "skill_id": skill_id,
            "agent_id": agent_id,
            "params": _jsonable(params),
            "verdict": "ALLOW",
            "reason": allowed_reason(skill_id),
            "policy": None,
            "policy_index": None,
            "observed": None,
            "projected": None,
            "limit": None,
            "fail_closed": False,
            "latency_ms": None if latency is None else _latency(latency),
            "extra": details,
        }

    def _record_or_placeholder(self, item: tuple[Any, ...]) -> AuditRecord:
        """The item's record; if it cannot be built or processed, a record that says so.

        One record that cannot be made (a processor that raises on it) must neither wedge the
        log, blocking every call, nor vanish: its place in the chain holds what is known
        (event, skill, agent, time) and why the rest is missing, without any params.
        """
        try:
            return self._record(item)
        except Exception as exc:
            return self._placeholder(item, exc)

    def _writable(self, body: dict[str, Any], item: tuple[Any, ...]) -> dict[str, Any]:
        """``body`` if it is JSON data, else the placeholder of its item."""
        try:
            canonical_json(body)
        except (TypeError, ValueError) as exc:
            return self._placeholder(item, exc).to_dict()
        return body

    @staticmethod
    def _placeholder(item: tuple[Any, ...], exc: BaseException) -> AuditRecord:
        """What is known of an item whose record cannot be made, and why; no params."""
        event, subject, _, at, *_ = item
        skill, agent = (
            subject
            if type(subject) is tuple
            else (getattr(subject, "skill_id", "?"), getattr(subject, "agent_id", "?"))
        )
        return AuditRecord(
            time=_iso(at),
            event=str(event),
            skill_id=str(skill),
            agent_id=str(agent),
            params={},
            verdict=subject.verdict
            if type(subject) is AuditRecord
            else str(getattr(getattr(subject, "verdict", None), "value", "ALLOW")),
            reason=f"this {event} record could not be made: {_text(exc)[:200]}",
            extra={"unrecordable": type(exc).__name__},
        )

    def flush(self) -> None:
        """Write everything queued so far; raise :class:`AuditError` if it cannot be written.

        It writes in the calling thread, under the writer's lock: when it returns, every
        record queued before the call is in the sink, or the log is failing.
        """
        self._write_queued()
        if self._failure is not None:
            self._refuse()

    def close(self) -> None:
        """Flush, stop the writer and close the sink."""
        try:
            self.flush()
        finally:
            self._closed = True
            self._wake.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
            self.log.close()


_NOTHING: Mapping[str, Any] = {}
_buffered: weakref.WeakSet[BufferedAuditLog] = weakref.WeakSet()
_sinks: weakref.WeakSet[JsonlSink] = weakref.WeakSet()


def _flush_at_exit() -> None:
    for log in list(_buffered):
        if not log._closed:
            with contextlib.suppress(Exception):
                log.flush()


def _after_fork_in_child() -> None:
    # Records queued before the fork belong to the parent, which writes them; a lock another
    # thread held at the fork would never be released in the child.
    for sink in list(_sinks):
        sink._lock = threading.Lock()
    for log in list(_buffered):
        log._setup()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- verification -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :func:`verify` found. ``count``: the records that verified before any break.

    ``first_bad_line`` (1-based) and ``why`` are ``None`` when ``ok``. ``head`` is the hash of
    the last good record (``GENESIS`` for an empty log): store it elsewhere to anchor the chain.
    """

    ok: bool
    count: int
    first_bad_line: int | None = None
    why: str | None = None
    head: str = GENESIS


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "seq": int,
    "prev": str,
    "hash": str,
    "time": str,
    "event": str,
    "skill_id": str,
    "agent_id": str,
    "verdict": str,
}


def verify(path: str | os.PathLike[str], expect_head: str | None = None) -> VerifyResult:
    """Check every line of the log at ``path``: form, hash, ``seq`` and ``prev`` links.

    Stops at the first broken line. ``expect_head`` is a head kept from an earlier verify:
    a chain without a record of that hash fails (records were cut off the end, or the whole
    log was rewritten), with ``first_bad_line`` ``None``. Raises :class:`AuditError` only
    when the file cannot be read (missing, a directory, no permission).
    """
    try:
        with open(path, "rb") as file:
            return verify_lines(file, expect_head)
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc


def verify_lines(lines: Iterable[bytes], expect_head: str | None = None) -> VerifyResult:
    """:func:`verify` over raw lines (each ending in ``\\n``, as read from the file)."""
    count, prev = 0, GENESIS
    seen = expect_head is None or expect_head == GENESIS
    for number, raw in enumerate(lines, start=1):
        why, digest = _check_line(raw, count + 1, prev)
        if why is not None:
            return VerifyResult(False, count, number, why, prev)
        count, prev = count + 1, digest
        seen = seen or digest == expect_head
    if not seen:
        why = (
            f"no record has the expected head {expect_head}: records were cut off the end, or"
            " the log was rewritten"
        )
        return VerifyResult(False, count, None, why, prev)
    return VerifyResult(True, count, None, None, prev)


def _check_line(raw: bytes, seq: int, prev: str) -> tuple[str | None, str]:
    """``(problem, "")`` for a bad line; ``(None, hash)`` for record ``seq`` chained on ``prev``."""
    why = _problem(raw, seq, prev)
    return (why, "") if isinstance(why, str) else (None, why[0])


def _problem(raw: bytes, seq: int, prev: str) -> str | tuple[str]:
    if not raw.endswith(b"\n"):
        return "the last line is incomplete (no newline): truncated or torn write"
    body = raw[:-1]
    if not body.strip():
        return "blank line where a record was expected"
    try:
        text = body.decode("ascii")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return "not a valid JSON record (garbled or truncated)"
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, kind in _REQUIRED.items():
        value = data.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field {key!r} is missing or of the wrong type"
    if not _is_hash(data["hash"]) or not _is_hash(data["prev"]):
        return "'hash' or 'prev' is not a SHA-256 hex digest"
    try:
        canonical = canonical_json(data)
    except ValueError:
        return "not a valid JSON record (garbled or truncated)"
    if canonical != text:
        return "the record is not in canonical form: it was edited"
    if record_hash(data) != data["hash"]:
        return "hash mismatch: the record was edited"
    if data["seq"] != seq:
        return (
            f"seq {data['seq']} where {seq} was expected: "
            "a record was dropped, inserted or reordered"
        )
    if data["prev"] != prev:
        return (
            "prev does not match the previous record's hash: "
            "a record was dropped, inserted or reordered"
        )
    return (data["hash"],)
