"""``params.yaml``, read once into typed, frozen config objects.

Every stage gets its parameters the same way::

    parser = argparse.ArgumentParser(...)
    add_config_args(parser)                 # --params FILE, --profile NAME, --set dotted.key=value
    args = parser.parse_args(argv)
    params = config_from_args(args)         # -> Params, or ConfigError naming the key

``--set`` values are read as YAML scalars (``--set seed=3``, ``--set datasets.x.images=null``,
``--set prepare.datasets=[cifar10,imagenet100]``, ``--set train.lr=1e-3``); a key that is
not a parameter is an error that names it, as is a value of the wrong type or out of range.

The sections are :mod:`pipeline.config_schema` (the data's: :mod:`pipeline.config_datasets`),
bound by :mod:`pipeline.config_binder`. Keys of earlier versions (``loss.*``,
``tune.eta``/``zeta``/``*_range``) are read as their new keys with a warning
(:data:`ALIASES`). ``--profile NAME`` merges ``profiles/NAME.yaml`` over the file before
the ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import copy
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config_binder import Invalid, bind
from .config_datasets import (
    CIFAR10_MD5,
    CIFAR10_PROTOCOLS,
    CIFAR10_URL,
    NAME_RE,
    Cifar10Dataset,
    CustomDataset,
    DataConfig,
    DatasetConfig,
    ListsDataset,
    PrepareConfig,
)
from .config_schema import (
    EvaluateConfig,
    IndexConfig,
    MlflowConfig,
    ModelSettings,
    Params,
    PromoteConfig,
    TrainConfig,
    TuneConfig,
    VariantConfig,
)
from .errors import ConfigError

__all__ = [
    "DEFAULT_PARAMS",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_PROTOCOLS",
    "Invalid",
    "DataConfig",
    "PrepareConfig",
    "Cifar10Dataset",
    "ListsDataset",
    "CustomDataset",
    "DatasetConfig",
    "TrainConfig",
    "ModelSettings",
    "MlflowConfig",
    "TuneConfig",
    "EvaluateConfig",
    "IndexConfig",
    "PromoteConfig",
    "VariantConfig",
    "ALIASES",
    "Params",
    "load_params",
    "profile_overlay",
    "merge",
    "parse_params",
    "read_params_file",
    "read_yaml",
    "apply_overrides",
    "add_config_args",
    "config_from_args",
]

DEFAULT_PARAMS = "params.yaml"
PROFILES_DIR = "profiles"


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but ``1e-3`` is a number, as YAML 1.2 (and DVC) read it: YAML
    1.1 wants a dot (``1.0e-3``) and reads ``1e-3`` as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safe: plain data only), exponents without a dot read as numbers."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


#: Keys of earlier versions -> their keys now. An old key is read as the new one with a
#: warning naming both; given beside its new key, it is an error.
ALIASES = {
    "loss.eta": "objectives.dpfah.eta",
    "loss.zeta": "objectives.dpfah.zeta",
    "loss.delta": "objectives.dpfah.delta",
    "loss.pairs": "objectives.dpfah.pairs",
    "loss.use_tuned": "use_tuned",
    "tune.eta": "tune.space.eta",
    "tune.zeta": "tune.space.zeta",
    "tune.eta_range": "tune.ranges.eta",
    "tune.zeta_range": "tune.ranges.zeta",
}
#: Keys of earlier versions that are no parameters any more -> what took their place. Null,
#: as an old params.yaml gives them, they are dropped with a warning; else an error.
REMOVED = {
    "train.fail_at_epoch": "fault injection is a test hook now: the environment variable DPFAH_FAIL_AT_EPOCH",
}
#: Sections of earlier versions, all of whose keys are aliases.
_OLD_SECTIONS = {"loss": "DPFAH's knobs are objectives.dpfah.* and loss.use_tuned is use_tuned"}


def _renamed(old: str) -> str:
    new = ALIASES[old]
    warnings.warn(f"params: {old} is an old name of {new}; read as {new} (rename it)", FutureWarning, stacklevel=3)
    return new


def _section_at(root: dict[str, Any], parts: Sequence[str], error: Callable[[str], str]) -> dict[str, Any]:
    """The mapping at ``parts`` below ``root``, made where missing; ``ConfigError(error(p))``
    where the dotted prefix ``p`` holds a value."""
    node = root
    for i, part in enumerate(parts):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(error(".".join(parts[: i + 1])))
        node = child
    return node


def _translate(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the keys of :data:`ALIASES` moved to their new places (a null range stays
    unset); ``ConfigError`` for an old key beside its new one."""
    if not any(section in raw for section in ("loss", "tune", "train")):
        return raw
    out = copy.deepcopy(raw)
    for old, instead in REMOVED.items():
        section, key = old.split(".")
        node = out.get(section)
        if isinstance(node, dict) and key in node:
            if node.pop(key) is not None:
                raise ConfigError(f"{old}: not a parameter any more ({instead})")
            warnings.warn(f"params: {old} is not a parameter any more ({instead}); remove it", FutureWarning, 2)
    for old in ALIASES:
        section, key = old.split(".")
        node = out.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        new = _renamed(old)
        *path, last = new.split(".")
        target = _section_at(
            out,
            path,
            lambda where: f"{old}: an old name of {new}, but {where} is a value, not a section",  # noqa: B023
        )
        if last in target:
            raise ConfigError(f"{old}: an old name of {new}, which is also given: give {new} only")
        if value is not None or not old.endswith("_range"):
            target[last] = value
    for section, where in _OLD_SECTIONS.items():
        if section in out and isinstance(out[section], dict):
            if out[section]:
                raise ConfigError(
                    f"{section}.{next(iter(out[section]))}: unknown key (the `{section}` section is gone: {where})"
                )
            del out[section]
    return out


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (give the parameters file with --params FILE)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``dotted.key=value`` set (value parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        if key.strip() in ALIASES:
            if key.strip().endswith("_range") and read_yaml(text) is None:
                continue  # an old null range: nothing to set
            key = _renamed(key.strip())
            parts = key.split(".")
        try:
            value = read_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        _section_at(out, parts[:-1], lambda where: f"--set {key}: {where} is a value, not a section")[parts[-1]] = value  # noqa: B023
    return out


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Typed, validated :class:`Params` from a parsed params mapping (an empty section, as
    ``train:`` alone, takes its defaults)."""
    raw = _translate(dict(raw))
    if "profile" in raw:
        raise ConfigError(
            "profile: not a parameter any more: apply a profile to params.yaml with `python -m pipeline.profile NAME` "
            "(DVC then sees its values), or to one stage run with --profile NAME"
        )
    params = bind(Params, {k: {} if v is None and k in _SECTIONS else v for k, v in raw.items()})
    try:
        params.validate()
    except Invalid as e:
        raise ConfigError(f"{e.key}: {e.message}") from None
    return params


#: The top-level keys that are sections (mappings with defaults of their own).
_SECTIONS = {"data", "prepare", "train", "model", "mlflow", "tune", "evaluate", "index", "promote"}


def profile_overlay(name: str, params_path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """``profiles/<name>.yaml`` beside the parameters file: a partial params mapping."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"profile: {name!r} is not a profile name")
    path = Path(params_path).parent / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"profile: unknown profile {name!r} (no {path}; known: {', '.join(known) or 'none'})")
    return read_params_file(path)


def load_params(
    path: str | Path = DEFAULT_PARAMS, overrides: Sequence[str] = (), *, profile: str | None = None
) -> Params:
    """params.yaml, then a profile's overlay (``profiles/<profile>.yaml``), then the
    ``--set`` overrides, typed and checked.

    A profile given here applies to this process only; ``python -m pipeline.profile NAME``
    writes one into params.yaml, where DVC sees it."""
    raw = _translate(read_params_file(path))
    if profile is not None:
        raw = merge(raw, _translate(profile_overlay(profile, path)))
    return parse_params(apply_overrides(raw, overrides))


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay``'s values set, mappings merged key by key."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parameters")
    group.add_argument(
        "--params",
        metavar="FILE",
        default=DEFAULT_PARAMS,
        help=f"parameters file (default: {DEFAULT_PARAMS} in the current directory)",
    )
    group.add_argument(
        "--profile",
        metavar="NAME",
        default=None,
        help="apply profiles/NAME.yaml over the parameters file for this run, e.g. `paper` (224 px, RMSProp 5e-5, "
        "batch 128, bits 16/32/48/64, 4 GPU workers); under DVC use `python -m pipeline.profile NAME` instead",
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one parameter by its dotted key, the value read as YAML; repeatable "
        "(e.g. --set datasets.cifar10.source=/data/cifar10-jpg.tar.gz --set seed=1)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's and MLflow's own log lines (start-up, resource requests, per-report lines); "
        "by default a stage prints only its own progress and summary",
    )


def config_from_args(args: argparse.Namespace) -> Params:
    from .console import set_verbose

    set_verbose(getattr(args, "verbose", False))
    return load_params(args.params, args.overrides, profile=args.profile)
