"""Every kind of bad request gets a clear JSON error with the right status, and nothing is lost:
no job is created, no upstream call is made, no callback URL is contacted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.bitrix.protocol import encode_like_php
from gateway.bitrix.simulator import PortalEmulator
from gateway.loopback import LoopbackServer
from gateway.testing import ENGINE_TOKEN, FakeOpenAI, GatewayProcess, make_config

pytestmark = pytest.mark.e2e
LIMIT = 8192


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, PortalEmulator, FakeOpenAI]]:
    upstream, portal = FakeOpenAI(), PortalEmulator()
    with LoopbackServer(upstream.app) as up, LoopbackServer(portal.app) as portal_server:
        portal.url = portal_server.url
        config = make_config(up.url, limits={"max_body_bytes": LIMIT})
        gw = GatewayProcess(config, tmp_path_factory.mktemp("bad-input")).start()
        try:
            yield gw, portal, upstream
        finally:
            gw.kill()


def _body(portal: PortalEmulator, **changes: Any) -> dict[str, Any]:
    _, body = portal.new_request(prompt="hello")
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()
CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    # name: (how to send, expected status, expected error code)
    "unknown engine": ({"path": "/engines/nope/" + ENGINE_TOKEN + "/completions"}, 404, "unknown_engine"),
    "bad token": ({"path": "/engines/acme_text/not-the-token-000000000000/completions"}, 404, "unknown_engine"),
    "text/plain": ({"content_type": "text/plain"}, 415, "unsupported_media_type"),
    "form encoded": ({"raw": b"prompt=hi", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    "no content type": ({"content_type": None}, 415, "unsupported_media_type"),
    "not JSON": ({"raw": b"{prompt: hi"}, 400, "invalid_json"),
    "JSON array": ({"raw": b"[1, 2]"}, 400, "invalid_json"),
    "empty body": ({"raw": b""}, 400, "invalid_json"),
    "not UTF-8": ({"raw": b'{"prompt": "\xff\xfe"}'}, 400, "invalid_json"),
    "no callbackUrl": ({"changes": {"callbackUrl": _DROP}}, 422, "missing_callback_url"),
    "null errorCallbackUrl": ({"changes": {"errorCallbackUrl": None}}, 422, "missing_callback_url"),
    "relative callbackUrl": ({"changes": {"callbackUrl": "/bitrix/services/main/ajax.php"}}, 422, "invalid_field"),
    "ftp callbackUrl": ({"changes": {"callbackUrl": "ftp://127.0.0.1/x"}}, 422, "invalid_field"),
    "callback host not allowed": ({"changes": {"callbackUrl": "https://evil.example.com/bitrix/services/main/ajax.php?hash=x"}}, 422, "callback_not_allowed"),
    "callback with credentials": ({"changes": {"errorCallbackUrl": "http://user:pw@127.0.0.1/x"}}, 422, "callback_not_allowed"),
    "wrong category": ({"changes": {"category": "image"}}, 422, "wrong_category"),
    "empty prompt": ({"changes": {"prompt": "  "}}, 422, "invalid_field"),
    "prompt object for text": ({"changes": {"prompt": {"prompt": "x"}}}, 422, "invalid_field"),
    "negative ttl": ({"changes": {"ttl": -5}}, 422, "invalid_field"),
    "temperature not a number": ({"changes": {"temperature": "hot"}}, 422, "invalid_field"),
    "fractional max_tokens": ({"changes": {"max_tokens": 1.5}}, 422, "invalid_field"),
    "context not a list": ({"changes": {"context": "hello", "collect_context": True}}, 422, "invalid_field"),
    "context item content not text": ({"changes": {"context": [{"role": "user", "content": 5}], "collect_context": True}}, 422, "invalid_field"),
    "JSON nested 4,000 deep": ({"raw": b'{"x":' + b"[" * 4000 + b"]" * 4000 + b"}"}, 400, "invalid_json"),
    "integer of 4,301 digits": ({"raw": b'{"x":' + b"9" * 4301 + b"}"}, 400, "invalid_json"),
    "ttl 1e400": ({"raw_field": ("ttl", b"1e400")}, 422, "invalid_field"),
    "ttl Infinity": ({"raw_field": ("ttl", b"Infinity")}, 422, "invalid_field"),
    "ttl 1e300": ({"raw_field": ("ttl", b"1e300")}, 422, "invalid_field"),
    "temperature 1e400": ({"raw_field": ("temperature", b"1e400")}, 422, "invalid_field"),
    "max_tokens 1e400": ({"raw_field": ("max_tokens", b"1e400")}, 422, "invalid_field"),
    "max_tokens NaN": ({"raw_field": ("max_tokens", b"NaN")}, 422, "invalid_field"),
    "surrogate in callbackUrl": ({"changes": {"callbackUrl": "http://127.0.0.1/x?hash=\ud800"}}, 422, "invalid_field"),
    "surrogate in errorCallbackUrl path": ({"changes": {"errorCallbackUrl": "http://127.0.0.1/\udbff/x"}}, 422, "invalid_field"),
    "surrogate in the prompt": ({"changes": {"prompt": "hello \udc00"}}, 422, "invalid_field"),
    "unclosed IPv6 callback host": ({"changes": {"callbackUrl": "http://[::1/"}}, 422, "invalid_field"),
    "callback port abc": ({"changes": {"callbackUrl": "http://127.0.0.1:abc/x"}}, 422, "invalid_field"),
    "malformed IDNA callback host": ({"changes": {"callbackUrl": "http://xn--.127.0.0.1/x"}}, 422, "invalid_field"),
    "callback port 70000": ({"changes": {"callbackUrl": "http://127.0.0.1:70000/x"}}, 422, "invalid_field"),
    "tab in callbackUrl": ({"changes": {"callbackUrl": "http://127.0.0.1/a\tb"}}, 422, "invalid_field"),
    "NUL in errorCallbackUrl": ({"changes": {"errorCallbackUrl": "http://127.0.0.1/a\x00b"}}, 422, "invalid_field"),
    "newline in callbackUrl": ({"changes": {"callbackUrl": "http://127.0.0.1/a\nb"}}, 422, "invalid_field"),
    "body over the limit": ({"changes": {"prompt": "x" * (LIMIT + 1)}}, 413, "body_too_large"),
    "chunked body over the limit": ({"chunked": True, "changes": {"prompt": "x" * (LIMIT + 1)}}, 413, "body_too_large"),
}


# The exact wording for the cases the hardening issue found (the message names the field and the rule).
MESSAGES = {
    "JSON nested 4,000 deep": "the body's JSON is nested too deeply",
    "integer of 4,301 digits": "the body's JSON cannot be read: Exceeds the limit (4300 digits) for integer string conversion",
    "ttl 1e400": "ttl: must be a finite number, got inf",
    "ttl Infinity": "ttl: must be a finite number, got inf",
    "ttl 1e300": "ttl: must be between 1 and 86400, got 1e+300",
    "temperature 1e400": "temperature: must be a finite number, got inf",
    "max_tokens 1e400": "max_tokens: must be a finite number, got inf",
    "max_tokens NaN": "max_tokens: must be a finite number, got nan",
    "surrogate in callbackUrl": "callbackUrl: contains '\\ud800' at position 24; URLs may not hold spaces, control characters or lone surrogates",
    "surrogate in the prompt": "prompt: contains a lone UTF-16 surrogate",
    "unclosed IPv6 callback host": "callbackUrl: is not a valid URL (Invalid port: ':1')",
    "callback port abc": "callbackUrl: is not a valid URL (Invalid port: 'abc')",
    "callback port 70000": "callbackUrl: port 70000 is out of range (1-65535)",
    "tab in callbackUrl": "callbackUrl: contains '\\t' at position 18",
    "NUL in errorCallbackUrl": "errorCallbackUrl: contains '\\x00' at position 18",
    "newline in callbackUrl": "callbackUrl: contains '\\n' at position 18",
    "bad token": "no engine at this URL (unknown engine code or wrong token)",
    "unknown engine": "no engine at this URL (unknown engine code or wrong token)",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_clearly(stack, case):
    gw, portal, _upstream = stack
    how, status, code = CASES[case]
    path = how.get("path", f"/engines/acme_text/{ENGINE_TOKEN}/completions")
    raw = how["raw"] if "raw" in how else encode_like_php(_body(portal, **how.get("changes", {})))
    if "raw_field" in how:  # a number JSON allows but Python's json.dumps would not write
        key, literal = how["raw_field"]
        raw = encode_like_php(_body(portal, **{key: "__RAW__"})).replace(b'"__RAW__"', literal)
    headers = {}
    content_type = how.get("content_type", "application/json")
    if content_type:
        headers["Content-Type"] = content_type
    content: Any = raw
    if how.get("chunked"):
        content = iter([raw[i : i + 1000] for i in range(0, len(raw), 1000)])
    response = httpx.post(gw.url + path, content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if case in MESSAGES:
        assert error["message"].startswith(MESSAGES[case]), error["message"]


def test_nothing_was_accepted_or_contacted(stack):
    """Runs after the cases above (same module): they left no trace."""
    gw, portal, upstream = stack
    assert gw.cli_json("jobs", "list") == []
    assert upstream.requests == []
    assert all(not job.callbacks for job in portal.jobs.values())
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_requests_rejected_total{reason="callback_not_allowed"} 2.0' in metrics
    assert "gateway_jobs_accepted_total{" not in metrics


def test_no_redirects_on_the_completions_url(stack):
    gw, portal, _ = stack
    response = httpx.post(
        f"{gw.url}/engines/acme_text/{ENGINE_TOKEN}/completions/", content=encode_like_php(_body(portal)), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 404  # not a 307, which the portal would follow as a GET


def test_get_is_the_registration_check(stack):
    gw, _, _ = stack
    assert httpx.get(f"{gw.url}/engines/acme_text/{ENGINE_TOKEN}/completions").status_code == 200
    assert httpx.get(f"{gw.url}/engines/acme_text/wrong-token-0000000000/completions").status_code == 404


def test_unknown_engine_and_wrong_token_get_the_same_answer(stack):
    """A scanner cannot tell which engine codes exist."""
    gw, portal, _ = stack
    body = encode_like_php(_body(portal))
    answers = []
    for path in (f"/engines/nope/{ENGINE_TOKEN}/completions", "/engines/acme_text/not-the-token-000000000000/completions"):
        for method in ("GET", "POST"):
            response = httpx.request(method, gw.url + path, content=body, headers={"Content-Type": "application/json"})
            answers.append((response.status_code, response.content))
    assert len(set(answers)) == 1 and answers[0][0] == 404, answers


def test_head_is_answered_like_get(stack):
    gw, _, _ = stack
    assert httpx.head(f"{gw.url}/engines/acme_text/{ENGINE_TOKEN}/completions").status_code == 200


def test_control_characters_in_the_engine_code_cannot_forge_log_lines(stack):
    gw, _, _ = stack
    httpx.post(f"{gw.url}/engines/x%0aFORGED%20ERROR%20line/{ENGINE_TOKEN}/completions", content=b"{}", headers={"Content-Type": "application/json"})
    assert not any(line.startswith("FORGED") for line in gw.logs().splitlines())
    assert "'x\\nFORGED ERROR line'" in gw.logs()


def test_private_callback_refused_unless_allowed(gateway, portal, upstream):
    config = make_config(upstream.url)
    config["security"] = {"allowed_portals": ["127.0.0.1"], "allow_private_networks": False}
    gw = gateway(config)
    job_hash, body = portal.new_request()
    response = portal.send(gw.completions_url(), body)
    assert response.status_code == 422
    assert "allow_private_networks" in response.json()["error"]["message"]
    assert gw.cli_json("jobs", "list") == [] and upstream.requests == [] and portal.jobs[job_hash].callbacks == []


def test_unknown_and_null_fields_are_tolerated(gateway, portal, upstream):
    gw = gateway()
    job_hash, body = portal.new_request(
        prompt="tolerant",
        payload_markers=[],
        context=None,
        temperature=None,
        payload_role=None,
        qualityParam="summarize",
        consumptionId=17,
        brand_new_key={"nested": [1, 2]},
    )
    body["ttl"] = None  # the gateway falls back to limits.default_ttl
    assert portal.send(gw.completions_url(), body).status_code == 202
    assert portal.wait(job_hash, timeout=20).delivered[0].body == {"result": "echo: tolerant"}
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": "tolerant"}]
    assert "temperature" not in upstream.requests[0]
    assert {"qualityParam", "consumptionId", "brand_new_key"} <= set(body)  # the request really carried them
