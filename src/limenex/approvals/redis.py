"""Approval requests in Redis, under the key prefix of the Redis state store.

:class:`RedisApprovalStore` keeps each request as one string key holding the canonical JSON
text of its :meth:`~limenex.approvals.request.ApprovalRequest.to_dict`, and the ids of the
requests still waiting for a human in a sorted set scored by ``created_at``::

    {p}:approval:<id>      string  canonical JSON of the request
    {p}:approvals:waiting  zset    id -> created_at, for each request kept as pending

Every key starts with ``{prefix}:`` (a hash tag), so a store's keys share one hash slot with
each other and with the state store's: transactions work on Redis Cluster. A request leaves
the index when it is approved or denied; one that expires while pending stays in it (expiry
is read, never stored) and ``pending`` filters it out.

A change is an optimistic transaction: ``WATCH`` the request's key, read it, apply the
transition in Python (:func:`~limenex.approvals.store.decide`,
:func:`~limenex.approvals.store.use`), then ``MULTI``/``EXEC`` the new value (and the index
update). If another client changed the key in between, ``EXEC`` does nothing and the whole
step is run again on the new value, so of any number of concurrent consumes, on any number
of hosts, exactly one succeeds and the others read ``used``. ``create`` watches the key too
and refuses an id already kept.

Every failure of the server or the connection is an
:class:`~limenex.approvals.request.ApprovalStoreError` naming the server (never a password);
a value that does not read back as a request is a
:class:`~limenex.core.errors.CorruptStateError`. The client is thread-safe and fork-safe
(redis-py's connection pool); the async methods run the sync ones on a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
import redis.backoff
import redis.exceptions
import redis.retry

from limenex.approvals.request import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreError,
    canonical_json,
)
from limenex.approvals.store import BlockingApprovalStore
from limenex.core.errors import CorruptStateError, LimenexConfigError, LimenexError

__all__ = ["RedisApprovalStore"]

_T = TypeVar("_T")
_ATTEMPTS = 1000
"""Optimistic attempts of one change before giving up (each failed one means another won)."""
_CHUNK = 500
"""Requests read per ``MGET`` by ``pending``."""


class RedisApprovalStore(BlockingApprovalStore):
    """Approval requests in one Redis database, under one key prefix; see the module docstring.

    ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL as redis-py reads it.
    ``prefix`` is the state store's (letters without braces). ``connect_timeout`` bounds
    opening a connection and ``timeout`` each command, in seconds.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "limenex",
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise LimenexConfigError(
                f"prefix must be a non-empty string without braces, got {prefix!r}"
            )
        for name, value in (("connect_timeout", connect_timeout), ("timeout", timeout)):
            if type(value) not in (int, float) or not 0 < value < float("inf"):
                raise LimenexConfigError(f"{name} must be a positive number of seconds")
        self.prefix = prefix
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)
        if not isinstance(url, str):
            raise LimenexConfigError(f"the Redis URL must be a string, got {type(url).__name__}")
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.timeout,
                decode_responses=True,
                # One quick retry of a command on a dropped connection; a transaction whose
                # keys are watched is never retried by redis-py (we run it again ourselves).
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise LimenexConfigError(f"not a Redis URL: {exc}") from None
        options = self._client.connection_pool.connection_kwargs
        self._password = str(options.get("password") or "")
        if "path" in options:
            self.server = str(options["path"])
        else:
            host = str(options.get("host", "localhost"))
            port = options.get("port", 6379)
            self.server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._key = "{" + prefix + "}:approval:"
        self._waiting = "{" + prefix + "}:approvals:waiting"

    def __repr__(self) -> str:
        return f"RedisApprovalStore({self.server!r}, prefix={self.prefix!r})"

    # --- the operations -------------------------------------------------------------------

    def create(self, request: ApprovalRequest) -> None:
        key = self._key + request.id
        text = canonical_json(request.to_dict())

        def insert(pipe: Any) -> None:
            pipe.watch(key)
            if pipe.exists(key):
                raise ApprovalStoreError(f"an approval request {request.id!r} already exists")
            pipe.multi()
            pipe.set(key, text)
            if request.status is ApprovalStatus.PENDING:
                pipe.zadd(self._waiting, {request.id: request.created_at})
            pipe.execute()

        self._transact(insert)

    def get(self, request_id: str, now: float) -> ApprovalRequest | None:
        if not isinstance(request_id, str):
            return None
        key = self._key + request_id
        with self._errors():
            text = self._client.get(key)
        request = self._request(key, text)
        return None if request is None else request.at(now)

    def pending(self, now: float) -> list[ApprovalRequest]:
        found: list[ApprovalRequest] = []
        with self._errors():
            ids = [str(rid) for rid in self._client.zrange(self._waiting, 0, -1)]
            for start in range(0, len(ids), _CHUNK):
                keys = [self._key + rid for rid in ids[start : start + _CHUNK]]
                for key, text in zip(keys, self._client.mget(keys), strict=True):
                    request = self._request(key, text)
                    if request is not None and request.at(now).status is ApprovalStatus.PENDING:
                        found.append(request)
        return sorted(found, key=lambda r: (r.created_at, r.id))

    def transition(
        self, step: Callable[[ApprovalRequest | None], ApprovalRequest], request_id: str
    ) -> ApprovalRequest:
        """Watch the request, apply ``step`` and write the result back: one transaction."""
        if not isinstance(request_id, str):
            return step(None)  # refused: there is no such request
        key = self._key + request_id

        def change(pipe: Any) -> ApprovalRequest:
            pipe.watch(key)
            done = step(self._request(key, pipe.get(key)))
            pipe.multi()
            pipe.set(key, canonical_json(done.to_dict()))
            if done.status is not ApprovalStatus.PENDING:
                pipe.zrem(self._waiting, done.id)
            pipe.execute()
            return done

        return self._transact(change)

    def close(self) -> None:
        """Close the connections; the next call opens new ones."""
        with self._errors():
            self._client.close()

    # --- transactions and errors ----------------------------------------------------------

    def _transact(self, operation: Callable[[Any], _T]) -> _T:
        """``operation(pipeline)``, run again while another client changes a watched key."""
        with self._errors():
            with self._client.pipeline(transaction=True) as pipe:
                for _ in range(_ATTEMPTS):
                    try:
                        return operation(pipe)
                    except redis.exceptions.WatchError:
                        pipe.reset()
                        continue
            raise ApprovalStoreError(
                f"Redis at {self.server}: an approval request kept changing under"
                f" {_ATTEMPTS} attempts to change it"
            )

    def _request(self, key: str, text: object) -> ApprovalRequest | None:
        if text is None:
            return None
        try:
            if not isinstance(text, str):
                raise TypeError(f"expected text, got {type(text).__name__}")
            request = ApprovalRequest.from_dict(json.loads(text))
            if self._key + request.id != key:
                raise ValueError(f"it holds the request {request.id!r}")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CorruptStateError(
                f"Redis at {self.server}: key {key!r} holds no approval request this store can"
                f" read ({type(exc).__name__}: {exc}). It was left as found: fix or delete it."
            ) from None
        return request

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Every failure of the client as an :class:`ApprovalStoreError` naming the server."""
        try:
            yield
        except (ApprovalRefused, LimenexError):
            raise
        except (redis.exceptions.RedisError, OSError, UnicodeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if self._password:
                reason = reason.replace(self._password, "***")
            raise ApprovalStoreError(f"Redis at {self.server} failed: {reason}") from None
