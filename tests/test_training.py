"""Training, checkpoints, resume, evaluation and DDP on the tiny synthetic set (CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import evaluation
import training
import utils
from dataset import MammogramDataset
from tests.conftest import SIZE, train_args
from utils import CheckpointError, DistInfo, StepLog, TeeStdout, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_training(argv: list[str]) -> dict:
    return training.train(*training.parse_args(argv))


@pytest.fixture(scope="module")
def trained_run(csv_dir, tmp_path_factory) -> Path:
    """Four epochs from scratch: the run the checkpoint and evaluation tests read."""
    run = tmp_path_factory.mktemp("runs") / "full"
    run_training(train_args(csv_dir, run, "--epochs", "4"))
    return run / "checkpoint"


def test_training_lowers_the_loss_and_logs_every_epoch(trained_run):
    log = pd.read_csv(trained_run / "log.csv")
    assert log["epoch"].tolist() == [1, 2, 3, 4]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    dice = log[["dice_benign", "dice_mass", "dice_calc", "mean_fg_dice"]].to_numpy()
    assert ((dice >= 0) & (dice <= 1)).all()


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "


def test_train_log_has_the_screen_lines_timestamped_with_step_timings(trained_run):
    lines = (trained_run / "train.log").read_text().splitlines()
    assert all(re.match(STAMP, line) for line in lines)
    text = [line[21:] for line in lines]
    assert text[0].startswith("train: preprocessed") or text[0].startswith("training resnet18")
    assert len([t for t in text if re.match(r"epoch \d/4  train loss .* val Dice", t)]) == 4
    # --log-every 50 is more than an epoch's steps: one line at each epoch's last step.
    steps = [t for t in text if re.match(r"epoch \d/4 step (\d+)/\1  ", t)]
    assert len(steps) == 4
    for t in steps:
        assert re.search(r"  data \d+\.\d{3} s  step \d+\.\d{3} s  [\d.]+ img/s  "
                         r"eta \d+:\d\d:\d\d  peak RSS \d+ MB$", t), t
    assert (trained_run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_tee_stdout_copies_every_screen_line_with_a_timestamp(tmp_path, capsys):
    log = tmp_path / "train.log"
    with TeeStdout() as tee:
        print("before the run folder is ready")
        tee.open(log)
        print("in", "two parts")
        sys.stdout.write("no newline")
    print("after")
    assert capsys.readouterr().out == ("before the run folder is ready\nin two parts\n"
                                       "no newlineafter\n")
    lines = log.read_text().splitlines()
    assert [line[21:] for line in lines] == ["before the run folder is ready", "in two parts",
                                             "no newline"]
    assert all(re.match(STAMP, line) for line in lines)
    with TeeStdout() as tee:  # a run that fails before its folder is ready: no file
        print("cache build failed")
    with TeeStdout(enabled=False) as tee:
        print("not logged")
        tee.open(log)
    assert len(log.read_text().splitlines()) == 3


def test_step_log_times_data_and_steps_and_counts_validation_in_the_eta(monkeypatch, capsys):
    """A fake clock: each batch takes 1 s to load and 3 s to train; validation 10 s."""
    now = [0.0]
    monkeypatch.setattr(utils, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    class Loader:
        def __len__(self):
            return 5

        def __iter__(self):
            for batch in range(5):
                now[0] += 1
                yield batch

    log = StepLog(Loader(), every=2, epochs=4, start_epoch=0, images_per_step=4,
                  device=torch.device("cpu"))
    for _ in range(2):
        for _ in log:
            now[0] += 3
        now[0] += 15  # validation and checkpoint
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "epoch 1/4 step 2/5", "epoch 1/4 step 4/5", "epoch 1/4 step 5/5",
        "epoch 2/4 step 2/5", "epoch 2/4 step 4/5", "epoch 2/4 step 5/5"]
    assert all("data 1.000 s  step 3.000 s  1.0 img/s" in line for line in lines)
    # Epoch 1 knows only its steps (4 s each, 20 s an epoch); epoch 2 counts each later epoch
    # at the whole 35 s the first one took.
    assert [line.split("eta ")[1].split()[0] for line in lines] == [
        "0:01:12", "0:01:04", "0:01:00", "0:01:22", "0:01:14", "0:01:10"]


def test_checkpoint_holds_everything_to_continue(trained_run):
    checkpoint = load_checkpoint(trained_run / "last.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "config",
            "args"} <= set(checkpoint)
    assert checkpoint["epoch"] == 3
    config = checkpoint["config"]
    assert config["backbone"] == "resnet18" and config["num_classes"] == 4
    assert config["size"] == [64, 48] and "preprocess_version" in config
    best = load_checkpoint(trained_run / "best.pth")
    log = pd.read_csv(trained_run / "log.csv")
    assert math.isclose(best["best_metric"], log["mean_fg_dice"].max(), abs_tol=1e-4)
    assert not list(trained_run.glob("*.tmp"))


def test_killed_run_resumes_to_the_same_state(csv_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_training(train_args(csv_dir, straight, "--epochs", "2"))

    killed = tmp_path / "killed"
    real_epoch = training.train_one_epoch
    calls = []

    def dies_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed mid-way through epoch 2
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_training(train_args(csv_dir, killed, "--epochs", "2"))
    monkeypatch.setattr(training, "train_one_epoch", real_epoch)
    assert load_checkpoint(killed / "checkpoint" / "last.pth")["epoch"] == 0
    # Only --resume and the folders: every other flag comes back from the checkpoint.
    run_training(["--csv-dir", str(csv_dir), "--checkpoint-dir", str(killed / "checkpoint"),
                  "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--resume",
                  "--no-progress"])

    a = load_checkpoint(straight / "checkpoint" / "last.pth")
    b = load_checkpoint(killed / "checkpoint" / "last.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]
    assert pd.read_csv(killed / "checkpoint" / "log.csv")["epoch"].tolist() == [1, 2]


def test_resume_keeps_saved_flags_unless_given_even_at_their_default(trained_run, tmp_path):
    base = ["--checkpoint-dir", str(trained_run), "--resume"]
    args, given = training.parse_args([*base, "--lr", "3e-4"])  # 3e-4 is the default
    resumed, _ = training.resolve_resume(args, given)
    assert resumed.lr == 3e-4  # given explicitly: wins over the saved 1e-3
    assert resumed.size == [64, 48] and resumed.batch_size == 4  # not given: from the run
    assert resumed.checkpoint_dir == trained_run  # a machine flag: from this command line


def test_resume_with_another_backbone_is_refused(trained_run, csv_dir, tmp_path):
    argv = train_args(csv_dir, tmp_path, "--epochs", "5", "--backbone", "resnet34",
                      "--resume", str(trained_run / "last.pth"))
    with pytest.raises(CheckpointError, match="backbone='resnet18'"):
        run_training(argv)


def test_checkpoint_for_another_backbone_or_class_count_is_refused(trained_run, tmp_path):
    checkpoint = load_checkpoint(trained_run / "best.pth")
    for change in ({"backbone": "resnet34"}, {"num_classes": 3}):
        bad = {**checkpoint, "config": {**checkpoint["config"], **change}}
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match="does not fit"):
            evaluation.load_trained_model(tmp_path / "bad.pth", torch.device("cpu"))


def test_test_script_writes_every_metric_in_range(trained_run, csv_dir, tmp_path):
    out = tmp_path / "results"
    argv = ["--checkpoint", "best.pth", "--checkpoint-dir", str(trained_run), "--csv",
            str(csv_dir / "test.csv"), "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--workers", "0", "--bootstrap", "50", "--overlays", "2",
            "--no-progress"]
    assert evaluation.main(argv) == 0
    results = json.loads((out / "metrics.json").read_text())
    rows = pd.read_csv(csv_dir / "test.csv")
    assert results["n_images"] == rows["img_path"].nunique()
    assert results["n_lesions"] == len(rows)
    for resolution in ("original_resolution", "training_resolution"):
        section = results[resolution]
        for key in ("dice_pooled", "iou_pooled", "dice_mean", "iou_mean"):
            assert set(section[key]) == {"background", "benign", "mass", "calc"}
            for entry in section[key].values():
                assert entry["value"] is None or 0 <= entry["value"] <= 1
        matrix = section["confusion_matrix"]
        assert len(matrix) == 4 and all(len(r) == 4 for r in matrix)
    detection = results["original_resolution"]["detection"]
    froc = detection["iou_at_least_0.2"]["all"]
    assert len(froc["value"]) == len(detection["fp_per_image"]) == 6
    assert all(0 <= v <= 1 for v in froc["value"])
    assert froc["value"] == sorted(froc["value"])  # sensitivity grows with allowed FPs
    auc = results["malignancy"]["auc"]
    assert 0 <= auc["value"] <= 1 and auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == results["n_images"]
    for name in ("froc.png", "roc.png", "confusion_matrix.png", "training_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "overlays").glob("*.png"))) == 2


def test_kaggle_jpeg_copy_trains_and_tests_end_to_end(kaggle_csv_dir, tmp_path):
    run = tmp_path / "run"
    run_training(train_args(kaggle_csv_dir, run, "--epochs", "1"))
    argv = ["--checkpoint", str(run / "checkpoint" / "last.pth"), "--csv",
            str(kaggle_csv_dir / "test.csv"), "--out", str(tmp_path / "results"), "--cache-dir",
            str(tmp_path / "cache"), "--workers", "0", "--bootstrap", "20", "--overlays", "1",
            "--no-progress"]
    assert evaluation.main(argv) == 0
    results = json.loads((tmp_path / "results" / "metrics.json").read_text())
    rows = pd.read_csv(kaggle_csv_dir / "test.csv")
    assert rows["img_path"].str.endswith(".jpg").all()
    assert results["n_images"] == rows["img_path"].nunique() and results["n_lesions"] == len(rows)


def test_test_script_clear_error_for_a_missing_checkpoint(tmp_path, capsys):
    assert evaluation.main(["--checkpoint", "nope.pth", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "no checkpoint 'nope.pth'" in capsys.readouterr().err


def test_two_process_ddp_run_matches_single_process_structure(csv_dir, trained_run, tmp_path):
    """torchrun with 2 CPU processes (gloo): training, validation and checkpoint complete."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29533", str(REPO / "Train_deep_labv3+.py"),
               *train_args(csv_dir, run, "--epochs", "1", "--batch-size", "2")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ddp = load_checkpoint(run / "checkpoint" / "last.pth")
    single = load_checkpoint(trained_run / "last.pth")
    assert set(ddp) == set(single)
    assert {k: v.shape for k, v in ddp["model"].items()} == {
        k: v.shape for k, v in single["model"].items()}
    log = pd.read_csv(run / "checkpoint" / "log.csv")
    assert len(log) == 1 and 0 <= log["mean_fg_dice"].iloc[0] <= 1
    # Both ranks validated the model rank 0 saved (its BatchNorm statistics, not their own).
    args, _ = training.parse_args(command[8:])  # the training flags
    net, _ = evaluation.load_trained_model(run / "checkpoint" / "last.pth", torch.device("cpu"))
    val_set = MammogramDataset.from_csv(csv_dir / "val.csv", args.cache_dir, SIZE)
    loss, count = 0.0, 0
    for rank in (0, 1):  # each rank's share in its batches: the Dice term is per batch
        loader, share = training.make_loader(val_set, args, DistInfo(rank, 2), False,
                                             torch.device("cpu"))
        val = training.evaluate(net, loader, torch.device("cpu"), args, DistInfo())
        loss, count = loss + val["val_loss"] * len(share), count + len(share)
    assert math.isclose(loss / count, log["val_loss"].iloc[0], abs_tol=2e-5)
