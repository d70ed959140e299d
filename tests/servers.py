"""The real servers the suite talks to, and this run's own namespace on them.

Imported as ``servers`` (pytest puts ``tests/`` on ``sys.path`` for ``conftest.py``), so
that ``RUN`` is made once per run: every Redis key and PostgreSQL schema of the run starts
with it, and the session fixture in ``conftest.py`` removes them when the run ends.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

REDIS_URL = os.environ.get("LIMENEX_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("LIMENEX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RUN = f"lxt_{uuid.uuid4().hex[:10]}"
"""This test run's Redis key prefix and PostgreSQL schema prefix."""


def store_url(kind: str, folder: Path, tag: str) -> str:
    """A store URL of ``kind`` that every process of one test shares, and no other test.

    ``folder`` is the test's own temporary folder; ``tag`` keeps tests that share a folder
    name apart on the servers.
    """
    if kind == "file":
        return f"file://{folder}/state.json"
    if kind == "sqlite":
        return f"sqlite:///{folder}/state.db"
    if kind == "redis":
        return f"{REDIS_URL}?prefix={RUN}:{tag}:{folder.name}"
    return f"{POSTGRES_URL}?schema={RUN}_{tag}_{folder.name.replace('-', '_')}"
