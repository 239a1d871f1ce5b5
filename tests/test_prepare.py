"""pipeline.prepare: sources, protocols, bad input, reproducible shards, the CLI and DVC stage."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dpfah.data import EvalStream, read_manifest, verify_shards
from dpfah.model import DPFAH
from dpfah.train import fit
from pipeline import prepare as prepare_module
from pipeline.config import load_params
from pipeline.errors import ConfigError, DataError, run_main
from pipeline.prepare import main, prepare
from pipeline.runkey import RunKey
from pipeline.sources import Cifar10ArchiveSource, download, open_source
from tests.helpers import PARAMS_FILE, fake_training_run

REPO = Path(__file__).resolve().parents[1]

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PROTOCOLS = REPO / "pipeline" / "protocols"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run(tmp_path: Path, name: str, *overrides: str):
    params = load_params(PARAMS, [f"data.root={tmp_path / 'data'}", *overrides])
    return prepare(params, name, progress=False)


def table(directory: Path) -> list[dict]:
    return pq.read_table(directory / "splits.parquet").to_pylist()


def files_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def jpeg(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- CIFAR-10 python archive


def make_cifar_archive(path: Path, per_class: int, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A CIFAR-10 python archive in the official layout (cifar-10-batches-py/...)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    # smooth images with a little noise: realistic to compress, quick to encode as PNG
    colour = rng.integers(0, 200, (labels.size, 3, 1, 1), dtype=np.uint8)
    ramp = np.arange(32, dtype=np.uint8)[None, None, :, None] + np.arange(32, dtype=np.uint8)[None, None, None, :]
    noise = (rng.random((labels.size, 3, 32, 32)) < 0.02).astype(np.uint8)
    data = (colour + ramp + noise).reshape(labels.size, 3072)
    cuts = np.array_split(np.arange(labels.size), 6)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        members = {
            "batches.meta": {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": len(cuts[0])}
        }
        for name, rows in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], cuts):
            batches[name] = (data[rows], labels[rows].tolist())
            members[name] = {
                b"batch_label": name.encode(),
                b"labels": labels[rows].tolist(),
                b"data": data[rows],
                b"filenames": [b"x.png"] * rows.size,
            }
        for name, obj in members.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


def test_official_archive_reader(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    batches = make_cifar_archive(path, per_class=3)
    source = open_source(str(path), allow_cifar10=True)
    assert isinstance(source, Cifar10ArchiveSource)
    assert source.classes == CIFAR_CLASSES
    refs = source.refs()
    assert len(refs) == 30 and refs == sorted(refs)
    for ref in refs[::7]:
        batch, row = ref.split("[")
        row = int(row.rstrip("]"))
        pixels = np.asarray(Image.open(io.BytesIO(source.read(ref))))
        assert source.ext(ref) == "png"
        assert np.array_equal(pixels, batches[batch][0][row].reshape(3, 32, 32).transpose(1, 2, 0)), "lossless"
        assert source.label(ref) == batches[batch][1][row]
    assert source.identity["md5"] == hashlib.md5(path.read_bytes()).hexdigest()


def test_archive_with_foreign_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.tar.gz"
    make_cifar_archive(path, per_class=1)
    with tarfile.open(path, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    # builtins.print named by hand: pickle.dumps(print) names whatever `print` is now (a
    # session that imported Ray's tqdm_ray has its safe_print there)
    members["cifar-10-batches-py/test_batch"] = b"\x80\x02cbuiltins\nprint\nq\x00."
    assert pickle.loads(members["cifar-10-batches-py/test_batch"]) is __import__("builtins").print
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR-10 python batch .*builtins.print is not allowed"):
        open_source(str(path), allow_cifar10=True)


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    make_cifar_archive(path, per_class=620)  # the protocol needs 600 per class
    return path


def check_cifar_protocol(directory: Path, total: int, database: int):
    m = json.loads((directory / "manifest.json").read_text())
    counts = {s: m["splits"][s]["count"] for s in m["splits"]}
    assert counts == {"train": 4500, "validation": 500, "query": 1000, "database": database}
    assert m["classes"] == CIFAR_CLASSES and m["multi_label"] is False
    assert m["splits"]["query"]["class_counts"] == [100] * 10
    train_val = np.add(m["splits"]["train"]["class_counts"], m["splits"]["validation"]["class_counts"])
    assert train_val.tolist() == [500] * 10
    assert m["splits"]["validation"]["class_counts"] == [50] * 10
    rows = table(directory)
    keys = {s: {r["key"] for r in rows if r["split"] == s} for s in counts}
    assert not keys["query"] & (keys["database"] | keys["train"] | keys["validation"])
    assert len(keys["query"] | keys["database"]) == total - (0 if database == total - 1000 else 5000)
    for s in counts:  # stored order: index 0..n-1, not sorted by class or key
        idx = [r["index"] for r in rows if r["split"] == s]
        assert idx == list(range(counts[s]))
        split_keys = [r["key"] for r in rows if r["split"] == s]
        assert split_keys != sorted(split_keys)
    return m, keys


def test_cifar10_archive_protocols(tmp_path, cifar_archive):
    src = f"datasets.cifar10.source={cifar_archive}"
    a = run(tmp_path / "a", "cifar10", src, "datasets.cifar10.shard_size=2000")
    m, keys = check_cifar_protocol(a.directory, 6200, 5200)
    assert (keys["train"] | keys["validation"]) <= keys["database"], "59k: training images are in the database"
    assert m["overlap"]["train_in_database"] == 4500 and m["overlap"]["query_in_database"] == 0
    assert m["source"]["md5"] == hashlib.md5(cifar_archive.read_bytes()).hexdigest()
    assert [s["count"] for s in m["splits"]["database"]["shards"]] == [2000, 2000, 1200]
    assert a.images_written == 11200
    verify_shards(a.directory)

    c = run(tmp_path / "c", "cifar10", src, "datasets.cifar10.protocol=cifar10-54k", "seed=1")
    m54, keys54 = check_cifar_protocol(c.directory, 6200, 200)
    assert not (keys54["train"] | keys54["validation"]) & keys54["database"]
    assert keys54["query"] != keys["query"], "another seed draws other queries"
    assert m54["protocol"] == "cifar10-54k" and m54["seed"] == 1


def test_cifar10_download_by_url_checks_md5(tmp_path, cifar_archive, monkeypatch):
    monkeypatch.delenv("DPFAH_CIFAR10_SOURCE", raising=False)  # a local copy would stand in for the download
    url = cifar_archive.as_uri()
    md5 = hashlib.md5(cifar_archive.read_bytes()).hexdigest()
    got = download(url, tmp_path / "downloads", md5)
    assert got.read_bytes() == cifar_archive.read_bytes()
    assert download(url, tmp_path / "downloads", md5) == got  # kept, not fetched again
    with pytest.raises(DataError, match=r"md5 [0-9a-f]{32} does not match the expected 0{32}"):
        download(url, tmp_path / "other", "0" * 32)
    assert not list((tmp_path / "other").iterdir()), "no partial download left"
    r = run(
        tmp_path,
        "cifar10",
        f"datasets.cifar10.source={url}",
        f"datasets.cifar10.md5={md5}",
        "datasets.cifar10.validation=0",
    )
    assert r.manifest["source"]["url"] == url and "path" not in r.manifest["source"]
    assert r.manifest["splits"]["validation"]["count"] == 0 and r.manifest["splits"]["train"]["count"] == 5000
    assert list(EvalStream(r.directory, "validation")) == []
    assert (tmp_path / "data" / "downloads" / cifar_archive.name).exists()


# ----------------------------------------------------------------------------- real CIFAR-10


def test_real_cifar10(tmp_path, cifar10_source, cifar10_prepared):
    source = cifar10_source
    _, a = cifar10_prepared  # prepared once per test run; a second prepare must equal it byte for byte
    m, keys = check_cifar_protocol(a.directory, 60000, 59000)
    assert (keys["train"] | keys["validation"]) <= keys["database"]
    assert m["skipped"]["count"] == 0
    query = list(EvalStream(a.directory, "query", batch_size=1000, decode=True))
    assert query[0].images.shape == (1000, 3, 32, 32)
    b = run(tmp_path / "b", "cifar10", f"datasets.cifar10.source={source}")
    assert [s["sha256"] for s in b.manifest["splits"]["database"]["shards"]] == [
        s["sha256"] for s in m["splits"]["database"]["shards"]
    ]
    assert files_digest(a.directory) == files_digest(b.directory)


# ----------------------------------------------------------------------------- image folders


def make_folder(root: Path, classes=("ant", "bee", "cow"), per_class=12, ext="jpg") -> list[str]:
    refs = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            path = root / name / f"{i:03d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(c * 1000 + i))
            refs.append(f"{name}/{i:03d}.{ext}")
    return refs


def custom(name: str, images: Path, *extra: str) -> list[str]:
    return [
        f"datasets.{name}.kind=custom",
        f"datasets.{name}.images={images}",
        f"datasets.{name}.query_per_class=2",
        f"datasets.{name}.train_per_class=4",
        f"datasets.{name}.validation=3",
        f"datasets.{name}.shard_size=5",
        *extra,
    ]


def test_custom_image_folder_and_bad_images(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    good = jpeg(99, size=64)
    (root / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cow" / "junk.jpg").write_bytes(b"not an image")
    (root / "cow" / "notes.txt").write_text("ignored: not an image file")

    with pytest.raises(DataError) as e:
        run(tmp_path, "toy", *custom("toy", root))
    assert str(root / "bee" / "truncated.jpg") in str(e.value) and "on_bad_image: skip" in str(e.value)
    assert not (tmp_path / "data" / "shards" / "toy").exists()
    shards = tmp_path / "data" / "shards"
    assert not shards.exists() or os.listdir(shards) == [], "a failed run leaves nothing behind"

    r = run(
        tmp_path,
        "toy",
        *custom("toy", root, "datasets.toy.on_bad_image=skip", "datasets.toy.database_includes_train=false"),
    )
    m = r.manifest
    assert m["skipped"]["count"] == 2
    assert [i["where"] for i in m["skipped"]["items"]] == [
        str(root / "bee" / "truncated.jpg"),
        str(root / "cow" / "junk.jpg"),
    ]
    assert m["classes"] == ["ant", "bee", "cow"]
    counts = {s: m["splits"][s]["count"] for s in m["splits"]}
    assert counts == {"train": 9, "validation": 3, "query": 6, "database": 36 - 6 - 12}
    assert m["splits"]["validation"]["class_counts"] == [1, 1, 1]
    assert [s["count"] for s in m["splits"]["database"]["shards"]] == [5, 5, 5, 3]
    rows = table(r.directory)
    by_split = {s: [row["path"] for row in rows if row["split"] == s] for s in counts}
    assert not set(by_split["database"]) & set(by_split["train"] + by_split["validation"] + by_split["query"])
    for row in rows:  # the stored bytes are the file's bytes
        assert row["labels"] == [int(row["path"].startswith(c)) for c in ("ant", "bee", "cow")]
    got = list(EvalStream(r.directory, "query", batch_size=10))[0]
    paths = {row["index"]: row["path"] for row in rows if row["split"] == "query"}
    assert [(root / paths[i]).read_bytes() for i in got.index.tolist()] == got.images

    again = run(
        tmp_path / "again",
        "toy",
        *custom("toy", root, "datasets.toy.on_bad_image=skip", "datasets.toy.database_includes_train=false"),
    )
    assert files_digest(again.directory) == files_digest(r.directory), "same inputs and seed: byte-identical"


def test_custom_tar_folder_and_too_few_images(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=5)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    r = run(tmp_path, "toy", *custom("toy", archive, "datasets.toy.train_per_class=3"))
    assert {s: v["count"] for s, v in r.manifest["splits"].items()} == {
        "train": 6,
        "validation": 3,
        "query": 6,
        "database": 9,
    }
    assert r.manifest["source"]["type"] == "tar"
    with pytest.raises(
        DataError, match=r"datasets.toy: class 'ant' has 3 usable images left for training, fewer than 4"
    ):
        run(tmp_path, "toy", *custom("toy", archive))


# ----------------------------------------------------------------------------- image formats

SIDE = 16  # images are SIDE x SIDE, so the training decoder leaves them at their size


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey: (h, w); RGB: (h, w, 3)), written by hand: PIL writes no 16-bit colour."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def image_variants(seed: int) -> dict[str, tuple[bytes, np.ndarray | None, bool]]:
    """file name -> (file bytes, expected RGB pixels or None for PIL's convert("RGB"), lossless)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(2)]
    grey16 = rng.integers(0, 1 << 16, (SIDE, SIDE), dtype=np.uint16)
    rgb16 = rng.integers(0, 1 << 16, (SIDE, SIDE, 3), dtype=np.uint16)

    def enc(im, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    return {
        "rgb.jpg": (enc(rgb, "JPEG"), None, False),
        "grey.jpg": (enc(rgb.convert("L"), "JPEG"), None, False),
        "cmyk.jpg": (enc(rgb.convert("CMYK"), "JPEG"), None, False),
        "rgb.bmp": (enc(rgb, "BMP"), None, True),
        "rgb.tif": (enc(rgb, "TIFF"), None, True),
        "grey.png": (enc(rgb.convert("L"), "PNG"), None, True),
        "alpha.png": (enc(alpha, "PNG"), None, True),
        "palette.png": (enc(palette, "PNG"), None, True),
        "palette-transparent.png": (enc(palette, "PNG", transparency=3), None, True),
        "transparent.gif": (enc(palette, "GIF", transparency=3), None, True),
        "animated.webp": (enc(frames[0], "WEBP", lossless=True, save_all=True, append_images=frames[1:]), None, True),
        # PIL clips 16-bit grey to white; the stored image keeps the high byte, as PIL does for 16-bit colour
        "grey16.png": (png16(grey16), np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2), True),
        "rgb16.png": (png16(rgb16), (rgb16 >> 8).astype(np.uint8), True),
    }


CONVERTED = {"cmyk.jpg", "rgb.bmp", "rgb.tif", "transparent.gif", "animated.webp", "grey16.png", "rgb16.png"}


def test_what_prepare_stores_the_training_decoder_reads_as_pil_does(tmp_path):
    """Every image format prepare accepts decodes, under the decoder of training and
    evaluation (torchvision via dpfah.augment.decode_batch), to PIL's RGB pixels of the
    original: formats it cannot read or reads wrongly are stored as 8-bit RGB PNG."""
    from torch.utils.data import DataLoader

    from dpfah.augment import DeviceAugment, decode_batch
    from dpfah.train import encode

    root = tmp_path / "imgs"
    expected: dict[str, tuple[np.ndarray, bool]] = {}
    for c, cls in enumerate(("ant", "bee", "cow")):
        (root / cls).mkdir(parents=True)
        for name, (data, pixels, lossless) in image_variants(c).items():
            (root / cls / name).write_bytes(data)
            if pixels is None:
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            expected[f"{cls}/{name}"] = (pixels, lossless)
    assert (
        Image.open(root / "ant" / "grey16.png").mode == "I;16" and Image.open(root / "ant" / "cmyk.jpg").mode == "CMYK"
    )

    argv = ["--dataset", "toy", "--params", str(PARAMS), "--quiet", "--set", f"data.root={tmp_path / 'data'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", *argv, *[x for o in custom("toy", root) for x in ("--set", o)]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "toy (custom, seed 0): train 9, validation 3, query 6, database 33, "
        "21 stored converted to PNG (see manifest) -> "
    )
    r = run(tmp_path / "again", "toy", *custom("toy", root))
    assert files_digest(r.directory) == files_digest(tmp_path / "data" / "shards" / "toy"), (
        "conversions are reproducible"
    )
    converted = r.manifest["converted"]
    assert converted["count"] == 3 * len(CONVERTED)
    assert {Path(i["where"]).name for i in converted["items"]} == CONVERTED
    reasons = {Path(i["where"]).name: i["reason"] for i in converted["items"]}
    assert reasons["rgb.bmp"] == "BMP image: the training decoder (torchvision) reads only JPEG, PNG, WebP and GIF"
    assert reasons["grey16.png"].startswith("16-bit PNG: the training decoder reads 16-bit samples as white")
    assert reasons["cmyk.jpg"].startswith("CMYK JPEG: stored as RGB")
    rows = {(row["split"], row["index"]): row["path"] for row in table(r.directory)}

    def check(split: str, index: int, got: np.ndarray, how: str) -> None:
        path = rows[(split, index)]
        want, lossless = expected[path]
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        # JPEG: the same libjpeg-turbo decodes both today (0); a different build may round differently
        assert diff == 0 if lossless else diff <= 2, (
            f"{path} ({split} {index}) under {how}: max pixel difference {diff}"
        )

    seen = set()
    for split in ("train", "validation", "query", "database"):
        for batch in EvalStream(r.directory, split, batch_size=7):
            decoded = decode_batch(batch.images, SIDE)  # what training and evaluate run on the CPU
            for k, index in enumerate(batch.index.tolist()):
                check(split, index, decoded[k].permute(1, 2, 0).numpy(), "decode_batch")
                seen.add(rows[(split, index)])
        for batch in EvalStream(r.directory, split, batch_size=7, decode=True):  # the readers' own decoder (PIL)
            for k, index in enumerate(batch.index.tolist()):
                check(split, index, batch.images[k].permute(1, 2, 0).numpy(), "EvalStream(decode=True)")
    assert seen == set(expected), "every image was stored"

    class Recorder(torch.nn.Module):
        """Stands in for the model in evaluate's encoding; keeps the images it is shown."""

        bits, num_classes = 8, 3

        def __init__(self):
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, x):
            self.seen.append(x)
            return torch.ones(x.shape[0], self.bits), None

    aug = DeviceAugment()
    for split in ("query", "database"):  # as pipeline.evaluate encodes a split: EvalStream -> DataLoader -> encode
        model = Recorder()
        loader = DataLoader(
            EvalStream(r.directory, split, batch_size=5, rank=0, world_size=1), batch_size=None, num_workers=1
        )
        batches = list(loader)
        encode(model, batches, torch.device("cpu"), SIDE, "fp32")
        for batch, x in zip(batches, model.seen):
            pixels = (x * aug.std + aug.mean).round().clamp(0, 255).to(torch.uint8)
            for k, index in enumerate(batch.index.tolist()):
                check(split, index, pixels[k].permute(1, 2, 0).numpy(), "evaluate's encoding")


def test_images_without_an_8bit_form_are_refused_by_name(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=8)
    floats = root / "bee" / "depth.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(floats)
    with pytest.raises(DataError) as e:
        run(tmp_path, "toy", *custom("toy", root))
    assert str(e.value) == (
        f"{floats}: TIFF image of 32-bit float pixels (mode F): no 8-bit RGB form; save it as 8-bit "
        "(datasets.toy.on_bad_image: skip leaves such items out)"
    )
    r = run(tmp_path, "toy", *custom("toy", root, "datasets.toy.on_bad_image=skip"))
    assert [i["where"] for i in r.manifest["skipped"]["items"]] == [str(floats)]
    assert "converted" not in r.manifest, "nothing converted: the manifest is what it was before conversions existed"


# ----------------------------------------------------------------------------- list files


def read_lines(path: Path, classes=None) -> list[tuple[str, list[int]]]:
    """(path, label vector) of each line; with ``classes``, only single-label lines of those."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt") as f:
        for line in f:
            t = line.split()
            if t and (classes is None or t.index("1") - 1 in classes):
                out.append((t[0], [int(v) for v in t[1:]]))
    return out


def write_list(path: Path, entries, gz: bool = False) -> Path:
    text = "".join(f"{p} {' '.join(map(str, v))}\n" for p, v in entries)
    path.write_bytes(gzip.compress(text.encode(), mtime=0) if gz else text.encode())
    return path


def stand_in_images(root: Path, paths) -> None:
    for i, p in enumerate(sorted(set(paths))):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(jpeg(i))


def lists(name: str, images: Path, **paths: Path) -> list[str]:
    return [f"datasets.{name}.images={images}"] + [f"datasets.{name}.{k}={v}" for k, v in paths.items()]


@pytest.fixture(scope="module")
def imagenet_subset(tmp_path_factory):
    """The shipped ImageNet-100 lists restricted to three classes, with stand-in images."""
    d = tmp_path_factory.mktemp("imagenet")
    keep = (0, 1, 2)
    train = read_lines(PROTOCOLS / "imagenet100" / "train.txt.gz", keep)
    query = read_lines(PROTOCOLS / "imagenet100" / "query.txt.gz", keep)
    train_paths = {p for p, _ in train}
    extra = {c: 0 for c in keep}
    database = []
    for p, v in read_lines(PROTOCOLS / "imagenet100" / "database.txt.gz", keep):
        if p in train_paths or extra[v.index(1)] < 20:
            extra[v.index(1)] += p not in train_paths
            database.append((p, v))
    stand_in_images(d / "images", [p for p, _ in train + query + database])
    files = {
        "train_list": write_list(d / "train.txt", train),
        "query_list": write_list(d / "query.txt", query),
        "database_list": write_list(d / "database.txt.gz", database, gz=True),
    }
    return d, files, {"train": train, "query": query, "database": database}


def test_imagenet100_lists(tmp_path, imagenet_subset):
    d, files, entries = imagenet_subset
    assert (len(entries["train"]), len(entries["query"]), len(entries["database"])) == (390, 150, 450)
    r = run(
        tmp_path,
        "imagenet100",
        *lists("imagenet100", d / "images", **files),
        "datasets.imagenet100.validation=30",
        "datasets.imagenet100.shard_size=100",
    )
    m = r.manifest
    counts = {s: m["splits"][s]["count"] for s in m["splits"]}
    assert counts == {"train": 360, "validation": 30, "query": 150, "database": 450}
    assert (
        m["splits"]["validation"]["class_counts"][:3] == [10, 10, 10]
        and sum(m["splits"]["validation"]["class_counts"]) == 30
    )
    assert m["overlap"] == {
        "train_in_database": 360,
        "validation_in_database": 30,
        "query_in_database": 0,
        "query_in_train": 0,
        "query_in_validation": 0,
    }
    assert m["classes"][:3] == ["00", "01", "02"] and len(m["classes"]) == 100
    assert m["lists"]["database_list"]["lines"] == 450
    expected = {p: v for p, v in entries["train"] + entries["query"] + entries["database"]}
    rows = table(r.directory)
    assert {row["path"] for row in rows if row["split"] == "query"} == {p for p, _ in entries["query"]}
    for row in rows:
        assert row["labels"] == expected[row["path"]]
    verify_shards(r.directory)


def _nuswide_subset(tmp_path: Path):
    """The shipped NUS-WIDE lists cut down (30 queries, 60 training lines) plus 40 images of
    random multi-hot labels, with stand-in images, prepared as kind ``lists`` from an
    all_list: (the prepare result, the (path, labels) lines, the overrides)."""
    query = read_lines(PROTOCOLS / "nuswide21" / "query.txt.gz")[:30]
    train = read_lines(PROTOCOLS / "nuswide21" / "train.txt.gz")[:60]
    rng = np.random.default_rng(0)
    extra = [(f"images/extra_{i}.jpg", (rng.random(21) < 0.2).astype(int).tolist()) for i in range(40)]
    extra = [(p, v if any(v) else [1] + v[1:]) for p, v in extra]
    everything = query + train + extra
    stand_in_images(tmp_path / "nus", [p for p, _ in everything])
    files = {
        "train_list": write_list(tmp_path / "train.txt", train),
        "query_list": write_list(tmp_path / "query.txt", query),
        "all_list": write_list(tmp_path / "all.txt.gz", everything[::-1], gz=True),
    }
    sets = [*lists("nuswide21", tmp_path / "nus", **files), "datasets.nuswide21.validation=6"]
    return run(tmp_path, "nuswide21", *sets), (query, train, extra), sets


def test_nuswide21_all_list_multi_label(tmp_path):
    r, (query, train, extra), _ = _nuswide_subset(tmp_path)
    everything = query + train + extra
    assert any(sum(v) > 1 for _, v in everything), "the lists are multi-label"
    m = r.manifest
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {
        "train": 54,
        "validation": 6,
        "query": 30,
        "database": 100,
    }
    assert m["multi_label"] is True
    labels = dict(everything)
    rows = {(row["split"], row["index"]): row for row in table(r.directory)}
    for split in ("database", "validation", "query"):
        for batch in EvalStream(r.directory, split, batch_size=16):
            for index, vector in zip(batch.index.tolist(), batch.labels):
                path = rows[(split, index)]["path"]
                assert vector.tolist() == labels[path], "multi-hot vectors survive the round trip"
    assert {rows[k]["path"] for k in rows if k[0] == "database"} == {p for p, _ in train + extra}


@pytest.mark.slow
def test_lists_multi_label_through_fit_and_the_evaluate_stage(tmp_path, monkeypatch):
    """Kind ``lists`` with multi-label lines, after prepare: trained by fit from the shard
    stream reader (what each Ray Train worker runs) with validation, the model logged as the
    train stage logs it, evaluated by the stage at the training's 16 px: the label vectors
    reach the logged codes' table, and every metric is the plain computation's with
    relevance = any shared label (single-label relevance would give other numbers)."""
    from mlflow.tracking import MlflowClient

    from dpfah import methods
    from dpfah.codes import unpack_codes
    from dpfah.data import TrainStream
    from dpfah.settings import TrainSettings, pick
    from dpfah.train import validation_map
    from pipeline.codefiles import load_codes
    from pipeline.evaluation import evaluate
    from tests.helpers import plain_metrics

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r, _, sets = _nuswide_subset(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = ["train.image_size=16", "train.batch_size=8", "train.epochs=1", f"mlflow.tracking_uri={uri}"]
    settings += ["evaluate.loader_workers=0", "evaluate.grid_queries=1"]
    params = load_params(PARAMS, [f"data.root={tmp_path / 'data'}", *sets, *settings])
    stream = TrainStream(r.directory, 8, seed=0)
    model = DPFAH.build(16, 21, params.model, seed=0)
    objective = methods.build("dpfah", {"eta": 1.0, "zeta": 0.1}, bits=16, num_classes=21)
    reports = []

    def validate(net):
        return validation_map(
            net,
            EvalStream(r.directory, "validation", batch_size=8),
            EvalStream(r.directory, "train", batch_size=8),
            torch.device("cpu"),
            16,
        )

    fit(
        pick(TrainSettings, params.train),
        model,
        objective,
        train_batches=lambda epoch: stream,
        steps_per_epoch=len(stream),
        report=lambda m, s: reports.append(m),
        validate=validate,
    )
    assert len(stream) == 6 and np.isfinite(reports[0]["loss"]) and 0 <= reports[0]["val_map"] <= 1

    fake_training_run(
        uri,
        read_manifest(r.directory).sha256,
        dataset="nuswide21",
        bits=16,
        num_classes=21,
        image_size=16,
        model=model.eval(),
        root=tmp_path,
    )
    doc = evaluate(params, RunKey("nuswide21", 16), progress=False, root=tmp_path).doc
    assert (doc["n_queries"], doc["n_db"]) == (30, 100)
    local = Path(MlflowClient(uri).download_artifacts(doc["run_id"], "evaluation/codes", str(tmp_path / "dl")))
    (qp, ql, _, _), (dp, dl, _, _) = load_codes(local / "query.parquet"), load_codes(local / "database.parquet")
    qc, dc = unpack_codes(qp, 16), unpack_codes(dp, 16)
    vectors = {(row["split"], row["index"]): row["labels"] for row in table(r.directory)}
    assert ql.tolist() == [vectors[("query", i)] for i in range(30)] and dl.tolist() == [
        vectors[("database", i)] for i in range(100)
    ]
    assert (ql.sum(1) > 1).any() and (dl.sum(1) > 1).any()
    ref = plain_metrics(qc, dc, ql, dl, topk=doc["topk"], radius=2, n=10)
    assert doc["query_map"] == pytest.approx(ref["map"], abs=1e-12)
    assert doc["query_precision_within_radius"] == pytest.approx(ref["ball"], abs=1e-12)
    assert doc["query_p_at_0010"] == pytest.approx(ref["p_at_n"], abs=1e-12)
    one_hot = lambda y: np.eye(21, dtype=np.uint8)[y.argmax(1)]  # noqa: E731
    single = plain_metrics(qc, dc, one_hot(ql), one_hot(dl), topk=doc["topk"], radius=2, n=10)
    assert abs(single["map"] - doc["query_map"]) > 1e-3


def test_list_problems_name_file_and_line(tmp_path, imagenet_subset):
    d, files, entries = imagenet_subset
    good = entries["query"]
    bad_query = write_list(tmp_path / "q.txt", good[:2] + [("image/x.JPEG", [0, 1])] + good[2:])
    args = lists("imagenet100", d / "images", **{**files, "query_list": bad_query})
    with pytest.raises(DataError, match=rf"^{tmp_path / 'q.txt'}:3: label vector has 2 entries, expected 100 \("):
        run(tmp_path, "imagenet100", *args)

    lines = (tmp_path / "q.txt").read_text().splitlines()
    lines[2] = "image/lonely.JPEG"
    lines[4] = lines[4].replace(" 0 ", " 2 ", 1)
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n\n")
    with pytest.raises(DataError, match=r"q.txt:3: malformed line"):
        run(tmp_path, "imagenet100", *args)
    r = run(
        tmp_path, "imagenet100", *args, "datasets.imagenet100.on_bad_image=skip", "datasets.imagenet100.validation=0"
    )
    assert [i["where"] for i in r.manifest["skipped"]["items"]] == [
        f"{tmp_path / 'q.txt'}:3",
        f"{tmp_path / 'q.txt'}:5",
    ]
    assert "value '2'" in r.manifest["skipped"]["items"][1]["reason"]
    assert r.manifest["splits"]["query"]["count"] == len(good) - 1

    missing = write_list(tmp_path / "q2.txt", good + [("val_image/gone.JPEG", good[0][1])])
    with pytest.raises(DataError) as e:
        run(tmp_path, "imagenet100", *lists("imagenet100", d / "images", **{**files, "query_list": missing}))
    assert f"{d / 'images' / 'val_image/gone.JPEG'} (listed at {missing}:{len(good) + 1}): missing file" in str(e.value)

    leak = write_list(tmp_path / "q3.txt", good + [entries["train"][0]])
    with pytest.raises(DataError, match=r"is also a query"):
        run(tmp_path, "imagenet100", *lists("imagenet100", d / "images", **{**files, "query_list": leak}))


def test_list_file_encoding_and_lines_without_a_path(tmp_path):
    """A list saved with a byte order mark is read; a non-UTF-8 list and a line with no path
    are errors naming the file and line (issue #11)."""
    root = tmp_path / "imgs"
    refs = make_folder(root, per_class=8)
    classes = ("ant", "bee", "cow")
    lines = [f"{r} {' '.join('1' if r.startswith(c) else '0' for c in classes)}\n" for r in refs]
    labels = tmp_path / "labels.txt"
    sets = custom("toy", root, f"datasets.toy.labels_list={labels}", "datasets.toy.num_classes=3")

    for name, data in (("labels.txt", "\ufeff" + "".join(lines)), ("labels.txt.gz", "\ufeff" + "".join(lines))):
        raw = data.encode("utf-8")
        path = tmp_path / name
        path.write_bytes(gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw)
        r = run(tmp_path, "toy", *sets, f"datasets.toy.labels_list={path}")
        assert r.manifest["lists"]["labels_list"]["lines"] == len(refs), name
        assert {row["path"] for row in table(r.directory)} == set(refs), "the first path has no invisible character"

    (root / "ant" / "café.jpg").write_bytes(jpeg(7))
    labels.write_bytes("".join(lines[:4] + ["ant/café.jpg 1 0 0\n"] + lines[4:]).encode("latin-1"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.prepare",
            "--dataset",
            "toy",
            "--params",
            str(PARAMS),
            "--quiet",
            "--set",
            f"data.root={tmp_path / 'data'}",
            *[x for o in sets for x in ("--set", o)],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        f"error: {labels}:5: not UTF-8 text (byte 0xe9 at column 8); save the list as UTF-8\n",
    )

    labels.write_text("".join(lines[:2] + ["0 1 0\n"] + lines[2:]))
    with pytest.raises(DataError) as e:
        run(tmp_path, "toy", *sets)
    assert str(e.value) == (
        f"{labels}:3: no image path: the line is only a label vector (expected `<path> <0/1 label vector>`) "
        "(datasets.toy.on_bad_image: skip leaves such items out)"
    )


def test_unset_images_and_missing_lists(tmp_path):
    with pytest.raises(ConfigError, match=r"^datasets.imagenet100.images: not set"):
        run(tmp_path, "imagenet100")
    with pytest.raises(ConfigError, match=r"^datasets.nuswide21.all_list: not set"):
        run(tmp_path, "nuswide21", f"datasets.nuswide21.images={tmp_path}")
    with pytest.raises(ConfigError, match=r"^datasets.nuswide21.train_list: .*nope.txt: not found"):
        run(
            tmp_path,
            "nuswide21",
            f"datasets.nuswide21.images={tmp_path}",
            "datasets.nuswide21.all_list=x",
            f"datasets.nuswide21.train_list={tmp_path}/nope.txt",
        )
    with pytest.raises(ConfigError, match=r"^datasets.cifar10.source: .*absent.tar.gz: not found"):
        run(tmp_path, "cifar10", f"datasets.cifar10.source={tmp_path}/absent.tar.gz")


# ----------------------------------------------------------------------------- atomic output, CLI


def test_failed_run_keeps_previous_output(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    make_folder(root, per_class=8)
    first = run(tmp_path, "toy", *custom("toy", root))
    before = files_digest(first.directory)

    calls = []
    original = prepare_module._write_split

    def failing(out, split, *args):
        calls.append(split)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(out, split, *args)

    monkeypatch.setattr(prepare_module, "_write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "toy", *custom("toy", root, "seed=5"))
    assert files_digest(first.directory) == before
    assert sorted(os.listdir(tmp_path / "data" / "shards")) == ["toy"], "no work directory left behind"

    stale = tmp_path / "data" / "shards" / ".toy.tmp-999999999-x"
    stale.mkdir()
    monkeypatch.setattr(prepare_module, "_write_split", original)
    run(tmp_path, "toy", *custom("toy", root, "seed=5"))
    assert not stale.exists(), "work directories of dead runs are cleaned up"


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset NAME" in out and "--set KEY=VALUE" in out and "--params FILE" in out

    root = tmp_path / "imgs"
    make_folder(root, per_class=8)
    base = ["--params", str(PARAMS), "--set", f"data.root={tmp_path / 'data'}", "--quiet"]
    sets = [x for o in custom("toy", root) for x in ("--set", o)]
    assert run_main(main, ["--dataset", "toy", *base, *sets]) == 0
    out = capsys.readouterr().out
    assert out.startswith("toy (custom, seed 0): train 9, validation 3, query 6, database 18 ->")
    assert read_manifest(tmp_path / "data" / "shards" / "toy").dataset == "toy"

    assert run_main(main, ["--dataset", "nope", *base]) == 2
    err = capsys.readouterr().err
    assert err == "error: datasets.nope: no such dataset (defined: cifar10, nuswide21, imagenet100)\n"


@pytest.mark.slow
def test_cli_subprocess_and_dvc_stage(tmp_path):
    """`dvc repro` runs prepare@<dataset> in a fresh git repository; a second repro is a no-op."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() or shutil.which("git") is None:
        pytest.skip("dvc or git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for pkg in ("pipeline", "dpfah", "profiles"):
        shutil.copytree(REPO / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    images = tmp_path / "imgs"
    make_folder(images, per_class=8)
    toy = (
        f"  toy:\n    kind: custom\n    images: {images}\n    query_per_class: 2\n    train_per_class: 4\n"
        "    validation: 3\n    shard_size: 5\n    on_bad_image: fail\n"
    )
    text = (repo / "params.yaml").read_text()
    assert "\ndatasets:\n" in text
    text = text.replace("\ndatasets:\n", "\ndatasets:\n" + toy, 1).replace("datasets: [cifar10]", "datasets: [toy]")
    (repo / "params.yaml").write_text(text)
    env = {
        **os.environ,
        "PATH": f"{dvc.parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    sh("git", "init", "-q")
    sh(str(dvc), "init", "-q")
    # Only this stage: the rest of the DAG (train, ...) has its own end-to-end test.
    out = sh(str(dvc), "repro", "prepare@toy")
    assert "prepare@toy" in out
    manifest = json.loads((repo / "data" / "shards" / "toy" / "manifest.json").read_text())
    assert manifest["splits"]["query"]["count"] == 6
    lock = (repo / "dvc.lock").read_text()
    assert "prepare@toy:" in lock and "datasets.toy:" in lock
    assert "cifar10" not in lock, "inactive datasets are not stages, and params are per dataset"
    assert "didn't change" in sh(str(dvc), "repro", "prepare@toy")
    # another dataset's parameters do not touch this stage; its own do
    for old, new, stale in (
        ("validation: 500  # 50 per class", "validation: 400", False),
        ("    shard_size: 5\n", "    shard_size: 4\n", True),
    ):
        assert old in text
        (repo / "params.yaml").write_text(text.replace(old, new))
        assert ("prepare@toy" in sh(str(dvc), "status", "prepare@toy")) is stale
    # errors from the stage reach the user as one line, status 2
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--dataset", "toy", "--set", "datasets.toy.images=/nonexistent"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr == "error: datasets.toy.images: /nonexistent: not found\n"


def _png(seed, size=12):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_custom_dataset_with_a_multi_label_labels_list(tmp_path):
    """datasets.<name>.kind custom with labels_list (`<path> <0/1 vector>`, multi-label) and
    num_classes: the splits are drawn per class (query_per_class images carrying each class,
    train_per_class likewise, validation carved at random from training as for multi-label
    data, the database everything else with the training images), the label vectors survive,
    and the stored images decode, with the training decoder, to the files' pixels."""
    from dpfah.augment import decode_batch
    from dpfah.data import EvalStream
    from pipeline.config import load_params
    from pipeline.prepare import prepare

    root = tmp_path / "photos"
    rng = np.random.default_rng(1)
    lines, vectors = [], {}
    for i in range(60):
        v = (rng.random(4) < 0.35).astype(int)
        if not v.any():
            v[i % 4] = 1
        path = f"{'ab'[i % 2]}/img_{i:03d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_png(i))
        lines.append(f"{path} {' '.join(map(str, v))}\n")
        vectors[path] = v.tolist()
    assert sum(sum(v) > 1 for v in vectors.values()) > 10
    listing = tmp_path / "labels.txt"
    listing.write_text("".join(lines))
    sets = [
        f"data.root={tmp_path / 'data'}",
        "prepare.datasets=[mine]",
        "datasets.mine.kind=custom",
        f"datasets.mine.images={root}",
        f"datasets.mine.labels_list={listing}",
        "datasets.mine.num_classes=4",
        "datasets.mine.class_names=[sky,sea,dog,car]",
        "datasets.mine.query_per_class=2",
        "datasets.mine.train_per_class=5",
        "datasets.mine.validation=4",
        "datasets.mine.shard_size=7",
    ]
    result = prepare(load_params(PARAMS_FILE, sets), "mine", progress=False)
    m = result.manifest
    assert m["multi_label"] is True and m["classes"] == ["sky", "sea", "dog", "car"]
    assert m["lists"]["labels_list"]["lines"] == 60
    counts = {s: m["splits"][s]["count"] for s in m["splits"]}
    assert counts == {"query": 8, "train": 16, "validation": 4, "database": 52}

    import pyarrow.parquet as pq

    rows = pq.read_table(result.directory / "splits.parquet").to_pylist()
    by = {s: [r for r in rows if r["split"] == s] for s in counts}
    for r in rows:
        assert r["labels"] == vectors[r["path"]]
    for c in range(4):  # at least the drawn number per class (an image drawn for one class may carry others)
        assert sum(r["labels"][c] for r in by["query"]) >= 2
        assert sum(r["labels"][c] for r in by["train"] + by["validation"]) >= 5
    query = {r["path"] for r in by["query"]}
    assert not query & {r["path"] for r in by["database"] + by["train"] + by["validation"]}
    assert {r["path"] for r in by["train"] + by["validation"]} <= {
        r["path"] for r in by["database"]
    }  # database_includes_train
    assert {r["path"] for r in by["database"]} | query == set(vectors)

    paths = {(r["split"], r["index"]): r["path"] for r in rows}
    for split in ("query", "validation"):
        for batch in EvalStream(result.directory, split, batch_size=5):
            decoded = decode_batch(batch.images, 12)
            for k, index in enumerate(batch.index.tolist()):
                path = paths[(split, index)]
                assert batch.labels[k].tolist() == vectors[path]
                pixels = np.asarray(Image.open(root / path).convert("RGB")).transpose(2, 0, 1)
                assert np.array_equal(decoded[k].numpy(), pixels), path
