"""The plugin manager: entry points, the default plugins, listing and awaitable hooks."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
from typing import Any

import pluggy

from gateway import hookspecs

ENTRY_POINT_GROUP = "gateway"
LOAD_PLUGINS_ENV = "GATEWAY_LOAD_PLUGINS"

log = logging.getLogger("gateway.plugins")


class PluginError(Exception):
    """A plugin could not be loaded or implements a hook that does not exist."""


def get_plugin_manager(extra_plugins: list[tuple[object, str]] | None = None) -> pluggy.PluginManager:
    """Create a manager with the installed plugins (or those named in ``GATEWAY_LOAD_PLUGINS``).

    ``extra_plugins`` are (object, name) pairs registered beside them, such as the core's
    own metrics recorder; they go through the same hooks as any third-party plugin.
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
                        f"{LOAD_PLUGINS_ENV} names plugin {name!r}, which is not installed; "
                        f"installed plugins: {', '.join(sorted(available)) or 'none'}"
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
    return pm


async def call_hook(hook: Any, **kwargs: Any) -> list[Any]:
    """Call a hook and await the awaitables its implementations returned, in order."""
    results = []
    for value in hook(**kwargs):
        if inspect.isawaitable(value):
            value = await value
        results.append(value)
    return results


async def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook; a failing observer is logged and never stops the gateway."""
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        try:
            value = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if inspect.isawaitable(value):
                await value
        except Exception:
            log.exception("plugin %s failed in hook %s", impl.plugin_name, hook_name)


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
