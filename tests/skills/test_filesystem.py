"""Filesystem skills normalise paths before policies see them and act on the checked path."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import InvalidArgumentError
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.skills.filesystem import make_delete, make_move, make_write


def engine_protecting(root: Path) -> PolicyEngine:
    policy = f"""
    filesystem.{{skill}}:
      policies:
        - type: deterministic
          dimension: protected_paths
          param: {{param}}
          operator: not_in
          values: ["{root / "protected"}"]
          match: path
          breach_verdict: BLOCK
    """
    text = "".join(
        textwrap.dedent(policy).format(skill=skill, param=param)
        for skill, param in [("write", "filepath"), ("delete", "filepath"), ("move", "dst")]
    )
    return PolicyEngine(policy_store=InMemoryPolicyStore.from_yaml(text), state_store="memory://")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "protected").mkdir()
    (tmp_path / "protected" / "secret.txt").write_text("keep")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "link").symlink_to(tmp_path / "protected")
    return tmp_path


@pytest.mark.parametrize(
    "relative",
    [
        "protected/secret.txt",
        "work/../protected/secret.txt",
        "work//..//protected/new.txt",
        "work/link/secret.txt",
        "protected",
    ],
)
def test_write_into_protected_tree_is_blocked_however_the_path_is_spelled(
    tree: Path, relative: str
) -> None:
    write = make_write(engine_protecting(tree))
    with pytest.raises(BlockedError) as caught:
        write(agent_id="a", filepath=f"{tree}/{relative}", content="pwned")
    assert "protected_paths" in caught.value.decision.reason
    assert (tree / "protected" / "secret.txt").read_text() == "keep"
    assert not (tree / "protected" / "new.txt").exists()


def test_write_outside_protected_tree_runs_on_the_normalised_path(tree: Path) -> None:
    seen: list[str] = []

    def executor(*, filepath: str, content: str) -> int:
        seen.append(filepath)
        return len(content)

    write = make_write(engine_protecting(tree), executor=executor)
    assert write(agent_id="a", filepath=f"{tree}/work/../work/./a.txt", content="hi") == 2
    assert seen == [str(tree / "work" / "a.txt")]


def test_sibling_with_common_prefix_is_not_inside_protected_tree(tree: Path) -> None:
    (tree / "protected-not").mkdir()
    write = make_write(engine_protecting(tree))
    write(agent_id="a", filepath=tree / "protected-not" / "ok.txt", content="fine")
    assert (tree / "protected-not" / "ok.txt").read_text() == "fine"


def test_delete_and_move_are_governed(tree: Path) -> None:
    engine = engine_protecting(tree)
    (tree / "work" / "a.txt").write_text("a")
    with pytest.raises(BlockedError):
        make_move(engine)(agent_id="a", src=tree / "work" / "a.txt", dst=tree / "protected" / "a")
    make_move(engine)(agent_id="a", src=tree / "work" / "a.txt", dst=tree / "work" / "b.txt")
    assert (tree / "work" / "b.txt").read_text() == "a"
    make_delete(engine)(agent_id="a", filepath=tree / "work" / "b.txt")
    assert not (tree / "work" / "b.txt").exists()
    with pytest.raises(BlockedError):
        make_delete(engine)(agent_id="a", filepath=tree / "protected" / "secret.txt")
    assert (tree / "protected" / "secret.txt").exists()


@pytest.mark.parametrize("bad", ["", "a\0b", None, 42])
def test_bad_path_is_refused_naming_the_argument(tree: Path, bad: object) -> None:
    write = make_write(engine_protecting(tree))
    with pytest.raises(InvalidArgumentError) as caught:
        write(agent_id="a", filepath=bad, content="x")  # type: ignore[arg-type]
    assert caught.value.argument == "filepath"


def test_the_engines_own_files_are_never_changed_by_a_governed_call(tmp_path: Path) -> None:
    """Whatever the policies say, no filesystem skill may touch the files the engine is
    governed by: its policies, state, approvals and audit log (and their siblings)."""
    folder = tmp_path / ".limenex"
    folder.mkdir()
    policy = folder / "policies.yaml"
    policy.write_text(
        "filesystem.write:\n  policies: []\nfilesystem.delete:\n  policies: []\n"
        "filesystem.move:\n  policies: []\n"
    )
    engine = PolicyEngine(policy)  # state.db and audit.log beside the policy file
    write, delete, move = make_write(engine), make_delete(engine), make_move(engine)
    write(agent_id="a", filepath=tmp_path / "notes.txt", content="fine")  # anything else: ok
    before = policy.read_text()
    attempts = [
        lambda: write(agent_id="a", filepath=policy, content="filesystem.write: {policies: []}"),
        lambda: write(agent_id="a", filepath=folder / "state.db", content="x"),
        lambda: write(agent_id="a", filepath=str(folder / "state.db") + "-wal", content="x"),
        lambda: write(agent_id="a", filepath=folder / "../.limenex/audit.log", content="x"),
        lambda: delete(agent_id="a", filepath=folder / "audit.log"),
        lambda: move(agent_id="a", src=folder, dst=tmp_path / "elsewhere"),
        lambda: move(agent_id="a", src=tmp_path / "notes.txt", dst=policy),
    ]
    for attempt in attempts:
        with pytest.raises(BlockedError, match="files this engine is governed by"):
            attempt()
    assert policy.read_text() == before
    assert (tmp_path / "notes.txt").read_text() == "fine"
    engine.close()
    events = [line for line in (folder / "audit.log").read_text().splitlines()]
    assert sum('"event":"blocked"' in line for line in events) == len(attempts)


def test_an_extended_parent_policy_file_is_protected_too(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    parent = tmp_path / "base" / "base.yaml"
    parent.write_text("filesystem.write:\n  policies: []\n")
    (tmp_path / "policies.yaml").write_text("_extends: base/base.yaml\n")
    engine = PolicyEngine(tmp_path / "policies.yaml", "memory://", audit_logger=False)
    assert str(parent.resolve()) in engine.own_files()
    with pytest.raises(BlockedError, match="files this engine is governed by"):
        make_write(engine)(agent_id="a", filepath=parent, content="filesystem.write: {}")
    assert parent.read_text() == "filesystem.write:\n  policies: []\n"


def test_another_name_for_an_own_file_is_refused_and_so_is_a_resume_onto_one(
    tmp_path: Path,
) -> None:
    folder = tmp_path / ".limenex"
    folder.mkdir()
    policy = folder / "policies.yaml"
    policy.write_text(
        "filesystem.write:\n  policies:\n    - {type: deterministic, dimension: writes,"
        " operator: lt, value: 1, breach_verdict: ESCALATE}\n"
    )
    engine = PolicyEngine(policy)
    write = make_write(engine)
    link = tmp_path / "innocent.txt"
    os.link(policy, link)  # made outside the agent's reach: a skill cannot make links
    with pytest.raises(BlockedError, match="files this engine is governed by"):
        write(agent_id="a", filepath=link, content="x")
    # A request approved for a harmless path cannot be resumed onto an own file either.
    target = tmp_path / "later.txt"
    with pytest.raises(EscalationRequired) as paused:
        write(agent_id="a", filepath=target, content="x")
    request_id = paused.value.request_id
    assert request_id is not None
    engine.approvals.approve_sync(request_id, approver="ops")
    target.unlink(missing_ok=True)
    os.link(folder / "state.db", target)  # the harmless path now names the state
    with pytest.raises(BlockedError, match="files this engine is governed by"):
        engine.resume_sync(request_id)
    kept = engine.approvals.get_sync(request_id)
    assert kept is not None
    assert kept.status.value == "approved"  # refused before the approval was spent
    engine.close()


def test_a_relative_policy_path_stays_protected_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "limenex.yaml").write_text("filesystem.write:\n  policies: []\n")
    monkeypatch.chdir(tmp_path)
    engine = PolicyEngine("limenex.yaml", "memory://", audit_logger=False)
    write = make_write(engine)
    monkeypatch.chdir(tmp_path / "elsewhere")  # a tool, a notebook: the process moves
    with pytest.raises(BlockedError, match="files this engine is governed by"):
        write(agent_id="a", filepath=tmp_path / "limenex.yaml", content="x")
    write(agent_id="a", filepath=tmp_path / "elsewhere" / "limenex.yaml", content="fine")
    assert (tmp_path / "limenex.yaml").read_text() == "filesystem.write:\n  policies: []\n"
