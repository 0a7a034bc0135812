import json

import pytest

from gateway.adapters import Segment, TextResult, Transcript
from gateway.bitrix.protocol import (
    ProtocolError,
    encode_like_php,
    error_body,
    format_offset,
    parse_completion_request,
    read_callback_answer,
    success_body,
)
from gateway.languages import language_code
from gateway.tasks import Category, Message

CALLBACK = "https://acme.bitrix24.com/bitrix/services/main/ajax.php?action=ai.controller.integration.thirdparty.callbackSuccess&hash=Ab3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY"
ERROR_CALLBACK = CALLBACK.replace("callbackSuccess", "callbackError")


def portal_body(**changes):
    body = {
        "prompt": "Write a greeting", "payload_raw": "Write a greeting", "payload_provider": "text",
        "payload_role": "You are helpful.", "context": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
        "payload_markers": {"language": "English"}, "payload_prompt_text": None,
        "auth": {"access_token": "oauth-secret", "member_id": "m1"}, "category": "text", "ttl": 14400,
        "callbackUrl": CALLBACK, "errorCallbackUrl": ERROR_CALLBACK, "bx_module": "crm",
    }
    body.update(changes)
    return json.loads(encode_like_php(body))  # as it arrives: PHP escapes decoded


def parse(body, category=Category.TEXT):
    return parse_completion_request(body, engine="acme", category=category, default_ttl=840, job_id="j1", now=1000.0)


def test_php_encoding_is_what_the_portal_sends():
    raw = encode_like_php({"url": "https://a/b", "text": "Привет"})
    assert raw == b'{"url":"https:\\/\\/a\\/b","text":"\\u041f\\u0440\\u0438\\u0432\\u0435\\u0442"}'
    assert json.loads(raw) == {"url": "https://a/b", "text": "Привет"}


def test_text_request_becomes_a_task_without_secrets():
    request = parse(portal_body())
    task = request.task
    assert task.messages() == [
        Message("system", "You are helpful."), Message("user", "hi"), Message("assistant", "hello"), Message("user", "Write a greeting"),
    ]
    assert task.language == "English" and task.deadline == 1000.0 + 14400 and task.portal == "acme.bitrix24.com"
    assert "auth" not in task.extra and task.extra["bx_module"] == "crm" and task.extra["payload_provider"] == "text"
    assert "oauth-secret" not in json.dumps(task.to_json())
    assert "Ab3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY" not in json.dumps(task.to_json()) + request.idempotency_key
    assert request.callback_url == CALLBACK and request.error_callback_url == ERROR_CALLBACK


def test_same_hash_same_idempotency_key():
    assert parse(portal_body()).idempotency_key == parse(portal_body(prompt="other")).idempotency_key
    other = portal_body(callbackUrl=CALLBACK.replace("Ab3d", "Zz9d"))
    assert parse(other).idempotency_key != parse(portal_body()).idempotency_key


def test_numbers_may_arrive_as_strings_and_nulls_default():
    task = parse(portal_body(temperature="0.7", max_tokens="100", ttl=None, payload_markers=[])).task
    assert (task.temperature, task.max_tokens, task.ttl, task.language) == (0.7, 100, 840, None)


@pytest.mark.parametrize("changes, status, field", [
    ({"callbackUrl": None}, 422, "callbackUrl"),
    ({"category": "audio"}, 422, "audio"),
    ({"prompt": None}, 422, "prompt"),
    ({"temperature": True}, 422, "temperature"),
    ({"temperature": "NaN"}, 422, "temperature"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"ttl": "soon"}, 422, "ttl"),
    ({"context": [1]}, 422, "context[0]"),
    ({"payload_role": ["x"]}, 422, "payload_role"),
])
def test_invalid_requests(changes, status, field):
    with pytest.raises(ProtocolError) as err:
        parse(portal_body(**changes))
    assert err.value.status == status and field in err.value.message


def test_non_object_body():
    with pytest.raises(ProtocolError) as err:
        parse([1, 2])
    assert err.value.status == 400


def test_callback_bodies():
    assert success_body(TextResult("hi"), Category.TEXT) == {"result": "hi"}
    assert error_body("boom", 503) == {"message": "boom", "code": 503, "api_request_completed": False}


@pytest.mark.parametrize("status, body, outcome", [
    (200, b'{"status":"success","data":true,"errors":[]}', "delivered"),
    (200, b'{"status":"success","data":false,"errors":[]}', "gone"),
    (200, b'{"status":"error","data":null,"errors":[{"message":"Thirdparty is not available"}]}', "rejected"),
    (200, b"<html>maintenance</html>", "retry"),
    (503, b"", "retry"),
    (429, b"", "retry"),
    (302, b"", "rejected"),
    (404, b"", "rejected"),
])
def test_portal_answers(status, body, outcome):
    assert read_callback_answer(status, body).outcome == outcome


def test_audio_prompt_is_checked_and_php_empty_arrays_tolerated():
    prompt = {"file": "https://acme.bitrix24.com/disk/showFile/42/", "fields": [], "fileExtension": ""}
    task = parse(portal_body(prompt=prompt, category="audio", payload_provider="audio"), Category.AUDIO).task
    assert task.prompt == {"file": "https://acme.bitrix24.com/disk/showFile/42/", "fields": {}, "fileExtension": None}
    prompt = {"file": "https://acme.bitrix24.com/rec", "fields": {"type": "audio/mpeg", "prompt": "ACME", "detectEmotions": True}}
    task = parse(portal_body(prompt=prompt, category="call"), Category.CALL).task
    assert task.prompt["fields"] == {"type": "audio/mpeg", "prompt": "ACME", "detectEmotions": True}


@pytest.mark.parametrize("prompt, field", [
    ({}, "prompt.file"), ({"file": ""}, "prompt.file"), ({"file": "file:///etc/passwd"}, "prompt.file"),
    ({"file": "//host/x"}, "prompt.file"), ({"file": "https://a/x", "fields": {"type": 5}}, "prompt.fields.type"),
    ({"file": "https://a/x", "fileExtension": 3}, "prompt.fileExtension"), ("https://a/x.mp3", "prompt"),
])
def test_bad_audio_prompts(prompt, field):
    with pytest.raises(ProtocolError) as err:
        parse(portal_body(prompt=prompt, category="audio"), Category.AUDIO)
    assert err.value.status == 422 and err.value.message.startswith(field)


def test_transcripts_per_category():
    transcript = Transcript("Hello there. Bye.", "en", (Segment(0.0, 1.5, " Hello there."), Segment(3599.2, 3600.4, "Bye.")), 3601.0)
    assert success_body(transcript, Category.AUDIO) == {"result": "Hello there. Bye."}
    assert success_body(transcript, Category.CALL) == {"result": [{"transcriptions": [
        {"user_id": 0, "start_time_formatted": "00:00", "end_time_formatted": "00:01", "text": "Hello there."},
        {"user_id": 0, "start_time_formatted": "59:59", "end_time_formatted": "01:00:00", "text": "Bye."},
    ], "language": "en"}]}
    plain = Transcript("Just text.", None, (), 12.9)
    assert success_body(plain, Category.CALL)["result"][0]["transcriptions"] == [
        {"user_id": 0, "start_time_formatted": "00:00", "end_time_formatted": "00:12", "text": "Just text."}]
    assert Transcript.from_json(json.loads(json.dumps(transcript.to_json()))) == transcript


@pytest.mark.parametrize("seconds, text", [(0, "00:00"), (59.9, "00:59"), (61, "01:01"), (3599, "59:59"), (3600, "01:00:00"), (36125, "10:02:05"), (-1, "00:00")])
def test_offsets(seconds, text):
    assert format_offset(seconds) == text


@pytest.mark.parametrize("name, code", [
    ("English", "en"), ("Русский", "ru"), ("Deutsch", "de"), ("german", "de"), ("Português (Brasil)", "pt"),
    ("Українська", "uk"), ("Türkçe", "tr"), ("简体中文", "zh"), ("Bahasa Indonesia", "id"), ("ru", "ru"),
    ("Klingon", None), ("", None), (None, None),
])
def test_language_names(name, code):
    assert language_code(name) == code
