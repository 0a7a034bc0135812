"""App mode end to end over real sockets: portals (emulated, with Bitrix's OAuth server) install the
app on a running gateway, get their engines registered, send requests and uninstall."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.bitrix.oauth_emulator import OAuthEmulator
from gateway.bitrix.simulator import PortalEmulator, php_form
from gateway.loopback import LoopbackServer
from gateway.tenants.model import tenant_key
from gateway.tenants.service import CACHE_SECONDS
from gateway.testing import FakeOpenAI, GatewayProcess, make_config
from gateway.testing.runner import subprocess_env

pytestmark = pytest.mark.e2e
CLIENT_ID, CLIENT_SECRET = "app.gateway.test", "market-SECRET-0123456789abcdef"
PORTAL_RETRIES = 2


def app_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    config = make_config(upstream_url, **overrides)
    config["engines"][0].pop("token")  # app engines are reached through tenant URLs
    config["app"] = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "engines": ["acme_text"], "oauth_servers": ["127.0.0.1"]}
    config["portal"] = {"retries": PORTAL_RETRIES, "backoff": 0.05}  # REST calls to portals: quick retries in tests
    # No portal listed: an installed portal's own domain is where its callbacks may go.
    config["security"] = {**config["security"], "allowed_portals": []}
    return config


@pytest.fixture
def oauth() -> Iterator[OAuthEmulator]:
    server = OAuthEmulator(CLIENT_ID, CLIENT_SECRET)
    with LoopbackServer(server.app) as running:
        server.url = running.url
        yield server


@pytest.fixture
def portals() -> Iterator[list[PortalEmulator]]:
    started: list[PortalEmulator] = []
    servers: list[LoopbackServer] = []
    for _ in range(3):
        portal = PortalEmulator()
        server = LoopbackServer(portal.app).start()
        portal.url = server.url
        started.append(portal)
        servers.append(server)
    yield started
    for server in servers:
        server.stop()


def wait_until(check: Any, what: str, gw: GatewayProcess, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s; gateway log:\n{gw.logs()[-4000:]}")


def registered(portal: PortalEmulator) -> list[dict[str, Any]]:
    return [e for e in portal.engines.values() if e["app_code"]]


def test_portals_install_get_engines_send_requests_and_one_uninstalls(tmp_path: Path, oauth: OAuthEmulator, portals: list[PortalEmulator]) -> None:
    upstream = FakeOpenAI()
    with LoopbackServer(upstream.app) as up:
        gw = GatewayProcess(app_config(up.url), tmp_path).start()
        try:
            info = gw.cli_json("app", "info")
            for portal in portals:
                _, status = portal.install(oauth, info["install_url"])
                assert status == 200, gw.logs()[-3000:]
            for portal in portals:
                engines = wait_until(lambda p=portal: registered(p), f"engines registered on {portal.domain}", gw)
                assert [e["code"] for e in engines] == ["acme_text"]
                assert any(b.event == "ONAPPUNINSTALL" for b in portal.event_bindings.values())
            urls = [registered(p)[0]["completions_url"] for p in portals]
            assert len(set(urls)) == 3 and all(u.startswith(gw.url + "/app/") for u in urls)

            for portal, url in zip(portals, urls, strict=True):
                job_hash, body = portal.new_request(auth=portal.app_auth())
                assert portal.send(url, body).status_code == 202
                assert portal.wait(job_hash).delivered, gw.logs()[-3000:]

            # portal A's request on portal B's URL is refused; so is a callback on another domain
            job_hash, body = portals[0].new_request(auth=portals[0].app_auth())
            refused = portals[0].send(urls[1], body)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "wrong_portal"
            _, body = portals[0].new_request(auth=portals[1].app_auth())
            refused = portals[1].send(urls[1], body)  # auth of B, callbacks on A
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "callback_not_allowed"

            assert portals[2].uninstall(clean=True) == [200]
            job_hash, body = portals[2].new_request()
            assert portals[2].send(urls[2], body).status_code == 404
            tenants = {t["domain"]: t for t in gw.cli_json("tenants", "list")}
            assert tenants[portals[2].domain]["status"] == "uninstalled"
            assert tenants[portals[0].domain]["status"] == "active" and tenants[portals[0].domain]["registration"] == "done"
            job_hash, body = portals[0].new_request(auth=portals[0].app_auth())
            assert portals[0].send(urls[0], body).status_code == 202 and portals[0].wait(job_hash).delivered
            assert CLIENT_SECRET not in gw.logs()
        finally:
            gw.stop()


# -- shared pieces of the tests below ------------------------------------------------------


@pytest.fixture
def start_gateway(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[Callable[..., GatewayProcess]]:
    """``start_gateway(config=None, public_url=None)``: an app-mode gateway in its own folder; all killed at the end."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | None = None, *, public_url: str | None = None) -> GatewayProcess:
        workdir = tmp_path / f"node{len(started)}"
        workdir.mkdir()
        process = GatewayProcess(config or app_config(upstream.url), workdir, public_url=public_url)
        started.append(process)
        return process.start(timeout=60)

    yield start
    for process in started:
        process.kill()


class Portals:
    """Emulated portals, each on its own port (``new()``), and second addresses for renames (``address_for``)."""

    def __init__(self) -> None:
        self.servers: list[LoopbackServer] = []

    def new(self) -> PortalEmulator:
        portal = PortalEmulator()
        portal.url = self.address_for(portal)
        return portal

    def address_for(self, portal: PortalEmulator) -> str:
        self.servers.append(LoopbackServer(portal.app).start())
        return self.servers[-1].url


@pytest.fixture
def emulated() -> Iterator[Portals]:
    portals = Portals()
    yield portals
    for server in portals.servers:
        server.stop()


def events_url(gw: GatewayProcess) -> str:
    return gw.url + "/app/events"


def tenant(gw: GatewayProcess, portal: PortalEmulator) -> dict[str, Any]:
    result: dict[str, Any] = gw.cli_json("tenants", "show", portal.member_id)
    return result


def tenants(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    """Every tenant by member_id."""
    return {t["member_id"]: t for t in gw.cli_json("tenants", "list")}


def installed(gw: GatewayProcess, oauth: OAuthEmulator, portal: PortalEmulator) -> str:
    """Install the app on ``portal`` through ``gw``, wait for its engine; its completions URL."""
    _, status = portal.install(oauth, events_url(gw))
    assert status == 200, gw.logs()[-3000:]
    engines = wait_until(lambda: registered(portal), f"the engine registered on {portal.domain}", gw)
    assert [e["code"] for e in engines] == ["acme_text"]
    url: str = engines[0]["completions_url"]
    return url


def served(gw: GatewayProcess, portal: PortalEmulator, url: str) -> None:
    """A request from ``portal`` on ``url`` is accepted and its answer delivered to the portal."""
    job_hash, body = portal.new_request(auth=portal.app_auth())
    answer = portal.send(url, body)
    assert answer.status_code == 202, f"{answer.status_code} {answer.text}\n{gw.logs()[-3000:]}"
    assert portal.wait(job_hash, timeout=20).delivered, gw.logs()[-3000:]


def refused(portal: PortalEmulator, url: str) -> int:
    _, body = portal.new_request()
    return portal.send(url, body).status_code


def forged_uninstall(portal: PortalEmulator, application_token: str, member_id: str | None = None) -> dict[str, Any]:
    return {
        "event": "ONAPPUNINSTALL",
        "event_handler_id": "7",
        "data": {"LANGUAGE_ID": "en", "CLEAN": "1"},
        "ts": str(int(time.time())),
        "auth": {
            "domain": portal.domain,
            "server_endpoint": portal.oauth.server_endpoint if portal.oauth else "",
            "client_endpoint": portal.client_endpoint,
            "member_id": member_id or portal.member_id,
            "application_token": application_token,
        },
    }


def url_secret(completions_url: str) -> str:
    """``…/app/<tenant>/<secret>/engines/<code>/completions`` → the secret."""
    return completions_url.split("/app/", 1)[1].split("/")[1]


def assert_no_secrets(oauth: OAuthEmulator, portals: list[PortalEmulator], gateways: list[GatewayProcess], *extra: str) -> None:
    """No token, application token, client secret or URL secret seen in these flows is in a gateway's log."""
    values = {CLIENT_SECRET, *extra}
    for portal in portals:
        for event in portal.sent_events:
            values.update(str(event.fields.get("auth", {}).get(k) or "") for k in ("access_token", "refresh_token", "application_token"))
        values.update(str(params.get("auth") or "") for _, params in portal.rest_calls)  # tokens the gateway used, refreshed ones included
        values.update(url_secret(e["completions_url"]) for e in portal.engines.values() if "/app/" in e["completions_url"])
        if portal.installed_app is not None:
            values.add(portal.installed_app.client_secret)
    for query in oauth.token_requests:
        values.update((query.get("refresh_token", ""), query.get("client_secret", "")))
    values = {v for v in values if len(v) >= 8}
    assert len(values) > 3
    for gw in gateways:
        logs = gw.logs()
        leaked = [v[:6] + "…" for v in values if v in logs]
        assert not leaked, f"secrets in the log of {gw.url}: {leaked}"


class Recorder:
    """An HTTP server that records every request: a host the gateway must never call."""

    def __init__(self) -> None:
        self.requests: list[str] = []

        async def record(request: Request) -> Response:
            self.requests.append(f"{request.method} {request.url.path}")
            return JSONResponse({"result": {"install": {}}})

        self.app = Starlette(routes=[Route("/{path:path}", record, methods=["GET", "POST"])])


# -- 1. forged installs --------------------------------------------------------------------


def test_forged_installs_are_refused_and_store_nothing(start_gateway: Callable[..., GatewayProcess], oauth: OAuthEmulator, emulated: Portals) -> None:
    gw = start_gateway()
    a, b = emulated.new(), emulated.new()
    real, _ = a.install(oauth, events_url(gw), send=False)  # a real install event of A, not sent yet
    b.install(oauth, events_url(gw), send=False)

    def forged(**auth: str) -> httpx.Response:
        fields = {**real, "auth": {**real["auth"], **auth}}
        return a.send_event(events_url(gw), fields)

    # a token the OAuth server does not know
    answer = forged(access_token=secrets.token_hex(32))
    assert (answer.status_code, answer.json()["error"]) == (403, "install_not_verified"), gw.logs()[-3000:]
    # A's real token, B's member_id; then all of B's identity with A's token
    answer = forged(member_id=b.member_id)
    assert (answer.status_code, answer.json()["error"]) == (403, "install_not_verified")
    answer = forged(member_id=b.member_id, domain=b.domain, client_endpoint=b.client_endpoint)
    assert (answer.status_code, answer.json()["error_description"]) == (403, "the token does not belong to this portal")
    # OAuth servers not in app.oauth_servers: never called
    recorder = Recorder()
    with LoopbackServer(recorder.app) as other:
        port = other.url.rsplit(":", 1)[1]
        for endpoint in (f"http://localhost:{port}/rest/", "http://10.0.0.1/rest/", f"http://127.0.0.1.nip.io:{port}/rest/"):
            answer = forged(server_endpoint=endpoint)
            assert (answer.status_code, answer.json()["error"]) == (403, "untrusted_oauth_server"), endpoint
    assert recorder.requests == []
    # garbage: 400 (413 when too large), never a 5xx
    garbage = [
        b"",
        b"\xff\xfe\x00",
        b"event=ONAPPINSTALL",
        b"event=ONAPPINSTALL&auth=1",
        b"event=ONAPPINSTALL&auth[member_id]=x&auth=1",
        b"event=ONAPPINSTALL&" + b"&".join(b"auth[k%d]=v" % i for i in range(300)),
        b"event=ONAPPINSTALL&auth[a][b][c][d]=1",
        b"event=ONAPPUNINSTALL&auth[member_id]=x%0A&auth[domain]=a&auth[application_token]=t",
        b"event=ONAPPTEST",
        b'{"event": "ONAPPINSTALL"}',
        urlencode(php_form({**real, "auth": {**real["auth"], "client_endpoint": "http://evil.example/rest/"}})).encode(),
    ]
    for body in garbage:
        answer = httpx.post(events_url(gw), content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.status_code == 400 and answer.json()["error"] in ("invalid_event", "unknown_event"), (body[:80], answer.text)
    answer = httpx.post(events_url(gw), content=b"event=" + b"x" * 70000, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413
    assert httpx.get(events_url(gw)).status_code == 405
    assert tenants(gw) == {}, "a forged install stored a tenant"

    assert a.send_event(events_url(gw), real).status_code == 200  # the real event, refused above only for what was forged
    assert list(tenants(gw)) == [a.member_id]
    assert "Traceback" not in gw.logs()
    assert_no_secrets(oauth, [a, b], [gw], real["auth"]["access_token"], real["auth"]["refresh_token"], real["auth"]["application_token"])


# -- 2. forged and replayed uninstalls -------------------------------------------------------


def test_forged_uninstall_unknown_portal_and_replayed_install(start_gateway: Callable[..., GatewayProcess], oauth: OAuthEmulator, emulated: Portals) -> None:
    gw = start_gateway()
    a = emulated.new()
    url = installed(gw, oauth, a)
    install_event = next(e.fields for e in a.sent_events if e.fields["event"] == "ONAPPINSTALL")

    answer = a.send_event(events_url(gw), forged_uninstall(a, secrets.token_hex(16)))
    assert (answer.status_code, answer.json()["error"]) == (403, "invalid_application_token"), gw.logs()[-3000:]
    answer = a.send_event(events_url(gw), forged_uninstall(a, install_event["auth"]["application_token"][:-1]))  # a prefix is not the token
    assert answer.status_code == 403
    assert tenant(gw, a)["status"] == "active"
    served(gw, a, url)

    stranger = secrets.token_hex(16)
    answer = a.send_event(events_url(gw), forged_uninstall(a, install_event["auth"]["application_token"], member_id=stranger))
    assert (answer.status_code, answer.json()["error"]) == (404, "unknown_portal")
    assert not (Path(gw.config["data_dir"]) / "tenant-locks" / f"{tenant_key(stranger)}.lock").exists()  # a made-up portal takes no lock

    assert a.uninstall() == [200]
    assert refused(a, url) == 404
    replay = a.send_event(events_url(gw), install_event)  # the old install, its token revoked by the uninstall
    assert (replay.status_code, replay.json()["error"]) == (403, "install_not_verified"), gw.logs()[-3000:]
    shown = tenant(gw, a)
    assert shown["status"] == "uninstalled" and not shown["completions_urls"]
    assert refused(a, url) == 404
    assert_no_secrets(oauth, [a], [gw])


# -- 3. reinstall ----------------------------------------------------------------------------


def test_reinstall_is_idempotent(start_gateway: Callable[..., GatewayProcess], oauth: OAuthEmulator, emulated: Portals) -> None:
    gw = start_gateway()
    a = emulated.new()
    url = installed(gw, oauth, a)
    calls_before = len(a.rest_calls)
    _, status = a.reinstall()
    assert status == 200

    def registered_again() -> bool:
        return any(m == "ai.engine.list" for m, _ in a.rest_calls[calls_before:]) and tenant(gw, a)["registration"] == "done"

    wait_until(registered_again, "the engines checked again after the reinstall", gw)
    engines = registered(a)
    assert [(e["code"], e["completions_url"]) for e in engines] == [("acme_text", url)]  # url_secret kept, nothing registered twice
    assert [m for m, _ in a.rest_calls[calls_before:]].count("ai.engine.register") == 0
    assert sum(1 for b in a.event_bindings.values() if b.event == "ONAPPUNINSTALL") == 1
    shown = tenant(gw, a)
    assert shown["status"] == "active" and shown["engines"] == ["acme_text"] and shown["completions_urls"] == {"acme_text": url}
    served(gw, a, url)
    assert_no_secrets(oauth, [a], [gw])


def test_an_install_event_sent_twice_at_once_makes_one_tenant_with_one_url(
    start_gateway: Callable[..., GatewayProcess], oauth: OAuthEmulator, emulated: Portals
) -> None:
    """The same first install twice at once (a portal's retry, two nodes): one record, one URL secret,
    and the engine the portal has registered is the URL the gateway serves."""
    from concurrent.futures import ThreadPoolExecutor

    gw = start_gateway()
    a = emulated.new()
    fields, _ = a.install(oauth, events_url(gw), send=False)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: a.send_event(events_url(gw), fields).status_code, range(4)))
    assert answers == [200] * 4, gw.logs()[-3000:]
    wait_until(lambda: tenant(gw, a)["registration"] == "done" and registered(a), "the engine registered", gw)
    [engine] = registered(a)
    assert list(tenants(gw)) == [a.member_id] and tenant(gw, a)["completions_urls"] == {"acme_text": engine["completions_url"]}
    served(gw, a, engine["completions_url"])


def test_a_local_app_installs_only_on_a_portal_the_operator_named(
    start_gateway: Callable[..., GatewayProcess], upstream: FakeOpenAI, oauth: OAuthEmulator, emulated: Portals
) -> None:
    """A local app can be made on any portal: unnamed, its install is refused; named in
    app.local_apps, it installs and its tokens refresh with that portal's own pair."""
    stranger, named = emulated.new(), emulated.new()
    local = oauth.local_app(named.member_id)
    config = app_config(upstream.url)
    config["app"] = {**config["app"], "client_id": "", "client_secret": ""}  # local apps only: no Marketplace pair
    config["app"]["local_apps"] = [{"domain": named.domain, "client_id": local.client_id, "client_secret": local.client_secret}]
    gw = start_gateway(config)
    events = gw.url + "/app/events"
    _, status = stranger.install(oauth, events, status="L")
    assert status == 403 and "a local app on a portal not in app.local_apps" in gw.logs(), gw.logs()[-2000:]
    assert gw.cli_json("tenants", "list") == []
    _, status = named.install(oauth, events, client_id=local.client_id)
    assert status == 200, gw.logs()[-2000:]
    wait_until(lambda: registered(named), "the local app's engine registered", gw)
    assert registered(named)[0]["app_code"] == local.client_id
    assert local.client_secret not in gw.logs()


# -- 5, 7, 8: registration meets REST limits, a renamed portal, a refused refresh token ------------


def test_registration_retries_follows_a_rename_and_marks_invalid_grant(
    start_gateway: Callable[..., GatewayProcess], oauth: OAuthEmulator, emulated: Portals
) -> None:
    gw = start_gateway()
    limited, renamed, revoked = emulated.new(), emulated.new(), emulated.new()
    # REST limits inside one attempt: retried at once, the engine ends registered
    limited.rest_fail_next((503, "QUERY_LIMIT_EXCEEDED"), (503, "QUERY_LIMIT_EXCEEDED"))
    url = installed(gw, oauth, limited)
    assert [m for m, _ in limited.rest_calls].count("event.bind") == 3 and tenant(gw, limited)["registration"] == "done"
    served(gw, limited, url)

    # a first attempt that fails for good (every retry limited): the registration is tried again later
    for portal in (renamed, revoked):
        portal.rest_fail_next(*[(503, "QUERY_LIMIT_EXCEEDED")] * (PORTAL_RETRIES + 1))
        assert portal.install(oauth, events_url(gw))[1] == 200
    for portal in (renamed, revoked):
        wait_until(lambda p=portal: tenant(gw, p)["registration_error"], f"the first registration attempt on {portal.domain} failing", gw)
    old_domain = renamed.domain
    renamed.rename_to(emulated.address_for(renamed))  # the next attempt meets a 302 to the new address
    oauth.expire_tokens(revoked.member_id)  # ... and an expired token whose refresh token is no longer valid
    oauth.expire_refresh_tokens(revoked.member_id)

    shown = wait_until(lambda: (t := tenant(gw, renamed))["registration"] == "done" and t, "the registration after the rename", gw, timeout=30)
    assert shown["domain"] == renamed.domain != old_domain and shown["status"] == "active"
    assert [e["code"] for e in registered(renamed)] == ["acme_text"]
    served(gw, renamed, registered(renamed)[0]["completions_url"])  # callbacks on the new domain are the tenant's

    shown = wait_until(lambda: (t := tenant(gw, revoked))["status"] == "needs_reinstall" and t, "the tenant marked needs_reinstall", gw, timeout=30)
    assert shown["registration"] == "failed"
    assert f"reinstall the app on {revoked.domain}" in shown["detail"] and "invalid_grant" in shown["detail"]
    assert oauth.refreshes(revoked.member_id) == 1 and ("event.bind", "expired_token") in revoked.rest_denied
    assert tenant(gw, limited)["status"] == "active"
    # its requests are still served: callbacks need no token (its engines are on the portal from before)
    job_hash, body = revoked.new_request(auth=revoked.app_auth())
    key_url = gw.cli_json("tenants", "show", revoked.member_id)["completions_urls"]["acme_text"]
    answer = revoked.send(key_url, body)
    assert answer.status_code == 202 and revoked.wait(job_hash).delivered, gw.logs()[-3000:]
    assert_no_secrets(oauth, [limited, renamed, revoked], [gw])


# -- 6. the OAuth server down -----------------------------------------------------------------


def test_oauth_server_down(start_gateway: Callable[..., GatewayProcess], oauth: OAuthEmulator, emulated: Portals) -> None:
    gw = start_gateway()
    a, b = emulated.new(), emulated.new()
    url = installed(gw, oauth, a)
    oauth.down()
    served(gw, a, url)  # callbacks need no token
    fields, status = b.install(oauth, events_url(gw))
    assert status == 503, gw.logs()[-3000:]
    assert b.member_id not in tenants(gw)
    oauth.down(False)
    assert b.reinstall()[1] == 200  # the admin reinstalls once the OAuth server is back
    installed_b = wait_until(lambda: registered(b), "the engine registered after the reinstall", gw)
    served(gw, b, installed_b[0]["completions_url"])
    assert_no_secrets(oauth, [a, b], [gw], fields["auth"]["access_token"], fields["auth"]["refresh_token"])


# -- 4. an expired token refreshed exactly once, by racing processes -------------------------------

CALLER = r"""
import asyncio, hashlib, json, sys, time
from pathlib import Path
from gateway.config import load_config
from gateway.stores import Stores
from gateway.tenants.service import TenantService

async def main(config_path, member_id, go, calls):
    config = load_config(config_path)
    stores = Stores.for_config(config)
    await stores.queue.open()
    await stores.tenants.open()
    service = TenantService(config, stores.tenants, stores.queue, stores.files)
    tenant = await stores.tenants.get(member_id)
    print("ready", flush=True)
    while not Path(go).exists():
        await asyncio.sleep(0.002)

    async def one():
        async with service.portal(tenant) as portal:
            return [e["code"] for e in await portal.list()]

    lists = await asyncio.gather(*(one() for _ in range(calls)))
    after = await stores.tenants.get(member_id)
    print(json.dumps({"lists": lists, "token": hashlib.sha256(after.tokens.access_token.encode()).hexdigest(), "status": str(after.status)}), flush=True)
    await service.oauth.aclose()
    await stores.tenants.close()
    await stores.queue.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""
CALLS_PER_PROCESS = 2
TOKEN_DELAY = 3.0
"""The OAuth server takes this long to answer a refresh: every racing caller meets ``expired_token`` meanwhile."""


def slow_token_endpoint(oauth: OAuthEmulator) -> Any:
    """``oauth.app`` with refreshes answered after :data:`TOKEN_DELAY` (a slow OAuth server widens the race)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/oauth/token"):
            await asyncio.sleep(TOKEN_DELAY)
        await oauth.app(scope, receive, send)

    return app


def race_refresh(gw: GatewayProcess, oauth: OAuthEmulator, portal: PortalEmulator, go: Path) -> list[dict[str, Any]]:
    """Two processes with two callers each call the portal with the tenant's expired token at once."""
    callers = [
        subprocess.Popen(
            [sys.executable, "-c", CALLER, str(gw.config_path), portal.member_id, str(go), str(CALLS_PER_PROCESS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=gw.workdir,
            env=subprocess_env(),
        )
        for _ in range(2)
    ]
    try:
        for caller in callers:
            assert caller.stdout is not None
            line = caller.stdout.readline()
            assert line.strip() == "ready", line + caller.stdout.read()
        oauth.expire_tokens(portal.member_id)
        go.touch()
        outputs = [caller.communicate(timeout=60)[0] for caller in callers]
    finally:
        for caller in callers:
            if caller.poll() is None:
                caller.kill()
    assert all(c.returncode == 0 for c in callers), "\n".join(outputs)
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_expired_token_is_refreshed_once_under_contention(
    backend: str, request: pytest.FixtureRequest, start_gateway: Callable[..., GatewayProcess], upstream: FakeOpenAI, emulated: Portals, tmp_path: Path
) -> None:
    oauth = OAuthEmulator(CLIENT_ID, CLIENT_SECRET)
    with LoopbackServer(slow_token_endpoint(oauth)) as running:
        oauth.url = running.url
        config = app_config(upstream.url)
        if backend == "postgres":
            dsn = request.getfixturevalue("postgres_dsn")
            config["queue"] = {"backend": "postgres", "dsn": dsn, "lease_seconds": 2, "poll_interval": 0.5, "pool_size": 4}
        gw = start_gateway(config)
        portal = emulated.new()
        installed(gw, oauth, portal)
        denied_before = len(portal.rest_denied)

        results = race_refresh(gw, oauth, portal, tmp_path / "go")

        assert portal.rest_denied[denied_before:] == [("ai.engine.list", "expired_token")] * (2 * CALLS_PER_PROCESS), "the callers did not race"
        assert oauth.refreshes(portal.member_id) == 1, f"{oauth.refreshes(portal.member_id)} refreshes reached the OAuth server"
        assert all(r["lists"] == [["acme_text"]] * CALLS_PER_PROCESS for r in results), results
        assert results[0]["token"] == results[1]["token"] and {r["status"] for r in results} == {"active"}
        assert tenant(gw, portal)["last_refresh_at"] is not None
        assert_no_secrets(oauth, [portal], [gw])


# -- 9. three portals on two nodes sharing PostgreSQL ----------------------------------------------


def test_three_portals_on_two_nodes_sharing_postgres(
    start_gateway: Callable[..., GatewayProcess], upstream: FakeOpenAI, oauth: OAuthEmulator, emulated: Portals, postgres_dsn: str
) -> None:
    config = app_config(upstream.url)
    config["queue"] = {"backend": "postgres", "dsn": postgres_dsn, "lease_seconds": 2, "poll_interval": 0.5, "pool_size": 4}
    node0 = start_gateway(config)
    node1 = start_gateway(config, public_url=node0.url)  # behind one address: both announce node 0's URL
    nodes = [node0, node1]

    def on(node: GatewayProcess, url: str) -> str:
        return node.url + url.removeprefix(node0.url)

    portals = [emulated.new() for _ in range(3)]
    for i, portal in enumerate(portals):  # install events reach either node
        assert portal.install(oauth, events_url(nodes[i % 2]))[1] == 200, nodes[i % 2].logs()[-3000:]
    urls = [wait_until(lambda p=p: registered(p), f"the engine registered on {p.domain}", node1)[0]["completions_url"] for p in portals]
    assert len(set(urls)) == 3
    for portal, url in zip(portals, urls, strict=True):
        for node in nodes:
            served(node, portal, on(node, url))
    assert {t["status"] for t in tenants(node1).values()} == {"active"} and len(tenants(node0)) == 3

    gone = portals[2]
    served(node1, gone, on(node1, urls[2]))  # node 1 has the tenant cached now
    assert gone.uninstall() == [200]  # the uninstall handler is the public URL: node 0
    assert refused(gone, on(node0, urls[2])) == 404
    # Node 1 had the tenant cached: the uninstall's NOTIFY drops it there at once (well before the cache would expire).
    wait_until(lambda: refused(gone, on(node1, urls[2])) == 404, "node 1 refusing the uninstalled portal", node1, timeout=CACHE_SECONDS / 2)
    for node in nodes:
        assert refused(gone, on(node, urls[2])) == 404
        assert tenants(node)[gone.member_id]["status"] == "uninstalled"
        for portal, url in zip(portals[:2], urls[:2], strict=True):
            served(node, portal, on(node, url))
    assert_no_secrets(oauth, portals, nodes)
