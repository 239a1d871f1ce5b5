"""bench/paper_cost.py: the GPU-hours of the paper's reproduction, checked by hand."""

from __future__ import annotations

import json

from bench.paper_cost import main


def test_gpu_hours_equal_a_hand_computation(tmp_path, capsys):
    out = tmp_path / "cost.json"
    # 1 seed, 1 epoch, 1 GPU, no fixed cost: CIFAR-10 trains 4,500 images and validates on
    # 5,000 (validation + training), then encodes 1,000 + 59,000 for the evaluation.
    main(
        [
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--gpus",
            "1",
            "--train-img-s",
            "100",
            "--encode-img-s",
            "1000",
            "--train-fixed-s",
            "0",
            "--evaluate-fixed-s",
            "0",
            "--promote-fixed-s",
            "0",
            "--out",
            str(out),
        ]
    )
    doc = json.loads(out.read_text())
    cifar = next(r for r in doc["datasets"] if r["dataset"] == "cifar10")
    assert cifar["runs"] == 12 * 4
    assert cifar["per_run"]["gpu_s"] == 4500 / 100 + 5000 / 1000 + 60000 / 1000
    assert abs(cifar["gpu_h"] - 48 * 110 / 3600) < 1e-9
    assert doc["fixed_gpu_hours"] == 0
    # a training's fixed cost is paid on every GPU it holds; the promotion holds none
    main(
        [
            "--seeds",
            "3",
            "--gpus",
            "4",
            "--train-fixed-s",
            "10",
            "--evaluate-fixed-s",
            "5",
            "--promote-fixed-s",
            "7",
            "--out",
            str(out),
        ]
    )
    doc = json.loads(out.read_text())
    assert doc["runs"] == 3 * 3 * 48
    assert abs(doc["fixed_gpu_hours"] - doc["runs"] * (4 * 10 + 5) / 3600) < 1e-9
    assert "GPU-hours" in capsys.readouterr().out
