"""The methods' hyper-parameters as params.yaml gives them, checked against what each method
of :mod:`dpfah.methods` declares (names, types, choices), with errors naming the dotted key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["check_hyperparameters", "declared_hyperparameters", "tunable_hyperparameters"]


def _kind(default: Any) -> tuple[type | tuple[type, ...], str]:
    if default is None:  # a default computed from the code length (e.g. DSH's margin 2K)
        return (int, float, type(None)), "a number or null (the method's own default)"
    if isinstance(default, (tuple, list)):
        return (list, tuple), "a list"
    if isinstance(default, bool):
        return bool, "true or false"
    if isinstance(default, int):
        return int, "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    return str, "a string"


def _declared(method: str) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
    """(defaults, choices) of ``method``. DPFAH's from :class:`dpfah.settings.LossSettings`
    (no torch: reading params.yaml stays light); the others' from their classes."""
    if method == "dpfah":
        import dataclasses

        from dpfah.settings import PAIRS, LossSettings

        return {f.name: f.default for f in dataclasses.fields(LossSettings)}, {"pairs": PAIRS}
    from dpfah.methods import get

    cls = get(method)
    return dict(cls.defaults), dict(cls.choices)


def declared_hyperparameters(method: str) -> dict[str, Any]:
    """``method``'s hyper-parameters and their defaults."""
    return _declared(method)[0]


def tunable_hyperparameters(method: str) -> tuple[str, ...]:
    """The knobs ``method`` declares worth searching (DPFAH: eta and zeta)."""
    from dpfah.methods import get

    return tuple(get(method).tunable)


def check_hyperparameters(method: str, values: Mapping[str, Any], where: str) -> None:
    """``values`` (hyper-parameter -> value) are ones ``method`` has, of the type of its
    default and, for the categorical ones, among its choices."""
    if not values:
        return
    defaults, choices = _declared(method)
    for key, value in values.items():
        if key not in defaults:
            raise ConfigError(f"{where}.{key}: {method} has no hyper-parameter {key!r} (it has: {', '.join(sorted(defaults))})")
        types, noun = _kind(defaults[key])
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            raise ConfigError(f"{where}.{key}: expected {noun}, got {value!r}")
        allowed = choices.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
