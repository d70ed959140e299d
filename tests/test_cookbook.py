"""Every snippet of docs/cookbook.md is a policy file or its tests, and `limenex test` passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from limenex.core.policy_store import policy_json_schema

ROOT = Path(__file__).resolve().parent.parent
COOKBOOK = ROOT / "docs" / "cookbook.md"

# A fenced block and the line before it; the cookbook's YAML blocks are all ```yaml.
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>[\w-]*)\n(?P<body>.*?)\n```", re.S)
FILE = re.compile(r"<!-- file: (?P<path>[\w./-]+) -->")
CASE_NAME = re.compile(r"^  - name: ", re.M)
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)


def yaml_blocks() -> list[tuple[str | None, str]]:
    """``(file name or None, text)`` of every fenced YAML block, in order."""
    found = []
    for match in BLOCK.finditer(COOKBOOK.read_text()):
        if match["lang"] in ("yaml", "yml"):
            named = FILE.fullmatch(match["before"].strip())
            found.append((named["path"] if named else None, match["body"] + "\n"))
    return found


def files() -> dict[str, str]:
    return {name: text for name, text in yaml_blocks() if name is not None}


def cookbook_tests() -> dict[str, str]:
    return {name: text for name, text in files().items() if name.endswith(".test.yaml")}


def cookbook_policies() -> dict[str, str]:
    return {name: text for name, text in files().items() if not name.endswith(".test.yaml")}


def write_cookbook(folder: Path, replace: dict[str, str] | None = None) -> None:
    for name, text in {**files(), **(replace or {})}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def limenex(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "limenex", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_yaml_block_names_its_file() -> None:
    """No snippet escapes testing: each ```yaml block is preceded by <!-- file: ... -->."""
    blocks = yaml_blocks()
    assert len(blocks) >= 12
    unnamed = [text.splitlines()[0] for name, text in blocks if name is None]
    assert unnamed == []
    names = [name for name, _ in blocks]
    assert len(names) == len(set(names)), "two blocks write one file"


def test_every_policy_file_is_tested() -> None:
    tested = {
        (Path(name).parent / yaml.safe_load(text)["policies"]).as_posix()
        for name, text in cookbook_tests().items()
    }
    assert set(cookbook_policies()) <= tested
    assert tested <= set(cookbook_policies()), "a test file names a policy file the cookbook lacks"


@pytest.mark.parametrize("name", sorted(cookbook_policies()))
def test_policy_files_validate_with_the_schema_and_the_cli(name: str, tmp_path: Path) -> None:
    text = cookbook_policies()[name]
    jsonschema.validate(yaml.safe_load(text), policy_json_schema())
    write_cookbook(tmp_path)
    done = limenex("validate", name, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("✓ Valid — ")


def test_limenex_test_passes_every_case_of_the_cookbook(tmp_path: Path) -> None:
    write_cookbook(tmp_path)
    done = limenex("test", tmp_path, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    summary = SUMMARY.search(done.stdout)
    assert summary is not None, done.stdout
    cases = sum(len(CASE_NAME.findall(text)) for text in cookbook_tests().values())
    assert (int(summary[1]), int(summary[2])) == (cases, 0)
    assert cases >= 40
    ran = {line.split()[1].split(":")[0] for line in done.stdout.splitlines()[:-1]}
    assert {Path(p).relative_to(tmp_path).as_posix() for p in ran} == set(cookbook_tests())


def test_a_wrong_expectation_in_the_cookbook_fails(tmp_path: Path) -> None:
    """The cookbook's tests can fail: one flipped verdict makes `limenex test` exit 1."""
    name, text = next(
        (name, text) for name, text in sorted(cookbook_tests().items()) if "verdict: ALLOW" in text
    )
    write_cookbook(tmp_path, {name: text.replace("verdict: ALLOW", "verdict: BLOCK", 1)})
    done = limenex("test", tmp_path, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = SUMMARY.search(done.stdout)
    assert summary is not None, done.stdout
    assert summary[2] == "1", done.stdout
    assert "    differs   verdict" in done.stdout
    assert "    trace     1. " in done.stdout
