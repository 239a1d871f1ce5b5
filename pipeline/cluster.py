"""Ray, as the stages reach it: join the cluster a job runs on, or start a local one."""

from __future__ import annotations

import os

__all__ = ["ensure_ray"]


def ensure_ray() -> None:
    """Connect this process to Ray once: inside ``ray job submit`` (or with RAY_ADDRESS set)
    the job's cluster, elsewhere a new local instance on this machine's CPUs and GPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
