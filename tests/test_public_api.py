"""The import paths and names users already rely on (SPEC §1, §10) keep working."""

from __future__ import annotations

import limenex


def test_seed_import_paths_exist() -> None:
    from limenex.core.engine import (  # noqa: F401
        BlockedError,
        EscalationRequired,
        LimenexConfigError,
        PolicyEngine,
    )
    from limenex.core.policy_store import LocalFilePolicyStore  # noqa: F401
    from limenex.core.stores import (  # noqa: F401
        InMemoryStateStore,
        LocalFileStateStore,
        SQLiteStateStore,
    )
    from limenex.skills import UnregisteredExecutorError  # noqa: F401
    from limenex.skills.comms import make_send  # noqa: F401
    from limenex.skills.filesystem import make_delete, make_move, make_write  # noqa: F401
    from limenex.skills.finance import make_charge, make_spend  # noqa: F401
    from limenex.skills.web import make_post  # noqa: F401
    from limenex.stores import from_url  # noqa: F401


def test_adapter_and_integration_entry_points_exist() -> None:
    from limenex.integrations import Outcome, call, decide, handle_of  # noqa: F401
    from limenex.integrations.langgraph import governed_tools, send_tool_calls  # noqa: F401
    from limenex.integrations.mcp import McpProxy, run_proxy  # noqa: F401
    from limenex.integrations.openai_agents import governed_function_tools, review  # noqa: F401
    from limenex.semantic import Judgement, SemanticError  # noqa: F401
    from limenex.semantic.anthropic import AnthropicEvaluator  # noqa: F401
    from limenex.semantic.openai import OpenAIEvaluator  # noqa: F401
    from limenex.testing import ScriptedEvaluator  # noqa: F401


def test_the_cli_has_every_named_command() -> None:
    from limenex.cli import main

    names = set(main.commands)  # type: ignore[attr-defined]
    named = {"validate", "explain", "test", "schema", "state", "approvals", "audit", "serve"}
    assert named | {"mcp-proxy"} <= names


def test_package_all_lists_only_real_names() -> None:
    for name in limenex.__all__:
        assert hasattr(limenex, name), name
    assert limenex.Verdict.ALLOW == "ALLOW"


def test_store_urls_choose_backends_and_unknown_schemes_list_known_ones(tmp_path: object) -> None:
    import pytest

    from limenex.core.errors import LimenexConfigError
    from limenex.core.stores import InMemoryStateStore, LocalFileStateStore
    from limenex.stores import from_url

    assert isinstance(from_url("memory://"), InMemoryStateStore)
    assert isinstance(from_url(f"file://{tmp_path}/s.json"), LocalFileStateStore)
    with pytest.raises(
        LimenexConfigError, match="known schemes: memory://, file://, sqlite://, redis://"
    ):
        from_url("mongodb://x")


def test_version_matches_the_installed_metadata_and_the_cli() -> None:
    from importlib.metadata import version

    from click.testing import CliRunner

    from limenex.cli import main

    assert limenex.__version__ == version("limenex")
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert limenex.__version__ in result.output
