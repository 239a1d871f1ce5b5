"""Prepared datasets as WebDataset shards: the manifest, a reproducible shard writer and
readers, the image forms stored, and the training / evaluation streams. The format is
described in docs/data-formats.md.

``dpfah`` is a library of torch and numpy: nothing here imports the pipeline.
"""

from __future__ import annotations

from .images import UnsupportedImage, as_rgb_png, conversion_reason, decode_image
from .manifest import (
    FORMAT,
    MANIFEST_FILE,
    SPLITS,
    TABLE_FILE,
    Manifest,
    NotPrepared,
    ShardError,
    ShardInfo,
    SplitInfo,
    read_manifest,
    verify_shards,
)
from .shards import ShardWriter, read_samples, shard_name, tar_members
from .streams import Batch, EvalStream, TrainStream

__all__ = [
    "SPLITS",
    "MANIFEST_FILE",
    "TABLE_FILE",
    "FORMAT",
    "Batch",
    "ShardInfo",
    "SplitInfo",
    "Manifest",
    "ShardWriter",
    "ShardError",
    "NotPrepared",
    "read_manifest",
    "verify_shards",
    "tar_members",
    "read_samples",
    "shard_name",
    "decode_image",
    "conversion_reason",
    "as_rgb_png",
    "UnsupportedImage",
    "TrainStream",
    "EvalStream",
]
