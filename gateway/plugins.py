"""The plugin manager: entry points, the built-in plugins, listing, and the one way hooks are called.

Every hook implementation may be a plain function or a coroutine function. Three callers,
all built on :func:`implementations` and :func:`await_me_maybe` (datasette's idea):

- :func:`call_hook` for hooks whose failure matters (``startup``, ``shutdown``, ``prepare_task``);
- :func:`notify` for observers (``task_succeeded``, ``task_failed``): a failing one is logged;
- :func:`call_registration_hook` for ``register_*`` hooks, which run while the gateway is
  being built, before any event loop of the server runs, and must each register something.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pluggy

from gateway import hookspecs
from gateway.metrics import Metrics, MetricsRecorder

ENTRY_POINT_GROUP = "gateway"
LOAD_PLUGINS_ENV = "GATEWAY_LOAD_PLUGINS"

log = logging.getLogger("gateway.plugins")


class PluginError(Exception):
    """A plugin could not be loaded, implements a hook that does not exist, or broke a hook's contract."""


def default_plugins(metrics: Metrics) -> list[tuple[object, str]]:
    """The core's own plugins, as (object, name) pairs: the one list of built-ins.

    They are registered beside the installed ones and go through the same hooks. The provider
    plugins shipped with the gateway (``plugins/openai`` ...) are not here: they are entry
    points like any third-party plugin, so ``GATEWAY_LOAD_PLUGINS`` can leave them out.
    """
    return [(MetricsRecorder(metrics), "gateway.metrics")]


def get_plugin_manager(extra_plugins: list[tuple[object, str]] | None = None) -> pluggy.PluginManager:
    """Create a manager with the installed plugins (or those named in ``GATEWAY_LOAD_PLUGINS``).

    ``extra_plugins`` are (object, name) pairs registered beside them, usually
    :func:`default_plugins`; they go through the same hooks as any third-party plugin.
    """
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    try:
        if wanted is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            names = [name.strip() for name in wanted.split(",") if name.strip()]
            available = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
            for name in names:
                if name not in available:
                    raise PluginError(
                        f"{LOAD_PLUGINS_ENV} names plugin {name!r}, which is not installed; installed plugins: {', '.join(sorted(available)) or 'none'}"
                    )
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    except PluginError:
        raise
    except Exception as exc:  # an import error inside a plugin
        raise PluginError(f"a plugin failed to load: {type(exc).__name__}: {exc}") from exc
    for plugin, name in extra_plugins or []:
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    for caller in vars(pm.hook).values():
        implementations(caller)  # rejects wrappers now rather than at the first call
    return pm


# -- calling hooks -----------------------------------------------------------------------
def implementations(hook: pluggy.HookCaller) -> list[pluggy.HookImpl]:
    """A hook's implementations in the order pluggy would call them (last registered first, ``tryfirst`` honoured).

    The gateway calls them one at a time so that each result can be awaited and each failure
    named after its plugin; pluggy's wrappers cannot wrap a coroutine's result, so they are refused.
    """
    impls = hook.get_hookimpls()
    for impl in impls:
        if impl.hookwrapper or impl.wrapper:
            raise PluginError(
                f"plugin {impl.plugin_name!r} implements {hook.name} as a wrapper, which the gateway does not support: "
                "declare it with a plain @hookimpl (it may be async)"
            )
    return list(reversed(impls))


def call_implementation(impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
    """Call one implementation with the arguments it asks for (a plugin may omit any of them)."""
    return impl.function(*(kwargs[name] for name in impl.argnames))


async def await_me_maybe(value: Any) -> Any:
    """``value``, awaited if it is awaitable: how an implementation's result is read everywhere."""
    if inspect.isawaitable(value):
        return await value
    return value


async def call_hook(hook: pluggy.HookCaller, **kwargs: Any) -> list[Any]:
    """Call every implementation in turn, awaiting each; the results in call order. An exception stops the call."""
    return [await await_me_maybe(call_implementation(impl, kwargs)) for impl in implementations(hook)]


async def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook; a failing observer is logged and never stops the gateway or the other observers."""
    for impl in implementations(getattr(pm.hook, hook_name)):
        try:
            await await_me_maybe(call_implementation(impl, kwargs))
        except Exception:
            log.exception("plugin %s failed in hook %s", impl.plugin_name, hook_name)


def run_to_completion(value: Any) -> Any:
    """Run a registration hook's awaitable to its end from synchronous start-up code.

    Registration happens while the runtime and the app are built: adapters must be known to
    check the config before anything is served, and routes before Starlette is created, so it
    cannot wait for the server's lifespan. At that point there is usually no event loop
    (``gateway serve`` builds the app before uvicorn starts one), but there may be one (a test
    or an embedding program building the app inside ``async`` code), where ``asyncio.run`` is
    refused. So the awaitable always runs on a short-lived loop of its own in a helper thread,
    which works the same in both cases; start-up waits for it. A registration coroutine must
    therefore not keep loop-bound objects (clients, tasks): open those in ``startup``.
    """
    if not inspect.isawaitable(value):
        return value

    async def awaited(awaitable: Awaitable[Any]) -> Any:
        return await awaitable

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-plugin-registration") as pool:
        return pool.submit(asyncio.run, awaited(value)).result()


def call_registration_hook(hook: pluggy.HookCaller, arguments: Callable[[str], Mapping[str, Any]], registered: Callable[[], int], how: str) -> None:
    """Call a ``register_*`` hook at start-up, one implementation at a time, sync or async.

    ``arguments(plugin_name)`` gives the hook's arguments for that plugin; ``registered()``
    counts what has been registered so far. An implementation that registers nothing is a
    broken plugin (most often an async hook whose result was never awaited, or one that
    returns its things instead of registering them), so start-up stops naming it; ``how``
    tells its author what to do instead.
    """
    for impl in implementations(hook):
        before = registered()
        try:
            returned = run_to_completion(call_implementation(impl, arguments(impl.plugin_name)))
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook.name}: {type(exc).__name__}: {exc}") from exc
        if registered() == before:
            ignored = "" if returned is None else f" (it returned a {type(returned).__name__}, which the gateway does not read)"
            raise PluginError(f"plugin {impl.plugin_name!r} implements {hook.name} but registered nothing{ignored}: {how}, or remove the hook")


# -- listing -----------------------------------------------------------------------------
def list_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, version and implemented hooks of each registered plugin, for ``gateway plugins``.

    A plugin may define ``plugin_status()`` returning a small JSON object (e.g. whether a
    heavy library is loaded yet); it is listed under ``status``."""
    versions = {id(plugin): dist.version for plugin, dist in pm.list_plugin_distinfo()}
    listing = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        callers = pm.get_hookcallers(plugin) or []
        entry: dict[str, Any] = {
            "name": name,
            "version": versions.get(id(plugin)),
            "hooks": sorted(caller.name for caller in callers),
        }
        status = getattr(plugin, "plugin_status", None)
        if callable(status):
            entry["status"] = status()
        listing.append(entry)
    return sorted(listing, key=lambda item: item["name"])
