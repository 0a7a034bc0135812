"""Readers for a provider's options (``providers.<name>`` in the config) that adapter factories use.

They raise :class:`~gateway.adapters.AdapterConfigError` naming the option, which the
runtime turns into a configuration error naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.adapters import AdapterConfigError


def check_known_options(options: Mapping[str, Any], known: Iterable[str], hint: str = "") -> None:
    """Refuse an option the adapter does not know: a typo would otherwise fall back to a default.
    The error suggests the closest known option, as unknown keys elsewhere in the config do."""
    names = sorted(known)
    unknown = sorted(str(key) for key in options if key not in names)  # YAML keys may be numbers
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        fix = f"did you mean `{close[0]}`?" if close else "remove it, or use one of the known options"
        raise AdapterConfigError(unknown[0], f"unknown option; known options: {', '.join(names)}{hint}", fix)


def number_option(options: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number; a string is read as one, since ``${VAR}`` interpolation gives strings."""
    value = options.get(key, default)
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise AdapterConfigError(key, f"must be a positive number, got {value!r}")
    return number


def whole_option(options: Mapping[str, Any], key: str, default: int, *, minimum: int = 1) -> int:
    """A whole number of at least ``minimum`` (strings read as numbers, as for :func:`number_option`)."""
    value = options.get(key, default)
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise AdapterConfigError(key, f"must be a whole number >= {minimum}, got {value!r}")
    return number


def flag_option(options: Mapping[str, Any], key: str, default: bool) -> bool:
    """true or false; the strings "true" and "false" too, as ``${VAR}`` interpolation gives them."""
    value = options.get(key, default)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise AdapterConfigError(key, f"must be true or false, got {value!r}")
    return value
