"""State stores chosen by URL: ``limenex.stores.from_url("sqlite:///.limenex/state.db")``.

* ``memory://`` — :class:`~limenex.core.stores.InMemoryStateStore`
* ``file://.limenex/state.json`` — :class:`~limenex.core.stores.LocalFileStateStore`
* ``sqlite:///.limenex/state.db`` (relative), ``sqlite:////var/lib/x.db`` (absolute) —
  :class:`~limenex.core.stores.SQLiteStateStore`
* ``redis://host:6379/0``, ``rediss://...`` — :class:`~limenex.stores.redis.RedisStateStore`
* ``postgresql://user@host:5432/db``, ``postgres://...`` —
  :class:`~limenex.stores.postgres.PostgresStateStore`

Store options go in the query string and are taken out before the URL reaches the driver:
``lease_seconds`` (every store), ``synchronous=normal|full`` (SQLite), ``prefix`` (Redis key
prefix), ``schema`` (PostgreSQL schema), ``connect_timeout`` and ``timeout`` (seconds;
Redis and PostgreSQL). Any other query parameter of a Redis or PostgreSQL URL is the
driver's. An option a store does not take is refused, naming it.

The Redis and PostgreSQL clients are optional: ``pip install 'limenex[redis]'`` or
``'limenex[postgres]'``. Without them the URL is refused with that hint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from limenex.core.errors import LimenexConfigError
from limenex.core.state import StateStore

__all__ = ["SCHEMES", "from_url", "redacted"]

_FLOAT_OPTIONS = ("lease_seconds", "connect_timeout", "timeout")
_ALL_OPTIONS = ("lease_seconds", "synchronous", "prefix", "schema", "connect_timeout", "timeout")


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _options(url: str, query: str, allowed: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """Split a query string into our options (typed) and the rest (left for the driver)."""
    ours: dict[str, Any] = {}
    rest = []
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name in ours:
            raise LimenexConfigError(f"state store URL {redacted(url)!r}: {name} given twice")
        if name in allowed:
            if name in _FLOAT_OPTIONS:
                try:
                    ours[name] = float(value)
                except ValueError:
                    raise LimenexConfigError(
                        f"state store URL {redacted(url)!r}: {name} must be a number of "
                        f"seconds, got {value!r}"
                    ) from None
            else:
                ours[name] = value
        elif name in _ALL_OPTIONS:
            raise LimenexConfigError(
                f"state store URL {redacted(url)!r}: this store takes no {name!r} option "
                f"(it takes: {', '.join(allowed)})"
            )
        else:
            rest.append((name, value))
    return ours, urlencode(rest)


def _plain_options(url: str, rest: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """``rest`` without its query string, and the options in it (none may be foreign)."""
    path, _, query = rest.partition("?")
    options, foreign = _options(url, query, allowed)
    if foreign:
        raise LimenexConfigError(
            f"state store URL {redacted(url)!r}: unknown option(s) {foreign!r} "
            f"(known: {', '.join(allowed)})"
        )
    return path, options


def _memory(url: str, rest: str) -> StateStore:
    from limenex.core.stores import InMemoryStateStore

    path, options = _plain_options(url, rest, ("lease_seconds",))
    if path:
        raise LimenexConfigError(f"memory:// takes no path, got {path!r}")
    return InMemoryStateStore(**options)


def _file(url: str, rest: str) -> StateStore:
    from limenex.core.stores import LocalFileStateStore

    path, options = _plain_options(url, rest, ("lease_seconds",))
    return LocalFileStateStore(path or ".limenex/state.json", **options)


def _sqlite(url: str, rest: str) -> StateStore:
    """``sqlite:///relative.db`` and ``sqlite:////absolute.db``, as SQLAlchemy spells them."""
    from limenex.core.stores import SQLiteStateStore

    path, options = _plain_options(url, rest, ("lease_seconds", "synchronous"))
    if not path.startswith("/"):
        raise LimenexConfigError(
            f"state store URL {url!r}: write sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db (three slashes, then the path)"
        )
    path = path[1:]
    if not path or path == ":memory:":
        raise LimenexConfigError(
            f"state store URL {url!r} names no database file (use memory:// for a store "
            "that lives in this process)"
        )
    return SQLiteStateStore(path, **options)


def _optional(module: str, extra: str) -> Any:
    """Import an optional backend; a missing client library gets an install hint."""
    try:
        return importlib.import_module(module)
    except LimenexConfigError:
        raise
    except ImportError as exc:
        raise LimenexConfigError(
            f"this store needs an optional client library ({exc.name or exc}): "
            f"pip install 'limenex[{extra}]'"
        ) from exc


def _redis(url: str, rest: str) -> StateStore:
    allowed = ("lease_seconds", "prefix", "connect_timeout", "timeout")
    parts = urlsplit(url)
    options, query = _options(url, parts.query, allowed)
    backend = _optional("limenex.stores.redis", "redis")
    store: StateStore = backend.RedisStateStore(urlunsplit(parts._replace(query=query)), **options)
    return store


def _postgres(url: str, rest: str) -> StateStore:
    allowed = ("lease_seconds", "schema", "connect_timeout", "timeout")
    parts = urlsplit(url)
    options, query = _options(url, parts.query, allowed)
    backend = _optional("limenex.stores.postgres", "postgres")
    store: StateStore = backend.PostgresStateStore(
        urlunsplit(parts._replace(query=query)), **options
    )
    return store


SCHEMES: dict[str, Callable[[str, str], StateStore]] = {
    "memory": _memory,
    "file": _file,
    "sqlite": _sqlite,
    "redis": _redis,
    "rediss": _redis,
    "postgresql": _postgres,
    "postgres": _postgres,
}
"""URL scheme -> factory taking the whole URL and the rest after ``scheme://``."""


def from_url(url: str) -> StateStore:
    """Build a store from a URL; an unknown scheme lists the known ones."""
    if not isinstance(url, str):
        raise LimenexConfigError(f"a state store URL must be a string, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    factory = SCHEMES.get(scheme.lower()) if sep else None
    if factory is None:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise LimenexConfigError(
            f"unknown state store URL {redacted(url)!r}; known schemes: {known}"
        )
    return factory(url, rest)
