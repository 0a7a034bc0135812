"""Property tests for the last parsers of outside input: a queue DSN from the configuration and
the OAuth server's answers (app mode). Whatever arrives becomes a typed value or the parser's own
error, never another exception, and never a message that repeats a password or a secret."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, check_postgres_dsn
from gateway.tenants.oauth import Installation, OAuthClient, OAuthError

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PASSWORD = "Pa55-SECRET-word"

dsn_parts = st.one_of(st.text(max_size=40), st.sampled_from(["", ":", "@", "/", ",", "?", "[", "]", "%", ":99999", ":0", ":abc", "[::1]", "h1,h2"]))
dsns = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda scheme, host, rest: f"{scheme}://gateway:{PASSWORD}@{host}{rest}", st.sampled_from(["postgresql", "postgres", "mysql", ""]), dsn_parts, dsn_parts
    ),
)


@PROPERTY
@given(dsns)
def test_any_dsn_is_accepted_or_a_config_error_that_hides_the_password(dsn: str) -> None:
    try:
        accepted = check_postgres_dsn(Path("gateway.yaml"), "queue.dsn", dsn)
    except ConfigError as exc:
        assert exc.key == "queue.dsn" and PASSWORD not in str(exc)
        return
    assert accepted == dsn.strip() and accepted.split("://", 1)[0] in ("postgresql", "postgres")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
answers = st.tuples(
    st.sampled_from([200, 400, 401, 403, 500, 503]),
    st.one_of(
        json_values.map(json.dumps),
        st.fixed_dictionaries({"result": st.fixed_dictionaries({"client_id": json_values, "install": json_values})}).map(json.dumps),
        st.fixed_dictionaries({"access_token": json_values, "refresh_token": json_values, "expires": json_values}).map(json.dumps),
        st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
    ),
)


def _oauth(status: int, body: str) -> OAuthClient:
    client = OAuthClient(("oauth.example.test",), allow_private_networks=False)
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(status, text=body)))
    return client


@PROPERTY
@given(answers)
def test_any_oauth_answer_is_a_typed_value_or_an_oauth_error(answer: tuple[int, str]) -> None:
    status, body = answer

    async def ask() -> list[Any]:
        client = _oauth(status, body)
        found: list[Any] = []
        try:
            for call in (
                lambda: client.app_info("https://oauth.example.test/rest/", "access-token"),
                lambda: client.refresh("https://oauth.example.test/rest/", "client", "client-SECRET", "refresh-token"),
            ):
                try:
                    found.append(await call())
                except OAuthError as exc:
                    assert "client-SECRET" not in str(exc)
                    found.append(exc)
        finally:
            await client.aclose()
        return found

    info, refreshed = asyncio.run(ask())
    assert isinstance(info, (Installation, OAuthError))
    assert isinstance(refreshed, (tuple, OAuthError))
    if isinstance(refreshed, tuple):
        tokens, _ = refreshed
        assert tokens.access_token and tokens.refresh_token and isinstance(tokens.expires, float)


def test_an_oauth_server_outside_the_trusted_hosts_is_never_asked() -> None:
    asked: list[httpx.Request] = []
    client = OAuthClient(("oauth.example.test",), allow_private_networks=False)
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: asked.append(request) or httpx.Response(200, json={})))

    async def ask() -> OAuthError:
        try:
            await client.app_info("https://evil.example.test/rest/", "access-token")
        except OAuthError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("an untrusted OAuth server was asked")

    assert asyncio.run(ask()).code == "untrusted_server" and asked == []
