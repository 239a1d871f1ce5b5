"""Stage `search`: the nearest items of an index (``pipeline.index``) by Hamming distance.

Queries are image files (regular files up to ``--max-query-bytes``, encoded with the model
version the index records) or keys of its items; the search is exact (top ``-k`` by distance
then key, or all within ``--radius``), or approximate where the index has a sub-linear index
(:mod:`pipeline.index_sublinear`; ``--exact`` scans), printed as a table, drawn with ``--grid``
(:mod:`pipeline.search_grid`). How it works: docs/serving.md; usage: ``--help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import Params, add_config_args, config_from_args
from .encoding import MAX_IMAGE_BYTES, encode_images, read_image_file
from .errors import ConfigError, DataError, run_main
from .index_format import Index, load_index
from .index_sublinear import describe, load_sublinear, search_sublinear
from .registry import MismatchError, load_model, record_tracking_uri, resolve_model

__all__ = ["Hit", "search", "query_codes", "read_queries", "main", "MAX_QUERY_BYTES"]

#: The largest query image file read (``--max-query-bytes``): an image of a few megapixels is
#: a few MB; anything far larger is not a query and is refused before it is read.
MAX_QUERY_BYTES = MAX_IMAGE_BYTES


@dataclass(frozen=True)
class Hit:
    rows: np.ndarray  # int64 rows of the index, best first
    distances: np.ndarray  # int32


def search(
    index: Index, packed: np.ndarray, *, k: int = 10, radius: int | None = None, sublinear=None, nprobe: int = 1
) -> list[Hit]:
    """Per query (packed codes, (n_q, words) uint64): the top ``k`` rows by (distance, row),
    or with ``radius`` every row within it, in the same order. Exact, but for the top ``k``
    with ``sublinear`` (the index's faiss index, :func:`pipeline.index_sublinear.load_sublinear`),
    approximate, probing ``nprobe`` lists."""
    packed = np.ascontiguousarray(packed, dtype=np.uint64)
    if len(index) == 0 or len(packed) == 0:
        return [Hit(np.zeros(0, np.int64), np.zeros(0, np.int32)) for _ in range(len(packed))]
    if sublinear is not None and radius is None:
        return [Hit(r, d) for r, d in zip(*search_sublinear(sublinear, packed, k, nprobe))]
    h = index.hamming()
    if radius is None:
        idx, dist = h.search(packed, k)
        return [Hit(i, d) for i, d in zip(idx, dist)]
    counts = h.count_within(packed, radius)
    most = int(counts.max())
    if most == 0:
        return [Hit(np.zeros(0, np.int64), np.zeros(0, np.int32)) for _ in range(len(packed))]
    idx, dist = h.search(packed, most)  # the nearest `most`; each query keeps its own count
    return [Hit(i[:c], d[:c]) for i, d, c in zip(idx, dist, counts)]


def read_queries(paths: Sequence[str], max_bytes: int = MAX_QUERY_BYTES) -> tuple[list[bytes | None], dict[str, str]]:
    """The bytes of each query image file (None where it cannot be read, with why). A path
    that is not a regular file (a FIFO, a device such as /dev/zero, a folder) or is over
    ``max_bytes`` is refused: :class:`pipeline.encoding.NotAnImageFile`, before any is read."""
    data: list[bytes | None] = []
    problems: dict[str, str] = {}
    for path in paths:
        try:
            data.append(read_image_file(path, max_bytes))
        except OSError as e:
            data.append(None)
            problems[path] = f"cannot read ({e.strerror or e})"
    return data, problems


def query_codes(index: Index, images: Sequence[str], params: Params, data: Sequence[bytes | None] | None = None):
    """Packed codes of query image files (their bytes ``data``, else read with
    :func:`read_queries`), encoded with the index's model version the way its items were
    (device type and precision of the index); the files that failed, with why."""
    import torch

    from dpfah.codes import pack_codes

    m = index.manifest["model"]
    uri = record_tracking_uri({"tracking_uri": m.get("tracking_uri")}, params)
    resolved = resolve_model(params, m["uri"], uri)
    if resolved.run_id != m["run_id"] or resolved.bits != index.bits:
        raise MismatchError(
            f"{m['uri']} is now run {resolved.run_id} ({resolved.bits} bits); "
            f"the index was built with run {m['run_id']} ({index.bits} bits)"
        )
    problems: dict[str, str] = {}
    if data is None:
        data, problems = read_queries(images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(resolved, device)
    codes, ok, bad = encode_images(
        model, data, device, resolved.image_size, index.manifest.get("precision_used", "fp32")
    )
    problems.update({images[i]: why for i, why in bad.items()})
    return pack_codes(codes) if len(codes) else np.zeros((0, int(index.manifest["words"])), np.uint64), ok, problems


# ----------------------------------------------------------------------------- output


def _label(index: Index, row: int) -> str:
    from .figures import class_name

    if index.labels is None or not index.manifest.get("classes"):
        return ""
    return class_name(index.labels[row], index.manifest["classes"])


def table(index: Index, names: Sequence[str], hits: Sequence[Hit]) -> str:
    """The results as a fixed-width text table."""
    header = (
        ["query", "rank", "key", "distance"]
        + (["label"] if index.labels is not None else [])
        + (["path"] if index.paths is not None else [])
    )
    rows = []
    for name, hit in zip(names, hits):
        if len(hit.rows) == 0:
            rows.append([name, "-", "(none)", "-"] + [""] * (len(header) - 4))
        for rank, (r, d) in enumerate(zip(hit.rows, hit.distances), 1):
            row = [name, str(rank), index.key(r), str(int(d))]
            if index.labels is not None:
                row.append(_label(index, r))
            if index.paths is not None:
                row.append(index.paths[int(r)].as_py())
            rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.search",
        description=(
            "Search an index built by python -m pipeline.index: the top k items (or all within a\n"
            "Hamming radius) of query images or of items already in the index, exact, ties by key."
        ),
        epilog=(
            "examples:\n"
            "  python -m pipeline.search index/cifar10-64 cat.jpg dog.png -k 5\n"
            "  python -m pipeline.search index/cifar10-64 --key 17 --key 4242 --grid results.png\n"
            "  python -m pipeline.search index/photos --key holidays/img_0001.jpg --radius 3\n"
            "An index built with --sublinear ivf is searched through it (top k, approximate: its recall,\n"
            "measured at build time, is printed; needs the faiss extra); --exact scans every code.\n"
            "Query images are encoded with the model version recorded in the index (its MLflow store:\n"
            "the index's, unless MLFLOW_TRACKING_URI or --set mlflow.tracking_uri names another).\n"
            "Query files must be regular files of at most --max-query-bytes (a FIFO, a device or a\n"
            "larger file is refused). The last line gives the time in all, from the process's start.\n"
            "Errors print one line and exit 2. More: docs/serving.md (Search and serving)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("index", metavar="INDEX", help="the index folder")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="query image files")
    parser.add_argument(
        "--key", action="append", default=[], metavar="KEY", help="an item of the index as a query (repeatable)"
    )
    parser.add_argument("-k", type=int, default=10, metavar="K", help="results per query (default 10)")
    parser.add_argument(
        "--radius", type=int, metavar="R", help="every item within Hamming distance R instead of the top k"
    )
    parser.add_argument(
        "--exact", action="store_true", help="scan every code even where the index has a sub-linear index"
    )
    parser.add_argument(
        "--nprobe", type=int, metavar="N", help="lists the sub-linear index probes (default: the one it was built with)"
    )
    parser.add_argument("--grid", metavar="PNG", help="also draw the queries and their results into this figure")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also check each index file's sha256 against its manifest (sizes and shapes are checked on every load)",
    )
    parser.add_argument(
        "--max-query-bytes",
        type=int,
        default=MAX_QUERY_BYTES,
        metavar="N",
        help=f"refuse a query image file over N bytes (default {MAX_QUERY_BYTES:,}); only regular files are read",
    )
    add_config_args(parser)
    return parser


def _process_start() -> float | None:
    """When this process started (time.time() scale), where the OS tells it (psutil, which Ray
    installs); None elsewhere."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or the process table unreadable: no import time to show
        return None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def main(argv: Sequence[str] | None = None) -> int:
    wall0, t0 = time.time(), time.perf_counter()
    # run as `python -m pipeline.search`: the total counts from the process's start (imports too)
    started = _process_start() if getattr(main, "__module__", None) == "__main__" else None
    args = build_parser().parse_args(argv)
    if not args.images and not args.key:
        raise ConfigError("give query images and/or --key KEY")
    if args.k < 1:
        raise ConfigError(f"-k {args.k}: must be >= 1")
    if args.radius is not None and args.radius < 0:
        raise ConfigError(f"--radius {args.radius}: must be >= 0")
    if args.nprobe is not None and args.nprobe < 1:
        raise ConfigError(f"--nprobe {args.nprobe}: must be >= 1")
    if args.max_query_bytes < 1:
        raise ConfigError(f"--max-query-bytes {args.max_query_bytes}: must be >= 1")
    data, problems = read_queries(args.images, args.max_query_bytes)  # before any work: a FIFO is refused
    t = time.perf_counter()
    import pyarrow.parquet  # noqa: F401  (the imports are not the index's load time)

    import dpfah.codes  # noqa: F401

    spans: list[tuple[str, float]] = [("imports", time.perf_counter() - t)]
    t = time.perf_counter()
    index = load_index(args.index, verify=args.verify)
    info = index.manifest.get("sublinear") if not args.exact and args.radius is None else None
    approx = load_sublinear(index.directory, index.manifest) if info is not None else None
    if approx is None:
        index.hamming()  # the kernel's layout of the codes: part of loading
    nprobe = args.nprobe or (info or {}).get("nprobe", 1)
    spans.append(("index loaded", time.perf_counter() - t))
    names: list[str] = []
    packed: list[np.ndarray] = []
    queries: list[tuple[str, bytes | None, np.ndarray | None]] = []
    if args.images:
        t = time.perf_counter()
        codes, ok, bad = query_codes(index, args.images, config_from_args(args), data)
        spans.append(("model loaded and queries encoded", time.perf_counter() - t))
        for path, why in {**problems, **bad}.items():
            print(f"skipped query {path}: {why}", file=sys.stderr)
        good = [(p, d) for p, d, keep in zip(args.images, data, ok) if keep]
        names += [p for p, _ in good]
        packed.append(codes)
        queries += [(p, d, None) for p, d in good]
    if args.key:
        rows = index.rows_of(args.key)
        names += [f"key {k}" for k in args.key]
        packed.append(np.asarray(index.codes[rows]))
        queries += [
            (f"key {k}", None, None if index.labels is None else np.asarray(index.labels[r]))
            for k, r in zip(args.key, rows)
        ]
    if not names:
        raise DataError("no usable query (every query image failed; see above)")
    t = time.perf_counter()
    hits = search(index, np.concatenate(packed), k=args.k, radius=args.radius, sublinear=approx, nprobe=nprobe)
    spans.append(("searched", time.perf_counter() - t))
    print(table(index, names, hits))
    if args.grid:
        from .search_grid import draw_grid, item_bytes

        t = time.perf_counter()
        if args.key:  # the key queries' own images
            own = item_bytes(index, rows)
            offset = len(queries) - len(args.key)
            queries[offset:] = [(n, own[int(r)], lab) for (n, _, lab), r in zip(queries[offset:], rows)]
        path = draw_grid(args.grid, index, queries, hits)
        spans.append(("grid drawn", time.perf_counter() - t))
        print(f"wrote {path}")
    what = f"within distance {args.radius}" if args.radius is not None else f"top {args.k}"
    if approx is not None:
        print(f"approximate (--exact scans every code): {describe(info, nprobe)}")
        what += " (approximate)"
    total = time.perf_counter() - t0
    since = "since main started"
    if started is not None and started <= wall0:
        spans[0] = ("imports", spans[0][1] + wall0 - started)
        total += wall0 - started
        since = "since the process started"
    print(
        f"{len(names)} quer{'y' if len(names) == 1 else 'ies'}, {what} of {len(index):,} items ({index.bits} bits): "
        f"{_ms(total)} in all {since} ({', '.join(f'{n} in {_ms(s)}' for n, s in spans)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
