"""The promotion lock: concurrent promotions into one store act one after the other
(a file lock beside a SQLite store, a lock entry in a tracking server's registry), so a run
gets one version and the alias never moves to a worse model. See docs/operations.md."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import time
import uuid

from .errors import PipelineError
from .tracking import mlflow_errors, sqlite_path

__all__ = ["LOCK_SUFFIX", "LOCK_WAIT_S", "LockTimeout", "TRANSIENT", "promotion_lock", "registry_lock"]

#: Seconds a promotion waits for the lock before it reports the holder (a file lock) or
#: takes the lock over as stale (a tracking server: its holder must have died).
LOCK_WAIT_S = 120.0
#: The registered model that serves as the lock of ``<name>`` on a tracking server.
LOCK_SUFFIX = ".promote-lock"
#: MLflow error codes of a write that may succeed when tried again.
TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


class LockTimeout(PipelineError):
    """Another promotion of the same store held the promotion lock for too long."""


@contextlib.contextmanager
def promotion_lock(client, uri: str, name: str):
    """Held across read-compare-register-alias-tag, so concurrent promotions act one after
    the other: one version per run, and the alias never moves to a worse model.

    A local SQLite store: ``fcntl.flock`` on ``<store>.promote.lock`` beside it (released by
    the kernel when the process dies). Anything else (a tracking server): the registered
    model ``<name>.promote-lock``, whose creation fails for everyone but one (the store's
    unique name); deleted on release; taken over when the same lock has been held for
    LOCK_WAIT_S (its holder died). See docs/operations.md for what that leaves."""
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is None:  # in-memory: one process only
            yield
            return
        with _file_lock(path + ".promote.lock", uri):
            yield
        return
    with registry_lock(client, uri, name):
        yield


def _waiting(since: float, announced: bool, what: str) -> bool:
    if not announced and time.monotonic() - since > 2.0:
        print(f"promote: waiting for {what}", file=sys.stderr, flush=True)
        return True
    return announced


@contextlib.contextmanager
def _file_lock(path: str, uri: str):
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise LockTimeout(f"{path}: cannot open the promotion lock beside the store {uri} ({e.strerror})") from None
    try:
        start, announced = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > LOCK_WAIT_S:
                    raise LockTimeout(
                        f"{path}: another promotion into {uri} has held this lock for over {LOCK_WAIT_S:g} s; try "
                        "again when it ends"
                    ) from None
                announced = _waiting(start, announced, f"another promotion into {uri} (lock {path})")
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def registry_lock(client, uri: str, name: str):
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    start, announced, seen = time.monotonic(), False, None  # seen: (creation stamp, first seen)
    with mlflow_errors(f"taking the promotion lock {lock}", uri):
        while True:
            try:
                client.create_registered_model(
                    lock,
                    tags={"owner": owner},
                    description=f"held by pipeline.promote while it promotes into {name}; removed when it ends",
                )
                break
            except MlflowException as e:
                # A server on SQLite may answer a contended write with a transient error
                # (database locked); whether the write landed is read back below. "Does not
                # exist": the name was taken when MLflow's SQL store tried to insert it and gone
                # when it read the holder back to word its "already exists" error; the read
                # below finds it released (or taken again) as well.
                if (
                    e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", *TRANSIENT)
                    or time.monotonic() - start > LOCK_WAIT_S
                ):
                    raise
            try:
                held = client.get_registered_model(lock)
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    continue  # released meanwhile
                if e.error_code in TRANSIENT and time.monotonic() - start <= LOCK_WAIT_S:
                    time.sleep(0.1 + 0.2 * random.random())
                    continue
                raise
            if (held.tags or {}).get("owner") == owner:
                break  # our create landed although its answer was an error
            if seen is None or seen[0] != held.creation_timestamp:
                seen = (held.creation_timestamp, time.monotonic())
            elif time.monotonic() - seen[1] > LOCK_WAIT_S:
                print(
                    f"promote: taking over {lock} at {uri}, held by {(held.tags or {}).get('owner', '?')} for over "
                    f"{LOCK_WAIT_S:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
                seen = None
                continue
            announced = _waiting(
                start,
                announced,
                f"another promotion into {name} at {uri} ({lock} held by {(held.tags or {}).get('owner', '?')})",
            )
            time.sleep(0.1 + 0.2 * random.random())
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if (client.get_registered_model(lock).tags or {}).get("owner") == owner:
                client.delete_registered_model(lock)
