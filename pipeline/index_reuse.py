"""The codes a model's evaluation logged for a prepared split, taken by ``pipeline.index``
instead of encoding the split again once verified: a complete evaluation on the same shards
and precision, whose codes equal the model's own on items spread over the split."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .collection import Collection
from .config import Params
from .encoding import encode_images
from .registry import ResolvedModel
from .tracking import connect, get_run

__all__ = ["EVALUATED_SPLITS", "VERIFY_ITEMS", "EvaluationCodes", "evaluation_codes"]

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
            f"evaluation {eval_id} ran on other shards (manifest sha256 "
            f"{str(tags.get('eval.manifest_sha256'))[:12]}, these {ident['manifest_sha256'][:12]})",
        )
    want = _precision_here(params.index.precision)
    if tags.get("eval.precision") != want:
        return (
            None,
            f"evaluation {eval_id} encoded in {tags.get('eval.precision') or 'an unrecorded precision'}, "
            f"index.precision={params.index.precision} means {want} here",
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
                f"evaluation {eval_id}'s {split} codes are unreadable "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
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
