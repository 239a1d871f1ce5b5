"""The encoding side of ``pipeline.index``: a collection cut into blocks, encoded on Ray Data
by a pool of actors, each block written to ``<out>.partial/blocks`` as it comes, so that a
killed run resumes under the same plan; then the blocks assembled in order."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import write_atomic, write_json_atomic
from .collection import Collection
from .config import Params
from .encoding import encode_images
from .errors import ConfigError, DataError
from .index_format import FORMAT
from .registry import ResolvedModel

__all__ = ["PLAN", "FAULT_ENV", "BlockEncoder", "EncodeTiming", "plan_of", "encode_collection"]

PLAN = "plan.json"
#: Fault injection for tests: ``after-blocks:N`` stops the run (an error) once N blocks are written.
FAULT_ENV = "DPFAH_INDEX_FAULT"

# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeTiming:
    """Where an encoding run's time went: ``seconds`` from the first block requested to the
    last block written, of which ``startup_s`` before the first block's encoding began (the
    actors started, the model shipped to them and loaded); the rest is the steady state.
    ``busy_s``: the actors' time inside :func:`encode_block`, summed over the actors."""

    seconds: float = 0.0
    startup_s: float = 0.0
    items: int = 0
    busy_s: float = 0.0
    actors: int = 0

    @property
    def steady_s(self) -> float:
        return self.seconds - self.startup_s

    @property
    def steady_images_per_s(self) -> float:
        return self.items / self.steady_s if self.steady_s > 0 else 0.0


class BlockEncoder:
    """A Ray Data actor: reads, decodes and encodes whole blocks of a collection. A batch is
    a few block numbers (with their items' bytes, ``items``, when the driver holds the
    collection in memory: a tar archive, read once; ``reader`` is then None); each comes back
    as the block file's bytes (npz: ``codes`` packed, ``ok`` mask, ``problems`` JSON)."""

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
        items = batch["items"] if "items" in batch else [None] * len(batch["block"])
        out, seconds = [], []
        for b, i in zip(batch["block"], items):
            t = time.perf_counter()
            out.append(encode_block(self, int(b), None if i is None else pickle.loads(i)))
            seconds.append(time.perf_counter() - t)
        return {
            "block": np.asarray(batch["block"], dtype=np.int64),
            "data": np.array(out, dtype=object),
            "seconds": np.asarray(seconds, dtype=np.float64),  # in the actor: for EncodeTiming
        }


def encode_block(enc: BlockEncoder, block: int, read: list[tuple[bytes | None, str | None]] | None = None) -> bytes:
    """The block file of block number ``block``: its items ``read`` (bytes or None, why),
    else read by the actor's reader."""
    from dpfah.codes import pack_codes, words_for_bits

    start = block * enc.block_size
    stop = min(enc.count, start + enc.block_size)
    if read is None:
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


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _block_file(partial: Path, block: int) -> Path:
    return partial / "blocks" / f"{block:06d}.npz"


def plan_of(collection: Collection, resolved: ResolvedModel, params: Params) -> dict[str, Any]:
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


#: ``index.workers: null`` on a cluster without GPUs: one single-threaded actor per CPU, up to
#: this many (the CPUs then shared out as threads): on 2 cores shared with other work, two
#: actors of one thread each encoded 2.4x faster than one of two threads (docs/benchmarks.md);
#: each actor holds the model and a batch's activations, hence the cap.
CPU_ACTORS = 4


def _resources(workers: int | None, blocks: int) -> tuple[int, float, float, int]:
    """(actors, CPUs each, GPUs each, torch threads each) for the cluster this process joined,
    to encode ``blocks`` blocks (never more actors than blocks)."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 1)), int(have.get("GPU", 0))
    n = workers or (gpus if gpus else max(1, min(cpus, CPU_ACTORS)))
    if gpus and n > gpus:
        raise ConfigError(
            f"index.workers={n}, but the cluster has {gpus} GPU(s): one GPU each (set index.workers <= {gpus})"
        )
    n = max(1, min(n, blocks))
    node_cpus = max((int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")), default=cpus)
    per = max(1, min(cpus // n, node_cpus)) if cpus >= n else 1
    return n, float(per), 1.0 if gpus else 0.0, per


def _block_items(todo: list[int], collection: Collection, size: int) -> list[dict[str, Any]]:
    """The dataset's rows: a block number each, and the block's items (pickled) when the
    driver holds them in memory, so the actors get each block once rather than the whole
    archive each (or reading it again)."""
    if not getattr(collection.reader, "in_memory", False):
        return [{"block": b} for b in todo]
    count = len(collection.keys)
    return [
        {"block": b, "items": pickle.dumps(collection.reader.read(b * size, min(count, (b + 1) * size)))} for b in todo
    ]


def _encode_blocks(
    todo: list[int], model, collection: Collection, resolved: ResolvedModel, params: Params, partial: Path, bar
) -> EncodeTiming:
    """Encode the blocks ``todo`` on Ray Data, writing each as it comes; where the time went."""
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
        actors, cpus, gpus, threads = _resources(i.workers, len(todo))
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = verbose()  # ours counts images; Ray Data's with --verbose
        if not verbose():  # nor Ray Data's INFO lines (and its note that its bars are off)
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        fault = os.environ.get(FAULT_ENV, "")
        stop_after = int(fault.split(":", 1)[1]) if fault.startswith("after-blocks:") else None
        t0 = time.perf_counter()
        ds = ray.data.from_items(_block_items(todo, collection, i.block_size), override_num_blocks=len(todo))
        shipped = getattr(collection.reader, "in_memory", False)
        ds = ds.map_batches(
            BlockEncoder,
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "model": model,
                "reader": None if shipped else collection.reader,
                "count": len(collection.keys),
                "block_size": i.block_size,
                "image_size": resolved.image_size,
                "precision": i.precision,
                "batch_size": i.batch_size,
                "convert": collection.convert,
                "threads": threads,
            },
        )
        written = items = 0
        busy, first = 0.0, None
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            block, data, took = int(batch["block"][0]), batch["data"][0], float(batch["seconds"][0])
            if first is None:  # when the first block's encoding began, on the driver's clock
                first = time.perf_counter() - took - t0
            path = write_atomic(_block_file(partial, block), bytes(data))
            _, ok, problems = _read_block(path)
            bar.update(len(ok))
            written, items, busy = written + 1, items + len(ok), busy + took
            if problems and i.on_bad_image == "fail":
                _fail_on(problems, block * i.block_size, collection)
            if stop_after is not None and written >= stop_after:
                raise RuntimeError(f"{FAULT_ENV}={fault}: injected fault after {written} block(s)")
        return EncodeTiming(time.perf_counter() - t0, max(0.0, first or 0.0), items, busy, actors)
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


def encode_collection(
    collection: Collection, resolved: ResolvedModel, loaded, params: Params, partial: Path, plan, progress: bool | None
):
    """Encode the blocks ``partial`` lacks (on Ray Data) and assemble all of them: (packed
    codes, kept positions, skipped, device, encoding timing, items resumed, blocks encoded)."""
    from tqdm import tqdm

    _start_partial(partial, plan)
    count, size = len(collection.keys), params.index.block_size
    blocks = -(-count // size)
    todo = [b for b in range(blocks) if not _block_file(partial, b).exists()]
    done_items = sum(min(count, (b + 1) * size) - b * size for b in range(blocks) if b not in set(todo))
    timing = EncodeTiming()
    if todo:
        what = f"index {collection.identity.get('split') or Path(collection.identity.get('path', '')).name}"
        with tqdm(
            total=count,
            initial=done_items,
            desc=what,
            unit="img",
            disable=False if progress else None if progress is None else True,
        ) as bar:
            timing = _encode_blocks(todo, loaded, collection, resolved, params, partial, bar)
    packed, keep, skipped = _assemble(partial, blocks, collection, params)
    device = _block_device(_block_file(partial, 0)) if blocks else "cpu"
    return packed, keep, skipped, device, timing, done_items, todo
