"""The methods' hyper-parameters as params.yaml gives them, checked against what each method
of :mod:`dpfah.methods` declares (names, types, choices, bounds), with errors naming the
dotted key. DPFAH is one of them, like the others. A knob set to null keeps the method's
default."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = [
    "as_declared",
    "check_hyperparameters",
    "declared_hyperparameters",
    "method_names",
    "tunable_hyperparameters",
]


def method_names() -> tuple[str, ...]:
    """The registry's names (:func:`dpfah.methods.names`)."""
    from dpfah.methods import names

    return names()


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


def declared_hyperparameters(method: str) -> dict[str, Any]:
    """``method``'s hyper-parameters and their defaults."""
    from dpfah.methods import declared

    return dict(declared(method).defaults)


def tunable_hyperparameters(method: str) -> tuple[str, ...]:
    """The knobs ``method`` declares worth searching."""
    from dpfah.methods import declared

    return tuple(declared(method).tunable)


def check_hyperparameters(method: str, values: Mapping[str, Any], where: str) -> None:
    """``values`` (hyper-parameter -> value) are ones ``method`` has, null (its default) or of
    the type of its default, for the categorical ones among its choices, and within its
    bounds."""
    if not values:
        return
    from dpfah.methods import declared

    cls = declared(method)  # no torch: the parameters are checked before anything starts
    defaults, choices = cls.defaults, cls.choices
    for key, value in values.items():
        if key not in defaults:
            raise ConfigError(
                f"{where}.{key}: {method} has no hyper-parameter {key!r} (it has: {', '.join(sorted(defaults))})"
            )
        if value is None:
            continue
        types, noun = _kind(defaults[key])
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            raise ConfigError(f"{where}.{key}: expected {noun}, got {value!r}")
        allowed = choices.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        low = cls.at_least.get(key)
        if low is not None and not value >= low:
            raise ConfigError(f"{where}.{key}: must be >= {low:g}, got {value!r}")


def as_declared(method: str, knob: str, value: Any) -> Any:
    """``value`` of the kind of ``method``'s default for ``knob``: a number where the default
    is a float becomes a float (1 -> 1.0), so runs log and compare it alike."""
    default = declared_hyperparameters(method).get(knob)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
