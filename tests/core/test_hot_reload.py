"""Hot reload: LocalFilePolicyStore applies an edited policy file without a restart, and a
broken edit keeps the last good policies in force (logged once, audited)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limenex.approvals import ApprovalRefused
from limenex.audit import AuditLog, AuditRecord, BufferedAuditLog, JsonlSink, verify
from limenex.cli import main as cli
from limenex.core.decision import Verdict
from limenex.core.engine import EscalationRequired, PolicyEngine
from limenex.core.errors import LimenexConfigError, PolicyFileError
from limenex.core.policy_store import LocalFilePolicyStore, PolicyReload
from limenex.core.stores import InMemoryStateStore

FAST = 0.05  # seconds between checks in most tests

CAP = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: {cap}
      stateful: false
      breach_verdict: BLOCK
"""


def cap(value: int) -> str:
    return CAP.format(cap=value)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` (which calls the store) until it holds, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.01)


def told(store: LocalFilePolicyStore, events: list[PolicyReload], n: int = 1) -> Callable[[], bool]:
    """A condition for :func:`wait_for`: a call to the store has made ``n`` events."""

    def condition() -> bool:
        store.get("finance.spend")
        return len(events) >= n

    return condition


def run_checks(store: LocalFilePolicyStore, seconds: float) -> None:
    """Call the store for a while, so that it checks its files several times."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        store.get("finance.spend")
        time.sleep(0.01)


def limit(store: LocalFilePolicyStore, skill_id: str = "finance.spend") -> Any:
    skill = store.get(skill_id)
    assert skill is not None
    return [policy.value for policy in skill.policies]  # type: ignore[union-attr]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


@pytest.fixture
def make_engine(audit_path: Path) -> Iterator[Callable[..., PolicyEngine]]:
    engines: list[PolicyEngine] = []

    def make(store: LocalFilePolicyStore) -> PolicyEngine:
        engine = PolicyEngine(
            store, InMemoryStateStore(), audit_logger=AuditLog(JsonlSink(audit_path))
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def verdict(engine: PolicyEngine, amount: int) -> Verdict:
    params = {"agent_id": "a", "service": "openai", "amount_usd": amount}
    return engine.evaluate_sync("finance.spend", "a", params).verdict


# --- an edit applies --------------------------------------------------------------------


def test_an_edit_applies_without_restart(
    tmp_path: Path, make_engine: Callable[..., PolicyEngine], audit_path: Path
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    engine = make_engine(LocalFilePolicyStore(path, reload_interval=FAST))
    assert verdict(engine, 300) is Verdict.ALLOW
    write(path, cap(100))
    wait_for(lambda: verdict(engine, 300) is Verdict.BLOCK)
    [record] = [r for r in records(audit_path) if r["event"] == "policies_reloaded"]
    assert record["extra"]["sources"] == [str(path)]
    assert (record["extra"]["skills"], record["extra"]["policies"]) == (1, 1)
    assert verify(audit_path).ok


def test_with_the_default_interval_an_edit_applies_within_about_a_second(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path)
    assert store.reload_interval == 1.0
    write(path, cap(100))
    edited = time.monotonic()
    wait_for(lambda: limit(store) == [100], timeout=3.0)
    assert time.monotonic() - edited < 1.5


def test_a_touched_file_is_not_reloaded(tmp_path: Path) -> None:
    """Only a change of content reloads (and is audited): a new mtime alone does not."""
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    before = store.policy_set
    os.utime(path, (time.time() + 5, time.time() + 5))
    run_checks(store, 0.3)
    assert events == []
    assert store.policy_set is before


def test_an_edit_within_one_mtime_tick_is_noticed(tmp_path: Path) -> None:
    """A coarse clock can give an edit the same mtime and size: the bytes are compared."""
    path = write(tmp_path / "p.yaml", cap(500))
    stat = path.stat()
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    write(path, cap(100))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, same size
    wait_for(lambda: limit(store) == [100])


# --- a broken edit keeps the last good policies -------------------------------------------

Breakage = tuple[Callable[[Path], object], int | None, str | None]
"""How a file is broken, and the line and key its error names."""

BROKEN: dict[str, Breakage] = {
    "typo": (lambda p: write(p, cap(100).replace("param:", "parm:")), 5, "parm"),
    "bad-yaml": (lambda p: write(p, cap(100) + "  - [unclosed\n"), 10, None),
    "deleted": (lambda p: p.unlink(), None, None),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_a_broken_edit_keeps_the_last_good_policy_and_says_so_once(
    breakage: str,
    tmp_path: Path,
    make_engine: Callable[..., PolicyEngine],
    audit_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    engine = make_engine(store)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    good = store.policy_set
    breaks, line, key = BROKEN[breakage]
    caplog.set_level(logging.WARNING, logger="limenex")
    breaks(path)
    wait_for(told(store, events))
    run_checks(store, 0.3)  # several more checks of the same broken file
    assert store.policy_set is good
    assert verdict(engine, 300) is Verdict.ALLOW  # the cap of 500 is still in force
    assert verdict(engine, 600) is Verdict.BLOCK
    [event] = events
    assert not event.ok
    assert event.policy_set is good
    assert event.error is not None
    assert (event.error.path, event.error.line, event.error.key) == (str(path), line, key)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(event.error) in warnings[0].getMessage()
    [record] = [r for r in records(audit_path) if r["event"] == "policies_rejected"]
    assert (record["extra"]["file"], record["extra"]["line"], record["extra"]["key"]) == (
        str(path),
        line,
        key,
    )
    assert str(event.error) in record["reason"]
    assert verify(audit_path).ok
    # Fixed, it applies.
    write(path, cap(100))
    wait_for(lambda: verdict(engine, 300) is Verdict.BLOCK)
    assert [e.ok for e in events] == [False, True]
    assert [r["event"] for r in records(audit_path)][-1] == "policies_reloaded"
    assert verify(audit_path).ok


def test_a_broken_file_is_tried_again_when_it_changes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    caplog.set_level(logging.WARNING, logger="limenex")
    write(path, cap(100).replace("param:", "parm:"))
    wait_for(told(store, events))
    write(path, cap(100).replace("operator:", "oprator:"))
    wait_for(told(store, events, 2))
    run_checks(store, 0.2)
    assert [e.error.key for e in events if e.error is not None] == ["parm", "oprator"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert limit(store) == [500]


def test_audit_tail_shows_a_refused_edit_readably(
    tmp_path: Path, make_engine: Callable[..., PolicyEngine], audit_path: Path
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    make_engine(store)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    write(path, cap(100).replace("param:", "parm:"))
    wait_for(told(store, events))
    done = CliRunner().invoke(cli, ["audit", "tail", "--path", str(audit_path)])
    assert done.exit_code == 0, done.output
    [line] = done.output.splitlines()
    assert "policies_rejected" in line
    assert f"{path}:5: parm: unknown key (did you mean 'param'?)" in line
    done = CliRunner().invoke(cli, ["audit", "verify", "--path", str(audit_path)])
    assert done.exit_code == 0, done.output


def test_a_buffered_audit_log_records_reloads(tmp_path: Path) -> None:
    """The engine's default kind of audit log (queued, written by a thread) takes them too."""
    path = write(tmp_path / "p.yaml", cap(500))
    audit_path = tmp_path / "audit.log"
    audit = BufferedAuditLog(AuditLog(JsonlSink(audit_path)))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    engine = PolicyEngine(store, InMemoryStateStore(), audit_logger=audit)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    write(path, "")  # an empty file is refused
    wait_for(told(store, events))
    write(path, cap(100))
    wait_for(lambda: verdict(engine, 300) is Verdict.BLOCK)
    engine.close()
    audit.close()
    assert [r["event"] for r in records(audit_path)] == ["policies_rejected", "policies_reloaded"]
    assert records(audit_path)[0]["extra"]["problem"].startswith("the file is empty")
    assert verify(audit_path).ok


def test_an_event_record_a_processor_cannot_take_keeps_its_place_in_the_chain(
    tmp_path: Path,
) -> None:
    audit_path = tmp_path / "audit.log"

    def refuse(record: AuditRecord) -> AuditRecord:
        raise ValueError("no")

    audit = BufferedAuditLog(AuditLog(JsonlSink(audit_path), processors=[refuse]))
    audit.write_event("policies_reloaded", "policies reloaded from p.yaml", path="p.yaml")
    audit.close()
    [record] = records(audit_path)
    assert (record["event"], record["verdict"], record["skill_id"]) == ("policies_reloaded", "", "")
    assert record["reason"].startswith("this policies_reloaded record could not be made")
    assert verify(audit_path).ok


# --- _extends parents ---------------------------------------------------------------------

CHILD = """\
_extends: base.yaml
comms.send:
  policies: []
"""


def test_an_edit_of_a_parent_applies(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", cap(500))
    store = LocalFilePolicyStore(write(tmp_path / "p.yaml", CHILD), reload_interval=FAST)
    assert store.policy_set.sources == (str(tmp_path / "p.yaml"), str(base))
    write(base, cap(100))
    wait_for(lambda: limit(store) == [100])
    assert store.get("comms.send") is not None


@pytest.mark.parametrize("breakage", ["typo", "deleted"])
def test_a_broken_parent_keeps_the_last_good_policy(
    breakage: str,
    tmp_path: Path,
    make_engine: Callable[..., PolicyEngine],
    audit_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = write(tmp_path / "base.yaml", cap(500))
    child = write(tmp_path / "p.yaml", CHILD)
    store = LocalFilePolicyStore(child, reload_interval=FAST)
    engine = make_engine(store)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    caplog.set_level(logging.WARNING, logger="limenex")
    BROKEN[breakage][0](base)
    wait_for(told(store, events))
    run_checks(store, 0.2)
    assert limit(store) == [500]
    assert verdict(engine, 300) is Verdict.ALLOW
    [event] = events
    assert event.error is not None
    if breakage == "typo":  # the parent's own line
        assert (event.error.path, event.error.line, event.error.key) == (str(base), 5, "parm")
    else:  # the child's _extends line names the parent that is gone
        assert (event.error.path, event.error.line, event.error.key) == (str(child), 1, "_extends")
        assert "file not found" in event.error.problem
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    [record] = [r for r in records(audit_path) if r["event"] == "policies_rejected"]
    assert record["extra"]["file"] == event.error.path
    assert verify(audit_path).ok
    write(base, cap(100))
    wait_for(lambda: limit(store) == [100])


def test_a_parent_created_after_a_failed_load_is_picked_up(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", cap(500))
    child = write(tmp_path / "p.yaml", CHILD)
    store = LocalFilePolicyStore(child, reload_interval=FAST)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    write(child, CHILD.replace("base.yaml", "strict.yaml"))  # not there yet
    wait_for(told(store, events))
    assert events[0].error is not None
    assert "strict.yaml" in events[0].error.problem
    assert str(tmp_path / "strict.yaml") in events[0].sources  # watched: tried to read it
    write(tmp_path / "strict.yaml", cap(20))
    wait_for(lambda: limit(store) == [20])
    assert events[-1].ok
    assert events[-1].sources == (str(child), str(tmp_path / "strict.yaml"))


# --- concurrency --------------------------------------------------------------------------

TWO_SKILLS = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: {v}
      stateful: false
      breach_verdict: BLOCK
finance.charge:
  policies:
    - type: deterministic
      dimension: single_charge
      param: amount
      operator: lte
      value: {v}
      stateful: false
      breach_verdict: BLOCK
"""


def test_threads_calling_during_reloads_always_see_one_complete_valid_set(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.yaml", TWO_SKILLS.format(v=1))
    store = LocalFilePolicyStore(path, reload_interval=0.001)
    engine = PolicyEngine(store, InMemoryStateStore(), audit_logger=False)
    stop = threading.Event()
    problems: list[BaseException | str] = []
    seen: set[str] = set()

    def call() -> None:
        try:
            while not stop.is_set():
                policy_set = store.policy_set
                values = {str(s.policies[0].value) for s in policy_set.skills.values()}  # type: ignore[union-attr]
                if len(values) != 1 or len(policy_set.skills) != 2:
                    problems.append(f"a mixed or partial set: {values}")
                seen.update(values)
                if store.get("finance.spend") is None:
                    problems.append("finance.spend vanished")
                engine.skill("finance.charge")
                time.sleep(0)  # let the writer run too
        except BaseException as exc:
            problems.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for n in range(2, 14):
            if n % 5 == 0:  # a broken edit, written in place, is refused
                write(path, TWO_SKILLS.format(v=n).replace("param:", "parm:"))
            else:  # a good one, by rename
                temp = write(tmp_path / "p.yaml.tmp", TWO_SKILLS.format(v=n))
                os.replace(temp, path)
            time.sleep(0.15)  # past the settle time: each good edit may be applied
        write(path, TWO_SKILLS.format(v=100))
        wait_for(lambda: "100" in seen)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        engine.close()
    assert problems == []
    assert len(seen) > 2  # reloads did happen while the threads were calling


# --- switches and listeners ---------------------------------------------------------------


def test_reload_interval_none_never_reloads(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    for off in (None, 0):
        store = LocalFilePolicyStore(path, reload_interval=off)
        assert store.reload_interval is None
        write(path, cap(100 if off is None else 500))
        run_checks(store, 0.2)
        assert limit(store) == [500 if off is None else 100]
        store.reload()  # an explicit reload still reads the file
        assert limit(store) == [100 if off is None else 500]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True])
def test_a_bad_reload_interval_is_refused(tmp_path: Path, bad: Any) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    with pytest.raises(LimenexConfigError, match="reload_interval"):
        LocalFilePolicyStore(path, reload_interval=bad)


def test_a_listener_that_raises_does_not_break_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    engine = PolicyEngine(store, InMemoryStateStore(), audit_logger=False)
    events: list[PolicyReload] = []

    def broken(event: PolicyReload) -> None:
        raise RuntimeError("listener down")

    store.subscribe(broken)
    store.subscribe(events.append)  # a later listener is still told
    write(path, cap(100))
    wait_for(lambda: verdict(engine, 300) is Verdict.BLOCK)
    assert [e.ok for e in events] == [True]
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)
    engine.close()


def test_unsubscribe_and_engine_close_stop_the_notices(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=None)
    events: list[PolicyReload] = []
    unsubscribe = store.subscribe(events.append)
    engine = PolicyEngine(store, InMemoryStateStore(), audit_logger=False)
    assert len(store._listeners) == 2
    engine.close()
    unsubscribe()
    unsubscribe()  # twice is harmless
    store.reload()
    assert events == []
    assert store._listeners == []


def test_explicit_reload_raises_on_a_broken_file_and_tells_the_listeners(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "p.yaml", cap(500))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    good = store.policy_set
    write(path, cap(100).replace("param:", "parm:"))
    with pytest.raises(PolicyFileError, match="parm"):
        store.reload()
    assert store.policy_set is good
    assert [e.ok for e in events] == [False]
    run_checks(store, 0.2)  # the watcher does not try the same broken file again
    assert len(events) == 1
    write(path, cap(100))
    assert store.reload() is store.policy_set
    assert limit(store) == [100]
    assert [e.ok for e in events][:2] == [False, True]


def test_an_approval_does_not_survive_a_reload_that_changes_its_policies(
    tmp_path: Path, make_engine: Callable[..., PolicyEngine]
) -> None:
    """A human approved the call under the old policies: after an edit it is escalated again."""
    path = write(tmp_path / "p.yaml", cap(500).replace("BLOCK", "ESCALATE"))
    store = LocalFilePolicyStore(path, reload_interval=FAST)
    engine = make_engine(store)
    paid: list[int] = []

    @engine.governed("finance.spend")
    def spend(agent_id: str, service: str, amount_usd: int) -> None:
        paid.append(amount_usd)

    with pytest.raises(EscalationRequired) as escalated:
        spend("a", "openai", 600)
    request_id = str(escalated.value.request_id)
    engine.approvals.approve_sync(request_id, approver="ops")
    write(path, cap(700).replace("BLOCK", "ESCALATE"))
    wait_for(lambda: limit(store) == [700])
    with pytest.raises(ApprovalRefused) as refused:
        engine.resume_sync(request_id)
    assert refused.value.why == "policies"
    assert paid == []


# --- found by review --------------------------------------------------------------------------


def test_a_chdir_does_not_swap_in_another_folders_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative names are read from the folder they were given in, however the process
    moves later: an agent's tool entering a workspace with a lax policy file changes nothing."""
    project, workspace = tmp_path / "project", tmp_path / "workspace"
    for folder, value in ((project, 100), (workspace, 10_000)):
        (folder / ".limenex").mkdir(parents=True)
        write(folder / ".limenex" / "policies.yaml", cap(value))
    monkeypatch.chdir(project)
    store = LocalFilePolicyStore(reload_interval=FAST)
    monkeypatch.chdir(workspace)
    run_checks(store, 0.3)
    assert limit(store) == [100]
    write(project / ".limenex" / "policies.yaml", cap(50))  # its own file is still watched
    wait_for(lambda: limit(store) == [50])


def test_a_file_being_written_is_not_applied_until_it_stands_still(tmp_path: Path) -> None:
    """A half-written file can parse with policies missing: it must not be applied."""
    path = write(tmp_path / "p.yaml", cap(100) + DENY)
    store = LocalFilePolicyStore(path, reload_interval=0.01)
    events: list[PolicyReload] = []
    store.subscribe(events.append)
    with path.open("w") as half:  # truncate, then write only the first policy
        half.write(cap(100))
        half.flush()
        run_checks(store, 0.05)  # well inside the settle time: never applied
        assert events == []
        assert len(store.get("finance.spend").policies) == 2  # type: ignore[union-attr]
        half.write(DENY.replace("aws", "gcp"))
    wait_for(told(store, events))
    (event,) = events
    assert event.ok
    assert store.get("finance.spend").policies[1].values == ("gcp",)  # type: ignore[union-attr]


DENY = """\
    - type: deterministic
      dimension: denied_services
      param: service
      operator: not_in
      values: [aws]
      breach_verdict: BLOCK
"""


def test_an_engine_dropped_without_close_is_collected(tmp_path: Path) -> None:
    import gc
    import weakref

    store = LocalFilePolicyStore(write(tmp_path / "p.yaml", cap(100)), reload_interval=FAST)
    engines = [PolicyEngine(store, InMemoryStateStore(), audit_logger=False) for _ in range(20)]
    refs = [weakref.ref(engine) for engine in engines]
    del engines
    gc.collect()
    assert [ref() for ref in refs] == [None] * 20
    assert store._listeners == []  # their subscriptions ended with them
