"""What reproducing the whole paper costs on GPUs: an estimate from measured throughput.

    python -m bench.paper_cost [--train-img-s 9000] [--encode-img-s 30000] [--workers 1]
                               [--node-gpus 4] [--entry-fixed-s 12] [--train-fixed-s 40]
                               [--evaluate-fixed-s 10] [--promote-fixed-s 10] [--seeds 3]
                               [--epochs 60] [--out bench/results/paper_cost.json]

The paper's evidence is Table 6 (10 methods x 4 code lengths x 3 datasets) and Table 5 (the
ablation variants resnet18 and resnet18-pfa beside dpfah). The command of docs/cluster.md trains
every entry of `train.methods` (the 10 methods and the 2 variants) at every code length, with
three seeds: 432 trainings, each followed by an evaluation, then one promotion pass.

Two ways of running them are costed side by side, at `profile=paper` (224 px, 60 epochs):

* the matrix (the `train` stage, `python -m pipeline.matrix`): every training is a Ray Tune
  trial; with `--workers 1` (the paper profile's `train.num_workers`) it trains on one GPU and
  evaluates in the same process, so it pays `--entry-fixed-s` once (run opening, data set-up,
  model logging, records; the process itself is reused by the next trial):

      GPU-s = entry fixed + epochs x train images / train img/s
              + epochs x (validation + train) images / encode img/s
              + (query + database) images / encode img/s

  with `--workers` W > 1, a Ray Train DDP group of W GPUs trains it (W x (train fixed + work / W))
  and the evaluation runs on one GPU (evaluate fixed + its encoding);
* one DVC stage per training, evaluation and promotion (how the pipeline ran before the
  matrix): each is a process of its own paying `--train-fixed-s`, `--evaluate-fixed-s` and
  `--promote-fixed-s`, the training's fixed cost on each of its W GPUs.

Validation each epoch encodes the validation split and the training images (its database;
`dpfah.train.validation_map`). Wall time on one node of `--node-gpus` GPUs assumes the
trainings pack the GPUs perfectly (the matrix runs one per free GPU; the per-stage DAG ran one
training at a time, so its wall column is the sum of the runs).

Where the defaults come from, and how far to trust them:
- train 9,000 img/s per GPU and encode 30,000 img/s: measured on one H200 (torch 2.11, 224 px,
  ResNet-18 with PFA, batch 128, GPU-resident uint8 images, bf16, channels_last) by the stack
  notes' loop of the same design as `dpfah.train.fit`'s GPU path (8,600-9,400 img/s eager with
  PFA; the methods without PFA run 9,200-11,300, so this is the slower case). Our pipeline has
  not yet run on a GPU (`bench/gpu_check.sh` will measure it): pass its numbers with
  --train-img-s/--encode-img-s when it has.
- entry fixed 12 s: `bench/matrix.py` (bench/results/matrix.json) ran six toy entries, two at a
  time, in 35.3 s on the 2-core CPU machine, i.e. at most 11.8 s an entry with its (tiny)
  training and evaluation included; the same six as separate stages took 199.9 s.
- train 40 s, evaluate 10 s, promote 10 s per stage: measured on the same machine with a
  running Ray instance (`bench/run_overhead.py`, docs/benchmarks.md: train 35-45 s, evaluate
  9-15 s beyond its work, promote 8-11 s). A GPU node with more cores starts faster, so all the
  fixed costs lean high.
- dataset sizes: the paper's protocols (pipeline/protocols; NUS-WIDE's database is the
  common 193,734 images of the 21 concepts less the queries and depends on which images a
  user has).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: name: (train images incl. validation, validation, query, database), the paper's protocols
#: and params.yaml's validation carve-outs
DATASETS = {
    "cifar10": (5000, 500, 1000, 59000),
    "nuswide21": (10500, 1050, 2100, 193734),
    "imagenet100": (13000, 1300, 5000, 128503),
}
ENTRIES = 12  # train.methods: dpfah, the nine comparison methods, resnet18 and resnet18-pfa
BITS = 4  # 16, 32, 48, 64


def _work(a: argparse.Namespace, train: int, validation: int) -> tuple[float, float]:
    """GPU-seconds of one training's steps and of its per-epoch validation, on one GPU."""
    steps = a.epochs * (train - validation) / a.train_img_s
    validate = a.epochs * train / a.encode_img_s  # validation + training images per epoch
    return steps, validate


def matrix_cost(a: argparse.Namespace, train: int, validation: int, query: int, database: int) -> dict[str, float]:
    """GPU-seconds of one entry of the matrix: its training and its evaluation."""
    steps, validate = _work(a, train, validation)
    encode = (query + database) / a.encode_img_s
    if a.workers == 1:  # one process: trains, then evaluates the weights it holds
        fixed = a.entry_fixed_s
        gpu_s = fixed + steps + validate + encode
        wall_s = gpu_s
    else:  # a DDP group from the trial, then the evaluation on one GPU
        fixed = a.workers * a.train_fixed_s + a.evaluate_fixed_s
        train_wall = a.train_fixed_s + (steps + validate) / a.workers
        gpu_s = a.workers * train_wall + a.evaluate_fixed_s + encode
        wall_s = train_wall + a.evaluate_fixed_s + encode
    return {"gpu_s": gpu_s, "wall_s": wall_s, "fixed_gpu_s": fixed}


def stage_cost(a: argparse.Namespace, train: int, validation: int, query: int, database: int) -> dict[str, float]:
    """GPU-seconds of one training + evaluation + promotion, each a DVC stage of its own."""
    steps, validate = _work(a, train, validation)
    train_wall = a.train_fixed_s + (steps + validate) / a.workers
    evaluate_wall = a.evaluate_fixed_s + (query + database) / a.encode_img_s
    return {
        "gpu_s": a.workers * train_wall + evaluate_wall,
        "wall_s": train_wall + evaluate_wall + a.promote_fixed_s,
        "fixed_gpu_s": a.workers * a.train_fixed_s + a.evaluate_fixed_s,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.paper_cost",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for where each default comes from.",
    )
    add = parser.add_argument
    add("--train-img-s", type=float, default=9000.0, help="training images per second per GPU (default 9000: H200)")
    add("--encode-img-s", type=float, default=30000.0, help="encoding images per second on one GPU (default 30000)")
    add("--workers", type=int, default=1, help="GPUs per training (train.num_workers; the paper profile's: 1)")
    add("--node-gpus", type=int, default=4, help="GPUs of the node the wall-time column assumes (default 4)")
    add("--epochs", type=int, default=60, help="epochs per training (the paper profile's)")
    add("--seeds", type=int, default=3)
    add("--entry-fixed-s", type=float, default=12.0, help="a matrix entry's cost outside its work (bench/matrix.py)")
    add("--train-fixed-s", type=float, default=40.0, help="a training stage's cost outside its epochs (35-45 s)")
    add("--evaluate-fixed-s", type=float, default=10.0, help="an evaluation stage's cost beyond encoding")
    add("--promote-fixed-s", type=float, default=10.0, help="a promotion stage (CPU only: wall time, no GPU)")
    add("--out", default=str(REPO / "bench" / "results" / "paper_cost.json"))
    return parser


def main(argv=None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    for name in ("train_img_s", "encode_img_s", "workers", "node_gpus", "epochs", "seeds"):
        if getattr(a, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("entry_fixed_s", "train_fixed_s", "evaluate_fixed_s", "promote_fixed_s"):
        if getattr(a, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")

    ways = {"matrix": matrix_cost, "one stage per run": stage_cost}
    runs_per_dataset = ENTRIES * BITS * a.seeds
    rows, totals = [], {w: {"gpu_s": 0.0, "wall_s": 0.0, "fixed_gpu_s": 0.0} for w in ways}
    for name, sizes in DATASETS.items():
        row = {"dataset": name, "runs": runs_per_dataset}
        for way, cost in ways.items():
            one = cost(a, *sizes)
            gpu_s = runs_per_dataset * one["gpu_s"]
            # the matrix packs the node's GPUs; the per-stage DAG ran its trainings one at a time
            if way == "matrix":
                wall_s = max(gpu_s / a.node_gpus, one["wall_s"]) + a.promote_fixed_s
            else:
                wall_s = runs_per_dataset * one["wall_s"]
            row[way] = {"per_run": one, "gpu_h": gpu_s / 3600, "wall_h_one_node": wall_s / 3600}
            totals[way]["gpu_s"] += gpu_s
            totals[way]["wall_s"] += wall_s
            totals[way]["fixed_gpu_s"] += runs_per_dataset * one["fixed_gpu_s"]
        rows.append(row)

    print(
        f"The paper at profile=paper ({a.epochs} epochs, 224 px, {a.workers} GPU(s) per training), {a.seeds} seeds; "
        f"train {a.train_img_s:,.0f} img/s per GPU, encode {a.encode_img_s:,.0f} img/s; fixed: matrix entry "
        f"{a.entry_fixed_s:.0f} s; stages: train {a.train_fixed_s:.0f} s, evaluate {a.evaluate_fixed_s:.0f} s, "
        f"promote {a.promote_fixed_s:.0f} s"
    )
    node = f"hours, one {a.node_gpus}-GPU node"
    print(f"{'dataset':12s} {'runs':>5s} {'way':18s} {'GPU-min/run':>12s} {'GPU-hours':>10s} {node:>24s}")
    for r in rows:
        for way in ways:
            w = r[way]
            print(
                f"{r['dataset']:12s} {r['runs']:5d} {way:18s} {w['per_run']['gpu_s'] / 60:12.1f} {w['gpu_h']:10.1f} "
                f"{w['wall_h_one_node']:24.1f}"
            )
    runs = sum(r["runs"] for r in rows)
    for way, t in totals.items():
        print(
            f"{'all':12s} {runs:5d} {way:18s} {'':12s} {t['gpu_s'] / 3600:10.1f} {t['wall_s'] / 3600:24.1f}   "
            f"fixed costs {t['fixed_gpu_s'] / 3600:.1f} GPU-hours ({100 * t['fixed_gpu_s'] / t['gpu_s']:.0f} %)"
        )
    ratio = totals["one stage per run"]["gpu_s"] / totals["matrix"]["gpu_s"]
    print(f"the matrix takes {ratio:.1f}x fewer GPU-hours than one stage per run")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "assumptions": {k: v for k, v in vars(a).items() if k != "out"},
        "datasets": rows,
        "runs": runs,
        "totals": {
            w: {
                "gpu_hours": t["gpu_s"] / 3600,
                "wall_hours_one_node": t["wall_s"] / 3600,
                "fixed_gpu_hours": t["fixed_gpu_s"] / 3600,
            }
            for w, t in totals.items()
        },
        "gpu_hours_ratio_stages_to_matrix": ratio,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
