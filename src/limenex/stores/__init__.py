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
prefix), ``schema`` (PostgreSQL schema), ``timeout`` (seconds: how long an operation, or for
SQLite a wait for another writer's lock, may take) and ``connect_timeout`` (seconds; Redis and
PostgreSQL). Any other query parameter of a Redis or PostgreSQL URL is the
driver's. An option a store does not take is refused, naming it.

The Redis and PostgreSQL clients are optional: ``pip install 'limenex[redis]'`` or
``'limenex[postgres]'``. Without them the URL is refused with that hint.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from limenex.core.errors import LimenexConfigError
from limenex.core.state import StateStore

__all__ = ["SCHEMES", "from_url", "redacted"]

_FLOAT_OPTIONS = ("lease_seconds", "connect_timeout", "timeout")
_ALL_OPTIONS = ("lease_seconds", "synchronous", "prefix", "schema", "connect_timeout", "timeout")


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs.

    Both spellings the drivers take: ``user:password@host`` and a query parameter whose name
    ends in ``password`` (``?password=``, libpq's ``sslpassword``). The text is cut by hand,
    not by ``urlsplit``: a URL it cannot read (a bad port, a ``#`` or ``?`` left unencoded
    in the password) must be redacted too, never raise or show the password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = rest.find("/")
    authority, path = (rest, "") if end < 0 else (rest[:end], rest[end:])
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}" + _QUERY_PASSWORD.sub(r"\1***", host + path)


_QUERY_PASSWORD = re.compile(r"([?&;][^=&;#/]*password=)[^&;#]*", re.IGNORECASE)


def _options(url: str, query: str, allowed: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """Split a query string into our options (typed) and the rest (left for the driver).

    The rest is passed on exactly as written, never decoded and encoded again: libpq reads
    ``+`` as a plus and ``%20`` as a space, where re-encoding would swap them.
    """
    ours: dict[str, Any] = {}
    rest = []
    for piece in query.split("&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition("=")
        name, value = unquote_plus(raw_name), unquote_plus(raw_value)
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
            rest.append(piece)
    return ours, "&".join(rest)


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

    path, options = _plain_options(url, rest, ("lease_seconds", "synchronous", "timeout"))
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
