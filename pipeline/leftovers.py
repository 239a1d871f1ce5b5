"""What a training that died leaves behind, cleaned by the next training on the same host:
its MLflow run left RUNNING (marked FAILED) and its Ray Train folder of checkpoints under
``train.storage_path`` (deleted). A run folder is ours when it holds :data:`OWNER_FILE`,
written by the driver that started it; it is deleted only once that driver has ended."""

from __future__ import annotations

import json
import os
import shutil

from .train_worker import process_start_time

__all__ = [
    "OWNER_FILE",
    "alive",
    "claim_run_folder",
    "driver_tags",
    "fail_abandoned_runs",
    "remove_ended_run_folders",
    "wait_for_drivers",
]

#: The file in a Ray Train run folder naming the driver that started it (JSON: driver_tags).
OWNER_FILE = ".dpfah-driver.json"


def driver_tags() -> dict[str, str]:
    """Which process owns the run: a later training on the same host can tell a run whose
    driver died (SIGKILL, a lost machine) from one still going."""
    import socket

    return {
        "driver.host": socket.gethostname(),
        "driver.pid": str(os.getpid()),
        "driver.started": f"{process_start_time() or 0:.0f}",
    }


def alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (pids recycle)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    if _zombie(pid):  # ended, not yet reaped by its parent: it runs no code
        return False
    began = process_start_time(str(pid))
    return began is None or not float(started) or abs(began - float(started)) < 2


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_for_drivers(runs, timeout_s: float = 60.0, poll_s: float = 0.25) -> list[str]:
    """Wait until the driver processes of ``runs`` (MLflow runs tagged by :func:`driver_tags`)
    on this host have ended, at most ``timeout_s``; returns the ids of runs whose driver still
    runs. A Tune trial that the scheduler stopped is ended asynchronously: its process may
    still mark its run FAILED (its training interrupted) after fit() returned, so the search
    marks the run KILLED only once that process is gone. Drivers on other hosts can't be
    watched from here and are not waited for."""
    import time

    host = driver_tags()["driver.host"]
    watched = {}
    for r in runs:
        tags = r.data.tags
        if (
            tags.get("driver.host") == host
            and tags.get("driver.pid", "").isdigit()
            and int(tags["driver.pid"]) != os.getpid()
        ):
            watched[r.info.run_id] = (int(tags["driver.pid"]), tags.get("driver.started", "0"))
    deadline = time.monotonic() + timeout_s
    while True:
        running = [run_id for run_id, (pid, started) in watched.items() if alive(pid, started)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(poll_s)


def fail_abandoned_runs(experiment_id: str, current_run_id: str, uri: str) -> list[str]:
    """Mark FAILED the runs of this experiment that a training driver on this host left
    RUNNING when it died without closing them (killed with SIGKILL, out of memory); says so."""
    from mlflow.tracking import MlflowClient

    host = driver_tags()["driver.host"]
    client = MlflowClient(uri)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`driver.host` = '{host}'",
        max_results=200,
    )
    failed = []
    for r in runs:
        tags = r.data.tags
        if r.info.run_id == current_run_id or "driver.pid" not in tags:
            continue
        if alive(int(tags["driver.pid"]), tags.get("driver.started", "0")):
            continue
        client.set_tag(
            r.info.run_id, "failed_reason", f"its driver (pid {tags['driver.pid']} on {host}) ended without closing it"
        )
        client.set_terminated(r.info.run_id, "FAILED")
        failed.append(r.info.run_id)
    if failed:
        print(
            f"marked {len(failed)} run(s) FAILED whose training driver died without closing them: {', '.join(failed)}"
        )
    return failed


def claim_run_folder(storage: str, name: str) -> str | None:
    """Create the run folder ``storage/name`` with :data:`OWNER_FILE` in it (this driver);
    None (nothing written) for remote storage."""
    if "://" in storage:
        return None
    folder = os.path.join(storage, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, OWNER_FILE), "w") as f:
        json.dump(driver_tags(), f)
    return folder


def remove_ended_run_folders(storage: str, prefix: str, keep: str) -> list[str]:
    """Delete the run folders ``storage/<prefix>*`` (one training entry's) but ``keep`` that
    a driver on this host started and that driver has ended (finished, or killed): their
    checkpoints served only to resume that run, whose model, if any, is in MLflow. A folder
    without our owner file, another host's, or a live driver's is left alone. Returns what
    was deleted, and says so."""
    if "://" in storage or not os.path.isdir(storage):
        return []
    host, removed = driver_tags()["driver.host"], []
    for entry in sorted(os.listdir(storage)):
        folder = os.path.join(storage, entry)
        if not entry.startswith(prefix) or entry == keep or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        try:
            with open(os.path.join(folder, OWNER_FILE)) as f:
                owner = json.load(f)
            pid, started = int(owner["driver.pid"]), str(owner.get("driver.started", "0"))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a folder this pipeline started
        if owner.get("driver.host") != host or alive(pid, started):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        print(
            f"removed {len(removed)} Ray Train folder(s) of earlier trainings of {prefix.rstrip('-')}: "
            f"{', '.join(removed)}"
        )
    return removed
