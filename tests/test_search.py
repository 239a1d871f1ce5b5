"""pipeline.search on hostile input (issue 28): a query that is not a regular file or is too
large, and a corrupt index, each end in one line and exit 2, never a hang or a traceback.
And what it prints and draws (issue 29): the total time, the grid's captions in full."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import index_format
from pipeline import search as search_stage
from pipeline.search_grid import CAPTION_CHARS, caption_lines, grid_rows
from tests.helpers import cli

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird"]


@pytest.fixture
def small_index(tmp_path) -> Path:
    """An index of 40 items (keys 0..39, 16 bits, 3 classes) written by the index's writer."""
    rng = np.random.default_rng(0)
    n = 40
    labels = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, n)]
    collection = SimpleNamespace(
        keys=[str(i) for i in range(n)],
        paths=[f"class/{i:04d}.png" for i in range(n)],
        labels=labels,
        classes=CLASSES,
        identity={"type": "split", "dataset": "toy", "split": "database"},
    )
    resolved = SimpleNamespace(bits=16, describe=lambda: {"uri": "models:/x/1", "run_id": "r", "bits": 16})
    packed = rng.integers(0, 2**16, (n, 1)).astype(np.uint64)
    out = tmp_path / "idx"
    plan = {"block_size": 16, "precision": "fp32"}
    index_format.write_index(out, packed, np.arange(n), collection, resolved, [], plan, "cpu", "fp32", "encoded")
    return out


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m pipeline.search ARGV`` in a process of its own, killed after ``timeout``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.search", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_fifo_or_a_device_as_a_query_is_refused_at_once(small_index, tmp_path):
    """A FIFO with no writer (opening it for reading used to block for good) and /dev/zero
    (read without end): refused in one line, exit 2, within the timeout."""
    fifo = tmp_path / "query.jpg"
    os.mkfifo(fifo)
    done = _run(str(small_index), str(fifo), "-k", "3")
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == f"error: {fifo}: a FIFO, not an image file (only regular files are read)\n"
    done = _run(str(small_index), "/dev/zero")
    assert (done.returncode, done.stderr) == (
        2,
        "error: /dev/zero: a character device, not an image file (only regular files are read)\n",
    ), done
    done = _run(str(small_index), str(tmp_path))
    assert (
        done.returncode == 2
        and done.stderr == f"error: {tmp_path}: a folder, not an image file (only regular files are read)\n"
    )


def test_a_query_file_over_the_cap_is_refused_before_it_is_read(small_index, tmp_path, capsys):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    code, text = cli(search_stage, [str(small_index), str(big), "--max-query-bytes", "1000"], capsys)
    assert (code, text) == (2, f"error: {big}: 2,048 bytes, over the cap of 1,000\n")
    assert search_stage.MAX_QUERY_BYTES == 64 * 2**20  # the documented default
    assert "--max-query-bytes" in search_stage.build_parser().format_help()


def _corrupt(index: Path, how: str) -> str:
    """Damage the index ``how``; the file the error must name."""
    codes, keys, manifest = index / "codes.npy", index / "keys.parquet", index / "manifest.json"
    if how == "codes truncated":
        codes.write_bytes(codes.read_bytes()[:-40])
        return f"{codes}: 408 bytes, manifest.json says 448 (truncated or replaced"
    if how == "codes empty":
        codes.write_bytes(b"")
        return f"{codes}: 0 bytes, manifest.json says 448"
    if how == "keys truncated":
        keys.write_bytes(keys.read_bytes()[:100])
        return f"{keys}: 100 bytes, manifest.json says"
    if how == "labels missing":
        (index / "labels.npy").unlink()
        return f"{index / 'labels.npy'}: No such file or directory (the index lists it in manifest.json)"
    doc = json.loads(manifest.read_text())
    if how == "no count":
        del doc["count"]
        manifest.write_text(json.dumps(doc))
        return f"{manifest}: count is missing, expected a count"
    if how == "count wrong":  # sizes agree with the manifest, the shapes do not
        doc["count"] = 41
        manifest.write_text(json.dumps(doc))
        return f"{codes}: uint64 (40, 1), manifest.json says uint64 (41, 1)"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["codes truncated", "codes empty", "keys truncated", "labels missing", "no count", "count wrong"]
)
def test_a_corrupt_index_is_one_line_naming_the_file(small_index, capsys, how):
    code, text = cli(search_stage, [str(small_index), "--key", "3"], capsys)
    assert code == 0, text
    expected = _corrupt(small_index, how)
    code, text = cli(search_stage, [str(small_index), "--key", "3"], capsys)
    assert code == 2 and len(text.splitlines()) == 1 and text.startswith(f"error: {expected}"), text


def test_verify_checks_the_checksums_a_same_size_change_passes_the_load(small_index, capsys):
    codes = small_index / "codes.npy"
    data = bytearray(codes.read_bytes())
    data[-1] ^= 1  # one bit of the last code: same size, same shape
    codes.write_bytes(bytes(data))
    code, _ = cli(search_stage, [str(small_index), "--key", "3"], capsys)
    assert code == 0  # sizes only on every load
    code, text = cli(search_stage, [str(small_index), "--key", "3", "--verify"], capsys)
    assert (code, text) == (2, f"error: {codes}: sha256 does not match manifest.json (the file changed)\n")


def test_the_last_line_gives_the_time_in_all_and_its_parts(small_index, capsys):
    code, text = cli(search_stage, [str(small_index), "--key", "3", "--key", "7", "-k", "2"], capsys)
    last = text.splitlines()[-1]
    assert code == 0 and last.startswith("2 queries, top 2 of 40 items (16 bits): "), text
    assert " in all since main started (imports in " in last and ", index loaded in " in last, last
    assert ", searched in " in last, last
    done = _run(str(small_index), "--key", "3")  # as a command: from the process's start, imports counted
    assert done.returncode == 0 and " in all since the process started (imports in " in done.stdout, done


def test_grid_captions_fit_their_cell_and_say_the_class(small_index):
    long_path = "/data/a-rather-long-folder-name-for-holiday-photos/2026-summer/IMG_20260712_somewhere.png"
    assert caption_lines(long_path, 3) == ["\u2026/2026-summer/", "IMG_20260712_some", "where.png"]
    assert caption_lines("holidays/img_0001.jpg", 3) == ["holidays/", "img_0001.jpg"]
    assert caption_lines("key 1234", 3) == ["key 1234"]
    index = index_format.load_index(small_index)
    rows = index.rows_of(["3"])
    hits = search_stage.search(index, np.asarray(index.codes[rows]), k=3)
    image = np.zeros((4, 4, 3), np.uint8)
    import io

    from PIL import Image

    from pipeline.figures import thumbnail  # noqa: F401  (grid_rows thumbnails the query bytes)

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    queries = [(long_path, buf.getvalue(), None), ("key 3", buf.getvalue(), np.asarray(index.labels[rows[0]]))]
    got = grid_rows(index, queries, hits * 2, {int(r): image for r in hits[0].rows})
    cls = CLASSES[int(np.flatnonzero(index.labels[rows[0]])[0])]
    assert got[0]["name"] == "\u2026/2026-summer/\nIMG_20260712_some\nwhere.png"
    assert got[1]["name"] == f"key 3\n{cls}"
    for row in got:  # every result of an image query too: its key and class
        for (_, ok, _d, caption), r in zip(row["results"], hits[0].rows):
            want = CLASSES[int(np.flatnonzero(index.labels[r])[0])]
            assert caption == f"{index.key(r)}\n{want}" and (ok is None) == (row is got[0])
        assert all(len(line) <= CAPTION_CHARS for line in row["name"].splitlines())


def test_a_few_keys_and_many_keys_find_the_same_rows():
    """rows_of looks a few keys up by one pass over the column (index_in hashed the whole column
    on every call: 2.1 s of a --key search at 10M items) and many keys by index_in; both give
    the first row of a repeated key and name an unknown one."""
    import pyarrow as pa

    from pipeline.errors import DataError

    column = [f"img/{i:05d}.jpg" for i in range(1000)] + ["img/00007.jpg"]  # a repeated key: row 7 first
    index = SimpleNamespace(keys=pa.array(column, pa.string()), directory="IDX")
    few = ["img/00999.jpg", "img/00007.jpg", "img/00000.jpg"]
    many = [f"img/{i:05d}.jpg" for i in range(999, -1, -1)] + ["img/00007.jpg"]
    assert index_format.Index.rows_of(index, few).tolist() == [999, 7, 0]
    assert index_format.Index.rows_of(index, many).tolist() == list(range(999, -1, -1)) + [7]
    for keys in (["img/00001.jpg", "nope.jpg"], [*many, "nope.jpg"]):
        with pytest.raises(DataError, match=r"IDX: no item with key 'nope.jpg' \(1 unknown key\(s\)\)"):
            index_format.Index.rows_of(index, keys)
