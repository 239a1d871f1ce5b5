"""What reproducing the whole paper costs on GPUs: an estimate from measured throughput.

    python -m bench.paper_cost [--train-img-s 9000] [--encode-img-s 30000] [--gpus 4]
                               [--train-fixed-s 40] [--evaluate-fixed-s 10] [--promote-fixed-s 10]
                               [--seeds 3] [--epochs 60] [--out bench/results/paper_cost.json]

The paper's evidence is Table 6 (10 methods x 4 code lengths x 3 datasets) and Table 5 (the
ablation variants resnet18 and resnet18-pfa beside dpfah). The command of docs/cluster.md trains every
entry of `train.methods` (the 10 methods and the 2 variants) at every code length (a DVC
matrix cannot leave the variants out at 16/32/64 bits; Table 5 uses their 48-bit runs),
with three seeds: 432 trainings, each followed by an evaluation and a promotion. Per run, at `profile=paper`
(224 px, 60 epochs, 4 GPU workers):

  train     GPUs x (fixed + (epochs x train images / (GPUs x train img/s per GPU)
                             + epochs x (validation + train) images / (GPUs x encode img/s)))
  evaluate  1 GPU x (fixed + (query + database) images / encode img/s)
  promote   no GPU (the finite-weights check and the registry run on the CPU)

so the training's fixed cost (Ray worker start, imports, model logging) is paid on every GPU
it holds. Validation each epoch encodes the validation split and the training images (its
database; `dpfah.train.validation_map`).

Where the defaults come from, and how far to trust them:
- train 9,000 img/s per GPU and encode 30,000 img/s: measured on one H200 (torch 2.11, 224 px,
  ResNet-18 with PFA, batch 128, GPU-resident uint8 images, bf16, channels_last) by the stack
  notes' loop of the same design as `dpfah.train.fit`'s GPU path (8,600-9,400 img/s eager with
  PFA; the methods without PFA run 9,200-11,300, so this is the slower case). Our pipeline has
  not yet run on a GPU (`bench/gpu_check.sh` will measure it): pass its numbers with
  --train-img-s/--encode-img-s when it has. Perfect DDP scaling over the 4 GPUs is assumed.
- fixed costs: measured on the 2-core CPU machine with a running Ray instance
  (`bench/run_overhead.py`, docs/benchmarks.md: train 35-45 s, evaluate 9-15 s beyond its work, promote
  8-11 s); a GPU node with more cores starts faster, so these lean high.
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


def run_cost(a: argparse.Namespace, train: int, validation: int, query: int, database: int) -> dict[str, float]:
    """GPU-seconds of one training + evaluation + promotion."""
    steps = a.epochs * (train - validation) / (a.gpus * a.train_img_s)
    validate = a.epochs * train / (a.gpus * a.encode_img_s)  # validation + training images per epoch
    train_wall = a.train_fixed_s + steps + validate
    evaluate_wall = a.evaluate_fixed_s + (query + database) / a.encode_img_s
    return {
        "train_wall_s": train_wall,
        "train_gpu_s": a.gpus * train_wall,
        "evaluate_gpu_s": evaluate_wall,
        "wall_s": train_wall + evaluate_wall + a.promote_fixed_s,
        "gpu_s": a.gpus * train_wall + evaluate_wall,
        "fixed_gpu_s": a.gpus * a.train_fixed_s + a.evaluate_fixed_s,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.paper_cost",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for where each default comes from.",
    )
    parser.add_argument(
        "--train-img-s",
        type=float,
        default=9000.0,
        help="training images per second per GPU (default 9000: H200, stack notes)",
    )
    parser.add_argument(
        "--encode-img-s",
        type=float,
        default=30000.0,
        help="encoding images per second on one GPU (default 30000: H200)",
    )
    parser.add_argument(
        "--gpus", type=int, default=4, help="GPU workers per training (the paper profile's train.num_workers)"
    )
    parser.add_argument("--epochs", type=int, default=60, help="epochs per training (the paper profile's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--train-fixed-s",
        type=float,
        default=40.0,
        help="a training's cost outside its epochs (measured on CPU: 35-45 s)",
    )
    parser.add_argument("--evaluate-fixed-s", type=float, default=10.0, help="an evaluation's cost beyond encoding")
    parser.add_argument("--promote-fixed-s", type=float, default=10.0, help="a promotion (CPU only: wall time, no GPU)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "paper_cost.json"))
    a = parser.parse_args(argv)
    for name in ("train_img_s", "encode_img_s", "gpus", "epochs", "seeds"):
        if getattr(a, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    rows, total_gpu_s, total_wall_s, total_fixed = [], 0.0, 0.0, 0.0
    for name, sizes in DATASETS.items():
        one = run_cost(a, *sizes)
        runs = ENTRIES * BITS * a.seeds
        rows.append(
            {
                "dataset": name,
                "runs": runs,
                "per_run": one,
                "gpu_h": runs * one["gpu_s"] / 3600,
                "wall_h_one_node": runs * one["wall_s"] / 3600,
            }
        )
        total_gpu_s += runs * one["gpu_s"]
        total_wall_s += runs * one["wall_s"]
        total_fixed += runs * one["fixed_gpu_s"]
    print(
        f"The paper at profile=paper ({a.epochs} epochs, 224 px, {a.gpus} GPU workers per training), {a.seeds} seeds; "
        f"train {a.train_img_s:,.0f} img/s per GPU, encode {a.encode_img_s:,.0f} img/s, fixed: train "
        f"{a.train_fixed_s:.0f} s, "
        f"evaluate {a.evaluate_fixed_s:.0f} s, promote {a.promote_fixed_s:.0f} s"
    )
    print(
        f"{'dataset':12s} {'runs':>5s} {'train min':>10s} {'GPU-min/run':>12s} {'GPU-hours':>10s} "
        f"{'hours, one 4-GPU node':>22s}"
    )
    for r in rows:
        p = r["per_run"]
        print(
            f"{r['dataset']:12s} {r['runs']:5d} {p['train_wall_s'] / 60:10.1f} {p['gpu_s'] / 60:12.1f} "
            f"{r['gpu_h']:10.1f} {r['wall_h_one_node']:22.1f}"
        )
    runs = sum(r["runs"] for r in rows)
    print(f"{'all':12s} {runs:5d} {'':10s} {'':12s} {total_gpu_s / 3600:10.1f} {total_wall_s / 3600:22.1f}")
    print(
        f"of which fixed costs (GPUs held outside the epochs): {total_fixed / 3600:.1f} GPU-hours "
        f"({100 * total_fixed / total_gpu_s:.0f} %)"
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "assumptions": {k: v for k, v in vars(a).items() if k != "out"},
        "datasets": rows,
        "runs": runs,
        "gpu_hours": total_gpu_s / 3600,
        "wall_hours_one_node": total_wall_s / 3600,
        "fixed_gpu_hours": total_fixed / 3600,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
