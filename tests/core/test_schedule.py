"""Schedule policies: calls in bounds only inside a weekly time window (business hours)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from limenex.core.decision import Verdict
from limenex.core.engine import EscalationRequired, PolicyEngine
from limenex.core.errors import PolicyFileError
from limenex.core.policy_store import InMemoryPolicyStore, load_policy_text, policy_json_schema
from limenex.testing import FrozenClock

BUSINESS_HOURS = """\
finance.spend:
  policies:
    - type: schedule
      dimension: business_hours
      days: [mon, tue, wed, thu, fri]
      hours: "09:00-17:30"
      timezone: Europe/Berlin
      breach_verdict: ESCALATE
"""

NIGHT_SHIFT = BUSINESS_HOURS.replace("09:00-17:30", "22:00-06:00").replace(
    "[mon, tue, wed, thu, fri]", "[fri]"
)

BERLIN = ZoneInfo("Europe/Berlin")


def _engine(text: str, when: datetime) -> PolicyEngine:
    return PolicyEngine(
        InMemoryPolicyStore.from_yaml(text),
        "memory://",
        audit_logger=False,
        clock=FrozenClock(when),
    )


def _verdict(text: str, when: datetime) -> Verdict:
    engine = _engine(text, when)
    try:
        return engine.evaluate_sync("finance.spend", "a", {"service": "s", "amount_usd": 1}).verdict
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("local", "verdict"),
    [
        (datetime(2026, 11, 24, 9, 0), Verdict.ALLOW),  # Tuesday, opening minute
        (datetime(2026, 11, 24, 17, 29), Verdict.ALLOW),
        (datetime(2026, 11, 24, 17, 30), Verdict.ESCALATE),  # the end is excluded
        (datetime(2026, 11, 24, 8, 59), Verdict.ESCALATE),
        (datetime(2026, 11, 28, 12, 0), Verdict.ESCALATE),  # Saturday
        (datetime(2026, 3, 30, 9, 30), Verdict.ALLOW),  # Monday after the switch to summer time
    ],
)
def test_business_hours_in_the_policy_time_zone(local: datetime, verdict: Verdict) -> None:
    assert _verdict(BUSINESS_HOURS, local.replace(tzinfo=BERLIN)) is verdict


def test_the_time_zone_is_the_policys_not_the_machines() -> None:
    # 08:30 UTC on a Tuesday in winter is 09:30 in Berlin: inside.
    assert _verdict(BUSINESS_HOURS, datetime(2026, 11, 24, 8, 30, tzinfo=UTC)) is Verdict.ALLOW
    # 16:45 UTC is 17:45 in Berlin: outside.
    assert _verdict(BUSINESS_HOURS, datetime(2026, 11, 24, 16, 45, tzinfo=UTC)) is Verdict.ESCALATE


@pytest.mark.parametrize(
    ("local", "verdict"),
    [
        (datetime(2026, 11, 27, 23, 0), Verdict.ALLOW),  # Friday night
        (datetime(2026, 11, 28, 5, 59), Verdict.ALLOW),  # ...until Saturday 06:00
        (datetime(2026, 11, 28, 6, 0), Verdict.ESCALATE),
        (datetime(2026, 11, 28, 23, 0), Verdict.ESCALATE),  # Saturday night is not listed
        (datetime(2026, 11, 27, 5, 0), Verdict.ESCALATE),  # Friday early is Thursday's night
    ],
)
def test_a_window_past_midnight_belongs_to_the_day_it_opens(
    local: datetime, verdict: Verdict
) -> None:
    assert _verdict(NIGHT_SHIFT, local.replace(tzinfo=BERLIN)) is verdict


def test_the_reason_names_the_local_time_and_the_window() -> None:
    engine = _engine(BUSINESS_HOURS, datetime(2026, 11, 28, 12, 0, tzinfo=BERLIN))
    with pytest.raises(EscalationRequired) as escalated:
        engine.execute_sync("finance.spend", "a", {"service": "s", "amount_usd": 1}, lambda: 1)
    assert escalated.value.decision.reason == (
        "finance.spend: the call at Sat 12:00 Europe/Berlin is outside business_hours "
        "(mon, tue, wed, thu, fri 09:00-17:30) (policy 1, ESCALATE)."
    )
    engine.close()


@given(minutes=st.integers(min_value=0, max_value=7 * 24 * 60 - 1))
def test_inside_exactly_when_a_clock_on_the_wall_says_so(minutes: int) -> None:
    monday = datetime(2026, 11, 23, tzinfo=UTC)  # UTC: no DST to reason about here
    when = monday + timedelta(minutes=minutes)
    text = BUSINESS_HOURS.replace("Europe/Berlin", "UTC")
    inside = when.weekday() < 5 and (9 * 60) <= when.hour * 60 + when.minute < (17 * 60 + 30)
    assert (_verdict(text, when) is Verdict.ALLOW) == inside


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("09:00-17:30", "9-5"),
            "p.yaml:6: hours: expected hours such as 09:00-17:30 (24-hour "
            "clock), got '9-5' (write both ends as HH:MM)",
        ),
        (
            ("09:00-17:30", "09:00-09:00"),
            "p.yaml:6: hours: hours '09:00-09:00' start and end at the same time",
        ),
        (
            ("Europe/Berlin", "Mars/Olympus"),
            "p.yaml:7: timezone: unknown time zone "
            "'Mars/Olympus' (use an IANA name such as America/New_York)",
        ),
        (
            ("[mon, tue, wed, thu, fri]", "[monday]"),
            "p.yaml:5: days: unknown day the string "
            "'monday': use mon, tue, wed, thu, fri, sat, sun (did you mean 'mon'?)",
        ),
        (("[mon, tue, wed, thu, fri]", "[mon, mon]"), "p.yaml:5: days: day mon is listed twice"),
        (
            ("timezone:", "time_zone:"),
            "p.yaml:7: time_zone: unknown key (did you mean 'timezone'?)",
        ),
    ],
)
def test_schedule_mistakes_name_file_line_and_key(change: tuple[str, str], message: str) -> None:
    with pytest.raises(PolicyFileError) as error:
        load_policy_text(BUSINESS_HOURS.replace(*change), "p.yaml")
    assert str(error.value) == message


def test_the_schema_knows_schedules() -> None:
    schema = policy_json_schema()
    jsonschema.validate(yaml.safe_load(BUSINESS_HOURS), schema)
    for change in (("09:00-17:30", "9-5"), ("timezone:", "time_zone:"), ("[mon,", "[monday,")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(BUSINESS_HOURS.replace(*change)), schema)


def test_validate_counts_a_schedule_as_deterministic() -> None:
    counts = load_policy_text(BUSINESS_HOURS).counts
    assert (counts.deterministic, counts.semantic) == (1, 0)
