"""The OpenAI-compatible API's request parsing, keys and config, in process: every hostile input
is a 400 naming its field (property-tested), keys are checked in constant time and limited."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters import Usage
from gateway.config import ApiKeyConfig, ConfigError, OpenAIApiSettings, parse_config
from gateway.openai_api.errors import APIError
from gateway.openai_api.keys import KeyRing
from gateway.openai_api.parse import ChatRequest, ImagesRequest, TranscriptionRequest, parse_chat, parse_images, parse_transcription, read_json
from gateway.redaction import Redactor
from tests.strategies import hostile_text, json_values, numbers, raw_bodies

PROPERTIES = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = OpenAIApiSettings(max_messages=8, max_message_chars=100)
VALID_CHAT = {"model": "acme_text", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
CHAT_FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "stop",
    "seed",
    "n",
    "tools",
    "logprobs",
    "response_format",
    "user",
    "presence_penalty",
    "other",
]


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict:
    """A valid chat body with a few fields replaced by hostile values, or added."""
    body = dict(VALID_CHAT)
    for key in draw(st.lists(st.sampled_from(CHAT_FIELDS), max_size=4, unique=True)):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            body.pop(key, None)
        elif kind == 1:
            body[key] = draw(numbers)
        elif kind == 2 and key == "messages":
            body[key] = draw(
                st.lists(
                    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), hostile_text), "content": json_values}),
                    max_size=10,
                )
            )
        else:
            body[key] = draw(json_values)
    return body


def refusal(call, *args) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args)
    return caught.value


@PROPERTIES
@given(raw_bodies)
def test_any_body_is_a_json_object_or_a_400(raw: bytes):
    try:
        assert isinstance(read_json(raw), dict)
    except APIError as exc:
        assert exc.status == 400 and exc.code == "invalid_json"


@PROPERTIES
@given(st.one_of(chat_bodies(), st.dictionaries(hostile_text, json_values, max_size=5)))
def test_any_chat_body_is_a_request_or_a_400_naming_its_field(body: dict):
    try:
        parsed = parse_chat(body, LIMITS)
    except APIError as exc:
        assert exc.status == 400 and exc.type == "invalid_request_error" and exc.message
        assert exc.param is None or isinstance(exc.param, str)
        return
    assert isinstance(parsed, ChatRequest) and parsed.messages[-1].role == "user"
    assert 1 <= len(parsed.messages) <= LIMITS.max_messages and all(len(m.content) <= LIMITS.max_message_chars for m in parsed.messages)
    assert parsed.temperature is None or 0 <= parsed.temperature <= 2
    assert parsed.max_tokens is None or 1 <= parsed.max_tokens <= 1_000_000
    for message in parsed.messages:
        message.content.encode("utf-8")  # no lone surrogates get through


@PROPERTIES
@given(st.dictionaries(st.sampled_from(["model", "prompt", "n", "size", "response_format", "quality", "style", "user", "x"]), json_values, max_size=6))
def test_any_images_body_is_a_request_or_a_400(body: dict):
    try:
        parsed = parse_images(body)
    except APIError as exc:
        assert exc.status == 400
        return
    assert isinstance(parsed, ImagesRequest) and 1 <= parsed.n <= 10 and parsed.response_format in ("url", "b64_json")


@PROPERTIES
@given(
    st.dictionaries(
        st.sampled_from(["model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]", "stream", "x"]), hostile_text, max_size=6
    )
)
def test_any_transcription_form_is_a_request_or_a_400(fields: dict):
    try:
        parsed = parse_transcription(fields)
    except APIError as exc:
        assert exc.status == 400
        return
    assert isinstance(parsed, TranscriptionRequest) and parsed.response_format in ("json", "text", "verbose_json", "srt", "vtt")
    assert parsed.temperature is None or 0 <= parsed.temperature <= 1


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 9}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[1].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_each_refusal_names_the_field(change: dict, param: str):
    exc = refusal(parse_chat, {**VALID_CHAT, **change}, LIMITS)
    assert (exc.status, exc.param) == (400, param)


def test_a_valid_chat_keeps_what_the_model_needs():
    parsed = parse_chat(
        {
            **VALID_CHAT,
            "messages": [
                {"role": "developer", "content": "Rules"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 9,
            "seed": 3,
            "stop": "END",
            "user": "u1",
        },
        LIMITS,
    )
    assert [(m.role, m.content) for m in parsed.messages] == [("system", "Rules"), ("user", "a\nb")]
    assert parsed.stream and parsed.include_usage and parsed.max_tokens == 9 and parsed.params == {"seed": 3, "stop": "END"}


def test_nan_and_infinity_are_not_numbers():
    assert refusal(read_json, b'{"temperature": NaN}').code == "invalid_json"
    assert refusal(read_json, b"[1]").message == "the body must be a JSON object, got an array"


SECRET = "sk-gw-0123456789abcdefghijkl"


def test_keys_hashed_or_plain_and_constant_time_checks():
    redactor = Redactor()
    ring = KeyRing(
        [ApiKeyConfig("plain", SECRET, ("*",)), ApiKeyConfig("hashed", "sha256:" + hashlib.sha256(b"other-key-0123456789abcdef").hexdigest(), ("acme_text",))],
        redactor,
    )
    assert ring.authenticate(f"Bearer {SECRET}").name == "plain"
    assert ring.authenticate("bearer other-key-0123456789abcdef").name == "hashed"
    assert refusal(ring.authenticate, "Bearer nope").code == "invalid_api_key"
    assert refusal(ring.authenticate, None).code == "missing_api_key"
    assert refusal(ring.authenticate, SECRET).status == 401  # not a Bearer header
    assert redactor.redact(f"key {SECRET}") == "key ***"
    assert ring.keys[1].allowed(["acme_text", "acme_image"]) == ["acme_text"]


def test_limits_per_key_requests_per_minute_and_tokens_per_day():
    now = [1_000_000.0]
    ring = KeyRing([ApiKeyConfig("k", SECRET, ("*",), requests_per_minute=2, tokens_per_day=100)], clock=lambda: now[0])
    key = ring.keys[0]
    key.admit()
    key.admit()
    assert refusal(key.admit).code == "rate_limit_exceeded"
    now[0] += 61
    key.admit()
    key.count_usage(Usage(60, 50, 110))
    now[0] += 61
    assert refusal(key.admit).code == "tokens_per_day_exceeded"
    now[0] += 86400
    key.admit()  # a new UTC day


def config_error(tmp_path: Path, api_keys: object) -> ConfigError:
    data = {
        "engines": [{"code": "acme_text", "category": "text", "route": [{"provider": "p", "model": "m"}]}],
        "providers": {"p": {"type": "openai"}},
        "api_keys": api_keys,
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "gateway.yaml")
    return caught.value


def test_config_errors_name_the_key_and_never_echo_the_secret(tmp_path: Path):
    short = config_error(tmp_path, [{"name": "a", "secret": "short-secret", "engines": ["acme_text"]}])
    assert short.key == "api_keys[0].secret" and "short-secret" not in str(short) and "secrets.token_urlsafe" in short.fix
    bad_hash = config_error(tmp_path, [{"name": "a", "secret": "sha256:abc", "engines": ["*"]}])
    assert bad_hash.key == "api_keys[0].secret" and "sha256sum" in bad_hash.fix
    engine = config_error(tmp_path, [{"name": "a", "secret": SECRET, "engines": ["nope"]}])
    assert engine.key == "api_keys[0].engines" and "acme_text" in engine.fix
    twice = config_error(tmp_path, [{"name": "a", "secret": SECRET, "engines": ["*"]}, {"name": "a", "secret": SECRET + "x", "engines": ["*"]}])
    assert twice.key == "api_keys[1].name"
    unknown = config_error(tmp_path, [{"name": "a", "secret": SECRET, "engines": ["*"], "rpm": 5}])
    assert unknown.key == "api_keys[0].rpm"
