"""Index a collection with the champion and search it (issue 16): pipeline.index and
pipeline.search on the toy dataset, with a registered (untrained) DPFAH model."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from dpfah.packing import unpack_codes
from pipeline import index as index_stage
from pipeline import index_format
from pipeline import search as search_stage
from pipeline.index_blocks import FAULT_ENV
from pipeline.runkey import RunKey
from tests import index_fixtures
from tests.helpers import BITS, cli
from tests.index_fixtures import CHAMPION, NAME

champion, database_index = index_fixtures.champion, index_fixtures.database_index  # this module's own


#: A code bit whose network output is this close to 0 may take either sign when another
#: thread count or batch size sums the output in another order (the index's single-threaded
#: actors against evaluate's threads; any x86-64 CPU's kernels).
SIGN_MARGIN = 1e-4


def _evaluate_codes(params, record):
    """The database codes as evaluate computes them (its reader, dpfah.train.encode), and
    where each bit's output is within SIGN_MARGIN of 0 (rows in the stream's index order)."""
    from dpfah.codes import pack_codes
    from dpfah.data import EvalStream
    from dpfah.train import encode
    from pipeline.registry import load_checked_model

    model = load_checked_model(record["model_uri"], record["run_id"], params.mlflow.tracking_uri)
    outputs = []
    hook = model.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].detach().float().abs()))
    stream = EvalStream(params.shards_dir("toy"), "database", batch_size=32, rank=0, world_size=1)
    try:
        codes, labels, _ = encode(model, stream, torch.device("cpu"), 32, "fp32")
    finally:
        hook.remove()
    near_zero = torch.cat(outputs).numpy()[np.argsort(np.concatenate([b.index for b in stream]), kind="stable")]
    return pack_codes(codes), labels, near_zero < SIGN_MARGIN


def test_the_index_holds_evaluates_codes_keys_and_labels_of_the_split(champion, database_index):
    params, record, _ = champion
    m = database_index.manifest
    assert (m["count"], m["bits"], m["model"]["uri"], m["model"]["version"], m["model"]["run_id"]) == (
        78,
        BITS,
        f"models:/{NAME}/1",
        1,
        record["run_id"],
    )
    assert m["model"]["given"] == CHAMPION and m["source"]["split"] == "database" and m["skipped"]["count"] == 0
    assert (database_index.blocks, database_index.encoded_blocks) == (5, 5)
    t = database_index.timing  # the actors' start-up apart from the steady state
    assert (t.items, t.actors) == (78, 2) and 0 < t.startup_s < t.seconds and 0 < t.busy_s, t
    assert t.steady_images_per_s == pytest.approx(78 / (t.seconds - t.startup_s))
    assert database_index.images_per_s == pytest.approx(78 / t.seconds)
    index = index_format.load_index(database_index.directory, verify=True)
    packed, labels, unsure = _evaluate_codes(params, record)
    differ = unpack_codes(np.asarray(index.codes), BITS) != unpack_codes(packed, BITS)
    assert not (differ & ~unsure).any(), np.argwhere(differ & ~unsure)  # equal wherever the sign is clear
    np.testing.assert_array_equal(np.asarray(index.labels), labels)
    assert index.keys.to_pylist() == [str(i) for i in range(78)]
    assert not database_index.directory.with_name("toy-8.partial").exists()


def test_on_cpus_the_default_is_one_single_threaded_actor_per_cpu(ray_local):
    """index.workers null on a cluster without GPUs (ray_local: 2 CPUs): one actor per CPU,
    one thread each (2.4x one actor of two threads on 2 busy cores, docs/benchmarks.md); never
    more actors than blocks, the CPUs then shared out as threads."""
    from pipeline.index_blocks import _resources

    assert _resources(None, 15) == (2, 1.0, 0.0, 1)
    assert _resources(None, 1) == (1, 2.0, 0.0, 2)
    assert _resources(1, 15) == (1, 2.0, 0.0, 2)


def test_search_by_key_and_radius_is_exact_with_ties_by_key(database_index):
    index = index_format.load_index(database_index.directory)
    codes = np.asarray(index.codes)
    dist = np.bitwise_count(codes[:, 0][:, None] ^ codes[:, 0][None, :]).astype(np.int64)
    rows = index.rows_of(["5", "40"])
    for k, radius in ((7, None), (None, 2)):
        hits = search_stage.search(index, codes[rows], k=k or 10, radius=radius)
        for q, hit in zip(rows, hits):
            d = dist[q]
            expected = np.lexsort((np.arange(len(d)), d))  # by distance, then row (= key order)
            expected = expected[:k] if radius is None else expected[d[expected] <= radius]
            np.testing.assert_array_equal(hit.rows, expected)
            np.testing.assert_array_equal(hit.distances, d[expected])
            if radius is not None:  # every item within the radius: the query's own row at 0
                assert q in hit.rows[hit.distances == 0]


def test_a_killed_index_resumes_without_reencoding_and_equals_the_uninterrupted_one(
    champion, database_index, tmp_path, monkeypatch
):
    params, _, _ = champion
    out = tmp_path / "toy-8"
    monkeypatch.setenv(FAULT_ENV, "after-blocks:2")
    with pytest.raises(RuntimeError, match="injected fault after 2 block"):
        index_stage.build_index(params, out, model=CHAMPION, dataset="toy", split="database", progress=False)
    assert not out.exists()  # nothing that looks like an index
    assert len(list((tmp_path / "toy-8.partial" / "blocks").glob("*.npz"))) == 2
    with pytest.raises(index_format.NotAnIndex, match="not complete"):
        index_format.load_index(out)
    monkeypatch.delenv(FAULT_ENV)
    resumed = index_stage.build_index(params, out, model=CHAMPION, dataset="toy", split="database", progress=False)
    assert (resumed.blocks, resumed.encoded_blocks) == (5, 3)
    first = database_index.directory
    for name in ("codes.npy", "keys.parquet", "labels.npy"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (first, out))
    for doc in (a, b):
        doc.pop("created"), doc.pop("git_commit")
    assert a == b


def _folder_with_a_bad_image(images, root):
    """Six toy images, a corrupt PNG and a truncated one."""
    root.mkdir()
    for i, src in enumerate(sorted(images.rglob("*.png"))[::15][:6]):
        shutil.copy(src, root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)
    good = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_a_corrupt_image_is_named_or_skipped_and_an_image_finds_its_duplicate(ray_local, champion, tmp_path, capsys):
    import dataclasses

    params, _, images = champion
    folder = _folder_with_a_bad_image(images, tmp_path / "mine")
    out = tmp_path / "mine-index"
    code, text = cli(
        index_stage,
        [
            "--images",
            str(folder),
            "--model",
            CHAMPION,
            "--out",
            str(out),
            "--quiet",
            "--set",
            f"mlflow.tracking_uri={params.mlflow.tracking_uri}",
        ],
        capsys,
    )
    assert code == 2 and "broken.png: cannot decode image" in text and "index.on_bad_image: skip" in text, text
    assert not out.exists()

    skip = dataclasses.replace(params, index=dataclasses.replace(params.index, on_bad_image="skip", precision="bf16"))
    result = index_stage.build_index(skip, out, model=CHAMPION, images=str(folder), progress=False)
    m = result.manifest
    assert m["count"] == 6 and m["precision_used"] == "bf16" and m["classes"] is None
    assert sorted(i["key"] for i in m["skipped"]["items"]) == ["broken.png", "truncated.png"]
    assert all("cannot decode image" in i["reason"] for i in m["skipped"]["items"]), m["skipped"]

    duplicate = tmp_path / "copy-of-img3.png"
    shutil.copy(folder / "img3.png", duplicate)
    grid = tmp_path / "grid.png"
    argv = [
        str(out),
        str(duplicate),
        "--radius",
        "0",
        "--grid",
        str(grid),
        "--set",
        f"mlflow.tracking_uri={params.mlflow.tracking_uri}",
    ]
    code, text = cli(search_stage, argv, capsys)
    assert code == 0, text
    # every item at distance 0 from the copy (an untrained model gives many equal codes): img3.png among them
    lines = [line.split() for line in text.splitlines() if line.startswith(str(duplicate))]
    assert lines and all(cols[3] == "0" for cols in lines) and "img3.png" in [cols[2] for cols in lines], text
    assert [cols[2] for cols in lines] == sorted(cols[2] for cols in lines)  # ties in key order
    assert grid.is_file() and grid.stat().st_size > 5000


def test_a_split_the_evaluation_encoded_takes_its_codes_once_verified(champion, database_index, tmp_path, capsys):
    """The champion evaluated: its database index takes the evaluation's codes, checked on 64
    items, and holds the files the encoding built (``database_index``); codes tampered with
    are caught and the split encoded. Last in this module, and the evaluation's completion
    marker removed at the end: the builds above encode the champion's split."""
    import dataclasses

    import mlflow.artifacts
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from pipeline.evaluation import evaluate
    from pipeline.registry import EVAL_COMPLETE_TAG
    from pipeline.tracking import using_tracking_uri

    params, record, _ = champion
    uri, run_id = params.mlflow.tracking_uri, record["run_id"]
    quick = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, grid_queries=2))
    eval_id = evaluate(quick, RunKey("toy", BITS), run_id=run_id, progress=False, root=tmp_path).doc["eval_id"]
    try:
        taken = index_stage.build_index(
            params, tmp_path / "taken", model=CHAMPION, dataset="toy", split="database", progress=False
        )
        assert (
            taken.manifest["codes_from"] == f"evaluation {eval_id} of run {run_id}, verified on 64 items"
            and taken.encoded_blocks == 0
        )
        encoded = database_index.directory
        for name in ("codes.npy", "keys.parquet", "labels.npy"):
            assert (taken.directory / name).read_bytes() == (encoded / name).read_bytes(), name
        a, b = (json.loads((d / "manifest.json").read_text()) for d in (taken.directory, encoded))
        assert b["codes_from"] == "encoded"
        for doc in (a, b):
            doc.pop("created"), doc.pop("git_commit"), doc.pop("codes_from")
        assert a == b

        # one bit of item 0 (a sampled item) flipped in the run's logged codes
        with using_tracking_uri(uri):
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="evaluation/codes/database.parquet", dst_path=str(tmp_path / "dl")
            )
        table = pq.read_table(path)
        words = np.asarray(
            table.column("code").combine_chunks().values.to_numpy(zero_copy_only=False), dtype=np.uint64
        ).copy()
        words[0] ^= np.uint64(1)
        code = pa.FixedSizeListArray.from_arrays(
            pa.array(words, pa.uint64()), table.schema.field("code").type.list_size
        )
        tampered = tmp_path / "tampered" / "database.parquet"
        tampered.parent.mkdir()
        pq.write_table(table.set_column(table.schema.get_field_index("code"), "code", code), tampered)
        MlflowClient(uri).log_artifact(run_id, str(tampered), "evaluation/codes")
        capsys.readouterr()
        again = index_stage.build_index(
            params, tmp_path / "again", model=CHAMPION, dataset="toy", split="database", progress=False
        )
        note = capsys.readouterr().out
        assert (
            f"evaluation {eval_id}'s database codes differ from the model's on 1 of 64 sampled items; encoding" in note
        ), note
        assert again.manifest["codes_from"] == "encoded" and again.encoded_blocks == 5
        assert (again.directory / "codes.npy").read_bytes() == (encoded / "codes.npy").read_bytes()
    finally:
        MlflowClient(uri).delete_tag(run_id, EVAL_COMPLETE_TAG)  # the champion unevaluated again


def test_a_tar_archive_is_read_once_by_the_driver_not_again_by_each_worker(ray_local, champion, tmp_path, monkeypatch):
    """The driver reads the archive while listing it and ships each block's bytes to the
    actors: the archive removed once the collection is open (before any actor starts) is
    indexed all the same, with the codes of the same images indexed from a folder."""
    import dataclasses
    import tarfile

    params, _, images = champion
    two = dataclasses.replace(params, index=dataclasses.replace(params.index, workers=2))
    folder = images / sorted(p.name for p in images.iterdir())[0]
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="photos")
    real = index_stage.resolve_model

    def archive_gone_then_resolve(*args, **kwargs):
        archive.unlink()  # after open_collection read it; the actors cannot read it again
        return real(*args, **kwargs)

    monkeypatch.setattr(index_stage, "resolve_model", archive_gone_then_resolve)
    from_tar = index_stage.build_index(two, tmp_path / "t", model=CHAMPION, images=str(archive), progress=False)
    assert not archive.exists() and from_tar.manifest["count"] == len(list(folder.iterdir())) == 30
    assert from_tar.encoded_blocks == from_tar.blocks == 2
    monkeypatch.undo()
    from_folder = index_stage.build_index(two, tmp_path / "f", model=CHAMPION, images=str(folder), progress=False)
    a, b = (index_format.load_index(r.directory) for r in (from_tar, from_folder))
    assert [k.removeprefix("photos/") for k in a.keys.to_pylist()] == b.keys.to_pylist()
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only: skipped with the reason elsewhere), unmounted at the end."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a 1 MiB tmpfs, which only root can mount (mount -t tmpfs)")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fill(disk, leave: int) -> None:
    """Fill ``disk`` until ``leave`` bytes are free."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))


def test_a_full_disk_is_one_line_naming_the_space_and_the_index_there_stays(ray_local, champion, small_disk, capsys):
    """Index into a full file system: refused before any work when even the codes cannot fit;
    a disk that fills while blocks are written ends in one line, exit 2, the index already in
    --out as it was, no temporary file left, the finished block kept; with space again the
    same command resumes."""
    params, _, images = champion
    folder = images / sorted(p.name for p in images.iterdir())[0]  # 30 images: 2 blocks of 16
    out = small_disk / "photos"
    index_stage.build_index(params, out, model=CHAMPION, images=str(folder), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["--images", str(folder), "--model", CHAMPION, "--out", str(out), "--quiet", "--set"]
    argv += [f"mlflow.tracking_uri={params.mlflow.tracking_uri}", "--set", "index.block_size=16"]

    _fill(small_disk, 0)
    code, text = cli(index_stage, argv, capsys)
    assert code == 2 and text == (
        f"error: {out}: 0 B free on its device, the index needs at least 638 B; "
        "free some space (or choose another --out) and run the same command again\n"
    ), text

    _fill(small_disk, 8192)  # the plan and one block fit (a 4 KiB page each), not the second block
    code, text = cli(index_stage, argv, capsys)
    partial = small_disk / "photos.partial"
    assert code == 2 and len(text.splitlines()) == 1, text
    assert text.startswith(
        f"error: {out}: no space left on its device while writing the index (0 B free; the index needs at least 638 B, "
        "and its keys); "
    ), text
    assert f"the finished blocks in {partial} are kept; free some space" in text, text
    # one block fitted; which one is a race: the CPU default encodes with one actor per CPU
    kept = sorted(p.name for p in (partial / "blocks").iterdir())
    assert len(kept) == 1 and kept[0] in ("000000.npz", "000001.npz"), kept
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the index there as it was
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "photos", "photos.partial"]
    index_format.load_index(out, verify=True)

    (small_disk / "filler").unlink()
    code, text = cli(index_stage, argv, capsys)
    assert code == 0 and "1 of 2 blocks resumed" in text, text
    assert re.search(r"img/s encoding: \d+\.\d s actor start-up, then [\d,]+ img/s\) *$", text, re.M), text
    assert sorted(p.name for p in small_disk.iterdir()) == ["photos"]


def test_sublinear_ivf_is_written_beside_the_codes_and_search_goes_through_it(ray_local, champion, tmp_path, capsys):
    """--sublinear ivf (issue 30): the faiss file listed in the manifest with its parameters
    and the recall measured on the index's own codes, said by the command; a search goes
    through it and says so (30 images: one list, so the same rows as --exact)."""
    pytest.importorskip("faiss")
    params, _, images = champion
    folder = images / sorted(p.name for p in images.iterdir())[0]
    out = tmp_path / "photos"
    argv = ["--images", str(folder), "--model", CHAMPION, "--out", str(out), "--quiet", "--sublinear", "ivf"]
    argv += ["--set", f"mlflow.tracking_uri={params.mlflow.tracking_uri}"]
    code, text = cli(index_stage, argv, capsys)
    last = text.splitlines()[-1]
    assert code == 0 and last.startswith("sub-linear index in "), text
    assert last.endswith(
        "IndexBinaryIVF, nlist 1, nprobe 1: recall@10 1.000, recall@100 1.000, measured at build on 30 of its own codes"
    ), text
    index = index_format.load_index(out, verify=True)
    assert index.manifest["sublinear"]["nlist"] == 1 and "sublinear.faiss" in index.manifest["files"]
    key = index.key(4)
    code, approx = cli(search_stage, [str(out), "--key", key, "-k", "5"], capsys)
    assert code == 0 and "approximate (--exact scans every code): faiss " in approx, approx
    code, exact = cli(search_stage, [str(out), "--key", key, "-k", "5", "--exact"], capsys)
    assert code == 0 and approx.splitlines()[:6] == exact.splitlines()[:6], (approx, exact)
    code, text = cli(index_stage, argv, capsys)  # an index with its faiss file is replaced like any index
    assert code == 0, text


def test_a_list_file_is_read_as_prepare_reads_one(tmp_path, capsys):
    """index reads a `<path> [labels]` list with prepare's reader (sources.list_tokens): a
    line that is not UTF-8 stops the stage with one line naming the file, the line and the
    byte (not a path decoded with replacement characters that then is "missing"); a byte
    order mark is dropped. Fails before any model is looked up."""
    from pipeline.collection import open_collection
    from pipeline.config import load_params

    listed = tmp_path / "list.txt"
    listed.write_bytes("\ufeffa.png 1 0\n\nb.png 0 1\n".encode() + "café.png 1 1\n".encode("latin-1"))
    argv = ["--images", str(listed), "--model", "models:/none/1", "--out", str(tmp_path / "out"), "--quiet"]
    code, text = cli(index_stage, argv, capsys)
    assert (code, text) == (2, f"error: {listed}:4: not UTF-8 text (byte 0xe9 at column 4); save the list as UTF-8\n")

    listed.write_bytes("\ufeffb.png 1 0\n\na.png 0 1\n".encode())
    got = open_collection(load_params(), images=str(listed))
    assert got.keys == ["a.png", "b.png"] and got.labels.tolist() == [[0, 1], [1, 0]]


def test_out_never_replaces_a_folder_that_is_not_an_index(champion, database_index, tmp_path, monkeypatch, capsys):
    """An index build replaces its --out folder whole, so it refuses (one line, exit 2, before
    any work) a folder that is not an index: a user's folder, the images being indexed, the
    current folder, a manifest of another format, a user's <out>.partial; and replaces an index."""
    from pipeline.errors import ConfigError
    from pipeline.report import write_report

    params, _, images = champion
    mine = tmp_path / "u"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    photos = shutil.copytree(images / sorted(p.name for p in images.iterdir())[0], tmp_path / "photos")
    before = sorted(p.name for p in photos.iterdir())
    code, text = cli(
        index_stage, ["--images", str(photos), "--out", str(photos), "--model", "models:/nothing/1"], capsys
    )
    assert code == 2 and len(text.strip().splitlines()) == 1, text
    assert f"--out {photos}: {photos} holds files that are not an index" in text
    assert sorted(p.name for p in photos.iterdir()) == before  # every photo still there
    for out, why in (
        (mine, r"holds files that are not an index \(notes.txt\)"),
        (tmp_path, "holds files that are not an index"),
    ):
        with pytest.raises(ConfigError, match=why):
            index_stage.build_index(params, out, model=CHAMPION, images=str(images))
    # the report stage's --out: the same rule
    with pytest.raises(ConfigError, match="holds files that are not a report"):
        write_report(params, "toy", mine)
    assert (mine / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(mine)
    with pytest.raises(ConfigError, match="is the current or the root folder"):
        index_stage.build_index(params, ".", model=CHAMPION, images=str(images))
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "someone-else/1"}))
    with pytest.raises(ConfigError, match="not an index this project wrote .*format 'someone-else/1'"):
        index_stage.build_index(params, other, model=CHAMPION, images=str(images))
    (tmp_path / "fresh.partial").mkdir()
    (tmp_path / "fresh.partial" / "draft.txt").write_text("mine too")
    with pytest.raises(ConfigError, match="are not an unfinished index"):
        index_stage.build_index(params, tmp_path / "fresh", model=CHAMPION, images=str(images))
    assert (tmp_path / "fresh.partial" / "draft.txt").exists()
    # an index, an empty folder and a new path may be written
    assert index_stage.check_out(database_index.directory) == database_index.directory
    (tmp_path / "empty").mkdir()
    index_stage.check_out(tmp_path / "empty"), index_stage.check_out(tmp_path / "new")
