"""Keeping the portal's registered engines in line with the config.

The portal refuses to register a code twice in a category, so an engine whose URL, name
or settings changed is updated by unregistering and registering it again; an unchanged
one is left alone, which makes registration idempotent. The route is not part of what
the portal knows: changing a model needs no new registration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.engines import Engine

BUILTIN_ENGINES = {"text": ("ChatGPT", "YandexGPT", "GigaChat"), "image": ("Dalle",), "audio": ("Audio",), "call": ("AudioCall",)}
"""The portal's own engines by category; it refuses their codes (any case) in that category."""
BUILTIN_CODES = tuple(code for codes in BUILTIN_ENGINES.values() for code in codes)
"""Refused here in every category: stricter than the portal, and never wrong."""


class RegistrationError(Exception):
    """Registration cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class EngineStatus:
    code: str
    category: str
    status: str
    """``in_sync``, ``different`` (see ``differences``), ``missing`` (not on the portal),
    or ``not_in_config`` (on the portal, not in this config)."""
    differences: list[str] = field(default_factory=list)
    remote_id: int | None = None


def builtin_collision(code: str) -> str | None:
    return next((b for b in BUILTIN_CODES if b.lower() == code.lower()), None)


def registration_params(engine: Engine) -> dict[str, Any]:
    """The parameters of ``ai.engine.register`` for an engine, the completions URL excepted."""
    config = engine.config
    return {"name": config.name, "code": engine.code, "category": config.category.value, "settings": dict(config.settings)}


def _normalised(settings: Any) -> dict[str, str]:
    """Settings as the portal stores them (it may turn numbers into strings, or {} into [])."""
    if not isinstance(settings, Mapping):
        return {}
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}


def differences(engine: Engine, remote: Mapping[str, Any]) -> list[str]:
    found = []
    if remote.get("completions_url") != engine.completions_url:
        found.append("completions_url")
    if remote.get("name") != engine.config.name:
        found.append("name")
    if _normalised(remote.get("settings")) != _normalised(engine.config.settings):
        found.append("settings")
    return found


def _key(code: str, category: str) -> tuple[str, str]:
    return code.lower(), category


def compare(engines: Iterable[Engine], remote: Iterable[Mapping[str, Any]]) -> list[EngineStatus]:
    """Config engines beside the portal's list (``ai.engine.list`` items)."""
    on_portal = {_key(str(item.get("code")), str(item.get("category"))): item for item in remote}
    statuses = []
    for engine in engines:
        category = engine.config.category.value
        item = on_portal.pop(_key(engine.code, category), None)
        if item is None:
            statuses.append(EngineStatus(engine.code, category, "missing"))
            continue
        diff = differences(engine, item)
        statuses.append(EngineStatus(engine.code, category, "different" if diff else "in_sync", diff, _int(item.get("id"))))
    for item in on_portal.values():
        statuses.append(EngineStatus(str(item.get("code")), str(item.get("category")), "not_in_config", remote_id=_int(item.get("id"))))
    return statuses


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


async def check_reachable(engine: Engine, *, timeout: float = 10.0) -> None:
    """GET the completions URL from outside, as the portal will: it requires exactly 200.

    The portal's own error for a failing check is vague, so this one says what went wrong.
    """
    try:
        async with httpx.AsyncClient(follow_redirects=True, timeout=timeout) as client:
            response = await client.get(engine.completions_url)
    except httpx.HTTPError as exc:
        raise RegistrationError(
            f"engine {engine.code}: the gateway does not answer at its public URL ({type(exc).__name__}); "
            "start `gateway serve` and check public_url in the config"
        ) from None
    if response.status_code != 200:
        hint = {401: "the token in the URL is not the running gateway's", 404: "the running gateway does not serve this engine (another config?)"}
        raise RegistrationError(
            f"engine {engine.code}: GET completions_url answered HTTP {response.status_code}, the portal requires exactly 200"
            + (f"; {hint[response.status_code]}" if response.status_code in hint else "")
        )


async def apply_registration(portal: Any, engine: Engine, status: EngineStatus) -> str:
    """Bring one engine on the portal in line with the config, given how it stands there now
    (:func:`compare`): nothing when in sync, unregister and register again when different, register
    when missing. What ``gateway engines register`` and the dashboard's button do; returns a line saying so."""
    if status.status == "in_sync":
        return f"{engine.code}: unchanged (id {status.remote_id})"
    if status.status == "different":
        await portal.unregister(engine.code)
    engine_id = await portal.register(completions_url=engine.completions_url, **registration_params(engine))
    verb = "re-registered" if status.status == "different" else "registered"
    return f"{engine.code}: {verb} as id {engine_id}" + (f" ({', '.join(status.differences)} changed)" if status.differences else "")


async def register_engine(portal: Any, engine: Engine) -> str:
    """Register one engine after the checks ``gateway engines register`` makes first: not a built-in
    code, and its completions URL answers (the portal's own error for either is vague)."""
    builtin = builtin_collision(engine.code)
    if builtin:
        raise RegistrationError(
            f"the code collides with the portal's built-in engine {builtin}; choose another code (the portal compares codes case-insensitively)"
        )
    await check_reachable(engine)
    statuses = {(s.code, s.category): s for s in compare([engine], await portal.list())}
    return await apply_registration(portal, engine, statuses[(engine.code, engine.config.category.value)])
