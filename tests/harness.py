"""The core tests' names for the gateway runner, which lives in :mod:`gateway.testing.runner`
so that plugins can run their own tests with it."""

from gateway.testing.runner import API_KEY, ENGINE_TOKEN, GatewayProcess, free_port, make_config, subprocess_env

_env = subprocess_env  # the name tests/test_processes.py uses

__all__ = ["API_KEY", "ENGINE_TOKEN", "GatewayProcess", "_env", "free_port", "make_config", "subprocess_env"]
