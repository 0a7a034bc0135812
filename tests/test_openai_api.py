"""The OpenAI-compatible API end to end, driven by the official ``openai`` client: the gateway
under uvicorn in a subprocess, the upstream stub as its provider, real sockets throughout."""

from __future__ import annotations

import base64
import hashlib
import time

import httpx
import openai
import pytest

from gateway.testing import API_KEY, make_config, silence

pytestmark = pytest.mark.e2e

SCRIPTS_KEY = "sk-gw-scripts-0123456789abcdefSECRET"
BOTS_KEY = "sk-gw-bots-0123456789abcdefSECRETBOT"
LIMITED_KEY = "sk-gw-limited-0123456789abcdefSECRET"


def api_config(upstream_url: str, **overrides: object) -> dict:
    config = make_config(upstream_url, **overrides)
    config["engines"] += [
        {
            "code": "acme_image",
            "category": "image",
            "token": "img-token-0123456789abcdef",
            "route": [{"provider": "up", "model": "dall-e-3"}],
            "image": {"max_images": 2},
        },
        {"code": "acme_audio", "category": "audio", "token": "aud-token-0123456789abcdef", "route": [{"provider": "up", "model": "whisper-1"}]},
    ]
    config["api_keys"] = [
        {"name": "scripts", "secret": SCRIPTS_KEY, "engines": ["*"]},
        {"name": "bots", "secret": "sha256:" + hashlib.sha256(BOTS_KEY.encode()).hexdigest(), "engines": ["acme_text"]},
        {"name": "limited", "secret": LIMITED_KEY, "engines": ["acme_text"], "requests_per_minute": 2},
    ]
    return config


def client(gw, key: str = SCRIPTS_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_completion_with_the_official_client(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    answer = client(gw).chat.completions.create(
        model="acme_text", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], temperature=0.2, max_tokens=20
    )
    assert answer.choices[0].message.content == "echo: Hello there"
    assert answer.choices[0].finish_reason == "stop" and answer.model == "acme_text" and answer.object == "chat.completion"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 3, 10)
    [sent] = upstream.requests
    assert sent["model"] == "test-model" and sent["temperature"] == 0.2 and sent["max_tokens"] == 20
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert upstream.headers[0]["authorization"] == f"Bearer {API_KEY}"  # the provider's key, not the client's
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_provider_attempts_total{engine="acme_text",outcome="ok",provider="up",surface="openai"} 1.0' in metrics
    assert 'gateway_tokens_total{engine="acme_text",model="test-model",provider="up",surface="openai",type="prompt"} 7.0' in metrics
    assert 'gateway_openai_requests_total{endpoint="chat",status="200"} 1.0' in metrics
    assert SCRIPTS_KEY not in gw.logs() and SCRIPTS_KEY not in metrics


def test_stream_ends_with_done_and_carries_usage_when_asked(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    chunks = list(
        client(gw).chat.completions.create(
            model="acme_text", messages=[{"role": "user", "content": "stream me please"}], stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7 + 4
    assert upstream.streams == {"started": 1, "finished": 1, "cancelled": 0}
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SCRIPTS_KEY}"},
        json={"model": "acme_text", "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stream_falls_back_before_the_first_byte_only(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    upstream.script("503")  # the first attempt fails before any byte: retried, the client sees nothing of it
    chunks = list(client(gw).chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "again"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: again"
    assert len(upstream.requests) == 2
    upstream.script("streamfail")  # two chunks, then the upstream connection drops: no fallback after the first byte
    received = []
    with pytest.raises(openai.APIError) as failure:
        for chunk in client(gw).chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "one two three four"}], stream=True):
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "".join(r or "" for r in received) == "echo: one "  # what came before the failure
    assert "upstream" in str(failure.value) or "up:" in str(failure.value)
    assert len(upstream.requests) == 3  # not tried again


def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_call(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    upstream.script("slowstream:200:0.05")  # 10 s of chunks unless cancelled
    body = {"model": "acme_text", "messages": [{"role": "user", "content": "long"}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {SCRIPTS_KEY}"}, json=body, timeout=10) as response:
        events = (line for line in response.iter_lines() if line)
        assert [next(events)[:6] for _ in range(3)] == ["data: "] * 3  # events arrive: the stream runs
    deadline = time.monotonic() + 5
    while upstream.streams["cancelled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.streams == {"started": 1, "finished": 0, "cancelled": 1}
    assert client(gw).chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "next"}]).choices[0].message.content == "echo: next"


def test_images_as_hosted_urls_and_as_b64_json(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    api = client(gw)
    hosted = api.images.generate(model="acme_image", prompt="a lighthouse", size="1024x1024", n=2)
    assert len(hosted.data) == 2 and all(item.url.startswith(gw.url + "/files/") for item in hosted.data)
    picture = httpx.get(hosted.data[0].url)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png" and picture.content == upstream.pictures[0]
    inline = api.images.generate(model="acme_image", prompt="a boat", response_format="b64_json")
    assert base64.b64decode(inline.data[0].b64_json) == upstream.pictures[2]
    assert upstream.requests[-1]["size"] == "1024x1024" and upstream.requests[-1]["n"] == 1
    with pytest.raises(openai.BadRequestError) as too_many:
        api.images.generate(model="acme_image", prompt="three", n=3)
    assert too_many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as size:
        api.images.generate(model="acme_image", prompt="odd", size="256x256")
    assert size.value.body["param"] == "size" and "1024x1024" in size.value.body["message"]


def test_transcriptions_in_every_response_format(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    api = client(gw)
    audio = silence(1.0)
    plain = api.audio.transcriptions.create(model="acme_audio", file=("meeting.wav", audio, "audio/wav"))
    assert plain.text == f"transcript of audio.wav ({len(audio)} bytes)"
    upload = upstream.uploads[-1]
    assert upload["content"] == audio and upload["fields"]["model"] == "whisper-1"
    text = api.audio.transcriptions.create(model="acme_audio", file=("m.wav", audio), response_format="text", language="en", prompt="Names: Ivan")
    assert text.strip() == plain.text
    assert upstream.uploads[-1]["fields"]["language"] == "en" and upstream.uploads[-1]["fields"]["prompt"] == "Names: Ivan"
    verbose = api.audio.transcriptions.create(model="acme_audio", file=("m.wav", audio), response_format="verbose_json")
    assert verbose.duration == 75.5 and [(s.start, s.end) for s in verbose.segments] == [(0.0, 61.2), (61.2, 75.5)]
    srt = api.audio.transcriptions.create(model="acme_audio", file=("m.wav", audio), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:01:01,200\ntranscript of audio.wav")
    with pytest.raises(openai.BadRequestError) as not_audio:
        api.audio.transcriptions.create(model="acme_audio", file=("notes.txt", b"just some text, not audio"))
    assert not_audio.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as wrong_engine:
        api.audio.transcriptions.create(model="acme_text", file=("m.wav", audio))
    assert wrong_engine.value.body["param"] == "model" and "text engine" in wrong_engine.value.body["message"]


def test_models_lists_the_engines_a_key_may_use(gateway, upstream):
    gw = gateway(api_config(upstream.url))
    assert [m.id for m in client(gw).models.list()] == ["acme_text", "acme_image", "acme_audio"]
    assert [m.id for m in client(gw, BOTS_KEY).models.list()] == ["acme_text"]  # a key configured by its sha256
    assert client(gw, BOTS_KEY).models.retrieve("acme_text").id == "acme_text"
    with pytest.raises(openai.NotFoundError):
        client(gw, BOTS_KEY).models.retrieve("acme_image")


def test_keys_limits_and_engines_give_openai_errors(gateway, upstream, portal):
    gw = gateway(api_config(upstream.url))
    ask = {"model": "acme_text", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(gw, "sk-gw-not-a-key-0123456789abcdef").chat.completions.create(**ask)
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    missing = httpx.post(gw.url + "/v1/chat/completions", json=ask)
    assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as not_allowed:
        client(gw, BOTS_KEY).images.generate(model="acme_image", prompt="x")
    assert not_allowed.value.body["code"] == "model_not_found" and not_allowed.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        client(gw).chat.completions.create(model="nope", messages=ask["messages"])
    assert unknown.value.body["message"] == not_allowed.value.body["message"].replace("'acme_image'", "'nope'")
    with pytest.raises(openai.BadRequestError) as bad:
        client(gw).chat.completions.create(model="acme_text", messages=ask["messages"], temperature=3)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    limited = client(gw, LIMITED_KEY)
    limited.chat.completions.create(**ask)
    limited.chat.completions.create(**ask)
    with pytest.raises(openai.RateLimitError) as limit:
        limited.chat.completions.create(**ask)
    assert limit.value.body["code"] == "rate_limit_exceeded" and "2 requests per minute" in limit.value.body["message"]
    upstream.script("500", "500", "500")  # every try of the only target fails: a 5xx the client may retry
    with pytest.raises(openai.InternalServerError) as failed:
        client(gw).chat.completions.create(**ask)
    assert failed.value.status_code == 503 and failed.value.body["code"] == "upstream_failed"
    # the portal's path beside it, in the same gateway: accepted, run, delivered
    job_hash, body = portal.new_request(prompt="from the portal")
    assert portal.send(gw.completions_url(), body).status_code == 202
    [callback] = portal.wait(job_hash, 30).delivered
    assert callback.body["result"] == "echo: from the portal"
    logs = gw.logs()
    assert all(secret not in logs for secret in (SCRIPTS_KEY, BOTS_KEY, LIMITED_KEY))


def test_no_keys_means_the_api_is_off_and_says_so(gateway, upstream):
    gw = gateway(make_config(upstream.url))
    answer = httpx.post(gw.url + "/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {SCRIPTS_KEY}"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "api_disabled"
    assert "OpenAI-compatible API: off (no api_keys" in gw.logs()


def test_synchronous_requests_count_against_workers_concurrency(gateway, upstream, portal):
    gw = gateway(api_config(upstream.url, workers={"concurrency": 1}, openai_api={"timeout": 1}))
    upstream.script("delay:3")  # a portal job holds the only model slot for 3 s
    job_hash, body = portal.new_request(prompt="slow job")
    assert portal.send(gw.completions_url(), body).status_code == 202
    deadline = time.monotonic() + 5
    while not upstream.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.InternalServerError) as busy:  # waits openai_api.timeout for the slot, then 503
        client(gw).chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "me too"}])
    assert busy.value.status_code == 503 and busy.value.body["code"] == "overloaded" and "workers.concurrency" in busy.value.body["message"]
    assert portal.wait(job_hash, 10).delivered[0].body["result"] == "echo: slow job"
    answer = client(gw).chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "now"}])
    assert answer.choices[0].message.content == "echo: now"
