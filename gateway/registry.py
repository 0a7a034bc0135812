"""Adapter types by name, as plugins register them through the ``register_adapters`` hook."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.tasks import Category

AdapterFactory = Callable[[str, Mapping[str, Any]], Any]
"""``factory(provider_name, options) -> adapter``; may raise :class:`AdapterConfigError`."""


@dataclass(frozen=True)
class AdapterType:
    name: str
    factory: AdapterFactory
    categories: frozenset[Category]
    plugin: str = ""


class AdapterRegistry:
    """Adapter types by name, filled through the ``register_adapters`` hook."""

    def __init__(self) -> None:
        self._types: dict[str, AdapterType] = {}

    def register(self, name: str, factory: AdapterFactory, categories: Iterable[str | Category], *, plugin: str = "") -> None:
        if name in self._types:
            raise ValueError(f"adapter type {name!r} is registered twice (by {self._types[name].plugin or '?'} and {plugin or '?'})")
        self._types[name] = AdapterType(name, factory, frozenset(Category(c) for c in categories), plugin)

    def get(self, name: str) -> AdapterType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)
