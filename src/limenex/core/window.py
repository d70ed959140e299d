"""Time windows for stateful policies.

* **Rolling** (``10s``, ``30m``, ``24h``, ``7d``): an amount recorded at ``t`` counts for
  every instant in ``[t, t + window)`` and stops counting exactly at ``t + window``.
* **Calendar** (``hour``, ``day``, ``week``, ``month``; UTC, weeks start on Monday): an
  amount counts until the period it was recorded in ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["CALENDAR_UNITS", "ROLLING_UNITS", "Window"]

ROLLING_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CALENDAR_UNITS = ("hour", "day", "week", "month")
_ROLLING = re.compile(r"^([1-9][0-9]{0,8})([smhd])$")


@dataclass(frozen=True, slots=True)
class Window:
    """A parsed ``window:`` value. ``spec`` is the canonical text (``"24h"``, ``"day"``)."""

    spec: str
    seconds: int | None = None  # rolling windows
    calendar: str | None = None  # calendar windows

    @classmethod
    def parse(cls, text: str) -> Window:
        """Parse ``"24h"`` or ``"day"``; raise ``ValueError`` with a readable message."""
        if text in CALENDAR_UNITS:
            return cls(spec=text, calendar=text)
        match = _ROLLING.match(text)
        if match is None:
            raise ValueError(
                f"invalid window {text!r}: use a rolling length such as 10s, 30m, 24h, 7d "
                f"or a calendar period: {', '.join(CALENDAR_UNITS)}"
            )
        count, unit = match.groups()
        return cls(spec=text, seconds=int(count) * ROLLING_UNITS[unit])

    @property
    def rolling(self) -> bool:
        return self.seconds is not None

    def bucket(self, now: float) -> str:
        """The calendar period containing ``now`` (``"2026-11-24"`` for ``day``)."""
        if self.calendar is None:
            raise ValueError("bucket() is defined for calendar windows only")
        moment = datetime.fromtimestamp(now, UTC)
        if self.calendar == "hour":
            return moment.strftime("%Y-%m-%dT%H")
        if self.calendar == "day":
            return moment.strftime("%Y-%m-%d")
        if self.calendar == "week":
            year, week, _ = moment.isocalendar()
            return f"{year}-W{week:02d}"
        return moment.strftime("%Y-%m")

    def __str__(self) -> str:
        return self.spec
