"""Fixtures shared by the core tests and the plugins' tests: real servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_openai.testing import FakeOpenAI

from gateway.bitrix.simulator import PortalEmulator
from gateway.loopback import LoopbackServer
from tests.harness import GatewayProcess, make_config


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture
def portal() -> Iterator[PortalEmulator]:
    emulator = PortalEmulator()
    server = LoopbackServer(emulator.app).start()
    emulator.url = server.url
    emulator.server = server  # type: ignore[attr-defined]  # tests stop and restart it
    yield emulator
    emulator.server.stop()  # type: ignore[attr-defined]


@pytest.fixture
def gateway(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[Callable[..., GatewayProcess]]:
    """``gateway(**config_overrides)`` starts a gateway subprocess; all are killed at the end."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | None = None, *, args: tuple[str, ...] = (), **overrides: Any) -> GatewayProcess:
        process = GatewayProcess(config or make_config(upstream.url, **overrides), tmp_path)
        started.append(process)
        return process.start(*args)

    yield start
    for process in started:
        process.kill()
