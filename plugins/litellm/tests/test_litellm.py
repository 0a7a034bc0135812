"""The ``litellm`` adapter: litellm's mock_response for results and mapped errors (no network),
and end to end over real sockets with litellm's OpenAI provider pointed at the
OpenAI-compatible test server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from gateway.spi import AdapterError, ImageRequest, Message, TextRequest
from gateway.testing import free_port, make_config, make_png, silence
from gateway_litellm import LiteLLMAdapter, load_litellm

TEXT = TextRequest(model="openai/gpt-4o-mini", messages=[Message("system", "Be brief."), Message("user", "hi")], temperature=0.2, max_tokens=50)


def run(coro):
    return asyncio.run(coro)


def test_text_with_usage_and_cost():
    adapter = LiteLLMAdapter("ll", {"params": {"mock_response": "Hello from the mock"}})
    result = run(adapter.complete(TEXT))
    assert result.text == "Hello from the mock"
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens > 0
    assert result.usage.cost_usd > 0  # litellm's price list for gpt-4o-mini, read locally


def test_image_urls_come_back_for_the_core_to_host():
    adapter = LiteLLMAdapter("ll", {})
    request = ImageRequest(model="openai/dall-e-3", prompt="a lighthouse", size="1024x1024", params={"mock_response": "https://cdn.example/1.png"})
    result = run(adapter.generate_image(request))
    assert [image.url for image in result.images] == ["https://cdn.example/1.png"]


def _error(name: str):
    litellm = run(load_litellm())
    kinds = {
        "rate_limit": lambda: litellm.RateLimitError(message="slow down", llm_provider="openai", model="m"),
        "timeout": lambda: litellm.Timeout(message="took too long", model="m", llm_provider="openai"),
        "connection": lambda: litellm.APIConnectionError(message="refused", llm_provider="openai", model="m"),
        "unavailable": lambda: litellm.ServiceUnavailableError(message="down", llm_provider="openai", model="m"),
        "auth": lambda: litellm.AuthenticationError(message="bad key", llm_provider="openai", model="m"),
        "bad_request": lambda: litellm.BadRequestError(message="bad", model="m", llm_provider="openai"),
        "content_policy": lambda: litellm.ContentPolicyViolationError(message="filtered", model="m", llm_provider="openai"),
        "context_window": lambda: litellm.ContextWindowExceededError(message="too long", model="m", llm_provider="openai"),
    }
    return kinds[name]()


@pytest.mark.parametrize(
    "kind, retryable, status",
    [
        ("rate_limit", True, 429),
        ("timeout", True, 408),
        ("connection", True, 500),
        ("unavailable", True, 503),
        ("auth", False, 401),
        ("bad_request", False, 400),
        ("content_policy", False, 400),
        ("context_window", False, 413),
    ],
)
def test_errors_are_mapped(kind, retryable, status):
    adapter = LiteLLMAdapter("ll", {"params": {"mock_response": _error(kind)}})
    with pytest.raises(AdapterError) as err:
        run(adapter.complete(TEXT))
    assert (err.value.retryable, err.value.status) == (retryable, status)
    assert err.value.message.startswith("ll: ")


@pytest.mark.parametrize("options, key", [({"api_bse": "x"}, "api_bse"), ({"timeout": 0}, "timeout"), ({"params": [1]}, "params")])
def test_option_errors_name_the_key(options, key):
    from gateway.spi import AdapterConfigError

    with pytest.raises(AdapterConfigError) as err:
        LiteLLMAdapter("ll", options)
    assert err.value.key == key


def litellm_config(upstream_url: str, route: list, category: str = "text") -> dict:
    config = make_config(upstream_url)
    config["providers"]["ll"] = {"type": "litellm", "api_base": upstream_url + "/v1", "api_key": "sk-litellm-SECRET-0123456789"}
    config["engines"][0]["route"] = route
    config["engines"][0]["category"] = category
    return config


def plugin_status(gw) -> dict:
    listing = httpx.get(gw.url + "/-/plugins.json").json()
    return next(p for p in listing if p["name"] == "litellm")["status"]


@pytest.mark.e2e
def test_text_end_to_end_imports_litellm_only_at_the_first_job(gateway, portal, upstream):
    gw = gateway(litellm_config(upstream.url, [{"provider": "ll", "model": "openai/gpt-4o-mini"}]))
    assert plugin_status(gw) == {"litellm_imported": False}  # started, engine configured, not imported
    job_hash, body = portal.new_request(prompt="through litellm")
    assert portal.send(gw.completions_url(), body).status_code == 202
    [callback] = portal.wait(job_hash, 60).delivered
    assert callback.body == {"result": "echo: through litellm"}
    assert upstream.headers[0]["authorization"] == "Bearer sk-litellm-SECRET-0123456789"
    assert plugin_status(gw) == {"litellm_imported": True}
    [job] = gw.cli_json("jobs", "list")
    shown = gw.cli_json("jobs", "show", job["id"])
    assert shown["provider"] == "ll/openai/gpt-4o-mini"
    usage = shown["result"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (7, 3, 10) and usage["cost_usd"] > 0
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_tokens_total{engine="acme_text",model="openai/gpt-4o-mini",provider="ll",surface="portal",type="prompt"} 7.0' in metrics
    assert 'gateway_cost_usd_total{engine="acme_text",model="openai/gpt-4o-mini",provider="ll",surface="portal"}' in metrics
    assert "sk-litellm-SECRET" not in gw.logs()


@pytest.mark.e2e
def test_transcription_end_to_end(gateway, portal, upstream):
    gw = gateway(litellm_config(upstream.url, [{"provider": "ll", "model": "openai/whisper-1"}], category="call"))
    recording = silence(0.4)
    job_hash, body = portal.new_request(category="call", prompt={"file": portal.add_file(recording), "fields": {"prompt": "ACME"}, "fileExtension": ""})
    assert portal.send(gw.completions_url(), body).status_code == 202
    [callback] = portal.wait(job_hash, 60).delivered
    [call] = callback.body["result"]
    assert call["language"] == "en" and [p["end_time_formatted"] for p in call["transcriptions"]] == ["01:01", "01:15"]
    [upload] = upstream.uploads
    assert upload["content"] == recording and upload["filename"] == "audio.wav"
    assert upload["fields"]["prompt"] == "ACME" and upload["fields"]["response_format"] == "verbose_json"


@pytest.mark.e2e
def test_image_from_mock_response_is_hosted(gateway, portal, upstream):
    picture = make_png(4, 4, 7)
    upstream.pictures.append(picture)
    route = [{"provider": "ll", "model": "openai/dall-e-3", "params": {"mock_response": f"{upstream.url}/pictures/0.png"}}]
    gw = gateway(litellm_config(upstream.url, route, category="image"))
    job_hash, body = portal.new_request(category="image", prompt={"prompt": "a lighthouse", "style": None, "format": "square"})
    assert portal.send(gw.completions_url(), body).status_code == 202
    [callback] = portal.wait(job_hash, 60).delivered
    [url] = callback.body["result"]
    assert url.startswith(gw.url + "/files/") and httpx.get(url).content == picture


@pytest.mark.e2e
def test_failing_litellm_target_falls_back_to_openai_and_delivers_once(gateway, portal, upstream):
    config = litellm_config(upstream.url, [{"provider": "ll", "model": "openai/gpt-4o-mini"}, {"provider": "up", "model": "test-model"}])
    config["providers"]["ll"]["api_base"] = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    gw = gateway(config)
    job_hash, body = portal.new_request(prompt="fall back")
    assert portal.send(gw.completions_url(), body).status_code == 202
    job = portal.wait(job_hash, 60)
    assert [c.body for c in job.callbacks] == [{"result": "echo: fall back"}]
    [listed] = gw.cli_json("jobs", "list")
    attempts = gw.cli_json("jobs", "show", listed["id"])["attempts"]
    assert [(a["target"], a["outcome"]) for a in attempts if a["kind"] == "provider"] == [("ll/openai/gpt-4o-mini", "retryable")] * 3 + [
        ("up/test-model", "ok")
    ]
    assert "Connection error" in attempts[0]["detail"]


def test_core_never_imports_litellm():
    code = "import sys, gateway.app, gateway.cli, gateway.runtime, gateway_litellm; assert 'litellm' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
