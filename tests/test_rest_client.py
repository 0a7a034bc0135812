from __future__ import annotations

import pytest

from gateway.bitrix.registration import compare
from gateway.bitrix.rest import PortalClient, PortalError, PortalUnreachable
from gateway.config import EngineConfig, RouteTarget
from gateway.engines import Engine
from gateway.tasks import Category
from gateway.testing import free_port

pytestmark = pytest.mark.anyio


def client(webhook: str) -> PortalClient:
    return PortalClient(webhook, retries=2, backoff=0.01)


async def test_results_and_portal_errors(portal):
    async with client(portal.webhook) as rest:
        assert await rest.list() == []
        assert await rest.unregister("nothing") is False
        with pytest.raises(PortalError) as err:
            await rest.call("ai.engine.nonexistent")
        assert err.value.code == "ERROR_METHOD_NOT_FOUND" and err.value.status == 404


async def test_retries_then_gives_up_without_the_secret(portal):
    portal.rest_fail_next((500, "INTERNAL_SERVER_ERROR"), (429, "OPERATION_TIME_LIMIT"))
    async with client(portal.webhook) as rest:
        assert await rest.list() == []  # third attempt succeeds
    closed = f"http://127.0.0.1:{free_port()}/rest/1/{portal.webhook_secret}/"
    async with client(closed) as rest:
        with pytest.raises(PortalUnreachable) as err:
            await rest.list()
    assert "cannot reach 127.0.0.1" in str(err.value) and portal.webhook_secret not in str(err.value)


def test_webhook_must_look_like_one():
    with pytest.raises(ValueError, match="rest"):
        PortalClient("https://acme.bitrix24.com/")


def test_settings_compare_as_the_portal_stores_them():
    config = EngineConfig("e", "E", Category.TEXT, None, (RouteTarget("p", "m"),), {"model_context_limit": 8000, "flag": True})
    engine = Engine(config, "t" * 20, "https://gw/engines/e/tttt/completions")
    stored = {
        "code": "E",
        "category": "text",
        "name": "E",
        "completions_url": engine.completions_url,
        "settings": {"model_context_limit": "8000", "flag": "true"},
    }
    assert compare([engine], [stored])[0].status == "in_sync"  # codes compare case-insensitively
    assert compare([engine], [{**stored, "settings": []}])[0].differences == ["settings"]
