"""The JSON Schema agrees with the loader on every policy file the project shows users."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from limenex.core.errors import PolicyFileError
from limenex.core.policy_store import load_policy_text, policy_json_schema

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- file: (?P<path>\S+\.ya?ml) -->\s*\n```yaml\n(?P<body>.*?)```", re.S)


def _shown() -> list[tuple[str, str]]:
    """Every policy file in the README, the docs and the examples (test files left out)."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in _BLOCK.finditer(doc.read_text()):
            if not match["path"].endswith(".test.yaml"):
                found.append((f"{doc.name}:{match['path']}", match["body"]))
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        if not path.name.endswith(".test.yaml"):
            found.append((str(path.relative_to(ROOT)), path.read_text()))
    return found


SHOWN = _shown()


def test_the_project_shows_policy_files() -> None:
    assert len(SHOWN) >= 5


@pytest.mark.parametrize(("name", "text"), SHOWN, ids=[name for name, _ in SHOWN])
def test_schema_and_loader_agree(name: str, text: str) -> None:
    """A file the loader accepts the schema accepts; the README's broken ones both refuse."""
    data = yaml.safe_load(text)
    try:
        load_policy_text(re.sub(r"(?m)^_extends:.*$", "", text), name)
    except PolicyFileError:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(data, policy_json_schema())
    else:
        jsonschema.validate(data, policy_json_schema())


def test_a_typo_is_refused_by_the_schema() -> None:
    text = dict(SHOWN)["README.md:reference.yaml"]
    assert "param:" in text
    jsonschema.validate(yaml.safe_load(text), policy_json_schema())
    for typo in (("param:", "parm:"), ("policies:", "polices:"), ("window:", "windw:")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(text.replace(*typo, 1)), policy_json_schema())
