"""User-facing errors: one line naming the bad key, path or value.

Config values are read through the typed accessors here (``number``, ``whole``, ``flag``,
``listed``) rather than bare ``float()``/``int()``/``bool()``, so a value of the wrong type
is a ConfigError naming its key, never a traceback or a silent truncation (2.5 steps).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")


def plain(node: Any) -> Any:
    """A config node as plain, resolved Python containers (other values as they are)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class DiffsensError(Exception):
    """An error the CLI reports as one line and a non-zero exit, without a traceback."""


class ConfigError(DiffsensError):
    """A config value that cannot be used: names its full key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def warn(message: str) -> None:
    """A warning to the user: one line on stderr."""
    print(f"diffsens: warning: {message}", file=sys.stderr, flush=True)


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def one_of(value, allowed, key: str):
    """``value`` if it is one of ``allowed``, else a ConfigError listing them."""
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def number(value: Any, key: str, null: bool = False) -> float | None:
    """``value`` as a finite float (an int or float in the config, not a bool or a string);
    None passes when ``null``."""
    if value is None and null:
        return None
    require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
            f"must be {'null or ' if null else ''}a number, got {value!r}")
    require(math.isfinite(value), key, f"must be finite, got {value!r}")
    return float(value)


def whole(value: Any, key: str, null: bool = False, at_least: int | None = None) -> int | None:
    """``value`` as an int (an int, or a float with no fraction such as 1e3), at least
    ``at_least`` if given; None passes when ``null``. One wording for every count."""
    if value is None and null:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    ok = ok and (at_least is None or int(value) >= at_least)
    bound = "" if at_least is None else f" >= {at_least}"
    require(ok, key, f"must be {'null or ' if null else ''}a whole number{bound}, got {value!r}")
    return int(value)


def positive_whole(value: Any, key: str) -> int:
    """``whole(value, key, at_least=1)``: a count, as ``listed`` reads its items."""
    return whole(value, key, at_least=1)


def flag(value: Any, key: str) -> bool:
    """``value`` if it is a bool (true or false in the config; not the string 'yes')."""
    require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    return value


def listed(value: Any, key: str, item: Callable[[Any, str], T], min_len: int = 1) -> list[T]:
    """A list of at least ``min_len`` items, each read by ``item(value, f"{key}[i]")``."""
    plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    require(isinstance(plain, Sequence) and not isinstance(plain, str) and len(plain) >= min_len, key,
            f"must be a list of at least {min_len} value{'s' if min_len != 1 else ''}, got {plain!r}")
    return [item(v, f"{key}[{i}]") for i, v in enumerate(plain)]
