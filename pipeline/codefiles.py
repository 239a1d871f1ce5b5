"""The codes files: packed codes of a prepared split with their labels and indices, as one
Parquet table (``index`` int64, ``code`` packed uint64 words, ``labels`` uint8 vector, and
metadata: bits, dataset, split, run_id, manifest_sha256).

Evaluate writes them (the query codes for DVC, both splits under ``evaluation/codes/`` of the
training's MLflow run); the report reads the query codes, and index takes a split's codes
from the run instead of encoding it again.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["ARTIFACT_DIR", "codes_table", "load_codes"]


ARTIFACT_DIR = "evaluation"


def codes_table(codes: np.ndarray, labels: np.ndarray, index: np.ndarray, meta: dict[str, str]):
    """A pyarrow table: ``index`` int64, ``code`` packed uint64 words, ``labels`` uint8 vector."""
    import pyarrow as pa

    from dpfah.codes import pack_codes

    packed = pack_codes(codes)
    code = pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1), pa.uint64()), packed.shape[1])
    lab = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(labels).reshape(-1), pa.uint8()), labels.shape[1]
    )
    table = pa.table({"index": pa.array(index, pa.int64()), "code": code, "labels": lab})
    return table.replace_schema_metadata({k.encode(): str(v).encode() for k, v in meta.items()})


def load_codes(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """Read a codes Parquet file: packed codes (n, words) uint64, labels (n, classes) uint8,
    indices (n,) int64 and the metadata (bits, dataset, split, run_id, manifest_sha256)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    n = table.num_rows
    code = table.column("code").combine_chunks()
    lab = table.column("labels").combine_chunks()
    packed = np.asarray(code.values.to_numpy(zero_copy_only=False), dtype=np.uint64).reshape(n, code.type.list_size)
    labels = np.asarray(lab.values.to_numpy(zero_copy_only=False), dtype=np.uint8).reshape(n, lab.type.list_size)
    index = table.column("index").to_numpy()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return packed, labels, index, meta
