"""--tensorboard: per-epoch scalars equal to log.csv's and validation overlays, resumed runs
without duplicate epochs, and a one-line usage error when the package is missing."""

from __future__ import annotations

import shutil
import sys

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training
from tensorboard_log import OVERLAYS, TENSORBOARD_DIR
from tests.conftest import tiny_run_args

SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "lr": "lr",
           "dice/benign": "dice_benign", "dice/mass": "dice_mass", "dice/calc": "dice_calc",
           "dice/mean": "mean_fg_dice", "dice/ema": "ema_fg_dice",
           "images_per_s": "train_images_per_s"}


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_has_every_epochs_curves_and_overlays(csv_dir, tmp_path):
    folder = tmp_path / "run"
    args = tiny_run_args(csv_dir, folder, tmp_path / "cache", "--decoder-channels", "16",
                         "--tensorboard")
    assert training.main([*args, "--epochs", "1"]) == 0
    shutil.copy(folder / "last.pth", tmp_path / "after_epoch_1.pth")
    assert training.main([*args, "--epochs", "2", "--resume"]) == 0
    # As if killed after epoch 2's events but before its checkpoint: epoch 2 runs again.
    shutil.copy(tmp_path / "after_epoch_1.pth", folder / "last.pth")
    assert training.main([*args, "--epochs", "2", "--resume"]) == 0
    board, log = events(folder), pd.read_csv(folder / "log.csv")
    for tag, column in SCALARS.items():
        scalars = board.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], tag  # epoch 2 once, not twice
        assert [s.value for s in scalars] == pytest.approx(log[column].tolist(), rel=1e-4,
                                                              nan_ok=True), tag
    for k in range(OVERLAYS):
        images = board.Images(f"validation/{k}")
        assert [i.step for i in images] == [1, 2]
        assert images[0].width > 2 * images[0].height  # image | truth | prediction
    assert training.main([*args, "--epochs", "1", "--overwrite"]) == 0
    assert len(list((folder / TENSORBOARD_DIR).iterdir())) == 1  # the old run's events went


def test_a_missing_tensorboard_package_is_a_usage_error(csv_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails

    def fail(*args, **kwargs):
        raise AssertionError("the cache build started before the flags were checked")

    monkeypatch.setattr(training, "load_datasets", fail)
    args = tiny_run_args(csv_dir, tmp_path / "run", tmp_path / "cache", "--tensorboard")
    assert training.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package") \
        and err.count("\n") == 1
