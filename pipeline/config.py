"""``params.yaml``, read once into typed, frozen config objects.

Every stage gets its parameters the same way::

    parser = argparse.ArgumentParser(...)
    add_config_args(parser)                 # --params FILE, --profile NAME, --set dotted.key=value
    args = parser.parse_args(argv)
    params = config_from_args(args)         # -> Params, or ConfigError naming the key

``--set`` values are read as YAML scalars (``--set seed=3``, ``--set datasets.x.images=null``,
``--set prepare.datasets=[cifar10,imagenet100]``); a key that is not a parameter is an error
that names it, as is a value of the wrong type or out of range.

The training sections are the library's own settings (``dpfah.settings``): ``train``
extends :class:`~dpfah.settings.TrainSettings` with how the pipeline runs it, ``model`` is
:class:`~dpfah.settings.ModelSettings`; a knob is declared once, there, with its default and
its check. A method's hyper-parameters (DPFAH's like any other's) are declared by the method
(:mod:`dpfah.methods`) and given under ``objectives.<method>``. Keys of earlier versions
(``loss.*``, ``tune.eta``/``zeta``/``*_range``) are read as their new keys with a warning
(:data:`ALIASES`). ``--profile NAME`` merges
``profiles/NAME.yaml`` over the file before the ``--set`` overrides.

Adding a stage's section is one frozen dataclass (fields with types and defaults; optional
``metadata={"check": ...}`` per field and a ``validate()`` method raising :class:`Invalid`
for rules across fields) plus one field in :class:`Params`, e.g.
``train: TrainConfig = field(default_factory=TrainConfig)``. Unknown top-level sections
and unknown keys inside a section are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpfah.settings import ModelSettings, TrainSettings, above, at_least, finite
from dpfah.settings import checked as _check

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
    "ALIASES",
    "EvaluateConfig",
    "PromoteConfig",
    "Params",
    "load_params",
    "profile_overlay",
    "merge",
    "parse_params",
    "read_params_file",
    "apply_overrides",
    "add_config_args",
    "config_from_args",
]

DEFAULT_PARAMS = "params.yaml"
PROFILES_DIR = "profiles"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# name -> (query per class, train per class, database includes the training images)
CIFAR10_PROTOCOLS = {"cifar10-59k": (100, 500, True), "cifar10-54k": (100, 500, False)}
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class Invalid(Exception):
    """Raised by a section's ``validate()``: ``key`` is relative to the section."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key = key
        self.message = message


# ----------------------------------------------------------------------------- field checks


def _methods() -> tuple[str, ...]:
    """The method registry's names (:mod:`dpfah.methods`, imported on first use: it needs torch)."""
    from .methods import method_names

    return method_names()


def matches(pattern: str, what: str) -> Callable[[Any], str | None]:
    rx = re.compile(pattern)
    return lambda v: None if v is None or rx.match(v) else f"{v!r} is not {what}"


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    root: str = field(default="data", metadata=_check(matches(r".+", "a path")))


@dataclass(frozen=True)
class PrepareConfig:
    # The datasets `dvc repro` prepares (dvc.yaml's foreach reads this list).
    datasets: tuple[str, ...] = ("cifar10",)
    # Read caps (issue 28): one image file or archive member, and an archive's members in all
    # (archives are read into memory); a list line naming a path outside the images root
    # (absolute, or climbing out with ..) is a bad item unless allow_outside_root.
    max_image_mb: int = field(default=64, metadata=_check(at_least(1)))
    max_archive_mb: int = field(default=4096, metadata=_check(at_least(1)))
    allow_outside_root: bool = False


OnBadImage = Literal["skip", "fail"]


@dataclass(frozen=True)
class _DatasetBase:
    kind: str = ""
    validation: int = field(default=0, metadata=_check(at_least(0)))
    shard_size: int = field(default=1000, metadata=_check(at_least(1)))
    on_bad_image: OnBadImage = "fail"


@dataclass(frozen=True)
class Cifar10Dataset(_DatasetBase):
    """CIFAR-10 from the official python archive (URL or file) or an image folder/.tar.gz."""

    kind: Literal["cifar10"] = "cifar10"
    source: str = field(default=CIFAR10_URL, metadata=_check(matches(r".+", "a path or URL")))
    md5: str | None = field(default=CIFAR10_MD5, metadata=_check(matches(r"^[0-9a-f]{32}$", "an md5 (32 hex digits)")))
    protocol: Literal["cifar10-59k", "cifar10-54k"] = field(default="cifar10-59k", metadata={"noun": "protocol"})
    validation: int = field(default=500, metadata=_check(at_least(0)))
    shard_size: int = field(default=5000, metadata=_check(at_least(1)))


@dataclass(frozen=True)
class ListsDataset(_DatasetBase):
    """Fixed split lists (`<path> <0/1 vector>` per line, plain or .gz) over an image root."""

    kind: Literal["lists"] = "lists"
    protocol: str = field(default="lists", metadata=_check(matches(r".+", "a name")))
    images: str | None = None
    num_classes: int | None = field(default=None, metadata=_check(at_least(1)))
    class_names: tuple[str, ...] | None = None
    train_list: str | None = None
    query_list: str | None = None
    database_list: str | None = None
    all_list: str | None = None

    def validate(self) -> None:
        if self.num_classes is None:
            raise Invalid("num_classes", "missing (the length of the label vectors)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise Invalid("class_names", f"{len(self.class_names)} names for num_classes {self.num_classes}")
        if self.database_list is not None and self.all_list is not None:
            raise Invalid("all_list", "give database_list or all_list, not both")


@dataclass(frozen=True)
class CustomDataset(_DatasetBase):
    """A user's labelled images; splits drawn per class: one folder per class, or a list file."""

    kind: Literal["custom"] = "custom"
    protocol: str = field(default="custom", metadata=_check(matches(r".+", "a name")))
    images: str | None = None
    labels_list: str | None = None
    num_classes: int | None = field(default=None, metadata=_check(at_least(1)))
    class_names: tuple[str, ...] | None = None
    query_per_class: int = field(default=100, metadata=_check(at_least(1)))
    train_per_class: int = field(default=500, metadata=_check(at_least(1)))
    database_includes_train: bool = True

    def validate(self) -> None:
        if self.labels_list is None:
            for key in ("num_classes", "class_names"):
                if getattr(self, key) is not None:
                    raise Invalid(key, "only with labels_list (otherwise the class folders name the classes)")
            return
        if self.num_classes is None:
            raise Invalid("num_classes", "missing (the length of the label vectors in labels_list)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise Invalid("class_names", f"{len(self.class_names)} names for num_classes {self.num_classes}")


DatasetConfig = Cifar10Dataset | ListsDataset | CustomDataset


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """The `train` section: how the loop trains (:class:`dpfah.settings.TrainSettings`, its
    fields and defaults) and how the pipeline runs it (workers, GPUs, storage, retries)."""

    steps_per_epoch: int | None = field(default=None, metadata=_check(at_least(1)))  # cap; None: the whole split
    num_workers: int = field(default=1, metadata=_check(at_least(1)))
    use_gpu: bool = False
    loader_workers: int = field(default=1, metadata=_check(at_least(0)))
    eval_batch_size: int = field(default=256, metadata=_check(at_least(1)))
    max_failures: int = field(default=2, metadata=_check(at_least(0)))
    collective_timeout_s: int = field(default=600, metadata=_check(at_least(10)))
    storage_path: str = field(
        default="ray_results", metadata=_check(matches(r".*\S", "a path or URI (where Ray Train keeps checkpoints)"))
    )
    # The method one training runs: a name of dpfah.methods (dpfah, dsh, hashnet, ...) or
    # of the `variants` section; `python -m pipeline.train --method` overrides it.
    method: str = field(default="dpfah", metadata=_check(matches(NAME_RE.pattern, "a method or variant name")))
    # What `dvc repro` trains, evaluates and promotes: every entry of `methods` (methods or
    # variants) at every code length in `bits` with every training seed in `seeds`.
    methods: tuple[str, ...] = field(
        default=("dpfah",),
        metadata=_check(lambda v: None if v and len(set(v)) == len(v) else "must list distinct names"),
    )
    seeds: tuple[int, ...] = field(
        default=(0,),
        metadata=_check(
            lambda v: None if v and len(set(v)) == len(v) and min(v) >= 0 else "must list distinct seeds >= 0"
        ),
    )
    # fault injection for tests: the last rank dies once as epoch fail_at_epoch + 1 starts
    # (counted from 0; the last epoch: no fault, each rank only notes the epochs it starts)
    fail_at_epoch: int | None = field(default=None, metadata=_check(at_least(0)))

    def validate(self) -> None:
        if self.batch_size % self.num_workers:
            raise Invalid("batch_size", f"{self.batch_size} is not divisible by num_workers {self.num_workers}")
        if self.fail_at_epoch is not None and self.fail_at_epoch >= self.epochs:
            raise Invalid(
                "fail_at_epoch",
                f"{self.fail_at_epoch} is not an epoch of this training (epochs count from 0: 0..{self.epochs - 1})",
            )


def _value_list(low: float, what: str) -> Callable[[Any], str | None]:
    return lambda v: None if v and all(x >= low for x in v) else f"must list one or more {what} >= {low}"


def _log_range(v: tuple[float, ...] | None) -> str | None:
    if v is None or (len(v) == 2 and 0 < v[0] <= v[1]):
        return None
    return f"must be [low, high] with 0 < low <= high (sampled log-uniformly), got {list(v)}"


@dataclass(frozen=True)
class TuneConfig:
    """The `tune` stage: a Ray Tune search over the code length and the hyper-parameters
    train.method declares (pipeline.tune checks the knobs against the method)."""

    datasets: tuple[str, ...] = ()  # dvc.yaml's tune@<dataset> stages; none by default (opt in)
    search: Literal["grid", "random"] = field(default="grid", metadata={"noun": "search"})
    bits: tuple[int, ...] = field(default=(16, 64), metadata=_check(_value_list(1, "code lengths")))
    # train.method's knobs, any method's alike: knob -> values to try (grid: every
    # combination; random: a choice), and knob -> [low, high] sampled log-uniformly (random
    # only). params.yaml gives DPFAH's eta and zeta.
    space: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, ...]] = field(default_factory=dict)
    num_samples: int = field(default=1, metadata=_check(at_least(1)))
    scheduler: Literal["asha", "none"] = field(default="asha", metadata={"noun": "scheduler"})
    grace_period: int = field(default=1, metadata=_check(at_least(1)))
    reduction_factor: float = field(default=2.0, metadata=_check(above(1)))
    max_concurrent_trials: int | None = field(default=None, metadata=_check(at_least(1)))
    max_failures: int = field(default=1, metadata=_check(at_least(0)))

    def validate(self) -> None:
        for knob, values in self.space.items():
            if not isinstance(values, tuple) or not values:
                raise Invalid(f"space.{knob}", f"must list one or more values to try, got {values!r}")
        for knob, bounds in self.ranges.items():
            if _log_range(bounds):
                raise Invalid(f"ranges.{knob}", _log_range(bounds))
        if self.search == "grid":
            if self.ranges:
                raise Invalid(
                    f"ranges.{next(iter(self.ranges))}", "only with search: random (a grid takes the lists of `space`)"
                )
            if self.num_samples != 1:
                raise Invalid(
                    "num_samples",
                    "a grid runs each point once (training is seeded: repeats would be identical); use search: random",
                )


def _map_at(v: dict[str, int | None]) -> str | None:
    bad = {k: r for k, r in v.items() if r is not None and r < 1}
    return f"R must be >= 1 or null (ALL), got {bad}" if bad else None


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` stage: retrieval metrics of a trained model on the query and database splits."""

    # mAP@R per dataset (the protocol's R); a dataset not listed, or null: R = ALL.
    map_at: dict[str, int | None] = field(
        default_factory=lambda: {"cifar10": None, "nuswide21": 5000, "imagenet100": 1000}, metadata=_check(_map_at)
    )
    radius: int = field(default=2, metadata=_check(at_least(0)))  # P@H<=radius
    max_n: int = field(default=1000, metadata=_check(at_least(1)))  # the P@N curve, N = 1..max_n
    pr_rank_points: int = field(default=100, metadata=_check(at_least(2)))  # PR curve by rank
    batch_size: int = field(default=256, metadata=_check(at_least(1)))
    loader_workers: int = field(default=2, metadata=_check(at_least(0)))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"noun": "device"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={"noun": "precision"})
    grid_queries: int = field(default=6, metadata=_check(at_least(0)))  # rows of the retrieval grid
    grid_topk: int = field(default=10, metadata=_check(at_least(1)))

    def r_for(self, dataset: str) -> int | None:
        """R of mAP@R for ``dataset`` (None: ALL)."""
        return self.map_at.get(dataset)

    def map_at_label(self, dataset: str) -> str | int:
        """R as the metrics file and MLflow tags name it: ``"ALL"`` or the integer."""
        r = self.r_for(dataset)
        return "ALL" if r is None else int(r)


@dataclass(frozen=True)
class IndexConfig:
    """The `index` stage: encode a collection with a registered model into a searchable index."""

    # Ray Data actors that encode; null: one per GPU of the cluster (one GPU each), else 1.
    workers: int | None = field(
        default=None, metadata=_check(lambda v: None if v is None or v >= 1 else "must be >= 1 or null")
    )
    batch_size: int = field(default=256, metadata=_check(at_least(1)))  # images per forward pass
    block_size: int = field(default=4096, metadata=_check(at_least(1)))  # items per resumable block
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={"noun": "precision"})
    on_bad_image: Literal["fail", "skip"] = field(default="fail", metadata={"noun": "policy"})


_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class PromoteConfig:
    """The `promote` stage: register the model; move the alias only to a better one."""

    # {method}: the method or variant, so each has its own champion (DPFAH's: dpfah-<d>-<b>b)
    model_name: str = field(default="{method}-{dataset}-{bits}b", metadata=_check(matches(r".+", "a name")))
    alias: str = "champion"
    metric: Literal["query_map", "query_map_tie_aware"] = field(default="query_map", metadata={"noun": "metric"})

    def validate(self) -> None:
        try:
            self.model_name.format(dataset="d", bits=1, method="m")
        except (KeyError, IndexError, ValueError) as e:
            raise Invalid(
                "model_name",
                f"{self.model_name!r} may use only {{dataset}}, {{bits}} and {{method}} ({type(e).__name__}: {e})",
            ) from None
        if not _ALIAS_RE.match(self.alias) or self.alias == "latest" or re.match(r"^v\d+$", self.alias):
            raise Invalid(
                "alias", f"{self.alias!r} is not a usable MLflow alias (letters, digits, _ and -; not 'latest' or v<N>)"
            )


@dataclass(frozen=True)
class VariantConfig:
    """A named training recipe that stands in `train.methods` beside the plain methods: a
    method with changes to the network (`model`) and to the method's hyper-parameters
    (`objective`: the method's knobs, over `objectives.<method>`). The paper's ablation rows
    are variants."""

    method: str = field(
        default="dpfah",
        metadata=_check(
            lambda v: None if v in _methods() else f"unknown method {v!r} (known: {', '.join(_methods())})"
        ),
    )
    model: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class MlflowConfig:
    # Default: an SQLite file in the repository. MLFLOW_TRACKING_URI, when set, wins.
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "dpfah"


@dataclass(frozen=True)
class Params:
    """All of params.yaml. A stage's section is one more field here."""

    seed: int = field(default=0, metadata=_check(at_least(0)))
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    # The code lengths `dvc repro` trains (dvc.yaml's matrix reads this list; a training
    # itself reads only its own length, so adding one here trains only the new one).
    bits: tuple[int, ...] = field(
        default=(64,),
        metadata=_check(lambda v: None if v and all(b >= 1 for b in v) else "must list code lengths >= 1"),
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    # Hyper-parameters of the methods, under the method's name (e.g. `dsh: {alpha: 0.05}`,
    # `dpfah: {eta: 1.0}`); what is not given (or null) keeps the method's default (its paper's).
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    # true: the trainings of the method the tune stage searched take its best knobs from
    # tune/<dataset>/best.json (the best at the training's code length, else the best
    # overall) over `objectives.<method>`; other methods keep theirs.
    use_tuned: bool = False
    # Named variants (a method plus network and hyper-parameter changes), usable wherever a
    # method name is (train.method, train.methods).
    variants: dict[str, VariantConfig] = field(default_factory=dict)

    def validate(self) -> None:
        known = _methods()
        for name in self.variants:
            if not NAME_RE.match(name) or name in known:
                raise Invalid(
                    "variants", f"variant name {name!r} must match {NAME_RE.pattern} and not be a method's name"
                )
            self.variant_model(name)  # the network changes: known keys, valid values
        for key, names in (("train.method", (self.train.method,)), ("train.methods", self.train.methods)):
            for name in names:
                if name not in known and name not in self.variants:
                    raise Invalid(
                        key,
                        f"unknown method or variant {name!r} (methods: {', '.join(known)}; variants: {', '.join(self.variants) or 'none'})",
                    )
        for name in self.objectives:
            if name not in known:
                raise Invalid("objectives", f"unknown method {name!r} (known: {', '.join(known)})")
        if self.objectives or any(v.objective for v in self.variants.values()):
            from .methods import check_hyperparameters  # imports torch: only when there is something to check

            for name, values in self.objectives.items():
                check_hyperparameters(name, values, f"objectives.{name}")
            for name, variant in self.variants.items():
                check_hyperparameters(variant.method, variant.objective, f"variants.{name}.objective")
        for name in self.datasets:
            if not NAME_RE.match(name):
                raise Invalid(
                    "datasets", f"dataset name {name!r} must match {NAME_RE.pattern} (it names files and DVC stages)"
                )
        for name in self.prepare.datasets:
            if name not in self.datasets:
                raise Invalid(
                    "prepare.datasets", f"unknown dataset {name!r} (defined: {', '.join(self.datasets) or 'none'})"
                )

    def variant_model(self, name: str) -> ModelSettings:
        """The `model` section with variant ``name``'s network changes (none for a method)."""
        variant = self.variants.get(name)
        if variant is None or not variant.model:
            return self.model
        return _build(ModelSettings, {**dataclasses.asdict(self.model), **variant.model}, f"variants.{name}.model")

    def dataset(self, name: str) -> DatasetConfig:
        try:
            return self.datasets[name]
        except KeyError:
            raise ConfigError(
                f"datasets.{name}: no such dataset (defined: {', '.join(self.datasets) or 'none'})"
            ) from None

    def shards_dir(self, dataset: str) -> str:
        """Where ``dataset``'s shards and manifest live: ``<data.root>/shards/<dataset>``.

        A URL root (``s3://...``, ``file://...``) stays a URL, read through fsspec; a local
        root becomes absolute, since Ray workers run in another directory.
        """
        root = self.data.root
        if "://" in root:
            return f"{root.rstrip('/')}/shards/{dataset}"
        return os.path.abspath(os.path.join(root, "shards", dataset))


# ----------------------------------------------------------------------------- reading

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
    import copy

    if not any(section in raw for section in ("loss", "tune")):
        return raw
    out = copy.deepcopy(raw)
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
        raw = yaml.safe_load(text)
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
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        if key.strip() in ALIASES:
            if key.strip().endswith("_range") and yaml.safe_load(text) is None:
                continue  # an old null range: nothing to set
            key = _renamed(key.strip())
            parts = key.split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        _section_at(out, parts[:-1], lambda where: f"--set {key}: {where} is a value, not a section")[parts[-1]] = value  # noqa: B023
    return out


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Typed, validated :class:`Params` from a parsed params mapping."""
    return _build(Params, _translate(dict(raw)), "")


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


# ----------------------------------------------------------------------------- typed building


def _choices(options: Sequence[Any]) -> str:
    shown = [str(o) for o in options]
    if not shown:
        return "none"
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return f"one of {_choices(typing.get_args(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _build(tp: Any, value: Any, key: str, meta: Mapping[str, Any] | None = None) -> Any:
    where = key or "params"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if all(dataclasses.is_dataclass(a) for a in members) and len(members) > 1:
            return _build_tagged(members, value, key)
        if len(members) == 1:
            return _build(members[0], value, key, meta)
        raise TypeError(f"unsupported config type {tp}")
    if tp is Any:  # a free value (method hyper-parameters): checked against the method's declaration
        if isinstance(value, dict):
            raise ConfigError(f"{where}: expected a value, got a mapping {value!r}")
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, float) and finite(v):
                raise ConfigError(f"{where}{f'[{i}]' if isinstance(value, list) else ''}: {finite(v)}")
        return tuple(value) if isinstance(value, list) else value
    if value is None and tp is not type(None) and not dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: missing value (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, {} if value is None else value, key)
    if origin is Literal:
        if value not in args:
            noun = (meta or {}).get("noun", "value")
            raise ConfigError(f"{where}: unknown {noun} {value!r} (choose {_choices(args)})")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, _dotted(key, str(k))) for k, v in value.items()}
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and finite(value):
            raise ConfigError(f"{where}: {finite(value)}")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported config type {tp}")
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build_tagged(members: Sequence[type], value: Any, key: str) -> Any:
    by_kind = {typing.get_args(typing.get_type_hints(m)["kind"])[0]: m for m in members}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    kind = value.get("kind")
    if kind is None:
        raise ConfigError(f"{_dotted(key, 'kind')}: missing (choose {_choices(list(by_kind))})")
    if kind not in by_kind:
        raise ConfigError(f"{_dotted(key, 'kind')}: unknown kind {kind!r} (choose {_choices(list(by_kind))})")
    return _build_dataclass(by_kind[kind], value, key)


def _build_dataclass(cls: type, value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'params'}: expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in value if k not in fields]
    if not key and "profile" in unknown:
        raise ConfigError(
            "profile: not a parameter any more: apply a profile to params.yaml with `python -m pipeline.profile NAME` "
            "(DVC then sees its values), or to one stage run with --profile NAME"
        )
    if unknown:
        what = "section" if not key else "key"
        raise ConfigError(f"{_dotted(key, str(unknown[0]))}: unknown {what} (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in value:
            continue
        sub = _dotted(key, name)
        v = _build(hints[name], value[name], sub, f.metadata)
        check = f.metadata.get("check")
        problem = check(v) if check else None
        if problem:
            raise ConfigError(f"{sub}: {problem}")
        kwargs[name] = v
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except Invalid as e:
            raise ConfigError(f"{_dotted(key, e.key)}: {e.message}") from None
    return obj
