"""Where a stage's time goes: named spans, written only when asked for.

With ``DPFAH_TIMINGS=/path/spans.jsonl`` in the environment, every span a stage (or a Ray
worker of it: the variable travels with the process environment) passes through appends
one JSON line ``{"name", "start", "end", "pid"}`` (wall-clock seconds) to that file.
Without it, nothing is recorded and a span costs one dictionary lookup. ``bench/run_overhead.py``
reads the file to break a run down.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

__all__ = ["ENV", "span", "record"]

ENV = "DPFAH_TIMINGS"


def record(name: str, start: float, end: float | None = None) -> None:
    """Append one span (``end`` defaults to now) when DPFAH_TIMINGS names a file."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"name": name, "start": start, "end": time.time() if end is None else end, "pid": os.getpid()})
    with open(path, "a") as f:  # one short write per line: lines from several processes do not interleave
        f.write(line + "\n")


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    start = time.time()
    try:
        yield
    finally:
        record(name, start)
