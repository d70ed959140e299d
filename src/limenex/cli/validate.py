"""``limenex validate`` and ``limenex schema``: check a policy file, export its JSON Schema."""

from __future__ import annotations

import json
from typing import Any

import click

from limenex.core.errors import PolicyFileError
from limenex.core.policy_store import DEFAULT_POLICY_PATH, LocalFilePolicyStore, policy_json_schema

__all__ = ["schema", "validate"]


@click.command()
@click.argument("path", default=DEFAULT_POLICY_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the result as a JSON object.")
def validate(path: str, as_json: bool) -> None:
    """Check the policy file at PATH (default: .limenex/policies.yaml).

    Loads it exactly as the engine does at runtime. Exits 0 when it is valid, 1 when not.
    """
    try:
        store = LocalFilePolicyStore(path)
    except PolicyFileError as exc:
        if as_json:
            _print_json(
                {
                    "valid": False,
                    "error": str(exc),
                    "problem": exc.problem,
                    "path": exc.path,
                    "line": exc.line,
                    "key": exc.key,
                    "suggestion": exc.suggestion,
                }
            )
        else:
            click.echo(f"✗ Invalid — {exc}", err=True)
        raise click.exceptions.Exit(1) from None
    counts = store.policy_set.counts
    if as_json:
        _print_json(
            {"valid": True, "path": path, **counts._asdict(), "sources": store.policy_set.sources}
        )
    else:
        click.echo(f"✓ Valid — {counts.summary()}")


@click.command()
def schema() -> None:
    """Print the JSON Schema of the policy file format (for editors and CI)."""
    _print_json(policy_json_schema())


def _print_json(value: dict[str, Any]) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))
