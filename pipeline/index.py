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
import contextlib
import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import DEFAULT_METHOD, not_replaceable
from .collection import open_collection
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, DataError, run_main
from .index_blocks import PLAN, EncodeTiming, encode_collection, plan_of
from .index_format import (
    CODES,
    KEYS,
    LABELS,
    MANIFEST,
    SUBLINEAR,
    NotAnIndex,
    load_index,
    read_manifest,
    write_index,
)
from .index_reuse import evaluation_codes
from .index_sublinear import KINDS, SublinearSpec, add_sublinear, describe, import_faiss, sublinear_bytes
from .registry import default_model_uri, load_model, resolve_model

__all__ = [
    "IndexResult",
    "build_index",
    "default_out",
    "main",
]


def default_out(dataset: str, bits: int) -> Path:
    """Where the DVC stage (and --split without --out) writes: ``index/<dataset>-<bits>``."""
    return Path("index") / f"{dataset}-{bits}"


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class IndexResult:
    directory: Path
    manifest: dict[str, Any]
    encoded_blocks: int  # blocks encoded by this run (the others were resumed)
    blocks: int
    seconds: float
    images_per_s: float  # items encoded by this run / encoding time
    timing: EncodeTiming = EncodeTiming()  # the encoding's actor start-up and steady state


#: What an index folder and an unfinished build (``<out>.partial``) hold: nothing else is
#: ever deleted (see :func:`check_out`).
_INDEX_FILES = frozenset({MANIFEST, CODES, KEYS, LABELS, SUBLINEAR})
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
            f"--out {out}: {why}; an index is written only to a new or empty folder or over an index "
            "(nothing else is replaced)"
        )
    return out


def space_needed(collection, bits: int, *, encoding: bool, sublinear: SublinearSpec | None = None) -> int:
    """Bytes an index build writes at least: its codes and labels (.npy, their exact sizes;
    the keys and the manifest come on top), while ``encoding`` the blocks' codes and masks
    beside them, and the ``sublinear`` index's faiss file."""
    count, words = len(collection.keys), -(-bits // 64)
    codes = count * words * 8 + 128
    labels = 0 if collection.labels is None else int(collection.labels.size) + 128
    faiss_file = 0 if sublinear is None else sublinear_bytes(count, words, sublinear)
    return codes + labels + faiss_file + (count * (words * 8 + 1) if encoding else 0)


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    for e, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 2**e:
            return f"{n / 2**e:,.1f} {unit}"
    return f"{n:,} B"


@contextlib.contextmanager
def disk_full_is_an_error(out: Path, need: int, partial: Path) -> Iterator[None]:
    """Refuse a build that cannot fit (``need`` bytes, at least, where ``out`` goes), and turn
    a full disk met while writing into a :class:`DataError` naming ``out`` and the space: the
    temporary index is removed by the caller, finished blocks are kept for the rerun (an
    unfinished index with none is removed: it would only block the rerun)."""
    free = _free_bytes(out.absolute().parent)
    fix = "free some space (or choose another --out) and run the same command again"
    if free < need:
        raise DataError(f"{out}: {_size(free)} free on its device, the index needs at least {_size(need)}; {fix}")
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(e):
            raise
        if partial.is_dir() and not any((partial / "blocks").glob("*.npz")):
            shutil.rmtree(partial, ignore_errors=True)
        kept = f"; the finished blocks in {partial} are kept" if partial.is_dir() else ""
        free = _free_bytes(out.absolute().parent)
        raise DataError(
            f"{out}: no space left on its device while writing {Path(e.filename).name if e.filename else 'the index'} "
            f"({_size(free)} free; the index needs at least {_size(need)}, and its keys){kept}; {fix}"
        ) from None


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
    sublinear: SublinearSpec | None = None,
) -> IndexResult:
    """Encode a collection with the model ``model`` (a ``models:/`` URI) into the index
    folder ``out``, resuming from ``<out>.partial`` when an earlier run of the same plan left
    finished blocks there. A prepared split that the model's evaluation encoded takes the
    evaluation's codes instead, once verified (:func:`evaluation_codes`), unless ``reencode``.
    A full disk is a DataError naming ``out`` and the space needed; the index in ``out``, if
    any, is left as it was. ``sublinear``: also a faiss index of the codes beside them
    (:mod:`pipeline.index_sublinear`)."""
    t0 = time.perf_counter()
    out = check_out(out)
    collection = open_collection(params, dataset=dataset, split=split, images=images, root=root)
    resolved = resolve_model(params, model)
    loaded = load_model(resolved)
    plan = plan_of(collection, resolved, params)
    partial = out.with_name(out.name + ".partial")
    count, size = len(collection.keys), params.index.block_size
    blocks = -(-count // size)
    reused, why = (None, None) if reencode else evaluation_codes(params, collection, resolved, loaded)
    need = space_needed(collection, resolved.bits, encoding=reused is None, sublinear=sublinear)
    with disk_full_is_an_error(out, need, partial):
        packed, keep, skipped, device, timing, done_items, todo, used, codes_from = _codes(
            collection, resolved, loaded, params, partial, plan, progress, reused, why
        )
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            manifest = write_index(tmp, packed, keep, collection, resolved, skipped, plan, device, used, codes_from)
            if sublinear is not None:
                manifest = add_sublinear(tmp, manifest, packed, sublinear)
            _swap_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    encoded = count - done_items
    rate = encoded / timing.seconds if timing.seconds else 0.0
    return IndexResult(out, manifest, len(todo), blocks, time.perf_counter() - t0, rate, timing)


def add_sublinear_to(out: str | os.PathLike, spec: SublinearSpec) -> tuple[dict, float]:
    """Build the sub-linear index ``spec`` of the index already in ``out`` from its codes (no
    model, nothing encoded): its files are verified (sha256) first, the space checked, then
    the faiss file is written beside the codes and the manifest rewritten, each atomically
    (one there before is replaced). Returns the manifest and the seconds taken."""
    t0 = time.perf_counter()
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise ConfigError(
            f"--out {out}: no index there to add a sub-linear index to ({MANIFEST} not found); "
            "give --split or --images to build one"
        )
    index = load_index(out, verify=True)
    manifest = {k: v for k, v in index.manifest.items() if k != "sublinear"}
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k != SUBLINEAR}
    n, words = index.codes.shape
    need = sublinear_bytes(n, words, spec)
    free = _free_bytes(out)
    if free < need:
        raise DataError(f"{out}: {_size(free)} free on its device, the sub-linear index needs at least {_size(need)}")
    manifest = add_sublinear(out, manifest, np.asarray(index.codes), spec)
    return manifest, time.perf_counter() - t0


def _codes(collection, resolved, loaded, params: Params, partial: Path, plan, progress, reused, why):
    """The evaluation's codes (``reused``), else the collection encoded: (packed, kept rows,
    skipped, device, encoding timing, items resumed, blocks encoded, precision used, codes_from)."""
    from dpfah.train import precision_used

    count = len(collection.keys)
    if reused is not None:  # nothing to encode; an unfinished encoding in partial is not needed
        packed, keep, skipped, device, timing, done_items, todo = (
            reused.packed,
            np.arange(count, dtype=np.int64),
            [],
            reused.device,
            EncodeTiming(),
            count,
            [],
        )
        used, codes_from = reused.precision_used, reused.codes_from
    else:
        if why:
            print(f"not reusing the evaluation's codes: {why}; encoding", flush=True)
        packed, keep, skipped, device, timing, done_items, todo = encode_collection(
            collection, resolved, loaded, params, partial, plan, progress
        )
        used, codes_from = precision_used(plan["precision"], device), "encoded"
    return packed, keep, skipped, device, timing, done_items, todo, used, codes_from


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
            "  python -m pipeline.index --images list.txt --root /data/images \\\n"
            "      --model models:/dpfah-cifar10-64b@champion --out index/mine\n"
            "  python -m pipeline.index --out index/photos --sublinear ivf      # add a faiss index, no re-encoding\n"
            "  ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipeline.index ...\n"
            "The model: --model, else the champion (promote.alias) of promote.model_name for --dataset,\n"
            "--bits and --method. A list file has one `<path> [0/1 label vector]` per line. Settings:\n"
            "index.workers, index.batch_size, index.block_size, index.precision, index.on_bad_image\n"
            "(--set index.on_bad_image=skip leaves unreadable images out, listed in the manifest).\n"
            "Errors print one line and exit 2. More: docs/serving.md (Search and serving)."
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
        help="a models:/ URI instead of the champion "
        "(models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>)",
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
        help="the index folder (default with --split: index/<dataset>-<bits>): new, empty, or an index, "
        "which is replaced; any other folder is refused, never deleted",
    )
    parser.add_argument(
        "--reencode", action="store_true",
        help="encode a query or database split even when the model's evaluation logged its codes "
        "(they are reused once verified)",
    )  # fmt: skip
    parser.add_argument(
        "--sublinear", choices=KINDS,
        help="also build a faiss binary IVF index beside the codes, which pipeline.search then uses (approximate, "
        "its recall@10/@100 measured here; for collections of millions; needs the faiss extra); with --out alone "
        "(no --split or --images), add it to the index already in --out, from its codes",
    )  # fmt: skip
    parser.add_argument("--nlist", type=int, metavar="N", help="--sublinear's lists (default: about sqrt(items) / 4)")
    parser.add_argument(
        "--nprobe", type=int, metavar="N",
        help=f"lists a search probes by default (default {SublinearSpec.nprobe}; pipeline.search --nprobe overrides)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    if args.split is None and args.images is None:
        if args.sublinear and args.out:  # to the index already there, from its codes
            manifest, seconds = add_sublinear_to(args.out, _sublinear_spec(args))
            if "sublinear" not in manifest:
                print(f"{args.out}: the index holds no codes; no sub-linear index needed")
                return 0
            print(
                f"added a sub-linear index to {args.out} ({manifest['count']:,} codes, none encoded) in "
                f"{seconds:.1f} s: {describe(manifest['sublinear'])}"
            )
            return 0
        raise ConfigError(
            "give --split (with --dataset) or --images (a folder, a .tar archive or a list file); "
            "or --out DIR --sublinear ivf alone to add a sub-linear index to the index in DIR"
        )
    model = args.model
    if model is None:
        if args.dataset is None or args.bits is None:
            raise ConfigError("give --dataset and --bits (their champion encodes) or --model models:/...")
        params.dataset(args.dataset)
        model = default_model_uri(params, args.dataset, args.bits, args.method)
    sublinear = _sublinear_spec(args)
    out = args.out
    if out is None:
        if args.split is None or args.bits is None:
            raise ConfigError("give --out DIR (the index folder)")
        out = default_out(args.dataset, args.bits)
    result = build_index(
        params, out, model=model, dataset=args.dataset, split=args.split, images=args.images, root=args.root,
        progress=False if args.quiet else None, reencode=args.reencode, sublinear=sublinear,
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
    t = result.timing
    rate = (
        f" ({result.images_per_s:,.0f} img/s encoding: {t.startup_s:.1f} s actor start-up, "
        f"then {t.steady_images_per_s:,.0f} img/s)"
        if result.images_per_s
        else ""
    )
    print(
        f"indexed {m['count']:,} items with {m['model']['uri']} ({m['bits']} bits){skipped}{resumed} "
        f"-> {result.directory} in {result.seconds:.1f} s{rate}"
    )
    if "sublinear" in m:
        print(f"sub-linear index in {m['sublinear']['build_s']:.1f} s: {describe(m['sublinear'])}")
    return 0


def _sublinear_spec(args: argparse.Namespace) -> SublinearSpec | None:
    """--sublinear, --nlist and --nprobe, checked (faiss importable) before any work."""
    if args.sublinear:
        nprobe = SublinearSpec.nprobe if args.nprobe is None else args.nprobe
        spec = SublinearSpec(args.sublinear, args.nlist, nprobe).check()
        import_faiss("--sublinear")
        return spec
    if args.nlist is not None or args.nprobe is not None:
        raise ConfigError("--nlist and --nprobe go with --sublinear ivf")
    return None


if __name__ == "__main__":
    sys.exit(run_main(main))
