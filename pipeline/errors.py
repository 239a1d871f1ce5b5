"""User-facing errors of the pipeline stages and the one place they become an exit status.

A stage raises :class:`PipelineError` (or a subclass) for anything the user can fix: a bad
parameter, a missing file, a corrupt image. ``run_main`` prints its message as one line and
exits 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so cleanup code runs
    raise SystemExit(128 + signum)


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main(argv)``: user errors print ``error: ...`` and give 2, Ctrl-C 130."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return int(main(argv) or 0)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
