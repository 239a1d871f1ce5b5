"""Stage `index`: encode a collection with a registered model into a searchable index folder.

The collection is a prepared split, an image folder, a tar archive or a list file
(:mod:`pipeline.collection`); the model is ``--model`` or the champion for
--dataset/--bits/--method, resolved once to its version. Encoding runs on Ray Data, block by
block (:mod:`pipeline.encoding`), and resumes after a kill; a split the model's evaluation
already encoded takes its logged codes once verified. How it works, and the index folder's
files (:mod:`pipeline.index_format`): docs/serving.md and docs/data-formats.md; usage: ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import DEFAULT_METHOD, not_replaceable, write_atomic, write_json_atomic
from .collection import Collection, open_collection
from .config import Params, add_config_args, config_from_args
from .encoding import encode_images
from .errors import ConfigError, DataError, run_main
from .index_format import CODES, FORMAT, KEYS, LABELS, MANIFEST, NotAnIndex, read_manifest, write_index
from .registry import ResolvedModel, default_model_uri, load_model, resolve_model
from .tracking import connect, get_run

__all__ = [
    "IndexResult",
    "build_index",
    "default_out",
    "main",
]

PLAN = "plan.json"
#: Fault injection for tests: ``after-blocks:N`` stops the run (an error) once N blocks are written.
FAULT_ENV = "DPFAH_INDEX_FAULT"


def default_out(dataset: str, bits: int) -> Path:
    """Where the DVC stage (and --split without --out) writes: ``index/<dataset>-<bits>``."""
    return Path("index") / f"{dataset}-{bits}"


# ----------------------------------------------------------------------------- encoding


class BlockEncoder:
    """A Ray Data actor: reads, decodes and encodes whole blocks of a collection. A batch is
    a few block numbers; each comes back as the block file's bytes (npz: ``codes`` packed,
    ``ok`` mask, ``problems`` JSON)."""

    def __init__(
        self,
        model,
        reader,
        count: int,
        block_size: int,
        image_size: int,
        precision: str,
        batch_size: int,
        convert: bool,
        threads: int,
    ):
        import torch

        torch.set_num_threads(max(1, threads))  # Ray sets 1 thread per worker; the actor owns its CPUs
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.reader, self.count, self.block_size = reader, count, block_size
        self.image_size, self.precision, self.batch_size, self.convert = image_size, precision, batch_size, convert

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [encode_block(self, int(b)) for b in batch["block"]]
        return {"block": np.asarray(batch["block"], dtype=np.int64), "data": np.array(out, dtype=object)}


def encode_block(enc: BlockEncoder, block: int) -> bytes:
    from dpfah.codes import pack_codes, words_for_bits

    start = block * enc.block_size
    stop = min(enc.count, start + enc.block_size)
    read = enc.reader.read(start, stop)
    codes, ok, problems = [], np.zeros(stop - start, dtype=bool), {}
    for a in range(0, stop - start, enc.batch_size):
        part = read[a : a + enc.batch_size]
        for j, (_, why) in enumerate(part):
            if why is not None:
                problems[a + j] = why
        c, good, bad = encode_images(
            enc.model, [d for d, _ in part], enc.device, enc.image_size, enc.precision, convert=enc.convert
        )
        codes.append(c)
        ok[a : a + len(part)] = good
        problems.update({a + j: why for j, why in bad.items()})
    words = words_for_bits(enc.model.bits)
    packed = pack_codes(np.concatenate(codes)) if sum(len(c) for c in codes) else np.zeros((0, words), np.uint64)
    buf = io.BytesIO()
    problems_json = json.dumps({str(k): v for k, v in sorted(problems.items())})
    np.savez(buf, codes=packed, ok=ok, problems=np.array(problems_json), device=np.array(enc.device.type))
    return buf.getvalue()


# ----------------------------------------------------------------------------- the evaluation's codes

#: The prepared splits evaluate encodes and logs (``evaluation/codes/<split>.parquet``).
EVALUATED_SPLITS = ("query", "database")
#: Items of a split encoded to verify an evaluation's codes before they are reused.
VERIFY_ITEMS = 64


@dataclass(frozen=True)
class EvaluationCodes:
    """Codes of a prepared split that the model's evaluation logged, verified to be the model's."""

    packed: np.ndarray  # (n, words) uint64, row i = item i of the split
    device: str  # what the evaluation encoded on
    precision_used: str
    codes_from: str  # the manifest's provenance line


def _precision_here(precision: str) -> str:
    """What ``index.precision`` encodes with here (auto: bf16 where this process sees a GPU)."""
    import torch

    from dpfah.train import precision_used

    return precision_used(precision, "cuda" if torch.cuda.is_available() else "cpu")


def evaluation_codes(
    params: Params, collection: Collection, resolved: ResolvedModel, model
) -> tuple[EvaluationCodes | None, str | None]:
    """The codes of the prepared split ``collection`` that the evaluation of the model's run
    logged, when that evaluation is complete (``eval.complete`` = ``eval.id``), ran on the
    same prepared shards (manifest sha256) at the precision this index would use, and its
    codes equal the model's own on :data:`VERIFY_ITEMS` items spread over the split (encoded
    here). Else (None, why not); (None, None) for a source evaluate does not encode."""
    import tempfile

    import mlflow.artifacts
    import torch
    from mlflow.exceptions import MlflowException

    from dpfah.codes import pack_codes
    from dpfah.data import read_samples

    from .codefiles import ARTIFACT_DIR, load_codes
    from .console import quiet_libraries
    from .registry import EVAL_COMPLETE_TAG, EVAL_ID_TAG

    quiet_libraries()  # MLflow's download bar

    ident = collection.identity
    if ident.get("type") != "split" or ident["split"] not in EVALUATED_SPLITS:
        return None, None
    split, run_id = ident["split"], resolved.run_id
    tags = get_run(connect(resolved.tracking_uri), run_id, resolved.tracking_uri, resolved.given).data.tags
    eval_id = tags.get(EVAL_ID_TAG)
    if not eval_id or tags.get(EVAL_COMPLETE_TAG) != eval_id:
        return None, f"run {run_id} has no complete evaluation"
    if tags.get("eval.manifest_sha256") != ident["manifest_sha256"]:
        return (
            None,
            f"evaluation {eval_id} ran on other shards (manifest sha256 {str(tags.get('eval.manifest_sha256'))[:12]}, these {ident['manifest_sha256'][:12]})",
        )
    want = _precision_here(params.index.precision)
    if tags.get("eval.precision") != want:
        return (
            None,
            f"evaluation {eval_id} encoded in {tags.get('eval.precision') or 'an unrecorded precision'}, index.precision={params.index.precision} means {want} here",
        )
    n, words = len(collection.keys), -(-resolved.bits // 64)
    with tempfile.TemporaryDirectory(prefix="dpfah-index-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=f"{ARTIFACT_DIR}/codes/{split}.parquet",
                dst_path=tmp,
                tracking_uri=resolved.tracking_uri,
            )
            packed, labels, order, meta = load_codes(path)
        except (MlflowException, OSError, ValueError, KeyError) as e:  # missing, unreadable or not a codes table
            return (
                None,
                f"evaluation {eval_id}'s {split} codes are unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            )
    expected = {
        "split": split,
        "bits": str(resolved.bits),
        "run_id": run_id,
        "manifest_sha256": ident["manifest_sha256"],
    }
    if (
        any(meta.get(k) != v for k, v in expected.items())
        or packed.shape != (n, words)
        or not np.array_equal(order, np.arange(n))
    ):
        return (
            None,
            f"evaluation {eval_id}'s {split} codes describe another split, run or length ({packed.shape[0]} rows)",
        )
    if collection.labels is not None and not np.array_equal(labels, collection.labels):
        return None, f"evaluation {eval_id}'s {split} labels differ from the prepared split's"
    sample = (
        np.unique(np.linspace(0, n - 1, min(VERIFY_ITEMS, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    )
    images = read_samples(collection.reader.manifest, split, sample)
    on = torch.device(
        "cuda" if tags.get("eval.device") == "cuda" and torch.cuda.is_available() else "cpu"
    )  # as the evaluation did
    check = (
        copy.deepcopy(model).to(on) if on.type != "cpu" else model
    )  # the model itself stays on the CPU for the actors
    codes, ok, problems = encode_images(
        check, [images[int(i)] for i in sample], on, resolved.image_size, want, convert=collection.convert
    )
    if problems or not ok.all():
        return None, f"{len(problems)} of the {len(sample)} sampled items did not encode"
    differ = int((pack_codes(codes) != packed[sample]).any(axis=1).sum())
    if differ:
        return (
            None,
            f"evaluation {eval_id}'s {split} codes differ from the model's on {differ} of {len(sample)} sampled items",
        )
    source = f"evaluation {eval_id} of run {run_id}, verified on {len(sample)} items"
    return EvaluationCodes(packed, tags.get("eval.device") or "unrecorded", want, source), None


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class IndexResult:
    directory: Path
    manifest: dict[str, Any]
    encoded_blocks: int  # blocks encoded by this run (the others were resumed)
    blocks: int
    seconds: float
    images_per_s: float  # items encoded by this run / encoding time


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _block_file(partial: Path, block: int) -> Path:
    return partial / "blocks" / f"{block:06d}.npz"


def _plan(collection: Collection, resolved: ResolvedModel, params: Params) -> dict[str, Any]:
    """What the blocks depend on: a partial run is resumed only under the same plan."""
    i = params.index
    return {
        "format": FORMAT,
        "model": resolved.uri,
        "run_id": resolved.run_id,
        "bits": resolved.bits,
        "image_size": resolved.image_size,
        "precision": i.precision,
        "block_size": i.block_size,
        "count": len(collection.keys),
        "source": collection.identity,
        "keys_sha256": _sha256_bytes("\n".join(collection.keys).encode()),
    }


def _start_partial(partial: Path, plan: dict[str, Any]) -> None:
    """Keep the finished blocks of an earlier run of the same plan; else start afresh."""
    plan_file = partial / PLAN
    if plan_file.exists():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old == plan:
            return
        changed = sorted(k for k in set(plan) | set(old or {}) if (old or {}).get(k) != plan.get(k))
        print(
            f"{partial}: an unfinished index of another plan (differs in {', '.join(changed)}): starting afresh",
            flush=True,
        )
        shutil.rmtree(partial)
    (partial / "blocks").mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_file, plan)


def _read_block(path: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    with np.load(path) as z:
        return z["codes"], z["ok"], {int(k): v for k, v in json.loads(str(z["problems"])).items()}


def _block_device(path: Path) -> str:
    with np.load(path) as z:
        return str(z["device"])


def _fail_on(problems: dict[int, str], start: int, collection: Collection) -> None:
    i, why = min(problems.items())
    where = collection.where(start + i)
    raise DataError(
        f"{where}: {why} (index.on_bad_image: skip leaves such items out; {len(problems)} bad in this block)"
    )


def _resources(workers: int | None) -> tuple[int, float, float, int]:
    """(actors, CPUs each, GPUs each, torch threads each) for the cluster this process joined."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 1)), int(have.get("GPU", 0))
    n = workers or max(1, gpus)
    node_cpus = max((int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")), default=cpus)
    per = max(1, min(cpus // n, node_cpus)) if cpus >= n else 1
    if gpus and n > gpus:
        raise ConfigError(
            f"index.workers={n}, but the cluster has {gpus} GPU(s): one GPU each (set index.workers <= {gpus})"
        )
    return n, float(per), 1.0 if gpus else 0.0, per


def _encode_blocks(
    todo: list[int], model, collection: Collection, resolved: ResolvedModel, params: Params, partial: Path, bar
) -> float:
    """Encode the blocks ``todo`` on Ray Data, writing each as it comes; seconds spent."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    from .cluster import ensure_ray, started_here
    from .console import verbose

    i = params.index
    was_up = ray.is_initialized()
    ensure_ray()
    started = not was_up and started_here()
    try:
        n, cpus, gpus, threads = _resources(i.workers)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = verbose()  # ours counts images; Ray Data's with --verbose
        if not verbose():  # nor Ray Data's INFO lines (and its note that its bars are off)
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        fault = os.environ.get(FAULT_ENV, "")
        stop_after = int(fault.split(":", 1)[1]) if fault.startswith("after-blocks:") else None
        t0 = time.perf_counter()
        ds = ray.data.from_items([{"block": b} for b in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            BlockEncoder,
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=min(n, len(todo))),
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "model": model,
                "reader": collection.reader,
                "count": len(collection.keys),
                "block_size": i.block_size,
                "image_size": resolved.image_size,
                "precision": i.precision,
                "batch_size": i.batch_size,
                "convert": collection.convert,
                "threads": threads,
            },
        )
        written = 0
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            block, data = int(batch["block"][0]), batch["data"][0]
            path = write_atomic(_block_file(partial, block), bytes(data))
            _, ok, problems = _read_block(path)
            bar.update(len(ok))
            written += 1
            if problems and i.on_bad_image == "fail":
                _fail_on(problems, block * i.block_size, collection)
            if stop_after is not None and written >= stop_after:
                raise RuntimeError(f"{FAULT_ENV}={fault}: injected fault after {written} block(s)")
        return time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


def _assemble(partial: Path, blocks: int, collection: Collection, params: Params):
    """The finished blocks, in order: packed codes of the good items, their positions, the skipped."""
    codes, keep, skipped = [], [], []
    for b in range(blocks):
        c, ok, problems = _read_block(_block_file(partial, b))
        start = b * params.index.block_size
        if problems and params.index.on_bad_image == "fail":
            _fail_on(problems, start, collection)
        codes.append(c)
        keep.append(start + np.flatnonzero(ok))
        skipped += [
            {"where": collection.where(start + j), "key": collection.keys[start + j], "reason": why}
            for j, why in sorted(problems.items())
        ]
    return np.concatenate(codes), np.concatenate(keep).astype(np.int64), skipped


#: What an index folder and an unfinished build (``<out>.partial``) hold: nothing else is
#: ever deleted (see :func:`check_out`).
_INDEX_FILES = frozenset({MANIFEST, CODES, KEYS, LABELS})
_PARTIAL_ENTRIES = frozenset({PLAN, "blocks"})


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a path an index build may write: absent, an empty folder, or an index this
    project wrote (its manifest's format, and no file but the format's), and so may its
    ``<out>.partial``. Anything else is refused before any work, since the build replaces
    the folder whole."""
    out = Path(out)
    why = not_replaceable(out, lambda e: e.name in _INDEX_FILES, what="an index", marker=MANIFEST)
    if why is None and (out / MANIFEST).is_file():
        try:
            read_manifest(out)  # the manifest only: a corrupt index of ours may be rebuilt
        except NotAnIndex as e:
            why = f"not an index this project wrote ({e})"
    if why is None:
        partial = out.with_name(out.name + ".partial")
        why = not_replaceable(partial, lambda e: e.name in _PARTIAL_ENTRIES, what="an unfinished index", marker=PLAN)
    if why:
        raise ConfigError(
            f"--out {out}: {why}; an index is written only to a new or empty folder or over an index (nothing else is replaced)"
        )
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an older index there is removed only once the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build_index(
    params: Params,
    out: str | os.PathLike,
    *,
    model: str,
    dataset: str | None = None,
    split: str | None = None,
    images: str | None = None,
    root: str | None = None,
    progress: bool | None = None,
    reencode: bool = False,
) -> IndexResult:
    """Encode a collection with the model ``model`` (a ``models:/`` URI) into the index
    folder ``out``, resuming from ``<out>.partial`` when an earlier run of the same plan left
    finished blocks there. A prepared split that the model's evaluation encoded takes the
    evaluation's codes instead, once verified (:func:`evaluation_codes`), unless ``reencode``."""
    from dpfah.train import precision_used

    t0 = time.perf_counter()
    out = check_out(out)
    collection = open_collection(params, dataset=dataset, split=split, images=images, root=root)
    resolved = resolve_model(params, model)
    loaded = load_model(resolved)
    plan = _plan(collection, resolved, params)
    partial = out.with_name(out.name + ".partial")
    count, size = len(collection.keys), params.index.block_size
    blocks = -(-count // size)
    reused, why = (None, None) if reencode else evaluation_codes(params, collection, resolved, loaded)
    if reused is not None:  # nothing to encode; an unfinished encoding in partial is not needed
        packed, keep, skipped, device, seconds, done_items, todo = (
            reused.packed,
            np.arange(count, dtype=np.int64),
            [],
            reused.device,
            0.0,
            count,
            [],
        )
        used, codes_from = reused.precision_used, reused.codes_from
    else:
        if why:
            print(f"not reusing the evaluation's codes: {why}; encoding", flush=True)
        packed, keep, skipped, device, seconds, done_items, todo = _encode_collection(
            collection, resolved, loaded, params, partial, plan, progress
        )
        used, codes_from = precision_used(plan["precision"], device), "encoded"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = write_index(tmp, packed, keep, collection, resolved, skipped, plan, device, used, codes_from)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    encoded = count - done_items
    return IndexResult(
        out, manifest, len(todo), blocks, time.perf_counter() - t0, encoded / seconds if seconds else 0.0
    )


def _encode_collection(
    collection: Collection, resolved: ResolvedModel, loaded, params: Params, partial: Path, plan, progress: bool | None
):
    """Encode the blocks ``partial`` lacks (on Ray Data) and assemble all of them: (packed
    codes, kept positions, skipped, device, encoding seconds, items resumed, blocks encoded)."""
    from tqdm import tqdm

    _start_partial(partial, plan)
    count, size = len(collection.keys), params.index.block_size
    blocks = -(-count // size)
    todo = [b for b in range(blocks) if not _block_file(partial, b).exists()]
    done_items = sum(min(count, (b + 1) * size) - b * size for b in range(blocks) if b not in set(todo))
    seconds = 0.0
    if todo:
        what = f"index {collection.identity.get('split') or Path(collection.identity.get('path', '')).name}"
        with tqdm(
            total=count,
            initial=done_items,
            desc=what,
            unit="img",
            disable=False if progress else None if progress is None else True,
        ) as bar:
            seconds = _encode_blocks(todo, loaded, collection, resolved, params, partial, bar)
    packed, keep, skipped = _assemble(partial, blocks, collection, params)
    device = _block_device(_block_file(partial, 0)) if blocks else "cpu"
    return packed, keep, skipped, device, seconds, done_items, todo


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.index",
        description=(
            "Encode a collection of images with a registered model into a searchable index folder\n"
            "(packed codes, a key per item, labels when known, manifest.json). Encodes on Ray Data\n"
            "(an actor pool; GPUs when the cluster has them); a killed run resumes where it stopped.\n"
            "Search it with python -m pipeline.search."
        ),
        epilog=(
            "examples:\n"
            "  python -m pipeline.index --dataset cifar10 --bits 64 --split database       # -> index/cifar10-64\n"
            "  python -m pipeline.index --dataset cifar10 --bits 64 --images ~/photos --out index/photos\n"
            "  python -m pipeline.index --images photos.tar --model models:/dpfah-cifar10-64b/3 --out index/photos\n"
            "  python -m pipeline.index --images list.txt --root /data/images --model models:/dpfah-cifar10-64b@champion --out index/mine\n"
            "  ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipeline.index ...\n"
            "The model: --model, else the champion (promote.alias) of promote.model_name for --dataset,\n"
            "--bits and --method. A list file has one `<path> [0/1 label vector]` per line. Settings:\n"
            "index.workers, index.batch_size, index.block_size, index.precision, index.on_bad_image\n"
            "(--set index.on_bad_image=skip leaves unreadable images out, listed in the manifest).\n"
            "Errors print one line and exit 2."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", metavar="NAME", help="dataset of the model (and of --split); with --bits it names the champion"
    )
    parser.add_argument(
        "--bits", type=int, metavar="L", help="code length of the model (with --dataset: names the champion)"
    )
    parser.add_argument(
        "--method",
        metavar="NAME",
        default=DEFAULT_METHOD,
        help="method or variant whose champion encodes (default: dpfah)",
    )
    parser.add_argument(
        "--model",
        metavar="URI",
        help="a models:/ URI instead of the champion (models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--split", metavar="SPLIT", help="index this split of the prepared --dataset (e.g. database)")
    what.add_argument(
        "--images", metavar="PATH", help="index an image folder, a .tar archive of images, or a list file"
    )
    parser.add_argument(
        "--root", metavar="DIR", help="where a list file's relative paths start (default: the list's folder)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="the index folder (default with --split: index/<dataset>-<bits>): new, empty, or an index, which is replaced; any other folder is refused, never deleted",
    )
    parser.add_argument(
        "--reencode", action="store_true",
        help="encode a query or database split even when the model's evaluation logged its codes (they are reused once verified)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    if args.split is None and args.images is None:
        raise ConfigError("give --split (with --dataset) or --images (a folder, a .tar archive or a list file)")
    model = args.model
    if model is None:
        if args.dataset is None or args.bits is None:
            raise ConfigError("give --dataset and --bits (their champion encodes) or --model models:/...")
        params.dataset(args.dataset)
        model = default_model_uri(params, args.dataset, args.bits, args.method)
    out = args.out
    if out is None:
        if args.split is None or args.bits is None:
            raise ConfigError("give --out DIR (the index folder)")
        out = default_out(args.dataset, args.bits)
    result = build_index(
        params, out, model=model, dataset=args.dataset, split=args.split, images=args.images, root=args.root,
        progress=False if args.quiet else None, reencode=args.reencode,
    )  # fmt: skip
    m = result.manifest
    skipped = f", {m['skipped']['count']} skipped (see manifest)" if m["skipped"]["count"] else ""
    if m["codes_from"] != "encoded":
        resumed = f", the codes of {m['codes_from']}"
    else:
        resumed = (
            f", {result.blocks - result.encoded_blocks} of {result.blocks} blocks resumed"
            if result.encoded_blocks < result.blocks
            else ""
        )
    rate = f" ({result.images_per_s:,.0f} img/s encoding)" if result.images_per_s else ""
    print(
        f"indexed {m['count']:,} items with {m['model']['uri']} ({m['bits']} bits){skipped}{resumed} -> {result.directory} in {result.seconds:.1f} s{rate}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
