"""User-facing errors of the pipeline stages and the one place they become an exit status.

A stage raises :class:`PipelineError` (or a subclass) for anything the user can fix: a bad
parameter, a missing file, a corrupt image. ``run_main`` prints its message as one line and
exits 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import gc
import signal
import sys
import threading
from collections.abc import Callable, Sequence


class PipelineError(Exception):
    """An error the user can fix; its message names the file, line or parameter."""


class ConfigError(PipelineError):
    """A bad ``params.yaml`` value or ``--set`` override; the message names the dotted key."""


class DataError(PipelineError):
    """Bad input data: an unreadable image, a malformed list line, a protocol that cannot be met."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: it unwinds like Ctrl-C (an MLflow run open in the
    block ends KILLED, cleanup code runs) and the stage exits 128 + 15."""

    signum = signal.SIGTERM


_terminated = threading.Event()


def terminate(signum, frame):
    """The SIGTERM handler of every stage (``run_main`` installs it; a stage that starts a
    local Ray instance puts it back over Ray's, which would exit without unwinding). Noted
    as well as raised: a signal that arrives inside ``ray.get`` comes out of it as a plain
    KeyboardInterrupt."""
    _terminated.set()
    raise Terminated()


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main(argv)``: user errors print ``error: ...`` and give 2, Ctrl-C 130."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    _terminated.clear()
    try:
        return int(main(argv) or 0)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) or _terminated.is_set():
            print("terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if getattr(main, "__module__", None) == "__main__":  # `python -m pipeline.<stage>`: the process ends next
            _quick_exit.set()


_quick_exit = threading.Event()


def _exit_quickly() -> None:
    """The interpreter's exit, made fast for a stage run as ``python -m`` (:func:`run_main`).

    What the interpreter does at exit otherwise takes 2-4 s on 2 cores once torch, MLflow and
    Ray are imported: after clearing the modules it runs the cyclic collector over millions of
    their objects, only to free memory the process gives back anyway. So: collect the garbage
    there is now (its finalizers run, as at any collection), flush every open file object that
    can be written, then freeze every live object out of the collector's reach.

    Registered when this module is imported (stage modules import it before torch, MLflow or
    Ray), so it runs after their exit hooks (Ray's shutdown, MLflow's): what they write is
    written. What freezing skips is the finalizers of objects that become cyclic garbage only
    as the modules are cleared; a file held in such a cycle would lose what it had not
    flushed, which is why every open file is flushed here first. Objects freed by reference
    counting are finalized as before."""
    if not _quick_exit.is_set():
        return
    import io
    import warnings

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing printed at exit
        for obj in gc.get_objects():
            # type(), not isinstance: that asks obj.__class__, which some library proxies answer with a warning
            if issubclass(type(obj), io.IOBase):
                try:
                    if not obj.closed and obj.writable():
                        obj.flush()
                except Exception:  # a closed pipe, a detached stream: nothing of ours to save
                    pass
    gc.freeze()


atexit.register(_exit_quickly)
