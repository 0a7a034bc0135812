"""The portal's app events (``ONAPPINSTALL``, ``ONAPPUNINSTALL``) turned into typed values.

The portal POSTs them as ``application/x-www-form-urlencoded`` with PHP bracket keys
(``auth[access_token]=...``). Nothing in them is signed: an install is believed only after the
OAuth server confirms its token (:mod:`gateway.tenants.service`), an uninstall only when its
``application_token`` matches the install's. Here every field is bounded and checked, so that
what reaches the service is well-formed: sizes, key counts and depth are limited, URLs are
parsed by httpx (the client that will call them), and a missing or odd field is an
:class:`EventError` naming it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx

MAX_EVENT_BYTES = 65536
MAX_FIELDS = 200
MAX_DEPTH = 4
MAX_TOKEN = 1024
MEMBER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
"""Tokens are printable ASCII without spaces."""
DOMAIN_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$")
BRACKET_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class EventError(ValueError):
    """An event that cannot be read; ``field`` names what is wrong (for the 400 answer)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_php_form(body: bytes) -> dict[str, Any]:
    """A form body with PHP bracket keys as nested dicts (``auth[domain]`` → ``{"auth": {"domain": ...}}``)."""
    if len(body) > MAX_EVENT_BYTES:
        raise EventError("body", f"larger than {MAX_EVENT_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise EventError("body", "not UTF-8 text") from None
    except ValueError:
        raise EventError("body", f"more than {MAX_FIELDS} fields") from None
    form: dict[str, Any] = {}
    for key, value in pairs:
        match = BRACKET_KEY_RE.match(key)
        if match is None:
            raise EventError(key[:60], "not a form key")
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        if len(path) > MAX_DEPTH:
            raise EventError(key[:60], f"nested deeper than {MAX_DEPTH}")
        node = form
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise EventError(key[:60], "is both a value and a group")
            node = child
        if isinstance(node.get(path[-1]), dict):
            raise EventError(key[:60], "is both a value and a group")
        node[path[-1]] = value
    return form


@dataclass(frozen=True)
class InstallEvent:
    member_id: str
    domain: str
    client_endpoint: str
    server_endpoint: str
    access_token: str
    refresh_token: str
    expires: float
    application_token: str
    user_id: int
    status: str


@dataclass(frozen=True)
class UninstallEvent:
    member_id: str
    domain: str
    application_token: str
    clean: bool


def _text(group: dict[str, Any], name: str, prefix: str, *, limit: int = MAX_TOKEN, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = group.get(name)
    field = f"{prefix}[{name}]"
    if value is None or value == "":
        if required:
            raise EventError(field, "is missing")
        return ""
    if not isinstance(value, str):
        raise EventError(field, "must be a value, not a group")
    if len(value) > limit:
        raise EventError(field, f"longer than {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):  # fullmatch: `$` would let a trailing newline through
        raise EventError(field, "has characters it may not have")
    return value


def _url(group: dict[str, Any], name: str) -> str:
    value = _text(group, name, "auth", limit=2048)
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, ValueError):
        raise EventError(f"auth[{name}]", "is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise EventError(f"auth[{name}]", "must be an http(s) URL")
    return value if value.endswith("/") else value + "/"


def _domain(group: dict[str, Any]) -> str:
    domain = _text(group, "domain", "auth", limit=260, pattern=DOMAIN_RE).lower()
    return domain.removesuffix(":443").removesuffix(":80")  # kept as callbacks' host[:port] is compared


def _host_port(url: str) -> str:
    parsed = httpx.URL(url)
    default = {"http": 80, "https": 443}[parsed.scheme]
    port = parsed.port
    return parsed.host.lower() + (f":{port}" if port not in (None, default) else "")


def _auth(form: dict[str, Any]) -> dict[str, Any]:
    auth = form.get("auth")
    if not isinstance(auth, dict):
        raise EventError("auth", "is missing")
    return auth


def event_name(form: dict[str, Any]) -> str:
    name = form.get("event")
    if not isinstance(name, str) or not name:
        raise EventError("event", "is missing")
    return name.upper()


def read_install(form: dict[str, Any], *, now: float | None = None) -> InstallEvent:
    auth = _auth(form)
    domain = _domain(auth)
    client_endpoint = _url(auth, "client_endpoint")
    if _host_port(client_endpoint) != domain:
        raise EventError("auth[client_endpoint]", "is not on the portal's domain")
    expires_in = _text(auth, "expires_in", "auth", limit=10, pattern=re.compile(r"^[0-9]+$"), required=False)
    expires = _text(auth, "expires", "auth", limit=12, pattern=re.compile(r"^[0-9]+$"), required=False)
    now = time.time() if now is None else now
    user_id = _text(auth, "user_id", "auth", limit=10, pattern=re.compile(r"^[0-9]+$"), required=False)
    return InstallEvent(
        member_id=_text(auth, "member_id", "auth", limit=64, pattern=MEMBER_ID_RE),
        domain=domain,
        client_endpoint=client_endpoint,
        server_endpoint=_url(auth, "server_endpoint"),
        access_token=_text(auth, "access_token", "auth", pattern=TOKEN_RE),
        refresh_token=_text(auth, "refresh_token", "auth", pattern=TOKEN_RE),
        expires=float(expires) if expires else now + float(expires_in or 3600),
        application_token=_text(auth, "application_token", "auth", limit=256, pattern=TOKEN_RE),
        user_id=int(user_id or 0),
        status=_text(auth, "status", "auth", limit=2, pattern=re.compile(r"^[A-Z]$"), required=False),
    )


def read_uninstall(form: dict[str, Any]) -> UninstallEvent:
    auth = _auth(form)
    data = form.get("data") if isinstance(form.get("data"), dict) else {}
    assert isinstance(data, dict)
    clean = _text(data, "CLEAN", "data", limit=1, pattern=re.compile(r"^[01YN]$"), required=False)
    return UninstallEvent(
        member_id=_text(auth, "member_id", "auth", limit=64, pattern=MEMBER_ID_RE),
        domain=_domain(auth),
        application_token=_text(auth, "application_token", "auth", limit=256, pattern=TOKEN_RE),
        clean=clean in ("1", "Y"),
    )
