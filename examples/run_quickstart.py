"""Run the README's Quickstart verbatim in a fresh folder, as a new user would.

The README is the single source: every block after a ``<!-- file: PATH -->`` marker is
written to PATH, every ``bash`` block after a ``<!-- run -->`` marker is run, and its output
is compared with the block after the next ``<!-- output -->`` marker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_MARKED = re.compile(
    r"<!-- (file: (?P<path>\S+)|run|output) -->\s*\n```[^\n]*\n(?P<body>.*?)```", re.S
)


@dataclass
class Snippet:
    kind: str  # "file" | "run" | "output"
    body: str
    path: str | None = None


def snippets(section: str, readme: Path = README) -> list[Snippet]:
    """The marked blocks of one ``## section`` of the README, in order."""
    text = readme.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    found = []
    for match in _MARKED.finditer(text[start : end if end != -1 else len(text)]):
        marker = match.group(1)
        kind = "file" if marker.startswith("file:") else marker
        found.append(Snippet(kind, match.group("body"), match.group("path")))
    return found


def run_section(section: str, folder: Path, *, echo: bool = True) -> list[tuple[str, str]]:
    """Write and run one section's snippets in ``folder``; return (expected, actual) outputs."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    pairs: list[tuple[str, str]] = []
    last_output: str | None = None
    for snippet in snippets(section):
        if snippet.kind == "file":
            target = folder / str(snippet.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(snippet.body)
        elif snippet.kind == "run":
            if echo:
                for command in snippet.body.strip().splitlines():
                    print(f"$ {command}")
            done = subprocess.run(  # noqa: S603 - runs the README's own commands
                ["bash", "-euo", "pipefail", "-c", snippet.body],  # noqa: S607
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            last_output = done.stdout
            if echo:
                print(last_output, end="" if last_output.endswith("\n") else "\n")
            if done.returncode != 0:
                raise SystemExit(f"README command failed ({done.returncode}): {snippet.body}")
        elif last_output is not None:
            pairs.append((snippet.body.strip(), last_output.strip()))
            last_output = None
    return pairs


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="limenex-quickstart-") as tmp:
        pairs = run_section("Quickstart", Path(tmp))
    mismatches = [(want, got) for want, got in pairs if want != got]
    for want, got in mismatches:
        print(f"README output differs:\n--- expected\n{want}\n--- actual\n{got}", file=sys.stderr)
    return 1 if mismatches or not pairs else 0


if __name__ == "__main__":
    sys.exit(main())
