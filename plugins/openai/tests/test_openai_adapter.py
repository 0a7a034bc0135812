"""The openai adapter against a real OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import pytest

from gateway.spi import AdapterConfigError, AdapterError, Message, TextRequest
from gateway_openai import OpenAIAdapter

pytestmark = pytest.mark.anyio


def request(**changes) -> TextRequest:
    base = {"model": "m", "messages": [Message("system", "s"), Message("user", "hi")], "timeout": 5.0}
    return TextRequest(**{**base, **changes})


async def test_chat_completion(upstream):
    adapter = OpenAIAdapter("up", {"base_url": upstream.url + "/v1", "api_key": "sk-abcdef123", "headers": {"X-Team": "crm"}})
    try:
        result = await adapter.complete(request(temperature=0.2, max_tokens=9, params={"top_p": 0.5}))
    finally:
        await adapter.aclose()
    assert result.text == "echo: hi" and result.usage.total_tokens == 10
    assert upstream.requests[0] == {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "max_tokens": 9,
        "top_p": 0.5,
    }
    assert upstream.headers[0]["authorization"] == "Bearer sk-abcdef123" and upstream.headers[0]["x-team"] == "crm"


async def test_unset_sampling_options_are_not_sent(upstream):
    adapter = OpenAIAdapter("up", {"base_url": upstream.url + "/v1"})
    await adapter.complete(request())
    await adapter.aclose()
    assert set(upstream.requests[0]) == {"model", "messages"} and "authorization" not in upstream.headers[0]


@pytest.mark.parametrize(
    "behaviour, retryable, status",
    [
        ("500", True, 500),
        ("503", True, 503),
        ("429", True, 429),
        ("408", True, 408),
        ("400", False, 400),
        ("401", False, 401),
        ("404", False, 404),
        ("drop", True, None),
    ],
)
async def test_error_classification(upstream, behaviour, retryable, status):
    upstream.script(behaviour)
    adapter = OpenAIAdapter("up", {"base_url": upstream.url + "/v1"})
    with pytest.raises(AdapterError) as err:
        await adapter.complete(request())
    await adapter.aclose()
    assert err.value.retryable is retryable and err.value.status == status
    if status:
        assert f"HTTP {status}" in err.value.message and "scripted failure" in err.value.message


async def test_timeout_and_connection_refused_are_retryable(upstream):
    upstream.script("delay:2")
    adapter = OpenAIAdapter("up", {"base_url": upstream.url + "/v1"})
    with pytest.raises(AdapterError, match="timed out") as err:
        await adapter.complete(request(timeout=0.3))
    assert err.value.retryable
    await adapter.aclose()
    refused = OpenAIAdapter("down", {"base_url": "http://127.0.0.1:9/v1"})
    with pytest.raises(AdapterError, match="ConnectError") as err:
        await refused.complete(request())
    assert err.value.retryable
    await refused.aclose()


@pytest.mark.parametrize(
    "options, key",
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"headers": ["x"]}, "headers"),
        ({"model": "x"}, "model"),
    ],
)
def test_option_errors(options, key):
    with pytest.raises(AdapterConfigError) as err:
        OpenAIAdapter("p", options)
    assert err.value.key == key


@pytest.mark.parametrize("mode", ["b64", "url"])
async def test_image_generation(upstream, mode):
    from gateway.spi import ImageRequest

    upstream.image_mode = mode
    adapter = OpenAIAdapter("up", {"base_url": upstream.url + "/v1"})
    result = await adapter.generate_image(ImageRequest(model="dall-e-3", prompt="a cat", size="256x512", n=2, params={"quality": "hd"}))
    await adapter.aclose()
    assert upstream.requests[0] == {"model": "dall-e-3", "prompt": "a cat", "size": "256x512", "n": 2, "quality": "hd"}
    if mode == "b64":
        assert [image.data for image in result.images] == upstream.pictures
    else:
        assert [image.url for image in result.images] == [f"{upstream.url}/pictures/{i}.png" for i in range(2)]


async def test_image_answers_that_make_no_sense(upstream):
    from gateway.spi import ImageRequest

    upstream.script('json:{"data": []}', 'json:{"data": [{"b64_json": "not base64!"}]}', 'json:{"data": [{"revised_prompt": "x"}]}')
    adapter = OpenAIAdapter("up", {"base_url": upstream.url + "/v1"})
    request = ImageRequest(model="m", prompt="p", size="1x1")
    for retryable, message in ((True, "no data"), (False, "not valid base64"), (False, "neither b64_json nor url")):
        with pytest.raises(AdapterError, match=message) as err:
            await adapter.generate_image(request)
        assert err.value.retryable is retryable
    await adapter.aclose()
