"""The pytest plugin shipped with the gateway (entry point ``pytest11``: ``gateway``).

Fixtures for the core's tests and every plugin's: an OpenAI-compatible ``upstream`` stub,
the ``portal`` emulator and ``gateway``, a factory of gateway subprocesses configured to
use both. All of them serve real sockets on 127.0.0.1 and stop at the end of the test.
``postgres_server`` is one throw-away PostgreSQL cluster for the whole run and ``postgres_dsn``
a fresh database in it per test (:mod:`gateway.testing.postgres`; PostgreSQL must be installed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.bitrix.simulator import PortalEmulator
from gateway.loopback import LoopbackServer
from gateway.testing.postgres import PostgresServer
from gateway.testing.runner import GatewayProcess, make_config
from gateway.testing.upstream import FakeOpenAI


def pytest_configure(config: pytest.Config) -> None:
    """Declare the markers the gateway's tests use, so that ``--strict-markers`` accepts them in any project."""
    config.addinivalue_line("markers", "e2e: end-to-end test over real sockets (gateway under uvicorn in a subprocess)")


@pytest.fixture
def anyio_backend() -> str:
    """``@pytest.mark.anyio`` tests run on asyncio, the loop the gateway serves on."""
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    """A :class:`FakeOpenAI` served on 127.0.0.1; its base URL is ``upstream.url + "/v1"``."""
    fake = FakeOpenAI()
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture
def portal() -> Iterator[PortalEmulator]:
    """The portal emulator on 127.0.0.1: it sends requests and records callbacks.
    ``portal.server`` is its :class:`LoopbackServer`, for tests that stop and restart the portal."""
    emulator = PortalEmulator()
    server = LoopbackServer(emulator.app).start()
    emulator.url = server.url
    emulator.server = server  # type: ignore[attr-defined]  # tests stop and restart it
    yield emulator
    server.stop()


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL cluster for the run (127.0.0.1, a free port, trust auth), removed at the end.
    Fails (does not skip) when PostgreSQL is not installed: the message says how to install it."""
    server = PostgresServer()
    with server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN of a fresh, empty database in :func:`postgres_server`, dropped after the test.
    A test that stopped the server gets it started again first."""
    postgres_server.start()
    dsn = postgres_server.create_database()
    yield dsn
    if postgres_server.running():
        postgres_server.drop_database(dsn.rsplit("/", 1)[1])
    else:
        postgres_server.start()  # the next test finds it running
