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

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from limenex.core.decision import Decision
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
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "JsonlSink",
    "MemorySink",
    "Processor",
    "Redactor",
    "VerifyResult",
    "canonical_json",
    "path_for",
    "read_tail",
    "record_hash",
    "verify",
    "verify_lines",
]

DEFAULT_PATH = ".limenex/audit.log"
"""Where the CLI reads and writes the audit log unless told otherwise."""

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
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
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
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        if isinstance(value, set | frozenset):
            items.sort(key=canonical_json)
        return items
    return str(value)


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _iso(epoch: float) -> str:
    moment = _dt.datetime.fromtimestamp(epoch, _dt.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


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
    ) -> AuditRecord:
        """The record of ``event`` for ``decision``; ``at`` defaults to now (epoch seconds)."""
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
            observed=_dec(decision.observed),
            projected=_dec(decision.projected),
            limit=_dec(decision.limit),
            fail_closed=decision.fail_closed,
            latency_ms=None if latency_ms is None else _latency(latency_ms),
            extra=_jsonable(extra or {}),
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
        """This record as number ``seq`` of a chain whose previous hash is ``prev``."""
        linked = dataclasses.replace(self, seq=seq, prev=prev, hash=None)
        return dataclasses.replace(linked, hash=record_hash(linked.to_dict()))

    def line(self) -> str:
        """The canonical JSON line (without the newline) a sink writes."""
        return canonical_json(self.to_dict())


def _latency(value: float | Decimal) -> str:
    return format(Decimal(str(value)).quantize(Decimal("0.001")), "f")


# --- processors ---------------------------------------------------------------------------

Processor = Callable[[AuditRecord], AuditRecord]
"""A step of the pipeline: takes a record, returns the (possibly new) record to keep."""


class Redactor:
    """Replaces configured params with ``"[redacted]"`` before anything is hashed or written.

    A field is a top-level param name (``card``) or a dotted path into nested mappings
    (``payload.card.number``); where the path crosses a list, it applies to every item. A
    path that is not there is ignored. The original params are never modified.
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
        for path in self._paths:
            params = _redact(params, path)
        if params is record.params:
            return record
        return dataclasses.replace(record, params=params)

    def __repr__(self) -> str:
        return f"Redactor(fields={list(self.fields)!r})"


def _redact(value: Any, path: Sequence[str]) -> Any:
    """``value`` with ``path`` replaced; the same object when nothing matched (copy on write)."""
    if isinstance(value, list):
        items = [_redact(item, path) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if not isinstance(value, dict) or path[0] not in value:
        return value
    head, rest = path[0], path[1:]
    new = REDACTED if not rest else _redact(value[head], rest)
    if new is value[head]:
        return value
    return {**value, head: new}


# --- sinks --------------------------------------------------------------------------------


class AuditSink:
    """Where chained records go. :meth:`append` chains the record and makes it durable.

    Subclasses implement :meth:`append`: under their own lock, read the chain's head, call
    :meth:`AuditRecord.chained`, store the result and return it; raise :class:`AuditError`
    when the record could not be stored.
    """

    def append(self, record: AuditRecord) -> AuditRecord:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds (nothing, by default)."""


class MemorySink(AuditSink):
    """Keeps the chained records in a list (``records``); for tests and short-lived tools."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self._lock = threading.Lock()

    def append(self, record: AuditRecord) -> AuditRecord:
        with self._lock:
            last = self.records[-1] if self.records else None
            chained = record.chained(
                1 if last is None else (last.seq or 0) + 1,
                GENESIS if last is None else (last.hash or GENESIS),
            )
            self.records.append(chained)
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
        self.path = Path(path)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"

    def append(self, record: AuditRecord) -> AuditRecord:
        if fcntl is None:  # pragma: no cover - Windows
            raise AuditError("JsonlSink needs POSIX file locks (fcntl.flock)")
        with self._lock:
            try:
                fd, created = self._open()
            except OSError as exc:
                raise AuditError(f"cannot open the audit log {self.path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                seq, prev = _head(fd, size, self.path)
                chained = record.chained(seq + 1, prev)
                try:
                    _write_all(fd, (chained.line() + "\n").encode("ascii"))
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
        **extra: Any,
    ) -> AuditRecord:
        """Record ``event`` for ``decision``; returns the record as written (chained).

        Raises :class:`AuditError` when the record could not be made durable.
        """
        try:
            record = AuditRecord.from_decision(
                event, decision, params, at=self.clock(), latency_ms=latency_ms, extra=extra
            )
        except Exception as exc:
            raise AuditError(f"cannot build the audit record of {event!r}: {exc}") from exc
        return self.append(record)

    def write_request(self, event: str, request: ApprovalRequest, **extra: Any) -> AuditRecord:
        """Record ``event`` on an approval request (see :meth:`AuditRecord.from_request`)."""
        try:
            record = AuditRecord.from_request(event, request, at=self.clock(), extra=extra)
        except Exception as exc:
            raise AuditError(f"cannot build the audit record of {event!r}: {exc}") from exc
        return self.append(record)

    def append(self, record: AuditRecord) -> AuditRecord:
        """Run ``record`` through the processors, then chain and store it in the sink."""
        try:
            for step in self.processors:
                record = step(record)
        except AuditError:
            raise
        except Exception as exc:
            raise AuditError(f"cannot process the audit record of {record.event!r}: {exc}") from exc
        return self.sink.append(record)

    def __call__(self, event: str, decision: Decision, params: Mapping[str, Any]) -> None:
        self.write(event, decision, params)

    def close(self) -> None:
        self.sink.close()


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


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check every line of the log at ``path``: form, hash, ``seq`` and ``prev`` links.

    Stops at the first broken line. Raises :class:`AuditError` only when the file cannot be
    read (missing, a directory, no permission).
    """
    try:
        with open(path, "rb") as file:
            return verify_lines(file)
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc


def verify_lines(lines: Iterable[bytes]) -> VerifyResult:
    """:func:`verify` over raw lines (each ending in ``\\n``, as read from the file)."""
    count, prev = 0, GENESIS
    for number, raw in enumerate(lines, start=1):
        why, digest = _check_line(raw, count + 1, prev)
        if why is not None:
            return VerifyResult(False, count, number, why, prev)
        count, prev = count + 1, digest
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
