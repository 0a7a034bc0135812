"""The core tests' fixtures (``upstream``, ``portal``, ``gateway``, ``anyio_backend``) come from
the pytest plugin :mod:`gateway.testing.fixtures`, which the core installs as a ``pytest11``
entry point: the same way a plugin's own tests get them. The core's own fixtures are below."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.jobs.sqlite import SQLiteJobQueue


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("gateway"):
        raise pytest.UsageError(
            "the gateway's pytest plugin is not loaded (entry point pytest11 `gateway` = gateway.testing.fixtures): "
            "install the core with `pip install -e .` (again, if the entry point is new), and do not pass `-p no:gateway`"
        )


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SQLiteJobQueue]:
    """An open SQLite queue in a temporary folder, closed after the test."""
    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    await q.open()
    yield q
    await q.close()
