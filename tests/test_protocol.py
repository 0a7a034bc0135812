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
from gateway.tasks import AudioPrompt, CallPrompt, Category, ImagePrompt, Message, Task, TextPrompt

CALLBACK = (
    "https://acme.bitrix24.com/bitrix/services/main/ajax.php?action=ai.controller.integration.thirdparty.callbackSuccess&hash=Ab3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY"
)
ERROR_CALLBACK = CALLBACK.replace("callbackSuccess", "callbackError")


def portal_body(**changes):
    body = {
        "prompt": "Write a greeting",
        "payload_raw": "Write a greeting",
        "payload_provider": "text",
        "payload_role": "You are helpful.",
        "context": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
        "payload_markers": {"language": "English"},
        "payload_prompt_text": None,
        "auth": {"access_token": "oauth-secret", "member_id": "m1"},
        "category": "text",
        "ttl": 14400,
        "callbackUrl": CALLBACK,
        "errorCallbackUrl": ERROR_CALLBACK,
        "bx_module": "crm",
    }
    body.update(changes)
    return json.loads(encode_like_php(body))  # as it arrives: PHP escapes decoded


def parse(body, category=Category.TEXT, context="when_requested"):
    return parse_completion_request(body, engine="acme", category=category, default_ttl=840, job_id="j1", now=1000.0, context=context)


def test_php_encoding_is_what_the_portal_sends():
    raw = encode_like_php({"url": "https://a/b", "text": "Привет"})
    assert raw == b'{"url":"https:\\/\\/a\\/b","text":"\\u041f\\u0440\\u0438\\u0432\\u0435\\u0442"}'
    assert json.loads(raw) == {"url": "https://a/b", "text": "Привет"}


def test_text_request_becomes_a_task_without_secrets():
    request = parse(portal_body(collect_context=True))
    task = request.task
    assert task.messages() == [
        Message("system", "You are helpful."),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "Write a greeting"),
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


@pytest.mark.parametrize(
    "changes, status, field",
    [
        ({"callbackUrl": None}, 422, "callbackUrl"),
        ({"category": "audio"}, 422, "audio"),
        ({"prompt": None}, 422, "prompt"),
        ({"temperature": True}, 422, "temperature"),
        ({"temperature": "NaN"}, 422, "temperature"),
        ({"max_tokens": 0}, 422, "max_tokens"),
        ({"ttl": "soon"}, 422, "ttl"),
        ({"ttl": 1e400}, 422, "ttl: must be a finite number"),
        ({"ttl": 86401}, 422, "ttl: must be between 1 and 86400"),
        ({"ttl": 0}, 422, "ttl: must be between 1 and 86400"),
        ({"ttl": 10**300}, 422, "ttl: must be between 1 and 86400, got a number of more than 18 digits"),
        ({"temperature": 1e400}, 422, "temperature: must be a finite number"),
        ({"temperature": -0.1}, 422, "temperature: must be between 0.0 and 2.0"),
        ({"temperature": 2.5}, 422, "temperature: must be between"),
        ({"max_tokens": 1e400}, 422, "max_tokens: must be a finite number"),
        ({"max_tokens": 2**40}, 422, "max_tokens: must be between 1 and 1048576"),
        ({"max_tokens": "9" * 40}, 422, "max_tokens: must be a number"),
        ({"prompt": "hi \ud800 there"}, 422, "prompt: contains a lone UTF-16 surrogate"),
        ({"payload_role": "\udfff"}, 422, "payload_role: contains a lone UTF-16 surrogate"),
        ({"context": [{"role": "user", "content": "a\ud800"}], "collect_context": True}, 422, "context[0].content: contains a lone"),
        ({"callbackUrl": "http://[::1/"}, 422, "callbackUrl: is not a valid URL"),
        ({"callbackUrl": "https://acme.bitrix24.com:abc/x"}, 422, "callbackUrl: is not a valid URL"),
        ({"callbackUrl": "https://acme.bitrix24.com:70000/x"}, 422, "callbackUrl: port 70000 is out of range (1-65535)"),
        ({"callbackUrl": "https://acme.bitrix24.com:0/x"}, 422, "callbackUrl: port 0 is out of range"),
        ({"errorCallbackUrl": "https://acme.bitrix24.com/x?hash=\ud800"}, 422, "errorCallbackUrl: contains '\\ud800' at position"),
        ({"callbackUrl": "https://acme.bitrix24.com/a\tb"}, 422, "callbackUrl: contains '\\t' at position 27"),
        ({"callbackUrl": "https://acme.bitrix24.com/a\x00b"}, 422, "callbackUrl: contains '\\x00'"),
        ({"callbackUrl": "https://acme.bitrix24.com/a\nb"}, 422, "callbackUrl: contains '\\n'"),
        ({"callbackUrl": "https://acme.bitrix24.com/a b"}, 422, "callbackUrl: contains ' '"),
        ({"callbackUrl": "https://acme.bitrix24.com/" + "x" * 5000}, 422, "callbackUrl: is longer than 4096 characters"),
        ({"callbackUrl": "http:///x"}, 422, "callbackUrl: must be an absolute http(s) URL"),
        ({"callbackUrl": "http://xn--.bitrix24.com/x"}, 422, "callbackUrl: is not a valid URL (Malformed A-label"),
        ({"callbackUrl": "https://a..bitrix24.com/x"}, 422, "callbackUrl: the host name has an empty label or one longer than 63"),
        ({"errorCallbackUrl": "https://" + "x" * 64 + ".bitrix24.com/x"}, 422, "errorCallbackUrl: the host name has an empty label"),
        ({"context": [1], "collect_context": True}, 422, "context[0]"),
        ({"payload_role": ["x"]}, 422, "payload_role"),
    ],
)
def test_invalid_requests(changes, status, field):
    with pytest.raises(ProtocolError) as err:
        parse(portal_body(**changes))
    assert err.value.status == status and field in err.value.message


def test_numbers_at_the_edges_of_their_range_are_accepted():
    task = parse(portal_body(ttl=86400, temperature=0, max_tokens=1048576)).task
    assert (task.ttl, task.temperature, task.max_tokens) == (86400, 0.0, 1048576)
    assert parse(portal_body(ttl="1", temperature="2")).task.temperature == 2.0


def test_context_follows_the_engine_setting_and_collect_context():
    """The portal's own engines use ``context`` only when the request asks (collect_context)."""
    assert parse(portal_body()).task.context == []
    assert parse(portal_body(collect_context=False)).task.context == []
    for truthy in (True, "Y", "true", 1, "1"):
        assert len(parse(portal_body(collect_context=truthy)).task.context) == 2
    assert len(parse(portal_body(), context="always").task.context) == 2
    # A bad context is ignored when it is not used, as the portal's engines would.
    assert parse(portal_body(context="not a list")).task.context == []


def test_unknown_keys_that_cannot_be_stored_are_dropped_not_refused():
    deep: object = "bottom"
    for _ in range(40):
        deep = [deep]
    request = parse(portal_body(bx_deep=deep, bx_surrogate="\ud800", bx_huge=10**30, bx_inf=1e400, bx_fine={"a": [1, "b"]}, **{"bad\udc00key": 1}))
    assert request.task.extra["bx_fine"] == {"a": [1, "b"]}
    assert not {"bx_deep", "bx_surrogate", "bx_huge", "bx_inf", "bad\udc00key"} & set(request.task.extra)
    json.dumps(request.task.to_json()).encode()  # storable as it is


def test_idn_callback_host_is_the_one_httpx_connects_to():
    url = "https://портал.рф/bitrix/services/main/ajax.php?action=x&hash=abc"
    request = parse(portal_body(callbackUrl=url, errorCallbackUrl=url))
    assert request.task.portal == "портал.рф"
    assert str(dict(request.outbound_urls)["callbackUrl"]) == "https://xn--80awhdgm.xn--p1ai"


def test_images_number_is_bounded():
    body = portal_body(category="image", prompt={"prompt": "a cat", "images_number": 1e400})
    with pytest.raises(ProtocolError, match=r"prompt.images_number: must be a finite number"):
        parse(body, Category.IMAGE)
    body = portal_body(category="image", prompt={"prompt": "a cat", "images_number": 101})
    with pytest.raises(ProtocolError, match=r"prompt.images_number: must be between 1 and 100"):
        parse(body, Category.IMAGE)
    body = portal_body(category="image", prompt={"prompt": "a cat", "images_number": 4})
    assert parse(body, Category.IMAGE).task.prompt == ImagePrompt(text="a cat", images_number=4)


def test_non_object_body():
    with pytest.raises(ProtocolError) as err:
        parse([1, 2])
    assert err.value.status == 400


def test_callback_bodies():
    assert success_body(TextResult("hi"), Category.TEXT) == {"result": "hi"}
    assert error_body("boom", 503) == {"message": "boom", "code": 503, "api_request_completed": False}


@pytest.mark.parametrize(
    "status, body, outcome",
    [
        (200, b'{"status":"success","data":true,"errors":[]}', "delivered"),
        (200, b'{"status":"success","data":false,"errors":[]}', "gone"),
        (200, b'{"status":"error","data":null,"errors":[{"message":"Thirdparty is not available"}]}', "rejected"),
        (200, b"<html>maintenance</html>", "retry"),
        (503, b"", "retry"),
        (429, b"", "retry"),
        (302, b"", "rejected"),
        (404, b"", "rejected"),
    ],
)
def test_portal_answers(status, body, outcome):
    assert read_callback_answer(status, body).outcome == outcome


def test_audio_prompt_is_checked_and_php_empty_arrays_tolerated():
    prompt = {"file": "https://acme.bitrix24.com/disk/showFile/42/", "fields": [], "fileExtension": ""}
    task = parse(portal_body(prompt=prompt, category="audio", payload_provider="audio"), Category.AUDIO).task
    assert task.prompt == AudioPrompt(file_url="https://acme.bitrix24.com/disk/showFile/42/", fields={}, extension=None)
    prompt = {"file": "https://acme.bitrix24.com/rec", "fields": {"type": "audio/mpeg", "prompt": "ACME", "detectEmotions": True}}
    task = parse(portal_body(prompt=prompt, category="call"), Category.CALL).task
    assert task.prompt == CallPrompt(
        file_url="https://acme.bitrix24.com/rec",
        mime="audio/mpeg",
        hint="ACME",
        fields={"type": "audio/mpeg", "prompt": "ACME", "detectEmotions": True},
    )
    assert type(task.prompt) is CallPrompt


IMAGE_BODY = {"prompt": "a lighthouse", "style": "watercolour", "format": "portrait", "images_number": 2}
AUDIO_BODY = {"file": "https://acme.bitrix24.com/rec", "fields": {"type": "audio/mpeg", "prompt": "ACME", "detectEmotions": True}, "fileExtension": "mp3"}


@pytest.mark.parametrize(
    "category, prompt",
    [
        (Category.TEXT, "Write a greeting"),
        (Category.IMAGE, IMAGE_BODY),
        (Category.AUDIO, AUDIO_BODY),
        (Category.CALL, AUDIO_BODY),
    ],
)
def test_a_stored_task_reads_back_with_its_typed_prompt(category, prompt):
    task = parse(portal_body(prompt=prompt, category=category.value), category).task
    stored = json.loads(json.dumps(task.to_json()))
    assert stored["prompt"]["kind"] == category.value
    assert Task.from_json(stored) == task and type(Task.from_json(stored).prompt) is type(task.prompt)


@pytest.mark.parametrize(
    "category, old_prompt, typed",
    [
        (Category.TEXT, "Write a greeting", TextPrompt("Write a greeting")),
        (Category.IMAGE, {"prompt": "a cat", "style": None, "format": None, "images_number": None}, ImagePrompt("a cat")),
        (Category.AUDIO, {"file": "https://a/x", "fields": {}, "fileExtension": None}, AudioPrompt("https://a/x")),
        (
            Category.CALL,
            {"file": "https://a/x", "fields": {"type": "audio/wav", "prompt": "  "}, "fileExtension": "wav"},
            CallPrompt("https://a/x", mime="audio/wav", hint=None, extension="wav", fields={"type": "audio/wav", "prompt": "  "}),
        ),
    ],
)
def test_tasks_stored_by_the_previous_version_still_load(category, old_prompt, typed):
    """Queues written before prompts were typed hold the portal's own prompt shape."""
    stored = {**parse(portal_body()).task.to_json(), "category": category.value, "prompt": old_prompt}
    assert Task.from_json(stored).prompt == typed and type(Task.from_json(stored).prompt) is type(typed)


@pytest.mark.parametrize(
    "prompt, field",
    [
        ({}, "prompt.file"),
        ({"file": ""}, "prompt.file"),
        ({"file": "file:///etc/passwd"}, "prompt.file"),
        ({"file": "//host/x"}, "prompt.file"),
        ({"file": "https://a/x", "fields": {"type": 5}}, "prompt.fields.type"),
        ({"file": "https://a/x", "fileExtension": 3}, "prompt.fileExtension"),
        ("https://a/x.mp3", "prompt"),
        ({"file": "https://a:99999/x"}, "prompt.file: port 99999"),
        ({"file": "https://a/x\ud800"}, "prompt.file: contains"),
        ({"file": "https://a/x", "fields": {"prompt": "\ud800"}}, "prompt.fields.prompt: contains a lone"),
    ],
)
def test_bad_audio_prompts(prompt, field):
    with pytest.raises(ProtocolError) as err:
        parse(portal_body(prompt=prompt, category="audio"), Category.AUDIO)
    assert err.value.status == 422 and err.value.message.startswith(field)


def test_transcripts_per_category():
    transcript = Transcript("Hello there. Bye.", "en", (Segment(0.0, 1.5, " Hello there."), Segment(3599.2, 3600.4, "Bye.")), 3601.0)
    assert success_body(transcript, Category.AUDIO) == {"result": "Hello there. Bye."}
    assert success_body(transcript, Category.CALL) == {
        "result": [
            {
                "transcriptions": [
                    {"user_id": 0, "start_time_formatted": "00:00", "end_time_formatted": "00:01", "text": "Hello there."},
                    {"user_id": 0, "start_time_formatted": "59:59", "end_time_formatted": "01:00:00", "text": "Bye."},
                ],
                "language": "en",
            }
        ]
    }
    plain = Transcript("Just text.", None, (), 12.9)
    assert success_body(plain, Category.CALL)["result"][0]["transcriptions"] == [
        {"user_id": 0, "start_time_formatted": "00:00", "end_time_formatted": "00:12", "text": "Just text."}
    ]
    assert Transcript.from_json(json.loads(json.dumps(transcript.to_json()))) == transcript


@pytest.mark.parametrize(
    "seconds, text", [(0, "00:00"), (59.9, "00:59"), (61, "01:01"), (3599, "59:59"), (3600, "01:00:00"), (36125, "10:02:05"), (-1, "00:00")]
)
def test_offsets(seconds, text):
    assert format_offset(seconds) == text


@pytest.mark.parametrize(
    "name, code",
    [
        ("English", "en"),
        ("Русский", "ru"),
        ("Deutsch", "de"),
        ("german", "de"),
        ("Português (Brasil)", "pt"),
        ("Українська", "uk"),
        ("Türkçe", "tr"),
        ("简体中文", "zh"),
        ("Bahasa Indonesia", "id"),
        ("ru", "ru"),
        ("Klingon", None),
        ("", None),
        (None, None),
    ],
)
def test_language_names(name, code):
    assert language_code(name) == code


def test_a_bad_value_too_deep_or_too_large_to_show_is_still_named():
    """The error message shows the bad value; one nested past the recursion limit (the JSON decoder
    stops near it, and the accept path runs deeper in the stack), or holding a huge integer, cannot be repr()'d."""
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    for bad in (deep, [10**5000]):
        body = {**portal_body(category="image"), "prompt": {"prompt": "a cat", "format": bad}}
        with pytest.raises(ProtocolError, match=r"prompt\.format: must be one of square, portrait, landscape, got a list too deep or too large to show"):
            parse(body, Category.IMAGE)
