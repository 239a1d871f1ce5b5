"""Readers of a prepared split for training and evaluation, as ``torch`` iterable datasets.

:class:`TrainStream` gives every rank the same number of full batches per epoch and each sample
to at most one rank and worker (an exact, seeded partition); :class:`EvalStream` yields every
sample of a split exactly once over all ranks and workers. Both yield :class:`Batch` tuples
``(images, labels, index)``; use them in a ``DataLoader`` with ``batch_size=None``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .images import decode_image
from .manifest import ShardError, read_manifest
from .shards import Sample, read_piece


class Batch(NamedTuple):
    """A batch from a reader.

    ``images``: a list of encoded bytes, or with ``decode=True`` a uint8 tensor
    (N, 3, H, W); ``labels``: uint8 (N, classes); ``index``: int64 (N,), each sample's
    position in its split.
    """

    images: Any
    labels: torch.Tensor
    index: torch.Tensor


def _make_batch(samples: Sequence[Sample], decode: bool) -> Batch:
    labels = torch.from_numpy(np.stack([s.labels for s in samples]))
    index = torch.tensor([s.index for s in samples], dtype=torch.int64)
    if not decode:
        return Batch([s.image for s in samples], labels, index)
    images = [decode_image(s.image) for s in samples]
    if any(im.shape != images[0].shape for im in images):
        shapes = sorted({tuple(im.shape) for im in images})
        raise ShardError(
            f"decode=True needs images of one size in a batch, got {shapes[:3]}: read the encoded bytes "
            "(decode=False) and resize on the device (dpfah.augment.decode_batch)"
        )
    return Batch(torch.stack(images), labels, index)


def _resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _share(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of ``part`` when ``total`` items are cut into ``parts`` near-equal runs."""
    return total * part // parts, total * (part + 1) // parts


class _Layout:
    """Positions of a split's samples across its shards, in some shard order."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self.paths = list(paths)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.starts[-1])

    def pieces(self, start: int, length: int) -> Iterator[tuple[str, int, int]]:
        """(shard path, first, stop) runs covering ``length`` positions from ``start``,
        wrapping around the end."""
        if self.total == 0:
            return
        pos = start % self.total
        while length > 0:
            s = int(np.searchsorted(self.starts, pos, side="right") - 1)
            lo = pos - int(self.starts[s])
            n = min(length, int(self.counts[s]) - lo)
            yield self.paths[s], lo, lo + n
            length -= n
            pos = (pos + n) % self.total


def _open_split(directory: str | os.PathLike, split: str, batch_size: int):
    """(the manifest, the split's entry) for a reader of ``batch_size`` batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(directory)
    return manifest, manifest.split(split)


class TrainStream(IterableDataset):
    """Training batches: the same number of full batches on every rank, whatever the shards.

    Each epoch every rank and DataLoader worker computes the same plan from ``(seed,
    epoch)``: a random shard order and a random starting offset into the concatenated split.
    Rank ``r`` then reads the ``r``-th run of ``len(self) * batch_size`` consecutive samples
    (its workers cut that run into near-equal whole-batch parts), through a seeded shuffle
    buffer. Every sample is used at most once per epoch; with ``drop_last`` (default) fewer
    than ``world_size * batch_size`` samples are left out, different ones each epoch (the
    stored order is already random). Without it the runs wrap around so that every sample
    is used and a few are used twice. Reading is sequential within shards, as WebDataset's
    resampled shards are, but the epoch is exact.

    Call :meth:`set_epoch` before each epoch (not with ``persistent_workers=True``).
    ``rank``/``world_size`` default to the process group, else ``RANK``/``WORLD_SIZE``.
    ``batch_size`` is per rank.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        decode: bool = False,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.manifest, info = _open_split(directory, split, batch_size)
        if info.count == 0:
            raise ShardError(f"{self.manifest.directory}: split {split!r} is empty")
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.decode = decode
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = _resolve_world(rank, world_size)
        self.epoch = 0
        self._paths = self.manifest.shard_paths(split)
        self._counts = [s.count for s in info.shards]
        global_batch = self.world_size * batch_size
        if drop_last:
            self.batches_per_rank = info.count // global_batch
            if self.batches_per_rank == 0:
                raise ShardError(
                    f"split {split!r} has {info.count} samples, fewer than one batch of {batch_size} on each of "
                    f"{self.world_size} ranks; lower the batch size or use drop_last=False"
                )
        else:
            self.batches_per_rank = -(-info.count // global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_rank

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, *words])))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        plan = self._rng()
        order = plan.permutation(len(self._paths))
        layout = _Layout([self._paths[i] for i in order], [self._counts[i] for i in order])
        offset = int(plan.integers(layout.total))
        b0, b1 = _share(self.batches_per_rank, workers, worker)
        start = offset + (self.rank * self.batches_per_rank + b0) * self.batch_size
        length = (b1 - b0) * self.batch_size
        rng = self._rng(1 + self.rank, worker)
        buffer: list[Sample] = []
        out: list[Sample] = []

        def emit(sample: Sample) -> Iterator[Batch]:
            out.append(sample)
            if len(out) == self.batch_size:
                yield _make_batch(out, self.decode)
                out.clear()

        for path, lo, hi in layout.pieces(start, length):
            for sample in read_piece(path, lo, hi):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield from emit(sample)
        for j in rng.permutation(len(buffer)):
            yield from emit(buffer[j])


class EvalStream(IterableDataset):
    """Every sample of a split exactly once over all ranks and DataLoader workers.

    Rank ``r`` of ``R`` reads the ``r``-th of ``R`` near-equal consecutive runs of the
    stored order (sizes differ by at most one); its workers cut that run again. Batches
    carry each sample's index: order by it (within a rank, workers interleave) to get the
    stored order. ``num_samples`` is this rank's share.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str,
        *,
        batch_size: int = 256,
        decode: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.manifest, info = _open_split(directory, split, batch_size)
        self.split = split
        self.batch_size = batch_size
        self.decode = decode
        self.rank, self.world_size = _resolve_world(rank, world_size)
        self._layout = _Layout(self.manifest.shard_paths(split), [s.count for s in info.shards])
        self._start, self._stop = _share(info.count, self.world_size, self.rank)

    @property
    def num_samples(self) -> int:
        return self._stop - self._start

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        lo, hi = _share(self.num_samples, workers, worker)
        out: list[Sample] = []
        for path, a, b in self._layout.pieces(self._start + lo, hi - lo):
            for sample in read_piece(path, a, b):
                out.append(sample)
                if len(out) == self.batch_size:
                    yield _make_batch(out, self.decode)
                    out = []
        if out:
            yield _make_batch(out, self.decode)
