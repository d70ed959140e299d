"""State stores chosen by URL: ``limenex.stores.from_url("file://.limenex/state.json")``."""

from __future__ import annotations

from collections.abc import Callable

from limenex.core.errors import LimenexConfigError
from limenex.core.state import StateStore

__all__ = ["SCHEMES", "from_url"]


def _memory(rest: str) -> StateStore:
    from limenex.core.stores import InMemoryStateStore

    if rest:
        raise LimenexConfigError(f"memory:// takes no path, got {rest!r}")
    return InMemoryStateStore()


def _file(rest: str) -> StateStore:
    from limenex.core.stores import LocalFileStateStore

    return LocalFileStateStore(rest or ".limenex/state.json")


SCHEMES: dict[str, Callable[[str], StateStore]] = {
    "memory": _memory,
    "file": _file,
}
"""URL scheme -> factory taking the rest of the URL after ``scheme://``."""


def from_url(url: str) -> StateStore:
    """Build a store from a URL; an unknown scheme lists the known ones."""
    scheme, sep, rest = url.partition("://")
    factory = SCHEMES.get(scheme) if sep else None
    if factory is None:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise LimenexConfigError(f"unknown state store URL {url!r}; known schemes: {known}")
    return factory(rest)
