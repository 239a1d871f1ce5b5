"""bench/search.py: each compiled kernel's rows, side by side, verified against numpy, with
the share of its own scan that issue 30's target reads (timings themselves are not asserted)."""

from __future__ import annotations

import json

import pytest

from bench.search import main, run_search_benchmark
from dpfah import kernels


def _have() -> list[str]:
    return list(kernels.hamming.kernels()) if kernels.hamming is not None else []


@pytest.mark.skipif(not _have(), reason="the compiled Hamming kernels did not import")
def test_every_kernel_is_verified_and_compared_with_its_own_scan():
    names = _have()
    rows = run_search_benchmark(
        5_000, 20, 50, 3, threads=2, numpy_queries=5, repeat=1, with_faiss=False, kernel_names=names
    )
    for name in names:
        mine = [r for r in rows if r["kernel"] == name]
        assert [r["threads"] for r in mine] == [2, 2, 2, 1, 1]
        assert all(r["verified"] is True for r in mine if not r["method"].startswith("kernel scan"))
        scans = {r["threads"]: r for r in mine if r["method"].startswith("kernel scan")}
        for r in mine:
            if r["method"].startswith("ours: HammingIndex.search"):
                assert r["share_of_ceiling"] == pytest.approx(r["gcomp_per_s"] / scans[r["threads"]]["gcomp_per_s"])
            else:
                assert r.get("share_of_ceiling") is None
    numpy_row = next(r for r in rows if r["method"].startswith("ours: numpy fallback"))
    assert numpy_row["verified"] is True and numpy_row["kernel"] is None


@pytest.mark.skipif(not _have(), reason="the compiled Hamming kernels did not import")
def test_the_command_line_writes_json_and_refuses_an_unknown_kernel(tmp_path, capsys):
    out = tmp_path / "search.json"
    args = ["--db", "3000", "--queries", "10", "-k", "20", "--repeat", "1", "--no-faiss", "--numpy-queries", "2"]
    assert main([*args, "--kernels", "portable", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {r["kernel"] for r in doc["rows"] if r["kernel"]} == {"portable"}
    assert "portable" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--kernels", "avx9000", "--out", str(out)])
    assert e.value.code == 2
    assert "--kernels: avx9000 not among this CPU's compiled kernels" in capsys.readouterr().err
