"""Ray, as the stages reach it: join the cluster a job runs on, or start a local one."""

from __future__ import annotations

import os

from .timing import ENV as TIMINGS_ENV

__all__ = ["ensure_ray", "train_run_defaults"]


def ensure_ray() -> None:
    """Connect this process to Ray once.

    With RAY_ADDRESS (``ray job submit`` sets it), that cluster; else the instance a
    ``ray start --head`` on this machine left running (Ray's own lookup), which saves every
    stage the start and the shutdown of its own instance (``bench/run_overhead.py``: about
    11 s a training on 2 cores); else a new local instance on this machine's CPUs and GPUs."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {}
    if os.environ.get(TIMINGS_ENV):  # the bench's span file reaches workers of a running instance too
        kwargs["runtime_env"] = {"env_vars": {TIMINGS_ENV: os.environ[TIMINGS_ENV]}}
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, **kwargs)


#: Ray Train's controller polls its workers this often (Ray's default: 2 s). Each stage of a
#: run waits for the next poll to learn that the workers started and that they finished.
HEALTH_CHECK_INTERVAL_S = "0.5"


def train_run_defaults() -> None:
    """Ray Train settings for the trainings this process starts, where the user set none:
    a shorter controller poll, and on a one-node instance no preemption watcher (an extra
    actor process that only logs node drains, which one machine does not have). Read by Ray
    Train when a trainer starts; it passes them on to its controller and workers."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    if len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
