"""``limenex test``: run policy test cases (``*.test.yaml``) and show what differed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from limenex.core.errors import PolicyFileError
from limenex.core.policy import counted
from limenex.policy_tests import FileResult, find_test_files, load_test_file, run_test_file

__all__ = ["DEFAULT_TEST_DIR", "run_policy_tests"]

DEFAULT_TEST_DIR = ".limenex"


@click.command(name="test")
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead.")
def run_policy_tests(paths: tuple[str, ...], as_json: bool) -> None:
    """Run the policy test cases in PATHS (files, or directories searched for *.test.yaml).

    With no PATHS, every *.test.yaml under .limenex/. Each case runs on a fresh engine; the
    case's call is a dry run. A failing case shows what differed and the trace of every
    policy against its call (also in --json). Exits 0 when every case passes, 1 when one
    fails, 2 when a test file or its policy file cannot be loaded (or its cases cannot be
    run), or when there is no test file.
    """
    searched = paths or (DEFAULT_TEST_DIR,)
    files = find_test_files(searched) if paths or Path(DEFAULT_TEST_DIR).is_dir() else []
    if not files:
        where = ", ".join(searched)
        message = f"no test files found (looked for *.test.yaml in {where})"
        if as_json:
            _print_json({"ok": False, "passed": 0, "failed": 0, "errors": [message], "files": []})
        else:
            click.echo(f"✗ {message}", err=True)
        raise click.exceptions.Exit(2)

    results: list[FileResult] = []
    errors: list[PolicyFileError] = []
    for path in files:
        outcome = _load_and_run(str(path))
        if isinstance(outcome, PolicyFileError):
            errors.append(outcome)
            if not as_json:
                click.echo(f"✗ {outcome}", err=True)
            continue
        results.append(outcome)
        if not as_json:
            for case in outcome.cases:
                mark = "✓" if case.passed else "✗"
                click.echo(f"{mark} {case.where}  {case.name}")
                for line in case.explain():
                    click.echo(f"    {line}")

    passed = sum(case.passed for result in results for case in result.cases)
    failed = sum(not case.passed for result in results for case in result.cases)
    if as_json:
        _print_json(
            {
                "ok": not errors and not failed,
                "passed": passed,
                "failed": failed,
                "errors": [_error_dict(exc) for exc in errors],
                "files": [result.to_dict() for result in results],
            }
        )
    else:
        summary = f"{passed} passed, {failed} failed"
        unrun = sum(isinstance(exc, _RunError) for exc in errors)
        if len(errors) > unrun:
            summary += f", {counted(len(errors) - unrun, 'file', 'files')} could not be loaded"
        if unrun:
            summary += f", {counted(unrun, 'file', 'files')} could not be run"
        click.echo(summary)
    if errors:
        raise click.exceptions.Exit(2)
    if failed:
        raise click.exceptions.Exit(1)


class _RunError(PolicyFileError):
    """A test file that loaded but whose cases could not be run."""


def _load_and_run(path: str) -> FileResult | PolicyFileError:
    """The file's results, or why it could not be used: never an exception (no traceback)."""
    try:
        loaded = load_test_file(path)
    except PolicyFileError as exc:
        return exc
    except Exception as exc:
        return _unexpected(PolicyFileError, path, "could not be loaded", exc)
    try:
        return run_test_file(loaded)
    except Exception as exc:
        return _unexpected(_RunError, path, "could not be run", exc)


def _unexpected(
    kind: type[PolicyFileError], path: str, what: str, exc: Exception
) -> PolicyFileError:
    """An error nobody planned for, as a file error: ``could not be run (ValueError: ...)``."""
    text = str(exc)
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return kind(f"{what} ({detail})", path=path, suggestion="a bug in limenex: please report it")


def _error_dict(exc: PolicyFileError) -> dict[str, object]:
    return {
        "error": str(exc),
        "problem": exc.problem,
        "path": exc.path,
        "line": exc.line,
        "key": exc.key,
        "suggestion": exc.suggestion,
    }


def _print_json(value: dict[str, object]) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))
