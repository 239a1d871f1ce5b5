"""pipeline.config: params.yaml into typed objects; every error names its dotted key."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import pytest

from pipeline.config import (
    CIFAR10_MD5,
    CIFAR10_URL,
    Cifar10Dataset,
    CustomDataset,
    ListsDataset,
    Params,
    add_config_args,
    config_from_args,
    load_params,
    parse_params,
)
from pipeline.errors import ConfigError, run_main

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def test_repository_params_load():
    p = load_params(PARAMS)
    assert p.seed == 0 and p.data.root == "data"
    assert p.prepare.datasets == ("cifar10",)
    c = p.datasets["cifar10"]
    assert isinstance(c, Cifar10Dataset)
    assert (c.source, c.md5, c.protocol, c.validation) == (CIFAR10_URL, CIFAR10_MD5, "cifar10-59k", 500)
    assert isinstance(p.datasets["nuswide21"], ListsDataset) and p.datasets["nuswide21"].images is None
    assert isinstance(p.datasets["imagenet100"], ListsDataset) and p.datasets["imagenet100"].num_classes == 100
    for d in p.datasets.values():
        for attr in ("train_list", "query_list", "database_list"):
            if getattr(d, attr, None):
                assert (REPO / getattr(d, attr)).is_file(), f"shipped list {getattr(d, attr)}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 1


def test_overrides_are_yaml_scalars_and_can_add_entries():
    p = load_params(
        PARAMS,
        [
            "seed=7",
            "datasets.cifar10.source=/data/c.tar.gz",
            "datasets.cifar10.md5=null",
            "prepare.datasets=[cifar10, mine]",
            "datasets.mine.kind=custom",
            "datasets.mine.images=/data/mine",
            "datasets.mine.database_includes_train=false",
        ],
    )
    assert p.seed == 7
    assert p.datasets["cifar10"].source == "/data/c.tar.gz" and p.datasets["cifar10"].md5 is None
    assert p.prepare.datasets == ("cifar10", "mine")
    mine = p.datasets["mine"]
    assert isinstance(mine, CustomDataset) and mine.images == "/data/mine" and mine.database_includes_train is False
    assert mine.query_per_class == 100  # defaults fill what is not given


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "datasets.cifar10.protocol=x",
            "datasets.cifar10.protocol: unknown protocol 'x' (choose cifar10-59k or cifar10-54k)",
        ),
        ("datasets.cifar10.sorce=/x", "datasets.cifar10.sorce: unknown key"),
        ("trian.epochs=3", "trian: unknown section"),
        ("train.optimizer=adam", "train.optimizer: unknown optimizer 'adam' (choose rmsprop, adamw or sgd)"),
        ("train.crop_scale=[0.9, 0.5]", "train.crop_scale: must be [lo, hi] with 0 < lo <= hi <= 1"),
        (
            "profile=paper",
            "profile: not a parameter any more: apply a profile to params.yaml with `python -m pipeline.profile NAME`",
        ),
        ("train.eta=1", "train.eta: unknown key"),
        ("objectives.dpfah.pairs=all", "objectives.dpfah.pairs: 'all' is not one of batch, memory, bank"),
        ("train.crop_scale=[0.5, 2]", "train.crop_scale: must be [lo, hi] with 0 < lo <= hi <= 1, got [0.5, 2.0]"),
        ("model.lam=0", "model.lam: must be > 0, got 0.0"),
        ("bits=[]", "bits: must list distinct code lengths >= 1"),
        ("bits=[64, 64]", "bits: must list distinct code lengths >= 1"),
        ("tune.bits=[16, 16]", "tune.bits: must list distinct code lengths >= 1"),
        ("seed=-1", "seed: must be >= 0"),
        ("seed=abc", "seed: expected an integer, got 'abc'"),
        ("datasets.cifar10.shard_size=0", "datasets.cifar10.shard_size: must be >= 1"),
        (
            "datasets.cifar10.on_bad_image=ignore",
            "datasets.cifar10.on_bad_image: unknown value 'ignore' (choose skip or fail)",
        ),
        ("datasets.cifar10.md5=xyz", "datasets.cifar10.md5: 'xyz' is not an md5"),
        (
            "datasets.cifar10.kind=folder",
            "datasets.cifar10.kind: unknown kind 'folder' (choose cifar10, lists or custom)",
        ),
        ("datasets.imagenet100.all_list=/x", "datasets.imagenet100.all_list: give database_list or all_list, not both"),
        ("datasets.imagenet100.num_classes=null", "datasets.imagenet100.num_classes: missing"),
        ("datasets.nuswide21.class_names=[a, b]", "datasets.nuswide21.class_names: 2 names for num_classes 21"),
        ("datasets.mine.images=/x", "datasets.mine.kind: missing (choose cifar10, lists or custom)"),
        ("datasets.cifar10.kind=null", "datasets.cifar10.kind: missing (choose cifar10, lists or custom)"),
        ("datasets.x=3", "datasets.x: expected a mapping, got 3"),
        ("use_tuned=1", "use_tuned: expected true or false, got 1"),
        ("seed=1.5", "seed: expected an integer, got 1.5"),
        (
            "prepare.datasets=[cifar10, nope]",
            "prepare.datasets: unknown dataset 'nope' (defined: cifar10, nuswide21, imagenet100)",
        ),
        ("prepare.datasets=cifar10", "prepare.datasets: expected a list"),
        (
            "datasets.cifar10.source.x=1",
            "--set datasets.cifar10.source.x: datasets.cifar10.source is a value, not a section",
        ),
        ("seed", "--set 'seed': expected dotted.key=value"),
        ("data.root=", "data.root: missing value (expected a string)"),
        # inf passes every `>= low` check, so floats are checked to be finite first (issue #11)
        ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("objectives.dpfah.eta=.inf", "objectives.dpfah.eta: must be a finite number, got inf"),
        ("objectives.dpfah.zeta=-.inf", "objectives.dpfah.zeta: must be a finite number, got -inf"),
        ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
        ("train.crop_scale=[0.5, .inf]", "train.crop_scale[1]: must be a finite number, got inf"),
        ("tune.space.eta=[1, .inf]", "tune.space.eta[1]: must be a finite number, got inf"),
        (
            "train.fail_at_epoch=1",
            "train.fail_at_epoch: not a parameter any more (fault injection is a test hook now: the environment "
            "variable DPFAH_FAIL_AT_EPOCH)",
        ),
        ("train.lr=1e-3x", "train.lr: expected a number, got '1e-3x'"),
        ('train.storage_path=""', "train.storage_path: '' is not a path or URI (where Ray Train keeps checkpoints)"),
        ("train.storage_path=' '", "train.storage_path: ' ' is not a path or URI"),
        (
            "train.method=nosuch",
            "train.method: unknown method or variant 'nosuch' "
            "(methods: dpfah, dpsh, dsh, dhn, hashnet, dsdh, dfh, idhn, dbdh, lcdsh;",
        ),
        ("train.methods=[dpfah,dsh,dpfah]", "train.methods: must list distinct names"),
        ("train.seeds=[]", "train.seeds: must list distinct seeds >= 0"),
        ("objectives.dsh.alpha=big", "objectives.dsh.alpha: expected a number, got 'big'"),
        (
            "objectives.dsh.beta=1",
            "objectives.dsh.beta: dsh has no hyper-parameter 'beta' (it has: alpha, margin, pairs)",
        ),
        ("objectives.hashnet.pairs=all", "objectives.hashnet.pairs: 'all' is not one of batch, memory, bank"),
        ("objectives.dsdh.pairs=bank", "objectives.dsdh.pairs: 'bank' is not one of memory"),
        ("objectives.dsh.alpha=.inf", "objectives.dsh.alpha: must be a finite number, got inf"),
        ("objectives.dpfah.eta=-1", "objectives.dpfah.eta: must be >= 0, got -1"),
        (
            "objectives.dpfah.alpha=1",
            "objectives.dpfah.alpha: dpfah has no hyper-parameter 'alpha' (it has: delta, eta, pairs, zeta)",
        ),
        ("loss.bogus=1", "loss.bogus: unknown key (the `loss` section is gone: DPFAH's knobs are objectives.dpfah.*"),
        ("objectives.vgg.x=1", "objectives: unknown method 'vgg'"),
        (
            "variants.resnet18.model.backbone=vgg",
            "variants.resnet18.model.backbone: unknown backbone 'vgg' (choose resnet18 or alexnet)",
        ),
        (
            "variants.resnet18.model.depth=3",
            "variants.resnet18.model.depth: unknown key (known: pfa, lam, backbone_weights, backbone)",
        ),
        ("variants.resnet18.objective.eta=yes", "variants.resnet18.objective.eta: expected a number, got True"),
        ("variants.dsh.method=dsh", "variants: variant name 'dsh' must match"),
        ("variants.mine.method=vgg", "variants.mine.method: unknown method 'vgg'"),
        ("promote.model_name='x-{run}'", "promote.model_name: 'x-{run}' may use only {dataset}, {bits} and {method}"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_params(PARAMS, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def _float_keys(cls, prefix: str):
    """Dotted keys of every float (or list-of-floats) field under a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        members = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        for m in members:
            if dataclasses.is_dataclass(m):
                yield from _float_keys(m, f"{prefix}{f.name}.")
            elif m is float or (typing.get_origin(m) is tuple and typing.get_args(m)[:1] == (float,)):
                yield f"{prefix}{f.name}", m is float


def test_every_float_key_refuses_inf_and_nan():
    keys = dict(_float_keys(Params, ""))
    assert {"train.lr", "model.lam", "tune.reduction_factor"} <= set(
        keys
    )  # (a method's knobs: test_errors_name_the_key)
    for key, scalar in keys.items():
        for text, shown in ((".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")):
            value = text if scalar else f"[{text}, 1.0]"
            with pytest.raises(ConfigError) as e:
                load_params(PARAMS, [f"{key}={value}"])
            where = key if scalar else f"{key}[0]"
            assert str(e.value) == f"{where}: must be a finite number, got {shown}", key


def test_library_settings_refuse_inf_too():
    import math

    from dpfah.loss import DPFAHLoss
    from dpfah.settings import TrainSettings

    with pytest.raises(ValueError, match=r"^lr: must be a finite number, got inf$"):
        TrainSettings(lr=math.inf)
    with pytest.raises(ValueError, match=r"^dpfah: eta must be >= 0, got nan$"):
        DPFAHLoss(eta=math.nan)
    with pytest.raises(ValueError, match=r"^crop_scale: must be a finite number, got inf$"):
        TrainSettings(crop_scale=(0.5, math.inf))


def test_a_stage_refuses_inf_in_one_line(tmp_path):
    """What a user sees: the stage exits 2 with one line naming the key, before any work."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for override, line in (
        ("train.lr=.inf", "error: train.lr: must be a finite number, got inf\n"),
        ("bits=[64, 64]", "error: bits: must list distinct code lengths >= 1\n"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                "--dataset",
                "cifar10",
                "--bits",
                "64",
                "--params",
                str(PARAMS),
                "--set",
                override,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (proc.returncode, proc.stderr) == (2, line)
    assert os.listdir(tmp_path) == [], "nothing started, nothing written"


def test_a_yaml_anchor_that_contains_itself_is_one_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("tune:\n  space: &a {eta: [*a]}\n")
    with pytest.raises(ConfigError, match=r"^params: not plain data \(Circular reference detected\)$"):
        load_params(f)


def test_dataset_names_must_be_file_and_stage_safe():
    with pytest.raises(ConfigError, match=r"datasets: dataset name 'a b' must match"):
        parse_params({"datasets": {"a b": {"kind": "custom"}}, "prepare": {"datasets": []}})


def test_custom_labels_list_needs_num_classes():
    with pytest.raises(ConfigError, match=r"datasets.x.num_classes: missing"):
        parse_params({"prepare": {"datasets": []}, "datasets": {"x": {"kind": "custom", "labels_list": "l.txt"}}})
    with pytest.raises(ConfigError, match=r"datasets.x.num_classes: only with labels_list"):
        parse_params({"prepare": {"datasets": []}, "datasets": {"x": {"kind": "custom", "num_classes": 3}}})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ndata:\n  root: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("prepare:\n  datasets: []\n")
    p = load_params(empty)
    assert (
        p.datasets == {}
        and p.prepare.datasets == ()
        and p == Params(prepare=dataclasses.replace(Params().prepare, datasets=()))
    )


def test_argparse_helper_and_exit_status(capsys):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--params", str(PARAMS), "--set", "seed=4", "--set", "data.root=/tmp/x"])
    p = config_from_args(args)
    assert (p.seed, p.data.root) == (4, "/tmp/x")

    def main(argv):
        config_from_args(parser.parse_args(argv))

    assert run_main(main, ["--params", str(PARAMS), "--set", "datasets.cifar10.protocol=x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: datasets.cifar10.protocol: unknown protocol 'x'") and err.count("\n") == 1


def test_params_yaml_repeats_the_declared_defaults():
    """A training knob is declared once (dpfah.settings, pipeline.config); params.yaml shows
    the same defaults, so reading the file or leaving a key out gives the same run."""
    import yaml

    from pipeline.config import Params, parse_params

    raw = yaml.safe_load(PARAMS.read_text())
    for section in ("train", "model", "evaluate", "promote", "tune", "mlflow"):
        sub = {k: v for k, v in raw.items() if k in (section, "datasets", "prepare")}
        got, declared = getattr(parse_params(sub), section), getattr(Params(), section)
        if section == "tune":  # the default search is over the default train.method's knobs, DPFAH's
            assert got.space == {"eta": (1.0, 10.0), "zeta": (0.1, 1.0)} and declared.space == {}
            got = dataclasses.replace(got, space={})
        assert got == declared, section
        assert set(raw[section]) == {f.name for f in dataclasses.fields(getattr(Params(), section))}, (
            f"{section}: every key is in params.yaml"
        )
    assert (
        tuple(raw["bits"]) == Params().bits and raw["seed"] == Params().seed and raw["use_tuned"] is Params().use_tuned
    )
    # A method's knobs: only what the CPU profile changes from the method's own defaults.
    assert raw["objectives"] == {"dpfah": {"eta": 1.0}}


def test_profile_applies_per_run_or_into_params_yaml(tmp_path, capsys):
    import shutil

    from dpfah import methods
    from pipeline.profile import apply_profile, main
    from pipeline.recipes import resolve

    paper = load_params(PARAMS, profile="paper")
    assert (
        paper.bits == (16, 32, 48, 64)
        and paper.train.image_size == 224
        and paper.objectives["dpfah"] == {"eta": None, "zeta": None}
    )
    assert resolve(paper, "cifar10", 64).hparams == {}  # DPFAH's own defaults: the paper's
    assert methods.build("dpfah", {}, bits=64, num_classes=10).eta == 10.0
    assert resolve(load_params(PARAMS), "cifar10", 64).hparams == {"eta": 1.0}
    assert load_params(PARAMS, ["train.epochs=3"], profile="paper").train.epochs == 3  # --set wins over the profile
    with pytest.raises(ConfigError, match="profile: unknown profile 'nope'"):
        load_params(PARAMS, profile="nope")

    (tmp_path / "profiles").mkdir()
    shutil.copy(REPO / "profiles" / "paper.yaml", tmp_path / "profiles")
    params_file = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params_file)
    before = params_file.read_text()
    assert apply_profile("paper", params_file, dry_run=True) and params_file.read_text() == before
    assert run_main(main, ["paper", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert "bits: [64] -> [16, 32, 48, 64]" in out and "objectives.dpfah.eta: 1.0 -> None" in out
    assert load_params(params_file) == paper  # the file now holds exactly the profile's run
    text = params_file.read_text()
    assert "# DPFAH (L1 + eta L2 + zeta L3)" in text and "  lr: 5.0e-05" in text  # comments kept, floats YAML 1.1
    # the profile's values that differ from params.yaml's, one line each, and nothing else moved
    # (train.num_workers is 1 in both: each training on one GPU, the matrix side by side)
    assert sum(a != b for a, b in zip(before.splitlines(), text.splitlines())) == 11
    assert apply_profile("paper", params_file) == []  # again: nothing to do
    assert run_main(main, ["nope", "--params", str(params_file)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_old_keys_are_read_as_their_new_ones_with_a_warning(tmp_path):
    """The keys of the `loss` section and tune.eta/zeta/*_range are aliases: read as
    objectives.dpfah.*, use_tuned and tune.space/ranges, each with a warning naming both,
    from --set as from a file (an old params.yaml)."""
    import yaml

    with pytest.warns(FutureWarning) as caught:
        p = load_params(
            PARAMS,
            ["loss.eta=3", "loss.use_tuned=true", "tune.eta=[2, 4]", "tune.search=random", "tune.zeta_range=[0.1, 1]"],
        )
    assert p.objectives["dpfah"] == {"eta": 3} and p.use_tuned is True
    assert p.tune.space["eta"] == (2, 4) and p.tune.ranges == {"zeta": (0.1, 1.0)}
    said = {str(w.message) for w in caught}
    assert "params: loss.eta is an old name of objectives.dpfah.eta; read as objectives.dpfah.eta (rename it)" in said
    assert {
        "loss.use_tuned is an old name of use_tuned",
        "tune.eta is an old name of tune.space.eta",
        "tune.zeta_range is an old name of tune.ranges.zeta",
    } <= {m.split(": ", 1)[1].split(";")[0] for m in said}

    raw = yaml.safe_load(PARAMS.read_text())
    del raw["objectives"], raw["use_tuned"]
    raw["loss"] = {"eta": 1.0, "zeta": 0.1, "delta": 1.1, "pairs": "batch", "use_tuned": False}
    raw["tune"] = {k: v for k, v in raw["tune"].items() if k != "space"} | {
        "eta": [1.0, 10.0],
        "zeta": [0.1, 1.0],
        "eta_range": None,
        "zeta_range": None,
    }
    old = tmp_path / "params.yaml"
    old.write_text(yaml.safe_dump(raw))
    with pytest.warns(FutureWarning) as caught:
        p = load_params(old)
    assert (
        "params: loss.delta is an old name of objectives.dpfah.delta; read as objectives.dpfah.delta (rename it)"
        in {str(w.message) for w in caught}
    )
    assert (
        p.objectives["dpfah"] == {"eta": 1.0, "zeta": 0.1, "delta": 1.1, "pairs": "batch"}
        and p.tune == load_params(PARAMS).tune
    )
    assert p.use_tuned is False
    raw["objectives"] = {"dpfah": {"eta": 2.0}}  # e.g. `dvc exp run -S loss.eta=...` on a new params.yaml
    with (
        pytest.warns(FutureWarning),
        pytest.raises(
            ConfigError,
            match=r"^loss.eta: an old name of objectives.dpfah.eta, which is also given: "
            r"give objectives.dpfah.eta only$",
        ),
    ):
        parse_params({**raw, "loss": {"eta": 2.0}})


def test_variants_resolve_to_their_method_network_and_hyper_parameters():
    from pipeline.recipes import resolve

    params = load_params(PARAMS, ["objectives.dsh.alpha=0.05", "datasets.cifar10.kind=cifar10"])
    row1 = resolve(params, "cifar10", 48, "resnet18")
    assert (row1.entry, row1.method, row1.model) == ("resnet18", "dpfah", {"pfa": False})
    assert row1.hparams == {"eta": 0.0, "zeta": 0.0}  # over DPFAH's defaults (delta 1.1, batch pairs)
    assert row1.source == {"weights_from": "params", "variant": "resnet18"}
    dsh = resolve(params, "cifar10", 48, "dsh")
    assert (dsh.method, dsh.hparams, dsh.model) == ("dsh", {"alpha": 0.05}, {})
    assert resolve(params, "cifar10", 48).entry == "dpfah"  # train.method
    alex = resolve(params, "cifar10", 48, "dbdh-alexnet")
    assert (
        alex.model == {"backbone": "alexnet", "pfa": False}
        and params.variant_model("dbdh-alexnet").backbone == "alexnet"
    )
    with pytest.raises(ConfigError, match="--method nosuch: unknown method or variant"):
        resolve(params, "cifar10", 48, "nosuch")


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as text (it wants 1.0e-3); YAML 1.2 and DVC read a number: so does
    the loader, in --set and in the file (issue 28, case 8)."""
    p = load_params(PARAMS, ["train.lr=1e-3", "model.lam=2E-4", "tune.space.eta=[1e1, 5]"])
    assert (p.train.lr, p.model.lam, p.tune.space["eta"]) == (0.001, 2e-4, (10.0, 5))
    f = tmp_path / "params.yaml"
    f.write_text(PARAMS.read_text().replace("  lr: 0.001", "  lr: 5e-5"))
    assert load_params(f).train.lr == 5e-5
    import shutil

    from pipeline.profile import apply_profile

    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    changes = apply_profile("paper", f, dry_run=True)  # its result is checked with the same reader
    assert changes and "train.lr" not in {key for key, _, _ in changes}  # 5e-5 already: the paper's
    assert load_params(PARAMS, ["data.root=1e3x"]).data.root == "1e3x"  # text stays text


def test_fail_at_epoch_is_a_test_hook_not_a_parameter(tmp_path, monkeypatch):
    """An old params.yaml's `train.fail_at_epoch: null` is dropped with a warning; the hook is
    DPFAH_FAIL_AT_EPOCH, checked against the training's epochs in one line."""
    from pipeline.train_driver import FAIL_AT_EPOCH_ENV, fail_at_epoch

    f = tmp_path / "params.yaml"
    f.write_text(PARAMS.read_text().replace("  seeds: [0]\n", "  seeds: [0]\n  fail_at_epoch: null\n"))
    with pytest.warns(FutureWarning, match=r"params: train.fail_at_epoch is not a parameter any more \(fault"):
        assert load_params(f) == load_params(PARAMS)
    assert fail_at_epoch(8) is None
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "7")
    assert fail_at_epoch(8) == 7
    for bad in ("8", "-1", "x"):
        monkeypatch.setenv(FAIL_AT_EPOCH_ENV, bad)
        with pytest.raises(ConfigError, match=rf"^DPFAH_FAIL_AT_EPOCH={bad}: not an epoch of this training \(epochs"):
            fail_at_epoch(8)


def test_loading_the_parameters_imports_no_torch():
    """params.yaml, its objectives and variants checked against the method registry, without
    importing torch (1.3 s of CPU on 2 cores): the registry's declarations are torch-free."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.config import load_params; load_params(sys.argv[1]); print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(PARAMS)], env=env, capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr
