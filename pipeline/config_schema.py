"""The sections of ``params.yaml`` besides the data's, and :class:`Params`, all of it.

Each section is a frozen dataclass (`@section`): fields with types and defaults, a check per field in
``metadata={"check": fn}`` (``fn(value)`` returns None or what is wrong) and rules across
fields in ``validate()`` raising :class:`~pipeline.config_binder.Invalid`; both run when an
object is made, and :mod:`pipeline.config_binder` reports them under the dotted key. The
checks against the method registry (:meth:`Params.validate`) run once, on loading. Adding a
stage's section is one dataclass here plus one field of :class:`Params`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal

from dpfah.settings import ModelSettings, TrainSettings, above, at_least, check_fields
from dpfah.settings import checked as _check

from .config_binder import Free, Invalid, bind, distinct, matches, section
from .config_datasets import NAME_RE, DataConfig, DatasetConfig, PrepareConfig, TaggedDataset
from .errors import ConfigError

__all__ = [
    "TrainConfig",
    "ModelSettings",
    "MlflowConfig",
    "TuneConfig",
    "EvaluateConfig",
    "IndexConfig",
    "PromoteConfig",
    "VariantConfig",
    "Params",
    "ObjectiveFile",
    "check_objective",
]


# ----------------------------------------------------------------------------- sections


@section
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
    seeds: tuple[int, ...] = field(default=(0,), metadata=_check(distinct("seeds", 0)))

    def validate(self) -> None:
        if self.batch_size % self.num_workers:
            raise Invalid("batch_size", f"{self.batch_size} is not divisible by num_workers {self.num_workers}")


def _log_range(v: tuple[float, ...] | None) -> str | None:
    if v is None or (len(v) == 2 and 0 < v[0] <= v[1]):
        return None
    return f"must be [low, high] with 0 < low <= high (sampled log-uniformly), got {list(v)}"


@section
class TuneConfig:
    """The `tune` stage: a Ray Tune search over the code length and the hyper-parameters
    train.method declares (pipeline.tune checks the knobs against the method)."""

    datasets: tuple[str, ...] = ()  # dvc.yaml's tune@<dataset> stages; none by default (opt in)
    search: Literal["grid", "random"] = field(default="grid", metadata={"noun": "search"})
    bits: tuple[int, ...] = field(default=(16, 64), metadata=_check(distinct("code lengths", 1)))
    # train.method's knobs, any method's alike: knob -> values to try (grid: every
    # combination; random: a choice), and knob -> [low, high] sampled log-uniformly (random
    # only). params.yaml gives DPFAH's eta and zeta.
    space: dict[str, tuple[Free, ...]] = field(default_factory=dict)
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


@section
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


@section
class IndexConfig:
    """The `index` stage: encode a collection with a registered model into a searchable index."""

    # Ray Data actors that encode; null: one per GPU of the cluster (one GPU each), else one per
    # CPU up to 4 (pipeline.index_blocks.CPU_ACTORS), the CPUs shared out as their threads.
    workers: int | None = field(
        default=None, metadata=_check(lambda v: None if v is None or v >= 1 else "must be >= 1 or null")
    )
    batch_size: int = field(default=256, metadata=_check(at_least(1)))  # images per forward pass
    block_size: int = field(default=4096, metadata=_check(at_least(1)))  # items per resumable block
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={"noun": "precision"})
    on_bad_image: Literal["fail", "skip"] = field(default="fail", metadata={"noun": "policy"})


_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@section
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


@section
class VariantConfig:
    """A named training recipe that stands in `train.methods` beside the plain methods: a
    method with changes to the network (`model`) and to the method's hyper-parameters
    (`objective`: the method's knobs, over `objectives.<method>`). The paper's ablation rows
    are variants."""

    method: str = "dpfah"  # a method of the registry (checked on loading)
    model: dict[str, Free] = field(default_factory=dict)
    objective: dict[str, Free] = field(default_factory=dict)
    description: str = ""


@section
class MlflowConfig:
    # Default: an SQLite file in the repository. MLFLOW_TRACKING_URI, when set, wins.
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "dpfah"


@section
class Params:
    """All of params.yaml. A stage's section is one more field here."""

    KEYS_ARE = "section"  # in the messages of pipeline.config_binder

    seed: int = field(default=0, metadata=_check(at_least(0)))
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    datasets: dict[str, TaggedDataset] = field(default_factory=dict)
    # The code lengths `dvc repro` trains (dvc.yaml's matrix reads this list; a training
    # itself reads only its own length, so adding one here trains only the new one).
    bits: tuple[int, ...] = field(default=(64,), metadata=_check(distinct("code lengths", 1)))
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    # Hyper-parameters of the methods, under the method's name (e.g. `dsh: {alpha: 0.05}`,
    # `dpfah: {eta: 1.0}`); what is not given (or null) keeps the method's default (its paper's).
    objectives: dict[str, dict[str, Free]] = field(default_factory=dict)
    # true: the trainings of the method the tune stage searched take its best knobs from
    # tune/<dataset>/best.json (the best at the training's code length, else the best
    # overall) over `objectives.<method>`; other methods keep theirs.
    use_tuned: bool = False
    # Named variants (a method plus network and hyper-parameter changes), usable wherever a
    # method name is (train.method, train.methods).
    variants: dict[str, VariantConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)  # validate() runs once, on loading

    def validate(self) -> None:
        """The checks against the method registry (imported here: it needs torch) and across
        sections; run once, on loading (:func:`pipeline.config.parse_params`)."""
        from .methods import method_names

        known = method_names()
        for name, variant in self.variants.items():
            at = f"variants.{name}"
            check_objective(variant.method, variant.objective, variant.model, self.model, at, f"{at}.objective")
            if not NAME_RE.match(name) or name in known:
                raise Invalid(
                    "variants", f"variant name {name!r} must match {NAME_RE.pattern} and not be a method's name"
                )
        for key, names in (("train.method", (self.train.method,)), ("train.methods", self.train.methods)):
            for name in names:
                if name not in known and name not in self.variants:
                    variants = ", ".join(self.variants) or "none"
                    raise Invalid(
                        key, f"unknown method or variant {name!r} (methods: {', '.join(known)}; variants: {variants})"
                    )
        for name in self.objectives:
            if name not in known:
                raise Invalid("objectives", f"unknown method {name!r} (known: {', '.join(known)})")
        for name, values in self.objectives.items():
            check_objective(name, values, {}, self.model, "", f"objectives.{name}")
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
        return bind(ModelSettings, {**dataclasses.asdict(self.model), **variant.model}, f"variants.{name}.model")

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


def check_objective(
    method: str, hparams: Mapping[str, Any], model: Mapping[str, Any], base: ModelSettings, at: str, knobs: str
) -> ModelSettings:
    """A method with its knobs and network changes, as a variant or an objective file gives
    them: the method is one of the registry (imported here: it needs torch), each knob one it
    has, of its kind, among its choices and within its bounds, and ``model`` changes ``base``
    with known keys and valid values (the network it gives). A ``ConfigError`` names the key:
    ``<at>.method``, ``<knobs>.<knob>``, ``<at>.model.<key>``."""
    from .methods import check_hyperparameters, method_names

    dotted = f"{at}." if at else ""
    if method not in method_names():
        raise ConfigError(f"{dotted}method: unknown method {method!r} (known: {', '.join(method_names())})")
    check_hyperparameters(method, hparams, knobs)
    if not model:
        return base
    return bind(ModelSettings, {**dataclasses.asdict(base), **model}, f"{dotted}model")


@section
class ObjectiveFile:
    """An objective file (``objectives/<dataset>-<bits>-<method>.json``, :mod:`pipeline.recipes`):
    what one training optimises, checked as params.yaml's ``objectives`` and ``variants`` are
    (:func:`check_objective`)."""

    dataset: str
    bits: int = field(metadata=_check(at_least(1)))
    entry: str = field(metadata=_check(matches(NAME_RE.pattern, "a method or variant name")))
    method: str
    hparams: dict[str, Free]
    model: dict[str, Free]
    source: dict[str, str] = field(default_factory=dict)
