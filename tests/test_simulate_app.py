"""``gateway simulate --app`` against a running gateway: install → request → uninstall from the command
line, with the emulated portal and OAuth server on 127.0.0.1, and the errors that tell the user what to set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.loopback import LoopbackServer
from gateway.testing import FakeOpenAI, GatewayProcess, make_config

pytestmark = pytest.mark.e2e
CLIENT_ID, CLIENT_SECRET = "app.simulate.test", "market-SECRET-simulate-0123456789"


def app_config(upstream_url: str, **app: Any) -> dict[str, Any]:
    config = make_config(upstream_url)
    config["engines"][0].pop("token")  # app engines are reached through tenant URLs
    config["app"] = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "engines": ["acme_text"], "oauth_servers": ["127.0.0.1"], **app}
    return config


@pytest.fixture
def upstream_url() -> Iterator[str]:
    upstream = FakeOpenAI()
    with LoopbackServer(upstream.app) as server:
        yield server.url


def test_simulate_app_installs_answers_and_uninstalls(tmp_path: Path, upstream_url: str) -> None:
    gw = GatewayProcess(app_config(upstream_url), tmp_path).start()
    try:
        run = gw.cli("simulate", "--app", "--prompt", "hello from the app", "--timeout", "30", check=False)
        out = run.stdout
        assert run.returncode == 0, f"{out}\n{run.stderr}\n{gw.logs()[-3000:]}"
        assert f"install (ONAPPINSTALL to {gw.url}/app/events): HTTP 200" in out
        assert "engine acme_text registered by the gateway after" in out
        assert "ONAPPUNINSTALL handler bound: yes" in out
        assert "completions POST (with the portal user's auth): HTTP 202" in out
        assert "success callback after" in out and "echo: hello from the app" in out
        assert "uninstall (ONAPPUNINSTALL to the handler the gateway bound): HTTP 200" in out
        assert "completions POST after uninstall: HTTP 404" in out and "refused, as it must be" in out
        tenants = gw.cli_json("tenants", "list")
        assert [t["status"] for t in tenants] == ["uninstalled"]
        secret = gw.cli_json("tenants", "show", tenants[0]["domain"])  # an uninstalled tenant has no URLs
        assert secret["completions_urls"] == {}
        assert CLIENT_SECRET not in out + run.stderr
        assert "/app/" in out and "…/engines/acme_text/completions" in out  # the tenant's URL secret is masked
    finally:
        gw.stop()


def test_simulate_app_says_which_keys_to_set_when_the_oauth_server_is_untrusted(tmp_path: Path, upstream_url: str) -> None:
    gw = GatewayProcess(app_config(upstream_url, oauth_servers=["oauth.bitrix.info"]), tmp_path).start()
    try:
        run = gw.cli("simulate", "--app", "--timeout", "10", check=False)
        assert run.returncode == 1, run.stdout
        assert "HTTP 403" in run.stdout and "untrusted_oauth_server" in run.stdout
        assert "`app.oauth_servers: [oauth.bitrix.info, 127.0.0.1]`" in run.stderr
        assert "`security.allow_private_networks: true`" in run.stderr
        assert gw.cli_json("tenants", "list") == []
    finally:
        gw.stop()


def test_simulate_app_without_app_mode_is_a_config_error(tmp_path: Path, upstream_url: str) -> None:
    gw = GatewayProcess(make_config(upstream_url), tmp_path)  # not started: the config is refused first
    run = gw.cli("simulate", "--app", check=False)
    assert run.returncode == 2, run.stdout
    assert "configuration error:" in run.stderr and "app: app mode is not configured" in run.stderr
    run = gw.cli("simulate", check=False)
    assert run.returncode == 2 and "pass --engine CODE; engines: acme_text" in run.stderr
