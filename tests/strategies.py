"""Hypothesis strategies for hostile portal requests, shared by the fuzz tests and ``bench/fuzz.py``.

They aim at what broke the gateway before: lone surrogates, numbers JSON allows but Python
cannot convert (``1e400``, ``Infinity``, 300-digit integers), deep nesting, and URLs that
a lenient parser passes but the HTTP client refuses (ports out of range, control
characters, unclosed IPv6 brackets).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Any code point, lone surrogates included: JSON escapes them as \udXXX.
any_text = st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=40)
hostile_text = st.one_of(
    any_text,
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\t", "\n", " ", "\u202e", "", "   ", "%", "%ZZ", "[", "]", "@", "#"]),
)
numbers = st.one_of(
    st.integers(-(10**300), 10**300),
    st.integers(-5, 100_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 840, 14400, 86400, 86401, 1e300, -1, 0.5, 2.0000001]),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, hostile_text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(hostile_text, children, max_size=4)),
    max_leaves=20,
)
ports = st.one_of(st.integers(-1, 70_000), st.sampled_from(["", "abc", "65536", "0", "99999999999999999999", " 80"]))
hosts = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1",
            "[::1]",
            "[::1",
            "::1]",
            "localhost",
            "acme.bitrix24.com",
            "xn--j1ay.xn--p1ai",
            "портал.рф",
            "",
            "user:pw@127.0.0.1",
            "a..bitrix24.com",
            ".acme.bitrix24.com",
            "x" * 64 + ".bitrix24.com",
            "xn--.com",
        ]
    ),
    hostile_text,
)


@st.composite
def urls(draw: st.DrawFn, base: str = "http://127.0.0.1:1") -> str:
    """A URL built from hostile parts, or a valid base with something hostile appended."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(hostile_text)
    if kind == 1:
        return base + "/bitrix/services/main/ajax.php?action=x&hash=" + draw(hostile_text)
    scheme = draw(st.sampled_from(["http", "https", "ftp", "file", "HTTP", "", "javascript"]))
    port = draw(ports)
    path = draw(hostile_text)
    return f"{scheme}://{draw(hosts)}{':' + str(port) if draw(st.booleans()) else ''}/{path}"


FIELDS = [
    "prompt",
    "payload_role",
    "context",
    "temperature",
    "max_tokens",
    "ttl",
    "category",
    "callbackUrl",
    "errorCallbackUrl",
    "payload_markers",
    "collect_context",
    "auth",
    "bx_module",
    "brand_new",
]


@st.composite
def mutated_bodies(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with a few fields replaced by hostile values, dropped, or added."""
    body = dict(valid)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            body.pop(key, None)
        elif choice == 1:
            body[key] = draw(numbers)
        elif choice == 2 and key in ("callbackUrl", "errorCallbackUrl"):
            body[key] = draw(urls())
        elif choice == 3 and key == "prompt":
            body[key] = {
                "file": draw(urls()),
                "prompt": draw(hostile_text),
                "images_number": draw(numbers),
                "format": draw(hostile_text),
                "fields": draw(json_values),
            }
        else:
            body[key] = draw(json_values)
    return body


def encode(body: Any) -> bytes:
    """JSON as a hostile client may send it: surrogates escaped, ``Infinity`` and ``NaN`` literals kept."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def nested(depth: int) -> bytes:
    return b'{"x":' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 3000).map(nested),
    st.integers(1, 5000).map(lambda n: b'{"ttl":' + b"9" * n + b"}"),
    json_values.map(encode),
)
