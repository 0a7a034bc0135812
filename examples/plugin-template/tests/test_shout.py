"""The plugin's tests: the adapter and the guardrail on their own, then through a real gateway.

They import only ``gateway.spi`` (what the plugin may use) and ``gateway.testing`` (servers
for tests); the fixtures ``gateway`` and ``portal`` come from the gateway's pytest plugin."""

import asyncio
import importlib.metadata

import pytest

from gateway.spi import AdapterConfigError, Category, Message, Task, TaskRefused, TextPrompt, TextRequest
from gateway.testing import make_config
from gateway_shout import ShoutAdapter, prepare_task

INSTALLED = any(ep.name == "shout" for ep in importlib.metadata.entry_points(group="gateway"))


def test_shouts():
    adapter = ShoutAdapter("loud", {"suffix": "!!"})
    result = asyncio.run(adapter.complete(TextRequest(model="any", messages=[Message("user", "hello")])))
    assert result.text == "HELLO!!"


def test_a_misspelt_option_is_a_config_error_naming_it():
    with pytest.raises(AdapterConfigError) as err:
        ShoutAdapter("loud", {"sufix": "!!"})
    assert err.value.key == "sufix" and err.value.fix == "did you mean `suffix`?"


def test_refuses_banned_word(monkeypatch):
    monkeypatch.setenv("SHOUT_BANNED_WORD", "secret")
    with pytest.raises(TaskRefused):
        prepare_task(Task(job_id="j", engine="e", category=Category.TEXT, prompt=TextPrompt("tell me the secret")))
    prepare_task(Task(job_id="j", engine="e", category=Category.TEXT, prompt=TextPrompt("tell me a story")))  # other prompts pass


@pytest.mark.e2e
@pytest.mark.skipif(not INSTALLED, reason="the gateway loads plugins by entry point: `pip install -e examples/plugin-template` first")
def test_the_gateway_answers_the_portal_with_the_shout_adapter(gateway, portal, upstream):
    config = make_config(upstream.url)
    config["providers"] = {"loud": {"type": "shout", "suffix": "!"}}  # only this plugin's adapter type
    config["engines"][0]["route"] = [{"provider": "loud", "model": "any"}]
    gw = gateway(config)
    job_hash, body = portal.new_request(prompt="hello portal")
    assert portal.send(gw.completions_url(), body).status_code == 202
    [callback] = portal.wait(job_hash, 30).delivered
    assert callback.kind == "success" and callback.body["result"] == "HELLO PORTAL!", callback.body
