"""What training prints per epoch: epochs numbered from 0, as MLflow's steps and the run record
number them (issue 29: the console said epoch 8 where MLflow's step was 7)."""

from __future__ import annotations

import io


def test_the_epoch_lines_number_epochs_as_mlflows_steps():
    from pipeline.console import EpochPrinter

    # what the printer polls: the run's metrics by MLflow step, validation/best_epoch among them
    logged = {
        0: {"loss": 0.9, "val_map": 0.30, "best_val_map": 0.30, "best_epoch": 0.0, "epoch_s": 1.0},
        1: {"loss": 0.7, "val_map": 0.28, "best_val_map": 0.30, "best_epoch": 0.0, "epoch_s": 1.0},
    }
    out = io.StringIO()
    printer = EpochPrinter(lambda: logged, 2, out=out)
    printer.poll()
    lines = out.getvalue().splitlines()
    assert [x.split("  ")[0] for x in lines] == ["epoch 0 (1/2)", "epoch 1 (2/2)"]
    assert "val mAP 0.2800 (best 0.3000 @ epoch 0)" in lines[1]  # the step whose validation/map is best
