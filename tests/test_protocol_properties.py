"""Property-based tests of the portal request parser: whatever arrives, the answer is a
typed request that can be stored and sent to, or a ProtocolError naming the field."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.bitrix.protocol import (
    MAX_TOKENS_RANGE,
    TEMPERATURE_RANGE,
    TTL_RANGE,
    ProtocolError,
    parse_completion_request,
    parse_outbound_url,
    read_callback_answer,
)
from gateway.outcomes import DeliveryOutcome
from gateway.tasks import Category
from tests.strategies import json_values, mutated_bodies, urls

VALID = {
    "prompt": "Write a greeting",
    "payload_raw": "Write a greeting",
    "payload_provider": "text",
    "payload_role": "You are helpful.",
    "context": [{"role": "user", "content": "hi"}],
    "payload_markers": {"language": "English"},
    "payload_prompt_text": None,
    "auth": None,
    "category": "text",
    "ttl": 14400,
    "callbackUrl": "https://acme.bitrix24.com/bitrix/services/main/ajax.php?action=a.callbackSuccess&hash=Ab3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY",
    "errorCallbackUrl": "https://acme.bitrix24.com/bitrix/services/main/ajax.php?action=a.callbackError&hash=Ab3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY",
}
PROPERTY_SETTINGS = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(body: Any, category: Category = Category.TEXT) -> Any:
    return parse_completion_request(body, engine="acme", category=category, default_ttl=840, job_id="j1", now=1000.0, context="always")


def _assert_storable_and_sendable(request: Any) -> None:
    task = request.task
    stored = json.dumps(task.to_json())
    # What the queue does with it: UTF-8 text in SQLite, read back equal.
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (task TEXT, cb TEXT, ecb TEXT)")
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (stored, request.callback_url, request.error_callback_url))
    assert json.loads(conn.execute("SELECT task FROM t").fetchone()[0]) == json.loads(stored)
    assert TTL_RANGE[0] <= task.ttl <= TTL_RANGE[1]
    assert task.temperature is None or TEMPERATURE_RANGE[0] <= task.temperature <= TEMPERATURE_RANGE[1]
    assert task.max_tokens is None or MAX_TOKENS_RANGE[0] <= task.max_tokens <= MAX_TOKENS_RANGE[1]
    for _, url in request.outbound_urls:
        assert url.scheme in ("http", "https") and url.host
        assert url.port is None or 1 <= url.port <= 65535
    # Delivery parses the stored strings again: they must parse to the same URLs.
    for sent, origin in (
        (request.callback_url, dict(request.outbound_urls)["callbackUrl"]),
        (request.error_callback_url, dict(request.outbound_urls)["errorCallbackUrl"]),
    ):
        full = httpx.URL(sent)
        assert (full.scheme, full.host, full.port) == (origin.scheme, origin.host, origin.port)


@PROPERTY_SETTINGS
@given(mutated_bodies(VALID))
def test_text_requests_parse_or_fail_cleanly(body):
    try:
        request = _parse(body)
    except ProtocolError as exc:
        assert exc.status in (400, 422) and exc.message
        return
    _assert_storable_and_sendable(request)


@PROPERTY_SETTINGS
@given(
    mutated_bodies({**VALID, "category": "audio", "prompt": {"file": "https://acme.bitrix24.com/disk/1", "fields": {"type": "audio/mpeg"}}}),
    st.sampled_from([Category.AUDIO, Category.CALL, Category.IMAGE]),
)
def test_object_prompts_parse_or_fail_cleanly(body, category):
    if category is Category.IMAGE and isinstance(body.get("prompt"), dict):
        body = {**body, "category": "image", "prompt": {**body["prompt"], "prompt": body["prompt"].get("prompt", "a cat")}}
    elif isinstance(body.get("category"), str):
        body = {**body, "category": category.value}
    try:
        request = _parse(body, category)
    except ProtocolError as exc:
        assert exc.status in (400, 422) and exc.message
        return
    _assert_storable_and_sendable(request)


@PROPERTY_SETTINGS
@given(json_values)
def test_any_json_value_parses_or_fails_cleanly(value):
    try:
        request = _parse(value)
    except ProtocolError:
        return
    _assert_storable_and_sendable(request)


@PROPERTY_SETTINGS
@given(urls())
def test_an_accepted_url_is_one_httpx_and_the_resolver_accept(text):
    try:
        url = parse_outbound_url(text, "callbackUrl")
    except ProtocolError as exc:
        assert exc.message.startswith("callbackUrl: ")
        return
    request = httpx.Request("POST", text.strip())  # what delivery builds from the whole URL: must not raise
    assert (request.url.scheme, request.url.host, request.url.port) == (url.scheme, url.host, url.port)
    assert 1 <= (url.port or 80) <= 65535
    host = url.raw_host.decode("ascii")
    if not host.startswith("["):
        host.encode("idna")  # what the resolver does with the name: must not raise either


answers = st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.fixed_dictionaries({"status": json_values, "data": json_values, "errors": json_values}).map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.integers(1, 3000).map(lambda n: b'{"status":"error","errors":' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 5000).map(lambda n: b'{"status":"error","errors":[' + b"9" * n + b"]}"),
    st.binary(max_size=200),
)


@PROPERTY_SETTINGS
@given(st.integers(100, 599), answers)
def test_any_portal_answer_is_classified_never_raised(status, body):
    """The portal's answer to a callback comes from outside too: whatever it is, it gets an outcome."""
    answer = read_callback_answer(status, body)
    assert answer.outcome in set(DeliveryOutcome) and len(answer.detail) <= 400
