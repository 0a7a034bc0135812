"""Fuzzing the completions endpoint of a real gateway over a socket: random bytes, random
JSON, mutated portal requests, hostile URLs and numbers. Every answer is below 500, comes
quickly, and the gateway keeps serving: a normal request afterwards is still delivered.

Bounded here (a few hundred requests); ``bench/fuzz.py`` runs the same strategies longer.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.bitrix.protocol import encode_like_php
from gateway.bitrix.simulator import PortalEmulator
from gateway.loopback import LoopbackServer
from gateway.testing import ENGINE_TOKEN, FakeOpenAI, GatewayProcess, make_config
from tests.strategies import encode, mutated_bodies, raw_bodies

pytestmark = pytest.mark.e2e
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, PortalEmulator, httpx.Client]]:
    """The gateway on each backend: a value one database takes and the other refuses is a 4xx on both."""
    upstream, portal = FakeOpenAI(), PortalEmulator()
    queue = {"backend": "sqlite", "lease_seconds": 2, "poll_interval": 0.1}
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server").start()  # started again if a test stopped it
        queue = {"backend": "postgres", "dsn": server.create_database(), "lease_seconds": 2, "poll_interval": 0.5}
    with LoopbackServer(upstream.app) as up, LoopbackServer(portal.app) as portal_server:
        portal.url = portal_server.url
        # Short ttl default and quick delivery retries: accepted oddities end soon.
        config = make_config(up.url, limits={"max_body_bytes": 65536, "default_ttl": 30}, queue=queue)
        gw = GatewayProcess(config, tmp_path_factory.mktemp("fuzz")).start()
        try:
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                yield gw, portal, client
        finally:
            gw.kill()


def _post(client: httpx.Client, content: bytes) -> httpx.Response:
    return client.post(f"/engines/acme_text/{ENGINE_TOKEN}/completions", content=content, headers={"Content-Type": "application/json"})


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.status_code in (202, 400, 413, 422), response.text
    body = response.json()
    assert body == {"result": "OK"} if response.status_code == 202 else body["error"]["message"]


def test_random_bytes_and_json(stack):
    _gw, _portal, client = stack

    @FUZZ
    @given(raw_bodies)
    def run(raw: bytes) -> None:
        _check(_post(client, raw))

    run()


def test_mutated_portal_requests(stack):
    """Each example is a new portal job (its own hash), so accepted ones are stored, run and delivered."""
    _gw, portal, client = stack

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        _, valid = portal.new_request(prompt="fuzz", ttl=30)
        _check(_post(client, encode(data.draw(mutated_bodies(valid)))))

    run()


def test_still_serving_after_the_fuzzing(stack):
    """Runs after the fuzz tests above (same module): nothing hung, nothing died."""
    gw, portal, client = stack
    health = client.get("/-/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    job_hash, body = portal.new_request(prompt="still there?")
    assert _post(client, encode_like_php(body)).status_code == 202
    assert portal.wait(job_hash, timeout=20).delivered[0].body == {"result": "echo: still there?"}
    assert "Traceback" not in gw.logs()
