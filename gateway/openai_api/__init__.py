"""The OpenAI-compatible API (``/v1``): the same engines, routes, plugins and models as the portal's
path, for the scripts, bots and tools a team runs that speak the OpenAI API.

- :mod:`~gateway.openai_api.keys`: API keys (``api_keys:``), their engines and per-key limits;
- :mod:`~gateway.openai_api.errors`: OpenAI's error shape and status codes;
- :mod:`~gateway.openai_api.parse`: request bodies -> checked, typed requests (every input hostile);
- :mod:`~gateway.openai_api.responses`: results -> OpenAI's answer bodies and stream chunks;
- :mod:`~gateway.openai_api.capacity`: the model slots a request holds while it runs;
- :mod:`~gateway.openai_api.routes`: the Starlette endpoints that tie them to the runtime.

Requests here run while the client waits (no queue, no callback) through
:meth:`gateway.execution.TaskExecutor.run`: the portal path's hooks, router, retries,
cooldowns and usage metrics, labelled ``surface="openai"``.
"""
