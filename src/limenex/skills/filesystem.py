"""Files: ``filesystem.write``, ``filesystem.delete`` and ``filesystem.move`` (sync).

Paths are normalised before any policy sees them (absolute, ``..`` and duplicate slashes
resolved, symlinks followed), and the executor acts on exactly the path that was checked.
The default executors act on the local file system; pass ``executor=`` to act elsewhere.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from limenex.core.engine import PolicyEngine
from limenex.core.errors import InvalidArgumentError
from limenex.core.evaluation import normalise_path
from limenex.core.handle import SkillHandle

__all__ = ["make_delete", "make_move", "make_write"]

PathArg = str | os.PathLike[str]


def _path(name: str, value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if type(value) is not str or not value or "\0" in value:
        raise InvalidArgumentError(
            f"argument {name!r} must be a non-empty path string, got {value!r}", argument=name
        )
    return normalise_path(value)


def _write_file(*, filepath: str, content: str | bytes) -> int:
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(filepath, mode) as handle:
        return handle.write(content)


def _delete_file(*, filepath: str) -> None:
    os.remove(filepath)


def _move_file(*, src: str, dst: str) -> str:
    return str(shutil.move(src, dst))


def make_write(
    engine: PolicyEngine, executor: Callable[..., Any] | None = None, *, name: str = ""
) -> Callable[..., Any]:
    """``write(agent_id=, filepath=, content=)``; the executor gets ``filepath=, content=``."""
    act = executor or _write_file

    def write_action(params: dict[str, Any]) -> Callable[[], Any]:
        engine.refuse_own_files("filesystem.write", params["agent_id"], params, params["filepath"])
        return lambda: act(filepath=params["filepath"], content=params["content"])

    engine.register_action("filesystem.write", write_action, name=name, executor=act)

    def write(*, agent_id: str, filepath: PathArg, content: str | bytes) -> Any:
        """Write ``content`` to ``filepath``, if the policies allow it."""
        path = _path("filepath", filepath)
        if not isinstance(content, str | bytes):
            raise InvalidArgumentError(
                f"argument 'content' must be str or bytes, got {type(content).__name__}",
                argument="content",
            )
        params = {"agent_id": agent_id, "filepath": path, "content": content}
        engine.refuse_own_files("filesystem.write", agent_id, params, path)
        return engine.execute_sync(
            "filesystem.write",
            agent_id,
            params,
            lambda: act(filepath=path, content=content),
            action_name=name,
        )

    write.skill_id = "filesystem.write"  # type: ignore[attr-defined]
    write.__limenex__ = SkillHandle(engine, "filesystem.write", write)  # type: ignore[attr-defined]
    return write


def make_delete(
    engine: PolicyEngine, executor: Callable[..., Any] | None = None, *, name: str = ""
) -> Callable[..., Any]:
    """``delete(agent_id=, filepath=)``; the executor gets ``filepath=``."""
    act = executor or _delete_file

    def delete_action(params: dict[str, Any]) -> Callable[[], Any]:
        engine.refuse_own_files("filesystem.delete", params["agent_id"], params, params["filepath"])
        return lambda: act(filepath=params["filepath"])

    engine.register_action("filesystem.delete", delete_action, name=name, executor=act)

    def delete(*, agent_id: str, filepath: PathArg) -> Any:
        """Delete the file at ``filepath``, if the policies allow it."""
        path = _path("filepath", filepath)
        params = {"agent_id": agent_id, "filepath": path}
        engine.refuse_own_files("filesystem.delete", agent_id, params, path)
        return engine.execute_sync(
            "filesystem.delete", agent_id, params, lambda: act(filepath=path), action_name=name
        )

    delete.skill_id = "filesystem.delete"  # type: ignore[attr-defined]
    delete.__limenex__ = SkillHandle(engine, "filesystem.delete", delete)  # type: ignore[attr-defined]
    return delete


def make_move(
    engine: PolicyEngine, executor: Callable[..., Any] | None = None, *, name: str = ""
) -> Callable[..., Any]:
    """``move(agent_id=, src=, dst=)``; the executor gets ``src=, dst=``."""
    act = executor or _move_file

    def move_action(params: dict[str, Any]) -> Callable[[], Any]:
        engine.refuse_own_files(
            "filesystem.move", params["agent_id"], params, params["src"], params["dst"]
        )
        return lambda: act(src=params["src"], dst=params["dst"])

    engine.register_action("filesystem.move", move_action, name=name, executor=act)

    def move(*, agent_id: str, src: PathArg, dst: PathArg) -> Any:
        """Move ``src`` to ``dst``, if the policies allow it."""
        source, target = _path("src", src), _path("dst", dst)
        params = {"agent_id": agent_id, "src": source, "dst": target}
        engine.refuse_own_files("filesystem.move", agent_id, params, source, target)
        return engine.execute_sync(
            "filesystem.move",
            agent_id,
            params,
            lambda: act(src=source, dst=target),
            action_name=name,
        )

    move.skill_id = "filesystem.move"  # type: ignore[attr-defined]
    move.__limenex__ = SkillHandle(engine, "filesystem.move", move)  # type: ignore[attr-defined]
    return move
