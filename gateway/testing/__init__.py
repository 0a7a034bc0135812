"""What a plugin's tests need from the gateway: real servers on 127.0.0.1, no mocks of the core.

Installed with the core as a pytest plugin (entry point ``pytest11``: ``gateway``), so that
the fixtures in :mod:`gateway.testing.fixtures` (``upstream``, ``portal``, ``gateway``,
``anyio_backend``) reach every test run where the gateway is installed, a plugin's own
folder included; ``-p no:gateway`` turns them off.

- :mod:`~gateway.testing.upstream`: ``FakeOpenAI``, a scriptable OpenAI-compatible provider;
- :mod:`~gateway.testing.runner`: ``GatewayProcess`` (the gateway in a subprocess), ``make_config``;
- :mod:`~gateway.testing.speech`: WAV recordings (spoken by espeak-ng, or silence);
- :mod:`~gateway.testing.postgres`: ``PostgresServer``, a throw-away PostgreSQL cluster on 127.0.0.1;
- the portal emulator (``PortalEmulator``) and ``LoopbackServer`` that serves any ASGI app.

This package does not import pytest: benchmarks use it too.
"""

from gateway.bitrix.simulator import PortalEmulator
from gateway.config import ConfigError
from gateway.loopback import LoopbackServer
from gateway.testing.postgres import PostgresServer
from gateway.testing.runner import API_KEY, ENGINE_TOKEN, GatewayProcess, free_port, make_config, start_up_error, subprocess_env
from gateway.testing.speech import silence, speak
from gateway.testing.upstream import FakeOpenAI, make_png

__all__ = [
    "API_KEY",
    "ENGINE_TOKEN",
    "ConfigError",
    "FakeOpenAI",
    "GatewayProcess",
    "LoopbackServer",
    "PortalEmulator",
    "PostgresServer",
    "free_port",
    "make_config",
    "make_png",
    "silence",
    "speak",
    "start_up_error",
    "subprocess_env",
]
