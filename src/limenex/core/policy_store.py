"""Policy files: strict YAML loading, ``_extends``, policy stores and the JSON Schema.

Loading has ``yaml.safe_load`` semantics and is stricter: the loader composes the YAML
nodes itself so that every error names the file, the line and the key. It refuses
duplicate keys, explicit tags, anchors and aliases, merge keys, empty values and numbers
YAML 1.1 reads in surprising ways (``010`` is 8, ``1:30`` is 90). The models in
:mod:`limenex.core.policy` then check types and consistency; their errors are walked back
through the node tree to a line.

``_extends: base.yaml`` (relative to the extending file) puts the parent's policies of a
skill before the child's. :class:`PolicySet` checks the merged result as a whole.

:class:`LocalFilePolicyStore` watches the files it read and applies an edit without a
restart (hot reload); a broken edit is refused and the last good policies stay in force.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml
from pydantic import AliasChoices, BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from limenex.core.errors import LimenexConfigError, PolicyFileError
from limenex.core.policy import (
    MATCH_MODES,
    MODES,
    OPERATORS,
    POLICY_TYPES,
    SKILL_ID_PATTERN,
    DeterministicPolicy,
    Policy,
    PolicyCounts,
    PolicySet,
    PolicySetError,
    SchedulePolicy,
    SemanticPolicy,
    SkillPolicies,
    describe_input,
    did_you_mean,
)

__all__ = [
    "DEFAULT_POLICY_PATH",
    "SCHEMA_ID",
    "InMemoryPolicyStore",
    "LocalFilePolicyStore",
    "PolicyReload",
    "PolicyStore",
    "load_policy_file",
    "load_policy_text",
    "policy_json_schema",
]

log = logging.getLogger("limenex")

DEFAULT_POLICY_PATH = ".limenex/policies.yaml"
SCHEMA_ID = "urn:limenex:schema:policy-file:v1"
EXTENDS = "_extends"

_TAG = "tag:yaml.org,2002:"
_SURPRISING_NUMBER = re.compile(r"[-+]?(0[0-9_]|0[xXoObB]|.*:)")
_POLICY_MODELS: dict[str, type[BaseModel]] = {
    "deterministic": DeterministicPolicy,
    "semantic": SemanticPolicy,
    "schedule": SchedulePolicy,
}
_ERROR_KEYS = {"union_tag_invalid": "type", "union_tag_not_found": "type"}
_CHOICES = {"operator": OPERATORS, "match": MATCH_MODES, "type": POLICY_TYPES, "mode": MODES}
_EXPECTED = {
    "bool_type": "true or false",
    "string_type": "text",
    "tuple_type": "a list",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}


# --- stores -------------------------------------------------------------------------------


@runtime_checkable
class PolicyStore(Protocol):
    """Where the engine gets each skill's policies from."""

    @property
    def policy_set(self) -> PolicySet: ...

    def get(self, skill_id: str) -> SkillPolicies | None: ...


@dataclass(frozen=True, slots=True)
class PolicyReload:
    """What one reload of a :class:`LocalFilePolicyStore` did; given to its listeners.

    ``ok``: the new policies are in force. Otherwise ``error`` says why the files were
    refused, and the last good policies stay in force. ``path`` is the store's policy file;
    ``sources`` the files read (the extending file first) or, for a refused load, the files
    it read or tried to read; ``policy_set`` the policies in force now.
    """

    ok: bool
    path: str
    sources: tuple[str, ...]
    policy_set: PolicySet = field(repr=False)
    error: PolicyFileError | None = None

    @property
    def counts(self) -> PolicyCounts:
        """Skills and policies in force now."""
        return self.policy_set.counts


_SETTLE_NS = 100_000_000
"""A changed file is loaded once it has not been written for this long (0.1 s)."""

_RECENT_NS = 3_000_000_000
"""A file written this recently (by its mtime) is read to check, whatever its stat says:
a coarse clock can give two writes within a tick one mtime, and one size."""


class LocalFilePolicyStore:
    """Policies from a YAML file, loaded when created and reloaded when it is edited.

    Hot reload: every ``reload_interval`` seconds (1 by default; ``None`` or ``0`` turns it
    off), :meth:`get` checks whether the policy file, or a file it ``_extends``, changed.
    Between checks a call costs one ``time.monotonic()`` comparison; a check costs an
    ``os.stat`` per file (and a read and a SHA-256 of a file written in the last seconds,
    or whose stat changed). A changed set of files is loaded and checked as a whole:

    * valid, it replaces the policies in one step; a call sees the old set or the new one,
      never a mix. The engine compiles a skill again when its policies change; approval
      requests made under the old policies of a skill cannot be resumed (see
      :meth:`~limenex.core.engine.PolicyEngine.resume`).
    * invalid (a typo, bad YAML, a removed or unreadable file, a missing parent), it is
      refused: the last good policies stay in force, and a WARNING on the ``limenex``
      logger names the file, line and key. It is not tried again until one of the files it
      read (or tried to read: a parent created later counts) changes again.

    Either way, the callbacks given to :meth:`subscribe` get a :class:`PolicyReload`; the
    engine's writes a ``policies_reloaded`` or ``policies_rejected`` audit record.

    One thread checks at a time; the others go on with the policies in force, without
    waiting. The check runs in the thread (or on the event loop) of the call that found it
    due, and a reload parses the YAML there: a few milliseconds, once per edit. A changed
    file is loaded once it has not been written for 0.1 s, so that a file rewritten in place
    is not read half-way (writing to a temporary file and renaming it over is safer still).
    Relative names are read from the folder the store was made in, whatever the current
    folder is later.

    :meth:`reload` reads the files now, whether they changed or not; if the new version is
    invalid it raises :class:`PolicyFileError` (after telling the listeners) and the store
    keeps serving the last good one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_POLICY_PATH,
        *,
        reload_interval: float | None = 1.0,
    ) -> None:
        if reload_interval is not None and not (
            type(reload_interval) in (int, float) and 0 <= reload_interval < math.inf
        ):
            raise LimenexConfigError(
                f"reload_interval must be a number of seconds, or None, got {reload_interval!r}"
            )
        self.path = Path(path)
        # Relative names are read from the folder they were given in, always: a later chdir
        # (an agent's tool moving into a workspace) must not swap in another project's file.
        self._base = Path.cwd()
        self.reload_interval = float(reload_interval) if reload_interval else None
        self._lock = threading.RLock()
        self._listeners: list[Callable[[PolicyReload], object]] = []
        self._seen: dict[str, _Seen] = {}
        self._policy_set = _load_file(self.path, str(self.path), self._seen, self._base)
        self._next_check = self._due()

    @property
    def policy_set(self) -> PolicySet:
        if time.monotonic() >= self._next_check:
            self._check()
        return self._policy_set

    def get(self, skill_id: str) -> SkillPolicies | None:
        if time.monotonic() >= self._next_check:
            self._check()
        return self._policy_set.skills.get(skill_id)

    def reload(self) -> PolicySet:
        """Load the files now; raise :class:`PolicyFileError` (keeping the last good set)
        if they are invalid. Listeners are told either way."""
        with self._lock:
            error = self._load(explicit=True)
        if error is not None:
            raise error
        return self._policy_set

    def subscribe(self, callback: Callable[[PolicyReload], object]) -> Callable[[], None]:
        """Call ``callback(event)`` after every reload, good or refused; returns a function
        that unsubscribes it. A callback that raises is logged and does not stop the rest."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    def __repr__(self) -> str:
        return f"LocalFilePolicyStore({str(self.path)!r})"

    def _due(self) -> float:
        return time.monotonic() + (self.reload_interval or math.inf)

    def _check(self) -> None:
        """Reload if a watched file changed; a thread that finds another checking goes on."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() < self._next_check:
                return  # another thread just checked
            self._next_check = self._due()
            if self._changed():
                if self._being_written():  # a writer may be half-way: look again shortly
                    self._next_check = time.monotonic() + _SETTLE_NS / 1e9
                    return
                self._load(explicit=False)
        except Exception:  # a bug here must not stop the calls: the policies stay in force
            log.exception("limenex: checking %s for changes failed", self.path)
        finally:
            self._lock.release()

    def _changed(self) -> bool:
        """Whether a file the last load read (or tried to) is not what it read now."""
        now = time.time_ns()
        for name, (signature, digest) in self._seen.items():
            current = _signature(name)
            if current == signature and (current is None or abs(now - current[0]) >= _RECENT_NS):
                continue
            try:
                found = None if current is None else _digest(Path(name).read_bytes())
            except OSError:
                found = None
            if found != digest:
                return True
            self._seen[name] = (current, digest)  # touched, not changed
        return False

    def _being_written(self) -> bool:
        """Whether a watched file was written in the last :data:`_SETTLE_NS`.

        A file rewritten in place (truncated, then written) can parse while half-written,
        with policies or list entries missing: such a version is never applied, because a
        change is loaded only once its files have stood still for a moment.
        """
        now = time.time_ns()
        for name in self._seen:
            current = _signature(name)
            if current is not None and 0 <= now - current[0] < _SETTLE_NS:
                return True
        return False

    def _load(self, *, explicit: bool) -> PolicyFileError | None:
        """Load the files (holding the lock), swap the set in if valid, tell the listeners."""
        seen: dict[str, _Seen] = {}
        try:
            policy_set = _load_file(self.path, str(self.path), seen, self._base)
        except PolicyFileError as exc:
            error: PolicyFileError | None = exc
        except Exception as exc:  # not expected from the loader: refused all the same
            error = PolicyFileError(
                f"cannot load: {type(exc).__name__}: {exc}", path=str(self.path)
            )
        else:
            error = None
            self._policy_set = policy_set  # one assignment: a call sees one set or the other
        self._seen = seen
        self._next_check = self._due()
        if error is None:
            log.info("limenex: policies reloaded from %s", ", ".join(self._policy_set.sources))
        elif not explicit:
            log.warning(
                "limenex: policy file refused, the last good policies stay in force: %s", error
            )
        event = PolicyReload(
            ok=error is None,
            path=str(self.path),
            sources=self._policy_set.sources if error is None else tuple(seen),
            policy_set=self._policy_set,
            error=error,
        )
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("limenex: a policy reload listener failed (%r)", listener)
        return error


class InMemoryPolicyStore:
    """Policies held in memory: from a :class:`PolicySet`, a mapping, or YAML text."""

    def __init__(self, policies: PolicySet | Mapping[str, SkillPolicies]) -> None:
        self._policy_set = policies if isinstance(policies, PolicySet) else PolicySet(policies)

    @classmethod
    def from_yaml(cls, text: str, path: str = "<string>") -> InMemoryPolicyStore:
        return cls(load_policy_text(text, path))

    @property
    def policy_set(self) -> PolicySet:
        return self._policy_set

    def get(self, skill_id: str) -> SkillPolicies | None:
        return self._policy_set.skills.get(skill_id)


# --- loading ------------------------------------------------------------------------------


_Seen = tuple[tuple[int, ...] | None, str | None]
"""A file as a load saw it: its stat signature taken before it was read (``None``: missing),
and the SHA-256 of the bytes read (``None``: missing or unreadable)."""


def load_policy_file(path: str | os.PathLike[str]) -> PolicySet:
    """Load and check a policy file and its ``_extends`` chain; raise ``PolicyFileError``."""
    return _load_file(Path(path), str(path))


def _load_file(
    path: Path, display: str, seen: dict[str, _Seen] | None = None, base: Path | None = None
) -> PolicySet:
    """:func:`load_policy_file`; ``seen`` gets every file read or tried (see :func:`_read`);
    relative names are read below ``base`` (the current folder when ``None``)."""
    return _load(_read(_at(base, path), display, seen), display, seen, base)


def _at(base: Path | None, path: Path) -> Path:
    """Where ``path`` is on disk: below ``base`` when it is relative."""
    return path if base is None or path.is_absolute() else base / path


def load_policy_text(text: str, path: str = "<string>") -> PolicySet:
    """Load policies from YAML text. ``path`` names it in errors and anchors ``_extends``
    (the current directory when ``path`` is not a file name, such as ``"<string>"``)."""
    return _load(text, path)


@dataclass
class _Origin:
    """Where a skill or one of its policies was written."""

    path: str
    node: Node


@dataclass
class _Merged:
    """Skills gathered along an ``_extends`` chain, parents first, with their origins."""

    policies: dict[str, list[Policy]] = field(default_factory=dict)
    descriptions: dict[str, str | None] = field(default_factory=dict)
    shadow: dict[str, bool] = field(default_factory=dict)  # every file naming it says shadow
    skill_origins: dict[str, _Origin] = field(default_factory=dict)
    policy_origins: dict[str, list[_Origin]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    seen: dict[str, _Seen] | None = None  # for the hot reload: every file read or tried
    base: Path | None = None  # the folder relative names are read from (None: the current)


def _load(
    text: str, path: str, seen: dict[str, _Seen] | None = None, base: Path | None = None
) -> PolicySet:
    merged = _Merged(seen=seen, base=base)
    own = None if path.startswith("<") else _at(base, Path(path)).resolve()
    _merge_file(text, path, merged, () if own is None else ((own, path),))
    skills = {
        skill_id: SkillPolicies(
            policies=tuple(policies),
            mode="shadow" if merged.shadow[skill_id] else "enforce",
            description=merged.descriptions[skill_id],
        )
        for skill_id, policies in merged.policies.items()
    }
    try:
        return PolicySet(skills=skills, sources=tuple(merged.sources))
    except PolicySetError as exc:
        raise _locate_set_error(exc, merged) from None


def _merge_file(text: str, path: str, merged: _Merged, chain: tuple[tuple[Path, str], ...]) -> None:
    """Parse one file, merge its parent first, then add this file's skills."""
    parsed = _ParsedFile(text, path)
    merged.sources.append(path)  # before the parents: sources read child first
    if parsed.extends is not None:
        target, key_node = parsed.extends
        parent_path = (Path.cwd() if path.startswith("<") else Path(path).parent) / target
        on_disk = _at(merged.base, parent_path)
        parent = on_disk.resolve()
        names = [name for _, name in chain]
        if parent in (resolved for resolved, _ in chain):
            cycle = " → ".join([*names, str(parent_path)])
            raise parsed.error(f"_extends cycle: {cycle}", key_node, key=EXTENDS)
        try:
            parent_text = _read(on_disk, str(parent_path), merged.seen)
        except PolicyFileError as exc:
            problem = f"cannot read {exc.path}: {exc.problem}"
            raise parsed.error(problem, key_node, key=EXTENDS) from None
        _merge_file(parent_text, str(parent_path), merged, (*chain, (parent, str(parent_path))))
    for skill_id, (skill, key_node, policy_nodes) in parsed.skills.items():
        merged.skill_origins.setdefault(skill_id, _Origin(path, key_node))
        # A file's skill-wide mode covers its own policies only: a file that extends a
        # baseline cannot put the baseline's policies in shadow mode.
        merged.policies.setdefault(skill_id, []).extend(
            policy.model_copy(update={"mode": skill.policy_mode(index)})
            if skill.mode == "shadow"
            else policy
            for index, policy in enumerate(skill.policies)
        )
        merged.shadow[skill_id] = merged.shadow.get(skill_id, True) and skill.mode == "shadow"
        origins = merged.policy_origins.setdefault(skill_id, [])
        origins.extend(_Origin(path, node) for node in policy_nodes)
        if skill.description is not None or skill_id not in merged.descriptions:
            merged.descriptions[skill_id] = skill.description


def _read(path: Path, display: str, seen: dict[str, _Seen] | None = None) -> str:
    """The text of a policy file; a missing or unreadable file is a ``PolicyFileError``.

    ``seen`` gets the file's absolute name mapped to what was found (:data:`_Seen`),
    readable or not.
    """
    signature = None if seen is None else _signature(str(path))
    data: bytes | None = None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problem = "file not found"
    except IsADirectoryError:
        problem = "is a directory, not a file"
    except OSError as exc:
        problem = f"cannot read the file: {exc.strerror or exc}"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {exc.start})"
    finally:
        if seen is not None:
            seen[str(path.absolute())] = (signature, None if data is None else _digest(data))
    raise PolicyFileError(problem, path=display)


def _signature(path: str) -> tuple[int, ...] | None:
    """What changes when a file is written, replaced or removed (``None``: no such file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- one file -----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and explicit tags as it composes."""

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _YamlRefused(
                "anchors and aliases are not supported; use _extends", event.start_mark
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = tag.replace(_TAG, "!!", 1) if tag.startswith(_TAG) else tag
            raise _YamlRefused(f"explicit YAML tags ({shown}) are not supported", event.start_mark)
        return super().compose_node(parent, index)


class _YamlRefused(Exception):
    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _ParsedFile:
    """One file: composed, converted to Python values and validated skill by skill."""

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.extends: tuple[str, Node] | None = None
        # skill id -> (its policies, the node of its key, the node of each policy)
        self.skills: dict[str, tuple[SkillPolicies, Node, list[Node]]] = {}
        self._loader = self._open(text)
        try:
            root = self._compose()
            if root is None:
                raise self.error("the file is empty; map skill ids to {policies: [...]}")
            if not isinstance(root, MappingNode):
                raise self.error(
                    f"the file must map skill ids to {{policies: [...]}}, got {_kind(root)}", root
                )
            for key, key_node, value_node in self._pairs(root):
                self._top_level(key, key_node, value_node)
        finally:
            self._loader.dispose()

    def error(
        self,
        problem: str,
        node: Node | None = None,
        *,
        key: str | None = None,
        suggestion: str | None = None,
    ) -> PolicyFileError:
        line = None if node is None else _line(node)
        return PolicyFileError(problem, path=self.path, line=line, key=key, suggestion=suggestion)

    def _open(self, text: str) -> _StrictLoader:
        try:
            return _StrictLoader(text)
        except yaml.reader.ReaderError as exc:
            problem = f"invalid YAML: character {exc.character:#06x} is not allowed"
            line = text.count("\n", 0, exc.position) + 1
            raise PolicyFileError(problem, path=self.path, line=line) from None

    def _compose(self) -> Node | None:
        try:
            return self._loader.get_single_node()
        except _YamlRefused as exc:
            raise PolicyFileError(exc.problem, path=self.path, line=exc.mark.line + 1) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "unreadable"
            if problem.startswith("but ") and exc.context:
                problem = f"{exc.context}, {problem}"
            problem = f"invalid YAML: {problem}"
            line = None if mark is None else mark.line + 1
            raise PolicyFileError(problem, path=self.path, line=line) from None
        except yaml.YAMLError as exc:
            raise PolicyFileError(f"invalid YAML: {exc}", path=self.path) from None
        except RecursionError:
            raise PolicyFileError("the YAML is nested too deeply", path=self.path) from None

    def _top_level(self, key: str, key_node: Node, value_node: Node) -> None:
        value = None if value_node.tag == f"{_TAG}null" else self._value(value_node, key)
        if key == EXTENDS:
            if not isinstance(value, str) or not value.strip():
                raise self.error(
                    f"expected the relative path of a policy file, got {describe_input(value)}",
                    value_node,
                    key=key,
                )
            self.extends = (value, key_node)
        elif key.startswith("_"):
            raise self.error(
                "unknown setting",
                key_node,
                key=key,
                suggestion=did_you_mean(key, [EXTENDS]) or f"the only setting is {EXTENDS}",
            )
        elif not isinstance(value, dict):
            hint = {
                list: "put the list under policies:",
                type(None): "write policies: [] to govern it without rules",
            }.get(type(value))
            raise self.error(
                f"a skill needs a mapping with a policies: list, got {describe_input(value)}",
                key_node,
                key=key,
                suggestion=hint,
            )
        else:
            policy_nodes = self._mark_policy_lines(value, value_node)
            try:
                skill = SkillPolicies.model_validate(value)
            except ValidationError as exc:
                raise self._pydantic_error(exc, value_node, key) from None
            self.skills[key] = (skill, key_node, policy_nodes)

    def _mark_policy_lines(self, skill: dict[str, Any], node: Node) -> list[Node]:
        """Give each policy mapping the line it starts on (``line`` is not a YAML key)."""
        pair = _child(node, "policies")
        policies = skill.get("policies")
        if not isinstance(policies, list) or pair is None:
            return []
        for policy, policy_node in zip(policies, pair[1].value, strict=True):
            if isinstance(policy, dict):
                line_key = _child(policy_node, "line")
                if line_key is not None:
                    raise self.error("unknown key", line_key[0], key="line")
                policy["line"] = _line(policy_node)
        return list(pair[1].value)

    # Node -> Python, with the checks safe_load does not make.

    def _pairs(self, node: MappingNode) -> Iterator[tuple[str, Node, Node]]:
        """A mapping's (key, key node, value node) triples; keys must be unique text."""
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == f"{_TAG}merge":
                raise self.error("merge keys (<<) are not supported; use _extends", key_node)
            if not isinstance(key_node, ScalarNode):
                raise self.error(f"keys must be text, not {_kind(key_node)}", key_node)
            if key_node.tag != f"{_TAG}str":
                raise self.error(
                    f"keys must be text; YAML reads {key_node.value} as {_kind(key_node)}",
                    key_node,
                    suggestion=f"quote it: '{key_node.value}'",
                )
            name = str(key_node.value)
            if name in seen:
                raise self.error("duplicate key", key_node, key=name)
            seen.add(name)
            yield name, key_node, value_node

    def _value(self, node: Node, key: str) -> Any:
        """The safe_load value of ``node`` (found under ``key``), refusing what misleads."""
        if isinstance(node, MappingNode):
            return {name: self._value(value, name) for name, _, value in self._pairs(node)}
        if isinstance(node, SequenceNode):
            return [self._value(item, key) for item in node.value]
        if node.tag == f"{_TAG}null":
            raise self.error("has no value", node, key=key, suggestion="give a value or remove it")
        if node.tag in (f"{_TAG}int", f"{_TAG}float") and _SURPRISING_NUMBER.match(node.value):
            raise self.error(
                f"YAML 1.1 reads {node.value} as {self._loader.construct_object(node)}",
                node,
                key=key,
                suggestion="write plain decimal digits, or quote it if it is text",
            )
        try:
            return self._loader.construct_object(node)
        except (ValueError, yaml.YAMLError) as exc:
            raise self.error(f"cannot read {node.value!r}: {exc}", node, key=key) from None

    # Pydantic errors -> file, line, key.

    def _pydantic_error(self, exc: ValidationError, node: Node, skill_id: str) -> PolicyFileError:
        errors = exc.errors()
        error = min(errors, key=lambda e: (e["type"] != "extra_forbidden", _error_line(e, node)))
        target, key = _follow(node, error["loc"])
        ctx = error.get("ctx") or {}
        named = ctx.get("key") or _ERROR_KEYS.get(error["type"])
        if named:  # an error about a whole policy that names its key
            key = str(named)
            pair = _child(target, key)
            target = target if pair is None else pair[0]
        problem, suggestion = _explain(error, key, _keys_at(error["loc"]))
        return self.error(problem, target, key=key or skill_id, suggestion=suggestion)


def _child(node: Node | None, key: str) -> tuple[Node, Node] | None:
    """The (key node, value node) pair of ``key`` in a mapping node."""
    if not isinstance(node, MappingNode):
        return None
    return next(((k, v) for k, v in node.value if k.value == key), None)


def _follow(node: Node, loc: tuple[int | str, ...]) -> tuple[Node, str | None]:
    """Walk a pydantic error location through the nodes: the deepest node found, its key.

    A key's own node is returned (the line where it is written); a missing key returns its
    mapping. Discriminated unions add the tag (``"deterministic"``) after the list index:
    it is skipped when it equals the mapping's ``type``.
    """
    key: str | None = None
    where = node
    for part in loc:
        if isinstance(node, MappingNode) and isinstance(part, str):
            pair = _child(node, part)
            if pair is None:
                tag = _child(node, "type")
                if tag is not None and tag[1].value == part:
                    continue
                return node, part
            (where, node), key = pair, part
        elif isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = where = node.value[part]
            key = f"{key}[{part}]"
        else:
            break
    return where, key


def _error_line(error: ErrorDetails, node: Node) -> int:
    return _line(_follow(node, error["loc"])[0])


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed in the mapping a location points into (for did-you-mean)."""
    tag = loc[2] if len(loc) > 3 else None
    model = _POLICY_MODELS.get(tag, SkillPolicies) if isinstance(tag, str) else SkillPolicies
    keys: list[str] = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            keys += [c for c in alias.choices if isinstance(c, str)]
        elif not info.exclude:
            keys.append(name)
    return keys


def _explain(error: ErrorDetails, key: str | None, keys: list[str]) -> tuple[str, str | None]:
    """A readable problem and suggestion for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    if kind == "limenex_policy":
        return str(ctx["problem"]), ctx.get("suggestion")
    if kind == "missing":
        return "required key is missing", None
    if kind == "extra_forbidden":
        return "unknown key", did_you_mean(key, keys) or f"valid keys: {', '.join(keys)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = value.get("type") if isinstance(value, dict) else None
        got = "missing policy type" if tag is None else f"unknown policy type {tag!r}"
        return f"{got}; valid types: {', '.join(POLICY_TYPES)}", did_you_mean(tag, POLICY_TYPES)
    if kind == "literal_error":
        choices = _CHOICES.get((key or "").partition("[")[0], ())
        return (
            f"expected one of {', '.join(choices)}; got {describe_input(value)}",
            did_you_mean(value, choices),
        )
    if kind in _EXPECTED:
        hint = None
        if isinstance(value, str) and kind == "bool_type":
            hint = "write true or false without quotes"
        elif isinstance(value, bool) and kind == "string_type":
            hint = "YAML reads yes/no/on/off/true/false as booleans; quote it"
        elif value is not None and kind == "string_type":
            hint = "quote it"
        return f"expected {_EXPECTED[kind]}, got {describe_input(value)}", hint
    if kind == "too_short":
        return "must not be empty", None
    return str(error["msg"]), None


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return {
        "null": "null",
        "str": "text",
        "bool": "a boolean",
        "int": "a number",
        "float": "a number",
        "timestamp": "a date",
    }.get(str(node.tag).removeprefix(_TAG), "a value")


def _locate_set_error(exc: PolicySetError, merged: _Merged) -> PolicyFileError:
    """Point a whole-set error at the file and line of the policy (or skill) concerned."""
    if exc.index is None:
        origin = merged.skill_origins[exc.skill_id]
        node = origin.node
    else:
        origin = merged.policy_origins[exc.skill_id][exc.index]
        pair = _child(origin.node, exc.key or "")
        node = origin.node if pair is None else pair[0]
    problem = exc.problem
    if exc.related is not None:
        other = merged.policy_origins[exc.related[0]][exc.related[1]]
        problem += f" (see {other.path}:{_line(other.node)})"
    return PolicyFileError(
        problem,
        path=origin.path,
        line=_line(node),
        key=exc.key or exc.skill_id,
        suggestion=exc.suggestion,
    )


# --- JSON Schema --------------------------------------------------------------------------


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema (Draft 2020-12) of a policy file, for editors and CI."""
    skill = TypeAdapter(SkillPolicies).json_schema()
    defs = skill.pop("$defs")
    defs["SkillPolicies"] = skill
    for definition in defs.values():
        for prop in definition["properties"].values():
            _drop_null(prop)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Limenex policy file",
        "description": "Skill ids mapped to their ordered policies; see `limenex validate`.",
        "type": "object",
        "properties": {
            EXTENDS: {
                "type": "string",
                "minLength": 1,
                "description": "a policy file whose policies come first (relative path)",
            }
        },
        "patternProperties": {SKILL_ID_PATTERN: {"$ref": "#/$defs/SkillPolicies"}},
        "additionalProperties": False,
        "$defs": defs,
    }


def _drop_null(prop: dict[str, Any]) -> None:
    """A policy file has no nulls (an empty value is an error): drop ``| None`` branches."""
    options = prop.pop("anyOf", None)
    if options is not None:
        rest = [option for option in options if option != {"type": "null"}]
        if len(rest) == 1:
            prop.update(rest[0])
        else:
            prop["anyOf"] = rest
    if "default" in prop and prop["default"] is None:
        del prop["default"]
