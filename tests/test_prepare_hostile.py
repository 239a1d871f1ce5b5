"""pipeline.prepare on hostile input (issue 28): FIFOs and devices in a list, paths outside the
images root, archive bombs and hostile member names, a full file system. Each ends in
seconds, with a one-line refusal or the item named in the manifest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.collection import FileReader, open_collection
from pipeline.config import load_params
from pipeline.errors import DataError
from pipeline.userfiles import MIB, Limits
from tests.test_prepare import PARAMS, custom, files_digest, jpeg, make_folder, run

CLASSES = ("ant", "bee", "cow")


def prepare_cli(tmp_path: Path, *sets: str, data: Path | None = None, timeout: float = 120):
    """`python -m pipeline.prepare --dataset toy` in a subprocess (a hang fails the test)."""
    cmd = [sys.executable, "-m", "pipeline.prepare", "--dataset", "toy", "--params", str(PARAMS), "--quiet"]
    for s in (f"data.root={data or tmp_path / 'data'}", *sets):
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def line(ref: str, cls: str) -> str:
    return f"{ref} {' '.join('1' if c == cls else '0' for c in CLASSES)}\n"


# ----------------------------------------------------------------------------- files that are not images


def test_a_fifo_a_device_and_a_path_outside_the_root_are_bad_images(tmp_path):
    root = tmp_path / "imgs"
    refs = make_folder(root, per_class=8)
    fifo = root / "ant" / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    (tmp_path / "secret.jpg").write_bytes(jpeg(5))
    listed = tmp_path / "labels.txt"
    body = "".join(line(r, r.split("/")[0]) for r in refs)
    listed.write_text(body + line("ant/pipe.jpg", "ant") + line("/dev/zero", "bee") + line("../secret.jpg", "cow"))
    sets = custom("toy", root, f"datasets.toy.labels_list={listed}", "datasets.toy.num_classes=3")

    proc = prepare_cli(tmp_path, *sets, "datasets.toy.on_bad_image=skip", timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "data" / "shards" / "toy" / "manifest.json").read_text())
    skipped = {i["where"]: i["reason"] for i in manifest["skipped"]["items"]}
    n = len(refs)
    outside = "outside the images root (prepare.allow_outside_root: true reads it)"
    assert skipped == {
        f"{fifo} (listed at {listed}:{n + 1})": "not a regular file: a FIFO",
        f"/dev/zero (listed at {listed}:{n + 2})": outside,
        f"{root / '../secret.jpg'} (listed at {listed}:{n + 3})": outside,
    }
    assert sum(s["count"] for k, s in manifest["splits"].items() if k != "database") == 6 + 9 + 3

    # allowed outside the root: the secret is read; the FIFO and the device still are not
    proc = prepare_cli(
        tmp_path, *sets, "datasets.toy.on_bad_image=skip", "prepare.allow_outside_root=true", timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "data" / "shards" / "toy" / "manifest.json").read_text())
    assert [i["reason"] for i in manifest["skipped"]["items"]] == [
        "not a regular file: a character device",
        "not a regular file: a FIFO",
    ]

    # on_bad_image: fail: one line naming the file, exit 2, within seconds
    for ref, cls, why in (("ant/pipe.jpg", "ant", "a FIFO"), ("/dev/zero", "bee", "a character device")):
        listed.write_text(body + line(ref, cls))
        proc = prepare_cli(tmp_path / "fail", *sets, "prepare.allow_outside_root=true", timeout=120)
        shown = fifo if ref == "ant/pipe.jpg" else ref
        assert (proc.returncode, proc.stderr) == (
            2,
            f"error: {shown} (listed at {listed}:{n + 1}): not a regular file: {why} "
            "(datasets.toy.on_bad_image: skip leaves such items out)\n",
        )
        assert not (tmp_path / "fail" / "data" / "shards" / "toy").exists()


def test_an_image_over_the_cap_is_a_bad_image(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=8)
    big = root / "bee" / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MIB
    with pytest.raises(DataError) as e:
        run(tmp_path, "toy", *custom("toy", root), "prepare.max_image_mb=1")
    assert str(e.value).startswith(f"{big}: 1.4 MiB, over the cap of 1.0 MiB (prepare.max_image_mb) (")
    r = run(tmp_path, "toy", *custom("toy", root, "datasets.toy.on_bad_image=skip"), "prepare.max_image_mb=1")
    assert [i["where"] for i in r.manifest["skipped"]["items"]] == [str(big)]


def test_index_reads_regular_files_only_with_the_same_cap(tmp_path):
    """collection.FileReader (what pipeline.index reads files with) follows the same rule."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "ok.jpg").write_bytes(jpeg(1))
    (tmp_path / "big.jpg").write_bytes(bytes(2 * MIB))
    reader = FileReader(str(tmp_path), ["ok.jpg", "pipe.jpg", "big.jpg", "gone.jpg"], Limits(max_file=MIB))
    got = reader.read(0, 4)
    assert got[0] == ((tmp_path / "ok.jpg").read_bytes(), None)
    assert got[1:] == [
        (None, "not a regular file: a FIFO"),
        (None, "2.0 MiB, over the cap of 1.0 MiB (prepare.max_image_mb)"),
        (None, "missing file"),
    ]
    reader = FileReader("/dev", ["zero"])
    assert reader.read(0, 1) == [(None, "not a regular file: a character device")]


# ----------------------------------------------------------------------------- archives


class Zeros(io.RawIOBase):
    """A stream of zeros (an archive bomb's member, made without holding it in memory)."""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        b[:] = bytes(len(b))
        return len(b)


def bomb(path: Path, member_mib: int) -> Path:
    """A small .tar.gz of three class folders, a ``member_mib`` MiB member of zeros named like
    an image, and members whose names are absolute or climb with ``..``."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for c, cls in enumerate(CLASSES):
            for i in range(8):
                add(f"imgs/{cls}/{i:03d}.jpg", jpeg(c * 100 + i))
        info = tarfile.TarInfo("imgs/bee/bomb.jpg")
        info.size = member_mib * MIB
        tar.addfile(info, Zeros())
        add("../evil/x.jpg", jpeg(900))
        add("/abs/rel/y.jpg", jpeg(901))
    return path


def test_an_archive_bomb_and_hostile_member_names(tmp_path):
    archive = bomb(tmp_path / "bomb.tar.gz", 256)
    assert archive.stat().st_size < 2 * MIB
    sets = custom("toy", archive)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            run(tmp_path, "toy", *sets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MIB, f"peak {peak / MIB:.0f} MiB: the member was read"
    assert str(e.value) == (
        f"{archive}!imgs/bee/bomb.jpg: 256 MiB, over the cap of 64 MiB (prepare.max_image_mb) "
        "(datasets.toy.on_bad_image: skip leaves such items out)"
    )

    r = run(tmp_path, "toy", *custom("toy", archive, "datasets.toy.on_bad_image=skip"))
    assert r.manifest["classes"] == list(CLASSES), "hostile names do not become classes"
    assert r.manifest["skipped"]["items"] == [
        {"where": f"{archive}!../evil/x.jpg", "reason": "member name is absolute or climbs with ..: left out"},
        {"where": f"{archive}!/abs/rel/y.jpg", "reason": "member name is absolute or climbs with ..: left out"},
        {"where": f"{archive}!imgs/bee/bomb.jpg", "reason": "256 MiB, over the cap of 64 MiB (prepare.max_image_mb)"},
    ]

    with pytest.raises(DataError) as e:
        run(tmp_path, "toy", *custom("toy", archive, "datasets.toy.on_bad_image=skip"), "prepare.max_archive_mb=100")
    assert str(e.value) == (
        f"{archive}: its members hold over 100 MiB uncompressed (prepare.max_archive_mb; an archive is read "
        "into memory): unpack it into a folder"
    )


def test_index_names_the_members_an_archive_bomb_leaves_out(tmp_path):
    """pipeline.index's collection of an archive: the members left out stay items, read as bad
    with the reason (so index.on_bad_image refuses them or lists them as skipped)."""
    archive = bomb(tmp_path / "bomb.tar.gz", 100)
    collection = open_collection(load_params(PARAMS, []), images=str(archive))
    assert len(collection.keys) == 24 + 3
    got = dict(zip(collection.keys, collection.reader.read(0, len(collection.keys))))
    assert got["imgs/bee/bomb.jpg"] == (None, "100 MiB, over the cap of 64 MiB (prepare.max_image_mb)")
    assert got["../evil/x.jpg"] == (None, "member name is absolute or climbs with ..: left out")
    assert got["/abs/rel/y.jpg"] == (None, "member name is absolute or climbs with ..: left out")
    assert got["imgs/ant/000.jpg"] == (jpeg(0), None)


# ----------------------------------------------------------------------------- a full file system


def big_jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_prepare_into_a_full_file_system(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs -o size=2m)")
    small = tmp_path / "small"
    make_folder(small, per_class=8)
    large = tmp_path / "large"
    for i, ref in enumerate(make_folder(large, per_class=8)):
        (large / ref).write_bytes(big_jpeg(i))
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = disk / "data"
        assert prepare_cli(tmp_path, *custom("toy", small), data=data).returncode == 0
        before = files_digest(data / "shards" / "toy")
        proc = prepare_cli(tmp_path, *custom("toy", large), data=data)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
            f"error: {data / 'shards'}: no space left on the device: the shards of 36 images need about "
        ), proc.stderr
        assert "free); nothing was written (free space there, or set data.root elsewhere)" in proc.stderr
        assert files_digest(data / "shards" / "toy") == before, "the previous output is left as it was"
        assert sorted(os.listdir(data / "shards")) == ["toy"], "no partial work folder left"
    finally:
        subprocess.run(["umount", str(disk)], check=False)
