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


_EXIT_SCRIPT = """
import atexit, gc, sys
atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0, flush=True))  # registered first: runs last
from pipeline.errors import run_main


class Holder:
    pass


def main(argv):
    held = Holder()
    held.self, held.file = held, open(sys.argv[1], "w")  # a file in a reference cycle, never closed
    held.file.write("main\\n")
    atexit.register(lambda: held.file.write("exit hook\\n"))
    globals()["held"] = held
    return 3


main.__module__ = sys.argv[2]
sys.exit(run_main(main))
"""


def test_a_stage_run_as_main_exits_without_the_final_collection_and_loses_no_write(tmp_path):
    """pipeline.errors: a stage's process (main defined in __main__) freezes the heap at exit
    instead of collecting it; files still open in reference cycles keep what was written to
    them, by the stage and by later exit hooks. A main imported from a module (tests) is
    left alone."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for module, frozen in (("__main__", True), ("some.module", False)):
        out = tmp_path / f"{module}.txt"
        proc = subprocess.run(
            [sys.executable, "-c", _EXIT_SCRIPT, str(out), module], cwd=repo, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.strip() == f"frozen {frozen}"
        assert out.read_text() == "main\nexit hook\n"


def test_model_requirements_are_checked_without_scanning_every_distribution(monkeypatch, caplog):
    """pipeline.tracking.requirements_known: MLflow's check of a logged model's requirements
    (versions against what is installed) works, and does not map every installed
    distribution's files (3 s of log_model); MLflow's map is put back as it was. Fails if
    MLflow renames what this relies on."""
    import numpy
    from mlflow.utils import requirements_utils as reqs

    from pipeline.model_logging import model_requirements, requirements_known

    monkeypatch.setattr(reqs, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(reqs, "_PACKAGES_TO_MODULES", None)

    def scan():
        raise AssertionError("scanned every installed distribution")

    monkeypatch.setattr(reqs.importlib_metadata, "packages_distributions", scan)
    with requirements_known():
        assert [reqs._check_requirement_satisfied(r) for r in model_requirements()] == [None, None, None]
        mismatch = reqs._check_requirement_satisfied("numpy==0.0.1")
        assert mismatch is not None and mismatch.installed_version == numpy.__version__
    assert reqs._MODULES_TO_PACKAGES is None and reqs._PACKAGES_TO_MODULES is None
