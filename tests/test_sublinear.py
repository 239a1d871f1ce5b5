"""The optional sub-linear index (issue 30, target 4): ``pipeline.index --sublinear ivf`` writes a
faiss binary IVF beside the codes with its recall measured; ``pipeline.search`` uses it and says
so; a damaged faiss file, or faiss missing, is one line. On 20,000 codes drawn around class
centres as bench/index_scale.py draws them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench.index_scale import make_packed_codes
from pipeline import index as index_stage
from pipeline import index_format
from pipeline import search as search_stage
from pipeline.index_sublinear import (
    SublinearSpec,
    add_sublinear,
    build_ivf,
    distance_recall,
    load_sublinear,
    sublinear_bytes,
)
from tests.helpers import cli

faiss = pytest.importorskip("faiss")

N = 20_000


def _write(out: Path, packed: np.ndarray) -> dict:
    n = len(packed)
    collection = SimpleNamespace(
        keys=[str(i) for i in range(n)], paths=None, labels=None, classes=None, identity={"type": "directory"}
    )
    resolved = SimpleNamespace(bits=64, describe=lambda: {"uri": "models:/x/1", "run_id": "r", "bits": 64})
    plan = {"block_size": 1024, "precision": "fp32"}
    return index_format.write_index(out, packed, np.arange(n), collection, resolved, [], plan, "cpu", "fp32", "encoded")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An index of 20,000 codes (20 classes, flip 0.25) with its sub-linear index (nprobe 8)."""
    _, packed, _, _ = make_packed_codes(0, 0, N, 64, 20, 0.25)
    out = tmp_path_factory.mktemp("sublinear") / "idx"
    manifest = _write(out, packed)
    add_sublinear(out, manifest, packed, SublinearSpec(nprobe=8))
    return out, packed


@pytest.fixture
def copy(built, tmp_path) -> Path:
    shutil.copytree(built[0], tmp_path / "idx")
    return tmp_path / "idx"


def test_distance_recall_counts_ties_at_the_kth_distance_as_found():
    exact = np.array([[1, 2, 2, 3], [0, 1, 1, 1], [4, 4, 4, 4]])
    approx = np.array([[1, 2, 3, 3], [0, 1, 1, 1], [4, 4, -1, -1]])
    assert distance_recall(exact, approx).tolist() == [0.75, 1.0, 0.5]


def test_the_manifest_records_the_sublinear_index_and_its_recall(built):
    out, _ = built
    m = index_format.read_manifest(out)
    s = m["sublinear"]
    assert (s["kind"], s["file"], s["nlist"], s["nprobe"]) == ("ivf", "sublinear.faiss", 32, 8)  # ~sqrt(20,000) / 4
    assert s["library"] == f"faiss {faiss.__version__} IndexBinaryIVF" and s["recall_queries"] == 1000
    assert set(s["recall"]) == {"10", "100"} and all(0.5 < v <= 1 for v in s["recall"].values()), s
    info = m["files"]["sublinear.faiss"]
    assert info["bytes"] == (out / "sublinear.faiss").stat().st_size and len(info["sha256"]) == 64
    index = load_sublinear(out, m)
    assert isinstance(index, faiss.IndexBinaryIVF) and (index.ntotal, index.d, index.nlist) == (N, 64, 32)
    assert index_stage.check_out(out) == out  # an index with its faiss file may be rebuilt in place


def test_the_disk_space_check_counts_the_faiss_file(built, tmp_path):
    """pipeline.index refuses a build that cannot fit before any work; with --sublinear the faiss
    file is part of what must fit: at least its size, and not much more."""
    out, packed = built
    written = (out / "sublinear.faiss").stat().st_size
    bound = sublinear_bytes(N, 1, SublinearSpec(nprobe=8))
    assert written <= bound <= written + 8192, (written, bound)
    for n, words, nlist in [(3_000, 1, 1), (5_000, 2, 16)]:
        codes = np.random.default_rng(n).integers(0, 2**63, size=(n, words), dtype=np.uint64)
        size = len(faiss.serialize_index_binary(build_ivf(codes, nlist)).tobytes())
        assert size <= sublinear_bytes(n, words, SublinearSpec(nlist=nlist)) <= size + 8192
    collection = SimpleNamespace(keys=[str(i) for i in range(N)], labels=None)
    plain = index_stage.space_needed(collection, 64, encoding=False)
    assert index_stage.space_needed(collection, 64, encoding=False, sublinear=SublinearSpec()) == plain + bound


def test_a_sublinear_index_is_added_to_an_existing_index_from_its_codes(built, tmp_path, capsys):
    """`pipeline.index --out DIR --sublinear ivf` alone: the faiss index is built from the codes
    already in DIR (no model, nothing encoded), the codes untouched; again with other lists, it
    replaces the first; a folder that is no index, or one whose codes changed, is refused in
    one line with nothing written."""
    out, packed = tmp_path / "idx", built[1]
    _write(out, packed)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    code, text = cli(index_stage, ["--out", str(out), "--sublinear", "ivf", "--nprobe", "8"], capsys)
    assert code == 0 and text.startswith(f"added a sub-linear index to {out} (20,000 codes, none encoded) in "), text
    assert "IndexBinaryIVF, nlist 32, nprobe 8: recall@10 " in text, text
    m = index_format.read_manifest(out)
    assert (
        m["sublinear"]["nlist"] == 32
        and m["sublinear"]["recall"] == index_format.read_manifest(built[0])["sublinear"]["recall"]
    )  # the same index as one built with the codes
    assert all((out / name).read_bytes() == data for name, data in before.items())
    index = index_format.load_index(out, verify=True)
    assert load_sublinear(out, index.manifest).nlist == 32

    code, text = cli(index_stage, ["--out", str(out), "--sublinear", "ivf", "--nlist", "16"], capsys)
    assert code == 0 and "nlist 16, nprobe 16" in text, text  # nprobe: at most the lists
    m = index_format.read_manifest(out)
    assert m["sublinear"]["nlist"] == 16 and load_sublinear(out, m).nlist == 16
    assert sorted(m["files"]) == sorted([*before, "sublinear.faiss"])

    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    code, text = cli(index_stage, ["--out", str(other), "--sublinear", "ivf"], capsys)
    assert code == 2 and text == (
        f"error: --out {other}: no index there to add a sub-linear index to (manifest.json not found); "
        "give --split or --images to build one\n"
    ), text
    assert sorted(p.name for p in other.iterdir()) == ["a.jpg"]
    codes = out / "codes.npy"
    data = codes.read_bytes()
    codes.write_bytes(data[:-8] + bytes(8))  # same size, other codes
    manifest = (out / "manifest.json").read_bytes()
    code, text = cli(index_stage, ["--out", str(out), "--sublinear", "ivf"], capsys)
    assert code == 2 and text == f"error: {codes}: sha256 does not match manifest.json (the file changed)\n", text
    assert (out / "manifest.json").read_bytes() == manifest
    code, text = cli(index_stage, ["--out", str(out)], capsys)
    assert code == 2 and "or --out DIR --sublinear ivf alone to add a sub-linear index to the index in DIR" in text


def test_probing_every_list_is_exact_and_the_recall_is_measured_against_the_scan(built):
    out, packed = built
    index = index_format.load_index(out)
    approx = load_sublinear(out, index.manifest)
    queries = packed[:50]
    exact = search_stage.search(index, queries, k=100)
    every = search_stage.search(index, queries, k=100, sublinear=approx, nprobe=32)
    assert all(np.array_equal(e.distances, a.distances) for e, a in zip(exact, every))
    few = search_stage.search(index, queries, k=100, sublinear=approx, nprobe=1)
    found = np.full((50, 100), -1)  # a list may hold fewer than k codes: -1, a miss
    for row, hit in zip(found, few):
        row[: len(hit.distances)] = hit.distances
        assert np.array_equal(np.lexsort((hit.rows, hit.distances)), np.arange(len(hit.rows)))  # as the exact search
    recall = distance_recall(np.stack([h.distances for h in exact]), found)
    assert 0 < recall.mean() < 1  # one list of 32 misses some


def test_search_uses_it_and_prints_the_recall_measured_at_build(built, capsys):
    out, _ = built
    recall = index_format.read_manifest(out)["sublinear"]["recall"]
    code, text = cli(search_stage, [str(out), "--key", "17", "-k", "5"], capsys)
    lines = text.splitlines()
    assert code == 0 and lines[1].split()[:4] == ["key", "17", "1", "17"], text  # itself first, at distance 0
    assert lines[-2] == (
        f"approximate (--exact scans every code): faiss {faiss.__version__} IndexBinaryIVF, nlist 32, nprobe 8: "
        f"recall@10 {recall['10']:.3f}, recall@100 {recall['100']:.3f}, measured at build on 1,000 of its own codes"
    ), text
    assert lines[-1].startswith(f"1 query, top 5 (approximate) of {N:,} items (64 bits): "), text
    code, text = cli(search_stage, [str(out), "--key", "17", "-k", "5", "--nprobe", "2"], capsys)
    assert code == 0 and "; this search probes 2" in text, text
    code, text = cli(search_stage, [str(out), "--key", "17", "-k", "5", "--exact"], capsys)
    assert code == 0 and "approximate" not in text, text


def _damage(index: Path, how: str) -> str:
    path = index / "sublinear.faiss"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-100])
        return f"{path}: {len(data) - 100:,} bytes, manifest.json says {len(data):,} (truncated or replaced"
    if how == "changed":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        return f"{path}: sha256 does not match manifest.json (the file changed; rebuild the index)"
    doc = json.loads((index / "manifest.json").read_text())
    if how == "no size in the manifest":
        del doc["files"]["sublinear.faiss"]["bytes"]
        (index / "manifest.json").write_text(json.dumps(doc))
        return f"{index / 'manifest.json'}: files.sublinear.faiss lacks its size or sha256"
    # a file the manifest agrees with that is no binary IVF of the codes: garbage, or another index
    if how == "garbage":
        path.write_bytes(b"IBxF" + bytes(4000))
        expected = f"{path}: not a faiss index ("
    else:
        flat = faiss.IndexBinaryFlat(64)
        flat.add(np.zeros((N, 8), np.uint8))
        path.write_bytes(faiss.serialize_index_binary(flat).tobytes())
        expected = f"{path}: not a binary IVF of the index's 20,000 codes"
    doc["files"]["sublinear.faiss"] = {"sha256": index_format.sha256_file(path), "bytes": path.stat().st_size}
    (index / "manifest.json").write_text(json.dumps(doc))
    return expected


@pytest.mark.parametrize("how", ["truncated", "changed", "no size in the manifest", "garbage", "another index"])
def test_a_damaged_faiss_file_is_one_line_naming_it(copy, capsys, how):
    expected = _damage(copy, how)
    code, text = cli(search_stage, [str(copy), "--key", "3"], capsys)
    assert code == 2 and len(text.splitlines()) == 1 and text.startswith(f"error: {expected}"), text


def test_without_faiss_both_commands_say_which_extra_installs_it(built, monkeypatch, capsys, tmp_path):
    out, _ = built
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    code, text = cli(search_stage, [str(out), "--key", "3"], capsys)
    assert (code, text) == (
        2,
        "error: searching the sub-linear index (or --exact) needs faiss, an optional dependency: "
        "pip install 'dpfah-pipeline[faiss]' (faiss-cpu)\n",
    )
    code, text = cli(search_stage, [str(out), "--key", "3", "--exact"], capsys)
    assert code == 0 and "approximate" not in text, text
    argv = ["--images", str(tmp_path), "--model", "models:/x/1", "--out", str(tmp_path / "o"), "--sublinear", "ivf"]
    code, text = cli(index_stage, argv, capsys)
    assert (code, text) == (
        2,
        "error: --sublinear needs faiss, an optional dependency: pip install 'dpfah-pipeline[faiss]' (faiss-cpu)\n",
    )
    code, text = cli(index_stage, argv[:-2] + ["--nlist", "8"], capsys)
    assert (code, text) == (2, "error: --nlist and --nprobe go with --sublinear ivf\n")


@pytest.mark.parametrize("flag", ["--nprobe", "--nlist"])
def test_a_zero_nprobe_or_nlist_is_refused_not_replaced_by_the_default(flag, tmp_path, capsys):
    """`--nprobe 0` was read as "not given" and became the default 32; now it is an error."""
    argv = ["--images", str(tmp_path), "--model", "models:/x/1", "--out", str(tmp_path / "o"), "--sublinear", "ivf"]
    code, text = cli(index_stage, [*argv, flag, "0"], capsys)
    assert (code, text) == (2, f"error: {flag} 0: must be >= 1\n")
    assert not (tmp_path / "o").exists()
