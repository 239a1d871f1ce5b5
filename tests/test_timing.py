"""pipeline.timing: spans recorded only when DPFAH_TIMINGS names a file, one JSON line each."""

from __future__ import annotations

import json
import os
import time

from pipeline.timing import ENV, record, span


def test_spans_go_to_the_named_file_and_nowhere_without_it(tmp_path, monkeypatch):
    path = tmp_path / "spans.jsonl"
    monkeypatch.delenv(ENV, raising=False)
    with span("unrecorded"):
        pass
    assert not path.exists()

    monkeypatch.setenv(ENV, str(path))
    with span("outer"):
        time.sleep(0.01)
        record("mark", time.time())
    try:
        with span("failing"):
            raise ValueError
    except ValueError:
        pass
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["name"] for x in lines] == ["mark", "outer", "failing"]  # a span is written when it ends, failed or not
    outer = lines[1]
    assert outer["end"] - outer["start"] >= 0.01 and outer["pid"] == os.getpid()
    assert lines[0]["start"] <= lines[0]["end"] <= outer["end"]
