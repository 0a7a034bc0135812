"""The portal's app events read into typed values: :mod:`gateway.tenants.events`.

Nothing in an install or uninstall event is signed, and anyone can POST to the events URL, so
whatever arrives must become either a well-formed :class:`InstallEvent`/:class:`UninstallEvent`
(every field within its bounds and character set) or an :class:`EventError` naming the field:
never another exception (a 500) and never a value with stray characters (a newline in a
member_id or a token). Examples first, then Hypothesis properties.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.bitrix.simulator import php_form
from gateway.tenants.events import (
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    MAX_FIELDS,
    MAX_TOKEN,
    MEMBER_ID_RE,
    TOKEN_RE,
    EventError,
    InstallEvent,
    UninstallEvent,
    event_name,
    parse_php_form,
    read_install,
    read_uninstall,
)
from tests.strategies import hostile_text, urls

NOW = 1_800_000_000.0


def install_fields(**auth: Any) -> dict[str, Any]:
    """An ``ONAPPINSTALL`` as the portal sends it (bitrix24-app-mode.md §1.3), ``auth`` fields overridden (None: left out)."""
    fields: dict[str, Any] = {
        "access_token": "s6p6eclrkLmN0pQ1",
        "expires": "1800003600",
        "expires_in": "3600",
        "scope": "ai_admin",
        "domain": "acme.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "F",
        "client_endpoint": "https://acme.bitrix24.com/rest/",
        "member_id": "a223c6b3710f85df22e9377d6c4f7553",
        "user_id": "1",
        "refresh_token": "4s386p3q0tr8dy89xvmt96e2ln3vrafv",
        "application_token": "51856fefc120afa4b628cc82d3935cce",
    }
    fields.update(auth)
    return {
        "event": "ONAPPINSTALL",
        "event_handler_id": "1",
        "data": {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
        "ts": "1800000000",
        "auth": {k: v for k, v in fields.items() if v is not None},
    }


def uninstall_fields(clean: str = "0", **auth: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "domain": "acme.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "client_endpoint": "https://acme.bitrix24.com/rest/",
        "member_id": "a223c6b3710f85df22e9377d6c4f7553",
        "application_token": "51856fefc120afa4b628cc82d3935cce",
    }
    fields.update(auth)
    return {
        "event": "ONAPPUNINSTALL",
        "event_handler_id": "2",
        "data": {"LANGUAGE_ID": "en", "CLEAN": clean},
        "ts": "1800000000",
        "auth": {k: v for k, v in fields.items() if v is not None},
    }


def encoded(fields: dict[str, Any]) -> bytes:
    """The body the portal's queue server POSTs (``http_build_query``)."""
    return urlencode(php_form(fields)).encode()


def field_of(body: bytes) -> str:
    with pytest.raises(EventError) as caught:
        parse_php_form(body)
    return caught.value.field


# -- parse_php_form ------------------------------------------------------------------


def test_bracket_keys_become_nested_groups() -> None:
    form = parse_php_form(b"event=ONAPPINSTALL&auth%5Bmember_id%5D=m1&auth[domain]=a.b&data[FIELDS][ID]=7&flag")
    assert form == {"event": "ONAPPINSTALL", "auth": {"member_id": "m1", "domain": "a.b"}, "data": {"FIELDS": {"ID": "7"}}, "flag": ""}


def test_a_real_install_event_round_trips() -> None:
    fields = install_fields()
    assert parse_php_form(encoded(fields)) == fields


def test_the_size_bound_is_exact() -> None:
    at_limit = b"event=" + b"x" * (MAX_EVENT_BYTES - len(b"event="))
    assert len(parse_php_form(at_limit)["event"]) == MAX_EVENT_BYTES - 6
    assert field_of(at_limit + b"x") == "body"


def test_the_field_count_is_bounded() -> None:
    assert len(parse_php_form(b"&".join(b"k%d=v" % i for i in range(MAX_FIELDS)))) == MAX_FIELDS
    with pytest.raises(EventError, match=f"more than {MAX_FIELDS} fields"):
        parse_php_form(b"&".join(b"k%d=v" % i for i in range(MAX_FIELDS + 1)))


def test_nesting_is_bounded() -> None:
    deepest = "a" + "[b]" * (MAX_DEPTH - 1)
    assert parse_php_form(f"{deepest}=1".encode()) == {"a": {"b": {"b": {"b": "1"}}}}
    with pytest.raises(EventError, match=f"nested deeper than {MAX_DEPTH}") as caught:
        parse_php_form(f"{deepest}[b]=1".encode())
    assert caught.value.field.startswith("a[b]")


@pytest.mark.parametrize("body", [b"auth=1&auth[member_id]=m", b"auth[member_id]=m&auth=1", b"a[b]=1&a[b][c]=2", b"a[b][c]=2&a[b]=1"])
def test_a_key_cannot_be_both_a_value_and_a_group(body: bytes) -> None:
    with pytest.raises(EventError, match="both a value and a group"):
        parse_php_form(body)


@pytest.mark.parametrize("body", [b"[x]=1", b"a[b=1", b"a]=1", b"a[b]c=1", b"=1", b"a[[b]]=1"])
def test_keys_that_are_not_form_keys_are_refused(body: bytes) -> None:
    with pytest.raises(EventError, match="not a form key"):
        parse_php_form(body)


@pytest.mark.parametrize("body", [b"event=\xff\xfe", b"event=%FF%FE", b"auth[%C0%AF]=1", b"\x80=1"])
def test_bytes_that_are_not_utf8_are_refused(body: bytes) -> None:
    assert field_of(body) == "body"


def test_an_event_name_is_required_and_read_case_insensitively() -> None:
    assert event_name(parse_php_form(b"event=onAppInstall")) == "ONAPPINSTALL"
    for body in (b"", b"event=", b"event[x]=1", b"auth[event]=ONAPPINSTALL"):
        with pytest.raises(EventError, match="event: is missing"):
            event_name(parse_php_form(body))


# -- read_install / read_uninstall -----------------------------------------------------


def test_a_valid_install_event_is_read() -> None:
    event = read_install(parse_php_form(encoded(install_fields())), now=NOW)
    assert event == InstallEvent(
        member_id="a223c6b3710f85df22e9377d6c4f7553",
        domain="acme.bitrix24.com",
        client_endpoint="https://acme.bitrix24.com/rest/",
        server_endpoint="https://oauth.bitrix.info/rest/",
        access_token="s6p6eclrkLmN0pQ1",
        refresh_token="4s386p3q0tr8dy89xvmt96e2ln3vrafv",
        expires=1800003600.0,
        application_token="51856fefc120afa4b628cc82d3935cce",
        user_id=1,
        status="F",
    )


def test_optional_install_fields_have_defaults() -> None:
    form = install_fields(
        expires=None, expires_in=None, user_id=None, status=None, domain="ACME.bitrix24.com", client_endpoint="https://acme.bitrix24.com/rest"
    )
    event = read_install(form, now=NOW)
    assert (event.expires, event.user_id, event.status) == (NOW + 3600, 0, "")
    assert event.domain == "acme.bitrix24.com" and event.client_endpoint == "https://acme.bitrix24.com/rest/"
    assert read_install(install_fields(expires=None, expires_in="60"), now=NOW).expires == NOW + 60


def test_a_portal_on_a_port_keeps_it_in_its_domain() -> None:
    event = read_install(install_fields(domain="127.0.0.1:8443", client_endpoint="http://127.0.0.1:8443/rest/"), now=NOW)
    assert event.domain == "127.0.0.1:8443"


@pytest.mark.parametrize(
    ("auth", "field", "message"),
    [
        ({"member_id": None}, "auth[member_id]", "is missing"),
        ({"member_id": "a" * 65}, "auth[member_id]", "longer than 64"),
        ({"member_id": "abc def"}, "auth[member_id]", "characters"),
        ({"member_id": "abc\n"}, "auth[member_id]", "characters"),
        ({"member_id": {"x": "1"}}, "auth[member_id]", "not a group"),
        ({"access_token": None}, "auth[access_token]", "is missing"),
        ({"access_token": "tok en"}, "auth[access_token]", "characters"),
        ({"access_token": "token\n"}, "auth[access_token]", "characters"),
        ({"access_token": "t" * (MAX_TOKEN + 1)}, "auth[access_token]", "longer than"),
        ({"refresh_token": ""}, "auth[refresh_token]", "is missing"),
        ({"application_token": "x\u00e9"}, "auth[application_token]", "characters"),
        ({"application_token": "a" * 257}, "auth[application_token]", "longer than 256"),
        ({"domain": None}, "auth[domain]", "is missing"),
        ({"domain": "acme.bitrix24.com/evil"}, "auth[domain]", "characters"),
        ({"domain": "acme.bitrix24.com\n"}, "auth[domain]", "characters"),
        ({"domain": "other.bitrix24.com"}, "auth[client_endpoint]", "not on the portal's domain"),
        ({"client_endpoint": "https://evil.example/rest/"}, "auth[client_endpoint]", "not on the portal's domain"),
        ({"client_endpoint": "https://acme.bitrix24.com:8443/rest/"}, "auth[client_endpoint]", "not on the portal's domain"),
        ({"client_endpoint": "ftp://acme.bitrix24.com/rest/"}, "auth[client_endpoint]", "http(s) URL"),
        ({"client_endpoint": "https://[::1/rest/"}, "auth[client_endpoint]", "not a URL"),
        ({"server_endpoint": "javascript:alert(1)"}, "auth[server_endpoint]", "http(s) URL"),
        ({"server_endpoint": None}, "auth[server_endpoint]", "is missing"),
        ({"expires": "soon"}, "auth[expires]", "characters"),
        ({"expires_in": "-5"}, "auth[expires_in]", "characters"),
        ({"user_id": "1e3"}, "auth[user_id]", "characters"),
        ({"status": "free"}, "auth[status]", "longer than 2"),
        ({"status": "f"}, "auth[status]", "characters"),
    ],
)
def test_a_bad_install_field_is_named(auth: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(EventError, match=re.escape(message)) as caught:
        read_install(parse_php_form(encoded(install_fields(**auth))), now=NOW)
    assert caught.value.field == field


def test_an_install_without_auth_is_refused() -> None:
    for form in ({"event": "ONAPPINSTALL"}, {"event": "ONAPPINSTALL", "auth": "x"}):
        with pytest.raises(EventError, match="auth: is missing"):
            read_install(form)


def test_uninstall_events_are_read_with_clean() -> None:
    assert read_uninstall(parse_php_form(encoded(uninstall_fields()))) == UninstallEvent(
        "a223c6b3710f85df22e9377d6c4f7553", "acme.bitrix24.com", "51856fefc120afa4b628cc82d3935cce", False
    )
    assert read_uninstall(uninstall_fields("1")).clean and read_uninstall(uninstall_fields("Y")).clean
    assert not read_uninstall(uninstall_fields("N")).clean
    no_data = uninstall_fields()
    del no_data["data"]
    assert not read_uninstall(no_data).clean
    no_data["data"] = "CLEAN"  # a value, not a group: as if there were no data
    assert not read_uninstall(no_data).clean


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (uninstall_fields("yes"), "data[CLEAN]"),
        (uninstall_fields("2"), "data[CLEAN]"),
        (uninstall_fields(application_token=None), "auth[application_token]"),
        (uninstall_fields(application_token="tok\n"), "auth[application_token]"),
        (uninstall_fields(member_id=None), "auth[member_id]"),
        (uninstall_fields(member_id="m\n"), "auth[member_id]"),
        (uninstall_fields(domain="a b"), "auth[domain]"),
    ],
)
def test_a_bad_uninstall_field_is_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(EventError) as caught:
        read_uninstall(parse_php_form(encoded(fields)))
    assert caught.value.field == field


# -- properties: any input is a typed value or an EventError -----------------------------

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOMAIN_FULL = re.compile(r"[a-z0-9.-]{1,253}(:[0-9]{1,5})?")


def assert_well_formed_install(event: InstallEvent) -> None:
    """What the service and the store may rely on for an install that was read."""
    assert MEMBER_ID_RE.fullmatch(event.member_id), event.member_id
    for token in (event.access_token, event.refresh_token, event.application_token):
        assert TOKEN_RE.fullmatch(token) and len(token) <= MAX_TOKEN, token
    assert DOMAIN_FULL.fullmatch(event.domain), event.domain
    for url in (event.client_endpoint, event.server_endpoint):
        parsed = httpx.URL(url)
        assert parsed.scheme in ("http", "https") and parsed.host and url.endswith("/"), url
    assert httpx.URL(event.client_endpoint).host == event.domain.split(":", 1)[0]
    assert event.user_id >= 0 and event.expires >= 0
    assert event.status == "" or re.fullmatch(r"[A-Z]", event.status)


def assert_well_formed_uninstall(event: UninstallEvent) -> None:
    assert MEMBER_ID_RE.fullmatch(event.member_id), event.member_id
    assert TOKEN_RE.fullmatch(event.application_token), event.application_token
    assert DOMAIN_FULL.fullmatch(event.domain), event.domain
    assert isinstance(event.clean, bool)


def read_any(body: bytes) -> object:
    """What the events endpoint does with a body, short of the network: a typed event or EventError."""
    try:
        form = parse_php_form(body)
        name = event_name(form)
        if name == "ONAPPINSTALL":
            event: object = read_install(form, now=NOW)
            assert isinstance(event, InstallEvent)
            assert_well_formed_install(event)
            return event
        if name == "ONAPPUNINSTALL":
            event = read_uninstall(form)
            assert isinstance(event, UninstallEvent)
            assert_well_formed_uninstall(event)
            return event
        return form
    except EventError as exc:
        assert isinstance(exc.field, str) and len(exc.field) <= 60
        return exc


key_parts = st.one_of(st.sampled_from(["auth", "data", "event", "member_id", "access_token", "domain", "CLEAN", "", "[", "]", "[]"]), hostile_text)
form_keys = st.builds(lambda head, rest: head + "".join(f"[{part}]" for part in rest), key_parts, st.lists(key_parts, max_size=6))
form_values = st.one_of(hostile_text, st.sampled_from(["ONAPPINSTALL", "ONAPPUNINSTALL", "1", "Y", "", "a" * 2000]), urls())


def raw_pair(key: str, value: str) -> str:
    return quote(key.encode("utf-8", "surrogatepass"), safe="[]") + "=" + quote(value.encode("utf-8", "surrogatepass"), safe="")


@PROPERTY
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_are_refused(body: bytes) -> None:
    read_any(body)


@PROPERTY
@given(st.lists(st.tuples(form_keys, form_values), max_size=30))
def test_any_bracket_form_parses_or_is_refused(pairs: list[tuple[str, str]]) -> None:
    read_any("&".join(raw_pair(k, v) for k, v in pairs).encode())
    read_any(("event=ONAPPINSTALL&" + "&".join(raw_pair(k, v) for k, v in pairs)).encode())


INSTALL_AUTH_KEYS = list(install_fields()["auth"])
UNINSTALL_AUTH_KEYS = list(uninstall_fields()["auth"])
replacements = st.one_of(
    st.none(),
    hostile_text,
    urls(),
    st.sampled_from(["", "\n", "x\n", "1\n", "127.0.0.1:1", "http://127.0.0.1:1/rest/", "https://acme.bitrix24.com/rest/", "A", "99999999999999"]),
    st.dictionaries(st.sampled_from(["", "x", "0"]), st.text(max_size=5), min_size=1, max_size=2),
)


@PROPERTY
@given(st.dictionaries(st.sampled_from(INSTALL_AUTH_KEYS), replacements, max_size=4), st.sampled_from(["ONAPPINSTALL", "OnAppInstall"]))
def test_an_install_with_any_fields_changed_is_well_formed_or_refused(changes: dict[str, Any], name: str) -> None:
    fields = install_fields(**changes)
    fields["event"] = name
    body = urlencode(php_form(fields), encoding="utf-8", errors="surrogatepass").encode()
    result = read_any(body)
    if not changes:
        assert isinstance(result, InstallEvent)


@PROPERTY
@given(st.dictionaries(st.sampled_from(UNINSTALL_AUTH_KEYS), replacements, max_size=3), replacements)
def test_an_uninstall_with_any_fields_changed_is_well_formed_or_refused(changes: dict[str, Any], clean: Any) -> None:
    fields = uninstall_fields(**changes)
    fields["data"]["CLEAN"] = clean
    read_any(urlencode(php_form(fields), encoding="utf-8", errors="surrogatepass").encode())


@PROPERTY
@given(st.integers(0, 3 * MAX_FIELDS), st.integers(1, 8))
def test_large_and_deep_forms_are_bounded(count: int, depth: int) -> None:
    key = "a" + "".join(f"[k{i}]" for i in range(depth - 1))
    body = "&".join(f"{key}[{i}]=v" if depth < MAX_DEPTH else f"{key}=v" for i in range(count)).encode()
    refused = count > MAX_FIELDS or (count > 0 and depth > MAX_DEPTH)
    try:
        form = parse_php_form(body)
    except EventError:
        assert refused
    else:
        assert not refused and (form == {} if count == 0 else "a" in form)
