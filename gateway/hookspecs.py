"""The plugin API. Every hook may be implemented by a plain function or an ``async def``; the gateway awaits it.

Plugins implement hooks with ``@gateway.hookimpl`` and are found through the ``gateway``
entry point group (``GATEWAY_LOAD_PLUGINS=a,b`` restricts which ones load). The
``register_*`` hooks run once while the gateway is built, before it serves; an
implementation that registers nothing stops start-up with an error naming its plugin.
The README's hook table lists these hooks and is checked against this module by a test.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("gateway")
hookimpl = pluggy.HookimplMarker("gateway")


@hookspec
def register_adapters(register: Any) -> None:
    """Register adapter types: ``register(name, factory, categories=["text", ...])``.

    ``factory(provider_name, options)`` is called once per provider in the config whose
    ``type`` is ``name``, and returns an adapter (see ``gateway.spi``). An async
    implementation runs on a short-lived event loop of its own: open clients in ``startup``.
    """


@hookspec
def startup(app: Any, config: Any) -> Any:
    """The gateway is starting: open resources. ``app`` is None in a worker-only process."""


@hookspec
def shutdown(app: Any) -> Any:
    """The gateway is stopping: release what ``startup`` opened."""


@hookspec
def prepare_task(task: Any) -> Any:
    """Inspect or enrich a task before it runs; raise ``gateway.spi.TaskRefused`` to refuse it.

    Runs in the worker, once per execution of the task (a task resumed after a crash
    is prepared again). Changes made to ``task`` are seen by the adapter. ``task.prompt``
    is a typed value (``TextPrompt``, ``ImagePrompt``, ``AudioPrompt``, ``CallPrompt``);
    to change it, assign a new one of the same class (``dataclasses.replace``).
    """


@hookspec
def task_succeeded(task: Any, result: Any, state: Any) -> Any:
    """A task's result reached the portal. Fires once per task, for every category.

    ``result`` is a ``TextResult``, ``HostedImages`` or ``Transcript`` (``gateway.spi``);
    its ``usage`` carries the tokens and cost the provider reported, when it did (billing).
    ``state`` is the job's final ``JobState``: ``delivered``, or ``delivered_unconfirmed``
    when the portal most likely took the callback but never said so. An implementation
    may leave out any argument it does not use (pluggy passes only those it names)."""


@hookspec
def task_failed(task: Any, error: Any, state: Any) -> Any:
    """A task ended without a delivered result: error delivered, gone, expired or dead.

    ``error`` is a ``gateway.spi.JobError``; ``state`` the job's final ``JobState``
    (``failed`` when the error reached the portal). Fires once per task. Observers run
    in pluggy's order: the plugin registered last runs first.
    """


@hookspec
def register_routes(routes: Any) -> None:
    """Append Starlette routes to ``routes`` to serve extra HTTP endpoints (runs once, when the app is built)."""
