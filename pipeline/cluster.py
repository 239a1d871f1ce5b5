"""Ray, as the stages reach it: join the cluster a job runs on, or start a local one."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from .console import verbose
from .errors import ConfigError
from .timing import ENV as TIMINGS_ENV

__all__ = [
    "ensure_ray",
    "started_here",
    "check_request",
    "shutdown_if_started",
    "shutdown_before_exit",
    "train_run_defaults",
    "PlacementGroupJanitor",
]


def started_here() -> bool:
    """Whether this process started the Ray instance it is connected to (``ray.init`` with no
    cluster to join), as opposed to joining a cluster (RAY_ADDRESS, ``ray job submit``, a
    running ``ray start --head``). Ray has no public call for it: a node this process started
    has processes of its own; a joined one has none. False when in doubt."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(ray.is_initialized() and node is not None and getattr(node, "all_processes", None))


class _TokenNotice(logging.Filter):
    """Drops Ray's notice that a local instance it starts has token authentication on, printed
    at the start of every stage: its default, which is kept (issue 29)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


#: The logger of Ray's token set-up (Ray's own module name).
TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def ensure_ray() -> None:
    """Connect this process to Ray once.

    With RAY_ADDRESS (``ray job submit`` sets it), that cluster; else the instance a
    ``ray start --head`` on this machine left running (Ray's own lookup), which saves every
    stage the start and the shutdown of its own instance (``bench/run_overhead.py``: about
    11 s a training on 2 cores); else a new local instance on this machine's CPUs and GPUs,
    with Ray's token authentication (its default; its notice shown with --verbose only)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {}
    if os.environ.get(TIMINGS_ENV):  # the bench's span file reaches workers of a running instance too
        kwargs["runtime_env"] = {"env_vars": {TIMINGS_ENV: os.environ[TIMINGS_ENV]}}
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    loud = verbose()  # Ray's banner, and its controller's and workers' logs, with --verbose only
    if not loud:
        kwargs["logging_level"] = logging.WARNING
        notices = logging.getLogger(TOKEN_LOGGER)
        if not any(isinstance(f, _TokenNotice) for f in notices.filters):
            notices.addFilter(_TokenNotice())
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=loud, **kwargs)
    if in_main_thread and callable(handler):
        # A local instance installs Ray's SIGTERM handler, which kills its processes and calls
        # sys.exit(1): the MLflow run would end FAILED instead of KILLED. Ours (pipeline.errors)
        # unwinds like Ctrl-C; the instance is then stopped by shutdown_if_started / at exit.
        signal.signal(signal.SIGTERM, handler)


def shutdown_if_started(started: bool) -> None:
    """Stop the local Ray instance this stage started (its dashboard and agents too), so an
    interrupted stage leaves no processes behind; a joined cluster is left alone."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


def shutdown_before_exit() -> None:
    """For a stage process about to exit: stop its local Ray instance, or leave the joined one,
    now rather than in Ray's exit hook, which first sleeps 0.5 s so that the workers' last log
    lines reach the console. They only do with --verbose (``log_to_driver``): then the hook
    is left to do it."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not verbose():
        ray.shutdown()


def check_request(num_workers: int, use_gpu: bool, *, command: str = "python -m pipeline.train ...") -> None:
    """Fail at once when a local Ray instance this process started cannot hold the training's
    workers (Ray Train would otherwise wait for resources that never come and time out after
    minutes). On a joined cluster, waiting is right: an autoscaler may add nodes."""
    import ray

    if not started_here():
        return
    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    need_gpus = num_workers if use_gpu else 0
    need_cpus = num_workers  # Ray Train: one CPU per worker (GPU workers too)
    if need_gpus <= gpus and need_cpus <= cpus:
        return
    asked = f"train.num_workers={num_workers} with train.use_gpu={str(use_gpu).lower()} asks for {need_cpus} CPU(s)"
    asked += f" and {need_gpus} GPU(s)" if use_gpu else ""
    workers = max(1, min(cpus, gpus if use_gpu and gpus else num_workers))
    fix = ("--set train.use_gpu=false " if need_gpus > gpus else "") + f"--set train.num_workers={workers}"
    raise ConfigError(
        f"{asked}, but this machine's local Ray has {cpus} CPU(s) and {gpus} GPU(s). Either ask for what it has "
        f"({fix}; a GPU profile such as `--profile paper` wants GPUs) or run where they are: "
        f"ray job submit --address http://HEAD:8265 --working-dir . -- {command}"
    )


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


class PlacementGroupJanitor:
    """Removes the placement groups of this job whose creator actor has died.

    When ASHA stops a trial, its Ray Train controller dies with it, and the worker group's
    placement group outlives it (non-detached placement groups live as long as their job).
    Ray Train's own cleaner, a detached actor, finds the cluster through the State API, which
    fails wherever more than one local Ray instance runs on the machine ("Found multiple
    active Ray instances"): the stopped trial's CPUs/GPUs then stay reserved and the next
    trial never starts its workers. This thread, in the driver, does the cleaner's job. It
    reads the GCS placement group table through Ray's internal accessor (the public table
    lacks the creator fields); if that API moves, it only warns.
    """

    def __init__(self, interval_s: float = 2.0):
        import threading

        self.interval_s = interval_s
        self.removed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="placement-group-janitor", daemon=True)

    def __enter__(self) -> PlacementGroupJanitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sweep()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as e:  # never take the search down
                print(f"warning: placement group janitor stopped: {type(e).__name__}: {e}", file=sys.stderr)
                return

    def sweep(self) -> int:
        import ray
        from ray._private import state as ray_state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = ray_state.state._connect_and_get_accessor()
        job = ray.get_runtime_context().get_job_id()
        removed = 0
        for raw in accessor.get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            # created by an actor (a driver's have no creator actor) that died, in this job
            by_actor = pg.creator_actor_id and not ray.ActorID(pg.creator_actor_id).is_nil()
            orphaned = by_actor and pg.creator_actor_dead and not pg.is_detached and pg.creator_job_id.hex() == job
            if not orphaned or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED:
                continue
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
            except Exception:  # removed meanwhile (by Ray Train's cleaner)
                pass
        self.removed += removed
        return removed
