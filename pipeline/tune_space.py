"""What a Tune search varies: the searched knobs of train.method (``tune.space``,
``tune.ranges``), the Tune search space over them and the code length, the trials at once,
and what one trial trains and is named."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .config import Params
from .errors import ConfigError

__all__ = ["searched_knobs", "search_space", "max_concurrency", "trial_run_name", "trial_recipe"]


def searched_knobs(params: Params) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """What the search varies besides the code length: knob -> ("values", the values to
    try) or ("range", (low, high)) sampled log-uniformly, for train.method: the knobs of
    ``tune.space`` and ``tune.ranges`` (a knob in both: its range, with a random search).
    A ``ConfigError`` names a knob the method does not have (and lists what it has), a value
    of the wrong kind, a variant (its own settings would be overridden) and a method given
    nothing to search."""
    from .methods import as_declared, check_hyperparameters, declared_hyperparameters, tunable_hyperparameters

    c, method = params.tune, params.train.method
    if method in params.variants:
        raise ConfigError(
            f"train.method: {method} is a variant; the search varies a method's own hyper-parameters: set "
            "train.method to a method"
        )
    have = declared_hyperparameters(method)
    knobs: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for section, entries in (("space", c.space), ("ranges", c.ranges)):
        for knob, value in entries.items():
            where = f"tune.{section}.{knob}"
            if knob not in have:
                raise ConfigError(
                    f"{where}: {method} has no hyper-parameter {knob!r} (it has: {', '.join(sorted(have))}; worth "
                    f"searching: {', '.join(tunable_hyperparameters(method))})"
                )
            if section == "space":
                for v in value:
                    check_hyperparameters(method, {knob: v}, "tune.space")
                value = tuple(as_declared(method, knob, v) for v in value)
                knobs[knob] = ("values", value)
            else:
                if isinstance(have[knob], (bool, str, tuple, list)):
                    raise ConfigError(
                        f"{where}: {knob} is not a number (its default is {have[knob]!r}): list its values under "
                        "tune.space"
                    )
                knobs[knob] = ("range", value)  # a range (random search only) wins over the knob's list
    if not knobs:
        raise ConfigError(
            f"tune.space: empty, and {method} has no default search; give the values of one or more of its knobs, "
            f"e.g. --set 'tune.space.{tunable_hyperparameters(method)[0]}=[...]' (worth searching: "
            f"{', '.join(tunable_hyperparameters(method))}; "
            f"it has: {', '.join(sorted(have))})"
        )
    return knobs


def search_space(params: Params, max_concurrent: int = 0) -> tuple[dict[str, Any], Any, int]:
    """(Tune param_space, search algorithm, num_samples) from the ``tune`` section.

    ``grid``: every combination of the searched knobs' values (:func:`searched_knobs`) and
    bits, once. ``random``: ``num_samples`` seeded draws, each knob from its values (or
    log-uniformly from its range), bits from its list.
    The generator itself bounds the trials running at once (Tune ignores
    ``TuneConfig.max_concurrent_trials`` when given a search algorithm of this kind)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    c = params.tune
    space: dict[str, Any] = {}
    for knob, (kind, value) in searched_knobs(params).items():
        if kind == "range":
            space[knob] = tune.loguniform(*value)
        else:
            space[knob] = tune.grid_search(list(value)) if c.search == "grid" else tune.choice(list(value))
    space["bits"] = tune.grid_search(list(c.bits)) if c.search == "grid" else tune.choice(list(c.bits))
    return space, BasicVariantGenerator(max_concurrent=max_concurrent, random_state=params.seed), c.num_samples


def max_concurrency(params: Params, resources: dict[str, float] | None = None) -> int:
    """Trials at once: ``tune.max_concurrent_trials``, else what the cluster holds now
    (GPUs, or CPUs on CPU workers, divided by the workers of one trial)."""
    if params.tune.max_concurrent_trials:
        return params.tune.max_concurrent_trials
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    unit = "GPU" if params.train.use_gpu else "CPU"
    return max(1, int(resources.get(unit, 0)) // params.train.num_workers)


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_run_name(search_name: str, trial_id: str, config: dict[str, Any]) -> str:
    """Unique per search, stable across retries of the trial (so a retry resumes its run)."""
    index = trial_id.rsplit("_", 1)[-1]
    knobs = "".join(f"-{k}{_shown(v)}" for k, v in config.items() if k != "bits")
    return f"{search_name}-t{index}{knobs}-{int(config['bits'])}b"


def trial_recipe(params: Params, dataset: str, config: dict[str, Any]):
    """What a trial trains: train.method with its knobs from params (never from best.json)
    and the searched ones (``config``, with ``bits``) from the search."""
    from . import recipes

    bits = int(config["bits"])
    base = recipes.resolve(replace(params, use_tuned=False), dataset, bits)
    searched = {k: v for k, v in config.items() if k != "bits"}
    return replace(base, hparams={**base.hparams, **searched}, source={"weights_from": "search"})
