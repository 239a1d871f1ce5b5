"""bench/paper_cost.py: the GPU-hours of the paper's reproduction, checked by hand."""

from __future__ import annotations

import json

import pytest

from bench.paper_cost import main


def _run(out, *args: str) -> dict:
    main([*args, "--out", str(out)])
    return json.loads(out.read_text())


def test_gpu_hours_equal_a_hand_computation(tmp_path, capsys):
    out = tmp_path / "cost.json"
    # 1 seed, 1 epoch, 1 GPU, no fixed cost: CIFAR-10 trains 4,500 images and validates on
    # 5,000 (validation + training), then encodes 1,000 + 59,000 for the evaluation; both ways
    # of running cost the same work.
    zero = ("--entry-fixed-s", "0", "--train-fixed-s", "0", "--evaluate-fixed-s", "0", "--promote-fixed-s", "0")
    doc = _run(out, "--seeds", "1", "--epochs", "1", "--train-img-s", "100", "--encode-img-s", "1000", *zero)
    cifar = next(r for r in doc["datasets"] if r["dataset"] == "cifar10")
    assert cifar["runs"] == 12 * 4
    for way in ("matrix", "one stage per run"):
        assert cifar[way]["per_run"]["gpu_s"] == pytest.approx(4500 / 100 + 5000 / 1000 + 60000 / 1000, rel=1e-12)
        assert cifar[way]["gpu_h"] == pytest.approx(48 * 110 / 3600, rel=1e-12)
        assert doc["totals"][way]["fixed_gpu_hours"] == 0
    # the matrix packs the node's 4 GPUs; the stages ran one training at a time
    assert cifar["matrix"]["wall_h_one_node"] == pytest.approx(48 * 110 / 4 / 3600, rel=1e-12)
    assert cifar["one stage per run"]["wall_h_one_node"] == pytest.approx(48 * 110 / 3600, rel=1e-12)


def test_fixed_costs_per_way_of_running(tmp_path, capsys):
    out = tmp_path / "cost.json"
    fixed = ("--entry-fixed-s", "3", "--train-fixed-s", "10", "--evaluate-fixed-s", "5", "--promote-fixed-s", "7")
    # one GPU a training: a matrix entry pays its fixed cost once, a stage its three processes'
    doc = _run(out, "--seeds", "3", *fixed)
    assert doc["runs"] == 3 * 3 * 48
    assert doc["totals"]["matrix"]["fixed_gpu_hours"] == pytest.approx(doc["runs"] * 3 / 3600, rel=1e-12)
    assert doc["totals"]["one stage per run"]["fixed_gpu_hours"] == pytest.approx(doc["runs"] * 15 / 3600, rel=1e-12)
    assert doc["gpu_hours_ratio_stages_to_matrix"] > 1
    # 4 GPUs a training: its fixed cost is paid on every GPU it holds; the promotion holds none
    doc = _run(out, "--seeds", "3", "--workers", "4", *fixed)
    for way in ("matrix", "one stage per run"):
        assert doc["totals"][way]["fixed_gpu_hours"] == pytest.approx(doc["runs"] * (4 * 10 + 5) / 3600, rel=1e-12)
    assert "GPU-hours" in capsys.readouterr().out


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--workers", "0", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["--entry-fixed-s", "-1", "--out", str(tmp_path / "x.json")])
