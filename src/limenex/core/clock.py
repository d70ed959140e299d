"""Time as the engine sees it. Inject a clock; never read ``time.time()`` in decision logic."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now() -> float``: seconds since the Unix epoch, UTC."""

    def now(self) -> float: ...


class SystemClock:
    """The wall clock (``time.time``)."""

    __slots__ = ()

    # The builtin itself, not a Python method wrapping it: ``clock.now()`` is on every call.
    now = staticmethod(time.time)
