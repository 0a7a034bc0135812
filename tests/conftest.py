"""The core tests' fixtures (``upstream``, ``portal``, ``gateway``, ``anyio_backend``) come from
the pytest plugin :mod:`gateway.testing.fixtures`, which the core installs as a ``pytest11``
entry point: the same way a plugin's own tests get them."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("gateway"):
        raise pytest.UsageError(
            "the gateway's pytest plugin is not loaded (entry point pytest11 `gateway` = gateway.testing.fixtures): "
            "install the core with `pip install -e .` (again, if the entry point is new), and do not pass `-p no:gateway`"
        )
