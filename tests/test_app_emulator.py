"""The emulated Bitrix24 side of app mode, over real sockets: the OAuth server and portals with the app installed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.bitrix.oauth_emulator import OAuthEmulator
from gateway.bitrix.simulator import PortalEmulator, php_form
from gateway.loopback import LoopbackServer

CLIENT_ID, CLIENT_SECRET = "app.5f0c1e2d3b4a59.87654321", "market-secret-0123456789"
INSTALL_KEYS = {
    "event",
    "event_handler_id",
    "ts",
    "data[VERSION]",
    "data[ACTIVE]",
    "data[INSTALLED]",
    "data[LANGUAGE_ID]",
    "auth[access_token]",
    "auth[expires]",
    "auth[expires_in]",
    "auth[scope]",
    "auth[domain]",
    "auth[server_endpoint]",
    "auth[status]",
    "auth[client_endpoint]",
    "auth[member_id]",
    "auth[user_id]",
    "auth[refresh_token]",
    "auth[application_token]",
}
UNINSTALL_KEYS = {
    "event",
    "event_handler_id",
    "ts",
    "data[LANGUAGE_ID]",
    "data[CLEAN]",
    "auth[domain]",
    "auth[server_endpoint]",
    "auth[client_endpoint]",
    "auth[member_id]",
    "auth[application_token]",
}


class Receiver:
    """The app's side: records every event form as sent, answers the registration GET with 200."""

    def __init__(self) -> None:
        self.url = ""
        self.forms: list[list[tuple[str, str]]] = []
        self.content_types: list[str] = []
        self.app = Starlette(routes=[Route("/events", self._event, methods=["POST"]), Route("/completions", self._check, methods=["GET"])])

    @property
    def events(self) -> str:
        return f"{self.url}/events"

    async def _event(self, request: Request) -> Response:
        self.content_types.append(request.headers.get("content-type", ""))
        self.forms.append(parse_qsl((await request.body()).decode(), keep_blank_values=True, strict_parsing=True))
        return Response("OK")

    async def _check(self, request: Request) -> Response:
        return Response("ready")


@pytest.fixture
def oauth() -> Iterator[OAuthEmulator]:
    emulator = OAuthEmulator(CLIENT_ID, CLIENT_SECRET)
    with LoopbackServer(emulator.app) as server:
        emulator.url = server.url
        yield emulator


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    app = Receiver()
    with LoopbackServer(app.app) as server:
        app.url = server.url
        yield app


@pytest.fixture
def portals() -> Iterator[list[PortalEmulator]]:
    """Three more portals (beside the ``portal`` fixture), each on its own server."""
    servers, emulators = [], []
    for _ in range(3):
        emulator = PortalEmulator()
        servers.append(LoopbackServer(emulator.app).start())
        emulator.url = servers[-1].url
        emulators.append(emulator)
    yield emulators
    for server in servers:
        server.stop()


def rest(portal: PortalEmulator, method: str, token: str, **params: Any) -> httpx.Response:
    return httpx.post(portal.client_endpoint + method, json={**params, "auth": token})


def refresh(oauth: OAuthEmulator, refresh_token: str, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET) -> httpx.Response:
    query = {"grant_type": "refresh_token", "client_id": client_id, "client_secret": client_secret, "refresh_token": refresh_token}
    return httpx.get(oauth.token_url, params=query)


def app_info(oauth: OAuthEmulator, access_token: str) -> httpx.Response:
    return httpx.get(oauth.server_endpoint + "app.info", params={"auth": access_token})


def register(portal: PortalEmulator, receiver: Receiver, code: str, token: str | None = None) -> httpx.Response:
    params = {"name": code, "code": code, "category": "text", "completions_url": receiver.url + "/completions"}
    if token is None:
        return httpx.post(portal.webhook + "ai.engine.register", json=params)
    return rest(portal, "ai.engine.register", token, **params)


def test_install_posts_the_exact_form_and_its_token_passes_app_info(portal, oauth, receiver):
    payload, status = portal.install(oauth, receiver.events, user_id=7)
    assert status == 200 and len(receiver.forms) == 1
    assert receiver.content_types == ["application/x-www-form-urlencoded"]
    form = receiver.forms[0]
    assert form == php_form(payload) and {k for k, _ in form} == INSTALL_KEYS and len(form) == len(INSTALL_KEYS)
    sent = dict(form)
    assert (sent["event"], sent["data[VERSION]"], sent["data[ACTIVE]"], sent["data[INSTALLED]"], sent["data[LANGUAGE_ID]"]) == (
        "ONAPPINSTALL",
        "1",
        "Y",
        "Y",
        "en",
    )
    assert sent["auth[domain]"] == portal.domain == portal.url.removeprefix("http://")
    assert sent["auth[client_endpoint]"] == portal.url + "/rest/" and sent["auth[server_endpoint]"] == oauth.url + "/rest/"
    assert sent["auth[member_id]"] == portal.member_id and len(portal.member_id) == 32 and int(portal.member_id, 16) >= 0
    assert (sent["auth[status]"], sent["auth[user_id]"], sent["auth[scope]"], sent["auth[expires_in]"]) == ("F", "7", "ai_admin", "3600")
    assert int(sent["event_handler_id"]) > 0 and int(sent["ts"]) > 0 and int(sent["auth[expires]"]) > int(sent["ts"])
    assert sent["auth[application_token]"] == portal.installed_app.application_token
    assert len({sent["auth[access_token]"], sent["auth[refresh_token]"], sent["auth[application_token]"]}) == 3

    info = app_info(oauth, sent["auth[access_token]"])
    assert info.status_code == 200
    result = info.json()["result"]
    assert (result["client_id"], result["scope"], result["user_id"]) == (CLIENT_ID, "ai_admin", 7)
    assert result["install"] == {
        "installed": True,
        "version": 1,
        "status": "F",
        "scope": "ai_admin",
        "domain": portal.domain,
        "uri": portal.url,
        "client_endpoint": portal.client_endpoint,
        "member_id": portal.member_id,
        "member_type": "PORTAL",
    }
    assert app_info(oauth, "not-a-token").json()["error"] == "invalid_token"
    assert app_info(oauth, "not-a-token").status_code == 401


def test_refresh_tokens_are_single_use_and_rotate_the_access_token(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events)
    old_access, old_refresh = payload["auth"]["access_token"], payload["auth"]["refresh_token"]
    answer = refresh(oauth, old_refresh)
    assert answer.status_code == 200
    fresh = answer.json()
    assert set(fresh) == {
        "access_token",
        "refresh_token",
        "expires",
        "expires_in",
        "client_endpoint",
        "server_endpoint",
        "domain",
        "member_id",
        "scope",
        "status",
        "user_id",
    }
    assert (fresh["domain"], fresh["member_id"], fresh["client_endpoint"], fresh["expires_in"], fresh["status"]) == (
        oauth.domain,
        portal.member_id,
        portal.client_endpoint,
        3600,
        "F",
    )
    assert fresh["access_token"] != old_access and fresh["refresh_token"] != old_refresh

    again = refresh(oauth, old_refresh)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert app_info(oauth, old_access).json()["error"] == "invalid_token"
    assert rest(portal, "app.info", old_access).json()["error"] == "NO_AUTH_FOUND"
    assert rest(portal, "app.info", fresh["access_token"]).json()["result"]["CODE"] == CLIENT_ID
    assert (oauth.refreshes(portal.member_id), oauth.refreshes(portal.member_id, accepted_only=True)) == (2, 1)

    wrong = refresh(oauth, fresh["refresh_token"], client_secret="guess")
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    unknown = refresh(oauth, "0" * 64)
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_grant"
    assert refresh(oauth, fresh["refresh_token"]).status_code == 200  # the failed attempts did not burn it


def test_expired_access_token_answers_expired_token_until_refreshed(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events)
    token = payload["auth"]["access_token"]
    assert rest(portal, "ai.engine.list", token).json()["result"] == []
    oauth.expire_tokens(portal.member_id)
    expired = rest(portal, "ai.engine.list", token)
    assert expired.status_code == 401
    assert expired.json() == {"error": "expired_token", "error_description": "The access token provided has expired."}
    assert app_info(oauth, token).status_code == 401 and app_info(oauth, token).json()["error"] == "expired_token"
    assert portal.rest_denied == [("ai.engine.list", "expired_token")]
    new_token = refresh(oauth, payload["auth"]["refresh_token"]).json()["access_token"]
    assert rest(portal, "ai.engine.list.json", new_token).status_code == 200
    assert httpx.post(portal.client_endpoint + "ai.engine.list", params={"auth": new_token}).json()["result"] == []


def test_uninstall_without_a_binding_sends_nothing_and_revokes_everything(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events)
    assert portal.uninstall(clean=True) == []
    assert len(receiver.forms) == 1  # only the install event
    gone = refresh(oauth, payload["auth"]["refresh_token"])
    assert gone.status_code == 401 and gone.json()["error"] == "invalid_client"
    assert app_info(oauth, payload["auth"]["access_token"]).json()["error"] == "invalid_token"
    denied = rest(portal, "ai.engine.list", payload["auth"]["access_token"])
    assert denied.status_code == 401 and denied.json()["error"] == "NO_AUTH_FOUND"


@pytest.mark.parametrize("clean", [True, False])
def test_uninstall_sends_clean_to_the_bound_handler_and_deletes_the_apps_engines(portal, oauth, receiver, clean):
    payload, _ = portal.install(oauth, receiver.events)
    token = payload["auth"]["access_token"]
    handler = receiver.events + "?uninstall=1"
    assert rest(portal, "event.bind", token, event="onAppUninstall", handler=handler).json()["result"] is True
    duplicate = rest(portal, "event.bind", token, event="ONAPPUNINSTALL", handler=handler)
    assert duplicate.status_code == 400 and duplicate.json() == {
        "error": "ERROR_CORE",
        "error_description": "Unable to set event handler: Handler already binded",
    }
    bound = rest(portal, "event.get", token).json()["result"]
    assert {"event": "ONAPPUNINSTALL", "handler": handler, "auth_type": "0", "offline": 0} in bound
    assert {b["event"] for b in bound} == {"ONAPPINSTALL", "ONAPPUNINSTALL"}  # the install URL is a handler too
    assert register(portal, receiver, "app_text", token).status_code == 200
    assert register(portal, receiver, "hook_text").status_code == 200

    assert portal.uninstall(clean=clean) == [200]
    form = receiver.forms[-1]
    assert {k for k, _ in form} == UNINSTALL_KEYS and len(form) == len(UNINSTALL_KEYS)
    sent = dict(form)
    assert (sent["event"], sent["data[CLEAN]"], sent["data[LANGUAGE_ID]"]) == ("ONAPPUNINSTALL", "1" if clean else "0", "en")
    assert sent["auth[application_token]"] == payload["auth"]["application_token"] and sent["auth[member_id]"] == portal.member_id
    assert (sent["auth[domain]"], sent["auth[client_endpoint]"], sent["auth[server_endpoint]"]) == (
        portal.domain,
        portal.client_endpoint,
        oauth.server_endpoint,
    )
    assert [e["code"] for e in portal.engines.values()] == ["hook_text"]
    assert portal.event_bindings == {}
    assert portal.sent_events[-1].status == 200 and portal.sent_events[-1].url == handler


def test_engines_are_scoped_to_the_apps_code(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events, app_code="vendor.ai_gateway")
    token = payload["auth"]["access_token"]
    assert register(portal, receiver, "shared").status_code == 200  # by the webhook: app_code null
    clash = register(portal, receiver, "SHARED", token)
    assert clash.status_code == 400 and clash.json()["error"] == "ENGINE_REGISTER_ERROR_CODE_UNIQUE"
    mine = register(portal, receiver, "mine", token)
    assert mine.status_code == 200 and isinstance(mine.json()["result"], int)

    listed = rest(portal, "ai.engine.list", token, filter={"APP_CODE": ""}).json()["result"]  # the filter is forced
    assert [(e["code"], e["app_code"]) for e in listed] == [("mine", "vendor.ai_gateway")]
    everything = httpx.post(portal.webhook + "ai.engine.list", json={}).json()["result"]
    assert sorted((e["code"], e["app_code"]) for e in everything) == [("mine", "vendor.ai_gateway"), ("shared", None)]
    assert rest(portal, "ai.engine.unregister", token, code="shared").json()["result"] is False
    assert httpx.post(portal.webhook + "ai.engine.unregister", json={"code": "mine"}).json()["result"] is False
    assert rest(portal, "ai.engine.unregister", token, code="MINE").json()["result"] is True
    assert [e["code"] for e in portal.engines.values()] == ["shared"]
    calls = [m for m, params in portal.rest_calls if params.get("auth") == token]
    assert calls == ["ai.engine.register", "ai.engine.register", "ai.engine.list", "ai.engine.unregister", "ai.engine.unregister"]


def test_local_app_has_its_own_credentials_valid_on_its_portal_only(portal, portals, oauth, receiver):
    payload, status = portal.install(oauth, receiver.events, status="L")
    local = portal.installed_app
    assert status == 200 and local.client_id.startswith("local.") and local.client_id != CLIENT_ID
    assert payload["auth"]["status"] == "L"
    info = rest(portal, "app.info", payload["auth"]["access_token"]).json()["result"]
    assert (info["CODE"], info["STATUS"], info["INSTALLED"], info["VERSION"]) == (local.client_id, "L", True, 1)
    assert app_info(oauth, payload["auth"]["access_token"]).json()["result"]["client_id"] == local.client_id

    market = refresh(oauth, payload["auth"]["refresh_token"])  # the Marketplace credentials do not fit
    assert market.status_code == 400 and market.json()["error"] == "invalid_grant"
    other_payload, _ = portals[0].install(oauth, receiver.events)
    foreign = refresh(oauth, other_payload["auth"]["refresh_token"], local.client_id, local.client_secret)
    assert foreign.status_code == 400 and foreign.json()["error"] == "invalid_grant"
    with pytest.raises(ValueError, match="another portal"):
        portals[1].install(oauth, receiver.events, client_id=local.client_id)
    assert refresh(oauth, payload["auth"]["refresh_token"], local.client_id, local.client_secret).status_code == 200
    own = oauth.local_app(portals[1])
    own_payload, _ = portals[1].install(oauth, receiver.events, client_id=own.client_id)
    assert (own_payload["auth"]["status"], portals[1].installed_app.app_code) == ("L", own.client_id)
    assert refresh(oauth, own_payload["auth"]["refresh_token"], own.client_id, own.client_secret).status_code == 200


def test_several_portals_keep_apart(portals, oauth, receiver):
    payloads = [p.install(oauth, receiver.events)[0] for p in portals]
    assert len({p.member_id for p in portals}) == 3 and len({p["auth"]["application_token"] for p in payloads}) == 3
    a, b, _ = portals
    foreign = rest(b, "ai.engine.list", payloads[0]["auth"]["access_token"])
    assert foreign.status_code == 401 and foreign.json()["error"] == "NO_AUTH_FOUND"
    assert refresh(oauth, payloads[1]["auth"]["refresh_token"]).status_code == 200
    assert [oauth.refreshes(p.member_id) for p in portals] == [0, 1, 0]
    oauth.expire_tokens(a.member_id)
    assert rest(a, "app.info", payloads[0]["auth"]["access_token"]).json()["error"] == "expired_token"
    assert rest(portals[2], "app.info", payloads[2]["auth"]["access_token"]).status_code == 200
    a.uninstall()
    assert rest(portals[2], "app.info", payloads[2]["auth"]["access_token"]).status_code == 200


def test_reinstall_keeps_the_application_token_and_issues_new_tokens(portal, oauth, receiver):
    first, _ = portal.install(oauth, receiver.events)
    second, status = portal.reinstall()
    assert status == 200 and len(receiver.forms) == 2 and dict(receiver.forms[1])["event"] == "ONAPPINSTALL"
    assert second["auth"]["application_token"] == first["auth"]["application_token"]
    assert second["event_handler_id"] == first["event_handler_id"]
    assert second["auth"]["access_token"] != first["auth"]["access_token"]
    assert refresh(oauth, second["auth"]["refresh_token"]).status_code == 200


def test_app_auth_is_the_protocol_docs_shape_and_works(portal, oauth, receiver):
    portal.install(oauth, receiver.events, status="L")
    auth = portal.app_auth(user_id=5)
    assert set(auth) == {
        "access_token",
        "expires",
        "expires_in",
        "scope",
        "domain",
        "server_endpoint",
        "status",
        "client_endpoint",
        "member_id",
        "refresh_token",
        "user_id",
        "client_id",
    }
    assert (auth["member_id"], auth["domain"], auth["user_id"], auth["client_id"]) == (portal.member_id, portal.domain, 5, portal.installed_app.client_id)
    assert app_info(oauth, auth["access_token"]).json()["result"]["user_id"] == 5
    _hash, body = portal.new_request(auth=auth)
    assert body["auth"] == auth


def test_rename_answers_302_on_the_old_address(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events)
    token, old = payload["auth"]["access_token"], portal.url
    with LoopbackServer(portal.app) as renamed:
        portal.rename_to(renamed.url)
        moved = httpx.post(f"{old}/rest/ai.engine.list.json?x=1", json={"auth": token})
        assert moved.status_code == 302 and moved.headers["location"] == f"{renamed.url}/rest/ai.engine.list.json?x=1"
        hook = httpx.post(f"{old}/rest/1/{portal.webhook_secret}/ai.engine.list", json={})
        assert hook.status_code == 302 and hook.headers["location"] == portal.webhook + "ai.engine.list"
        assert rest(portal, "ai.engine.list", token).json()["result"] == []
        assert portal.domain == renamed.url.removeprefix("http://")
        assert refresh(oauth, payload["auth"]["refresh_token"]).json()["client_endpoint"] == f"{renamed.url}/rest/"
        assert [m for m, _ in portal.rest_calls] == ["ai.engine.list"]  # the redirected calls did not run


def test_scripted_query_limit_and_oauth_outage(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events)
    token = payload["auth"]["access_token"]
    portal.rest_fail_next((503, "QUERY_LIMIT_EXCEEDED"))
    limited = rest(portal, "event.get", token)
    assert limited.status_code == 503 and limited.json()["error"] == "QUERY_LIMIT_EXCEEDED"
    assert rest(portal, "event.get", token).status_code == 200
    oauth.down()
    assert refresh(oauth, payload["auth"]["refresh_token"]).status_code == 503
    assert app_info(oauth, token).status_code == 503
    oauth.down(False)
    assert refresh(oauth, payload["auth"]["refresh_token"]).status_code == 200  # the outage did not burn it


def test_event_bind_checks_the_handler_and_unbind_counts(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events)
    token = payload["auth"]["access_token"]
    assert rest(portal, "event.bind", token, event="ONAPPUNINSTALL", handler="ftp://example.com/x").json()["error"] == "ERROR_UNSUPPORTED_PROTOCOL"
    assert rest(portal, "event.bind", token, event="ONAPPUNINSTALL", handler="").json()["error"] == "ERROR_WRONG_HANDLER_URL"
    assert rest(portal, "event.bind", token, event="ONNOTHING", handler=receiver.events).json()["error"] == "ERROR_EVENT_NOT_FOUND"
    assert rest(portal, "event.bind", token, event="ONAPPUNINSTALL", handler=receiver.events).json()["result"] is True
    assert rest(portal, "event.unbind", token, event="ONAPPUNINSTALL", handler=receiver.events).json()["result"] == {"count": 1}
    assert rest(portal, "event.unbind", token, event="ONAPPUNINSTALL", handler=receiver.events).json()["result"] == {"count": 0}
    assert portal.uninstall() == []


def test_send_event_encodes_forged_fields_with_php_brackets(portal, oauth, receiver):
    payload, _ = portal.install(oauth, receiver.events, send=False)
    assert receiver.forms == []
    forged = {**payload, "auth": {**payload["auth"], "member_id": "f" * 32}}
    assert portal.send_event(receiver.events, forged).status_code == 200
    assert dict(receiver.forms[0])["auth[member_id]"] == "f" * 32
    assert php_form({"data": {"FIELDS": {"ID": 5}, "LIST": ["a", "b"], "FLAG": True, "NONE": None}}) == [
        ("data[FIELDS][ID]", "5"),
        ("data[LIST][0]", "a"),
        ("data[LIST][1]", "b"),
        ("data[FLAG]", "1"),
    ]


def test_standalone_emulator_still_starts():
    done = subprocess.run([sys.executable, "-m", "gateway.bitrix.simulator", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "--port" in done.stdout
