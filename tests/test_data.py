"""dpfah.data: the shard format, its writer, and the readers under ranks and workers."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dpfah.data import (
    FORMAT,
    MANIFEST_FILE,
    EvalStream,
    ShardError,
    ShardWriter,
    TrainStream,
    read_manifest,
    read_samples,
    shard_name,
    verify_shards,
)

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

UNEVEN = [7, 30, 3, 11, 1, 20]  # 72 samples in deliberately uneven shards
CLASSES = 5


def _png(value: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, value // 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _labels(i: int) -> np.ndarray:
    v = np.zeros(CLASSES, np.uint8)
    v[i % CLASSES] = 1
    v[(i * 7) % CLASSES] = 1  # multi-hot for some
    return v


def _make_split_with_tarfile(directory, split: str, counts: list[int], sizes=None) -> dict:
    """Shards written with the standard library's tarfile (an independent writer)."""
    shards, index = [], 0
    for n, count in enumerate(counts):
        name = shard_name(split, n)
        with tarfile.open(directory / name, "w") as tar:
            for _ in range(count):
                key = f"{1000 + index:07d}"
                npy = io.BytesIO()
                np.save(npy, _labels(index))
                size = sizes[index] if sizes else 4
                for ext, data in (
                    ("png", _png(index, size)),
                    ("labels.npy", npy.getvalue()),
                    ("index", str(index).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        shards.append({"file": name, "count": count, "sha256": "0" * 64})
    return {"count": index, "shards": shards}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    manifest = {
        "format": FORMAT,
        "dataset": "toy",
        "protocol": "toy",
        "seed": 0,
        "classes": [f"c{i}" for i in range(CLASSES)],
        "multi_label": True,
        "splits": {
            "train": _make_split_with_tarfile(d, "train", UNEVEN),
            "query": _make_split_with_tarfile(d, "query", [3, 1, 5]),
        },
    }
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    return d


def _collect(stream, workers: int) -> list:
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 3), (3, 0), (4, 2)])
def test_train_equal_batches_and_exact_epoch(uneven, world, workers):
    n, bs = sum(UNEVEN), 4
    used = []
    lengths = set()
    for rank in range(world):
        stream = TrainStream(uneven, bs, seed=3, rank=rank, world_size=world)
        batches = _collect(stream, workers)
        lengths.add((len(batches), len(stream)))
        assert all(b.labels.shape == (bs, CLASSES) and len(b.images) == bs for b in batches)
        for b in batches:
            for image, labels, index in zip(b.images, b.labels, b.index.tolist()):
                assert isinstance(image, bytes)
                assert torch.equal(labels, torch.from_numpy(_labels(index)))
        used.extend(i for b in batches for i in b.index.tolist())
    per_rank = n // (world * bs)
    assert lengths == {(per_rank, per_rank)}, "every rank gets the same number of batches"
    assert len(used) == len(set(used)) == world * per_rank * bs, "no sample twice in one epoch"


def test_train_ranks_from_environment(uneven, monkeypatch):
    counts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        stream = TrainStream(uneven, 5)
        assert (stream.rank, stream.world_size) == (rank, 3)
        counts.append(len(_collect(stream, 2)))
    assert counts == [sum(UNEVEN) // 15] * 3


def test_train_epochs_are_seeded(uneven):
    def order(seed, epoch):
        s = TrainStream(uneven, 8, seed=seed)
        s.set_epoch(epoch)
        return [i for b in s for i in b.index.tolist()]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_train_without_drop_last_covers_everything(uneven):
    n = sum(UNEVEN)
    used = []
    for rank in range(2):
        stream = TrainStream(uneven, 5, drop_last=False, rank=rank, world_size=2)
        batches = _collect(stream, 3)
        assert len(batches) == len(stream) == -(-n // 10)
        assert all(len(b.index) == 5 for b in batches)
        used += [i for b in batches for i in b.index.tolist()]
    assert set(used) == set(range(n))


def test_train_rejects_too_small_split(uneven):
    with pytest.raises(ShardError, match="fewer than one batch"):
        TrainStream(uneven, 40, world_size=2, rank=0)


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 3), (2, 2), (3, 0), (3, 3), (5, 2)])
def test_eval_exactly_once(uneven, world, workers):
    n = sum(UNEVEN)
    seen = []
    total = 0
    for rank in range(world):
        stream = EvalStream(uneven, "train", batch_size=4, rank=rank, world_size=world)
        total += stream.num_samples
        for b in _collect(stream, workers):
            for labels, index in zip(b.labels, b.index.tolist()):
                assert torch.equal(labels, torch.from_numpy(_labels(index)))
                seen.append(index)
    assert total == n
    assert sorted(seen) == list(range(n)), "every sample exactly once"


def test_eval_order_and_decode(uneven):
    batches = list(EvalStream(uneven, "query", batch_size=2, decode=True))
    index = torch.cat([b.index for b in batches])
    assert index.tolist() == list(range(9)), "one process reads the stored order"
    images = torch.cat([b.images for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (9, 3, 4, 4)
    assert images[:, 0, 0, 0].tolist() == list(range(9))  # the pixel encodes the index


def test_read_samples_picks_single_samples_across_uneven_shards(uneven):
    """The few images a figure needs, by index, without reading whole splits: the same bytes
    the evaluation stream yields for those indices."""
    manifest = read_manifest(uneven)
    everything = {}
    for batch in EvalStream(uneven, "train", batch_size=16):
        everything.update(zip(batch.index.tolist(), batch.images))
    wanted = [0, 6, 7, 36, 37, 71, 40, 40]  # both ends of shards, the last sample, a repeat, unsorted
    got = read_samples(manifest, "train", wanted)
    assert sorted(got) == sorted(set(wanted))
    assert all(got[i] == everything[i] for i in got)
    assert read_samples(manifest, "query", []) == {}
    with pytest.raises(ShardError, match="has no sample 72"):
        read_samples(manifest, "train", [3, 72])


def test_eval_decode_needs_one_size(tmp_path):
    split = _make_split_with_tarfile(tmp_path, "query", [3], sizes=[4, 4, 6])
    manifest = {
        "format": FORMAT,
        "dataset": "x",
        "protocol": "x",
        "seed": 0,
        "classes": ["a"] * CLASSES,
        "multi_label": True,
        "splits": {"query": split},
    }
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="one size"):
        list(EvalStream(tmp_path, "query", batch_size=3, decode=True))
    assert len(list(EvalStream(tmp_path, "query", batch_size=3))[0].images) == 3


def test_missing_split_and_manifest(uneven, tmp_path):
    with pytest.raises(ShardError, match="no split 'database'"):
        EvalStream(uneven, "database")
    with pytest.raises(ShardError, match="not found"):
        read_manifest(tmp_path)


# ----------------------------------------------------------------------------- writer


def _write(directory, shard_size=4):
    with ShardWriter(directory, "database", shard_size) as w:
        for i in range(10):
            assert w.write(f"{i:07d}", _png(i), "png", _labels(i)) == i
        return w.close()


def test_writer_is_reproducible_and_fixed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    info_a, info_b = _write(a), _write(b)
    assert [s.count for s in info_a.shards] == [4, 4, 2]
    assert info_a == info_b
    for s in info_a.shards:
        assert (a / s.file).read_bytes() == (b / s.file).read_bytes()
    with tarfile.open(a / info_a.shards[0].file) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["0000000.png", "0000000.labels.npy", "0000000.index"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_writer_output_reads_back_with_webdataset_and_readers(tmp_path):
    wds = pytest.importorskip("webdataset")
    info = _write(tmp_path, shard_size=3)
    manifest = {
        "format": FORMAT,
        "dataset": "x",
        "protocol": "x",
        "seed": 0,
        "classes": [str(c) for c in range(CLASSES)],
        "multi_label": True,
        "splits": {"database": {"count": info.count, "shards": [vars(s) for s in info.shards]}},
    }
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    verify_shards(tmp_path)
    urls = [str(tmp_path / s.file) for s in info.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode())
    assert [s["index"] for s in samples] == list(range(10))
    assert all(np.array_equal(s["labels.npy"], _labels(s["index"])) for s in samples)
    assert [s["__key__"] for s in samples] == [f"{i:07d}" for i in range(10)]
    ours = list(EvalStream(tmp_path, "database", batch_size=10))[0]
    assert ours.images == [s["png"] for s in samples]

    (tmp_path / info.shards[1].file).write_bytes(b"x" * 512)
    with pytest.raises(ShardError, match="sha256"):
        verify_shards(tmp_path)


def test_writer_rejects_dotted_keys(tmp_path):
    with ShardWriter(tmp_path, "train", 2) as w, pytest.raises(ValueError, match="no dots"):
        w.write("a.b", b"x", "png", _labels(0))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_reads_other_writers(tmp_path, fmt):
    from dpfah.data import tar_members

    long = "d" * 60 + "/" + "n" * 80 + ".png"  # needs a pax/GNU long name (or a ustar prefix)
    files = [("a/one.png", b"1" * 700), (long, b"2" * 3), ("b/three.index", b"")]
    with tarfile.open(tmp_path / "x.tar", "w", format=fmt) as tar:
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(tmp_path / "x.tar", "rb") as f:
        got = [(name, read()) for name, _, read in tar_members(f, "x.tar")]
    assert got == files
    with open(tmp_path / "x.tar", "rb") as f:  # unread data is skipped
        assert [name for name, _, _ in tar_members(f, "x.tar")] == [n for n, _ in files]


def test_dpfah_never_imports_the_pipeline_stack():
    import ast
    from pathlib import Path

    import dpfah

    for path in Path(dpfah.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for name in names:
                assert name.split(".")[0] not in ("pipeline", "ray", "mlflow", "dvc"), f"{path.name} imports {name}"
