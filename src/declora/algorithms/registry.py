"""`algorithm.name` -> its `Algorithm` class. Every list of algorithm names (the config check,
the CLI help, report labels) reads this registry, not a hand-kept list."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from declora.errors import ConfigError

if TYPE_CHECKING:
    from declora.algorithms.base import Algorithm
    from declora.config.schema import RunConfig

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `cls` selectable as `algorithm.name=<cls.name>`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"algorithm name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_REGISTRY)


def algorithm_class(name: object) -> type[Algorithm]:
    """The class of `name`, or a ConfigError with the accepted names and a close match."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"algorithm.name {name!r} is unknown{hint}; choose one of: {', '.join(_REGISTRY)}"
    )


def make_algorithm(name: str, cfg: RunConfig) -> Algorithm:
    return algorithm_class(name)(cfg)


def label(name: str) -> str:
    """The name reports use ("Dec-LoRA", "FedAvg", ...); the config name if unknown."""
    cls = _REGISTRY.get(name)
    return cls.label if cls else name
