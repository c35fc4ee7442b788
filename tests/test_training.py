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

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import default_collate

import cbis
import evaluation
import inference
import metrics
import runs
import training
import utils
from augmentation import normalize_input, unit_range
from dataset import MammogramDataset
from tests import ddp_probe
from tests.conftest import train_args
from utils import CheckpointError, StepLog, TeeStdout, derive_seed, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_training(argv: list[str]) -> dict:
    return training.train(*runs.parse_args(argv))


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
    defined = ~np.isnan(dice)  # a class absent from the validation set has no Dice (nan)
    assert defined[:, -1].all() and defined.sum() > len(log)
    assert ((dice[defined] >= 0) & (dice[defined] <= 1)).all()


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
    log = pd.read_csv(trained_run / "log.csv")
    # The selection metric: nnU-Net's EMA of the mean foreground Dice (0.9 old, 0.1 new).
    dice, ema = log["mean_fg_dice"].to_numpy(), log["ema_fg_dice"].to_numpy()
    assert ema[0] == dice[0]
    np.testing.assert_allclose(ema[1:], 0.9 * ema[:-1] + 0.1 * dice[1:], atol=2e-4)
    best = load_checkpoint(trained_run / "best.pth")
    assert math.isclose(best["best_metric"], ema.max(), abs_tol=1e-4)
    assert ema[best["epoch"]] == ema.max()
    assert not list(trained_run.glob("*.tmp"))


def test_best_checkpoint_is_the_best_smoothed_validation_dice(csv_dir, trained_run, monkeypatch):
    # Validation Dice scripted as 0.2, 0.9, 0.5, 0.5, 0.0. By hand, the EMA (0.9 old, 0.1 new)
    # is 0.2, 0.27, 0.293, 0.3137, 0.28233: best.pth is epoch 4, not the raw best (2) nor the
    # last (5). A fake clock: each epoch trains for 2 s and validates for 1000 s.
    scripted = iter([0.2, 0.9, 0.5, 0.5, 0.0])
    clock = [0.0]

    def fake_train(model, loader, optimizer, scheduler, *args):
        for _ in range(len(loader)):  # the optimizer steps, without data or gradients
            optimizer.step()
            scheduler.step()
        clock[0] += 2.0
        return training.EpochResult(loss=1.0, steps_taken=len(loader))

    def fake_validate(*args):
        clock[0] += 1000.0
        value = next(scripted)
        return {"val_loss": 1.0, "dice": np.array([1.0, value, value, value]),
                "mean_fg_dice": value}

    monkeypatch.setattr(training, "train_one_epoch", fake_train)
    monkeypatch.setattr(training, "validate", fake_validate)
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])
    run = trained_run.parent.parent / "scripted"  # shares the trained run's cache
    run_training(train_args(csv_dir, run, "--epochs", "5", "--decoder-channels", "16",
                            "--min-lr-ratio", "0.1"))

    log = pd.read_csv(run / "checkpoint" / "log.csv")
    np.testing.assert_allclose(log["ema_fg_dice"], [0.2, 0.27, 0.293, 0.3137, 0.2823], atol=1e-4)
    assert load_checkpoint(run / "checkpoint" / "best.pth")["epoch"] + 1 == 4
    # Speed counts training time only; the logged lr is the one of each epoch's last step
    # (step e S - 1 in epoch e, S steps an epoch): the peak 1e-3 at the end of the one warm-up
    # epoch, then 1e-3 (0.1 + 0.9 (1 + cos(pi (step - S) / (4 S))) / 2) with the floor of 0.1.
    steps = pd.read_csv(csv_dir / "train.csv")["img_path"].nunique() // 4
    assert (log["seconds"] == 1002.0).all() and (log["train_images_per_s"] == steps * 4 / 2).all()
    last_step = np.arange(2, 6) * steps - 1
    expected_lr = 1e-3 * (0.1 + 0.45 * (1 + np.cos(np.pi * (last_step - steps) / (4 * steps))))
    np.testing.assert_allclose(log["lr"], [1e-3, *expected_lr], rtol=1e-9)


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
    args, given = runs.parse_args([*base, "--lr", "3e-4"])  # 3e-4 is the default
    resumed, _ = runs.resolve_resume(args, given)
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
            inference.load_trained_model(tmp_path / "bad.pth", torch.device("cpu"))


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
    assert 0 <= auc["value"] <= 1 and 0 <= auc["ci95"][0] <= auc["ci95"][1] <= 1
    assert 0 < auc["valid_resamples"] <= 50  # resamples with both classes define an AUC
    assert detection["min_area"] == 16 and len(froc["valid_resamples"]) == 6
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


@pytest.fixture(scope="module")
def ddp_run(csv_dir, tmp_path_factory) -> Path:
    """torchrun with 2 CPU processes (gloo; --standalone picks a free port), 2 epochs, through
    tests/ddp_probe.py (what each rank read, and a pooled soft Dice on each rank)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(REPO / "tests" / "ddp_probe.py"), str(out),
               *train_args(csv_dir, out / "run", "--epochs", "2", "--batch-size", "2")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_ddp_run_writes_what_a_single_process_run_does(ddp_run, trained_run):
    ddp = load_checkpoint(ddp_run / "run" / "checkpoint" / "last.pth")
    single = load_checkpoint(trained_run / "last.pth")
    assert set(ddp) == set(single)
    assert {k: v.shape for k, v in ddp["model"].items()} == {
        k: v.shape for k, v in single["model"].items()}
    assert pd.read_csv(ddp_run / "run" / "checkpoint" / "log.csv")["epoch"].tolist() == [1, 2]


def test_ddp_ranks_train_on_their_own_shares_in_a_new_order_each_epoch(ddp_run, csv_dir):
    reads = [json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    n_train = pd.read_csv(csv_dir / "train.csv")["img_path"].nunique()
    for epoch in (0, 1):
        rank0, rank1 = reads[0][epoch], reads[1][epoch]
        # ceil(n / 2) images per rank (an odd set padded), in whole batches of 2
        assert len(rank0) == len(rank1) == math.ceil(n_train / 2) // 2 * 2
        # Disjoint shares (DistributedSampler pads an odd set with one repeated image).
        assert len(set(rank0) & set(rank1)) <= n_train % 2
    assert reads[0][0] != reads[0][1] and reads[1][0] != reads[1][1]  # set_epoch: new order


def test_ddp_validation_figures_are_the_whole_validation_sets(ddp_run, csv_dir):
    # Each rank validates every other image (in batches of 2): the figures recorded must pool
    # both halves, computed with the saved model's BatchNorm statistics on every rank. Reference:
    # the saved model in one process. Background Dice is always defined and differs between the
    # halves (~1e-3 here); the loss also moves (~3e-4) when a rank keeps its own statistics.
    checkpoint_path = ddp_run / "run" / "checkpoint" / "last.pth"
    model, config = inference.load_trained_model(checkpoint_path, torch.device("cpu"))
    val = MammogramDataset.from_csv(csv_dir / "val.csv", ddp_run / "cache", tuple(config["size"]))
    stats, loss_sum = [], 0.0
    with torch.no_grad():
        for rank in (0, 1):
            share = list(range(rank, len(val), 2))
            for start in range(0, len(share), 2):
                images, masks, _ = default_collate([val[i] for i in share[start:start + 2]])
                logits = model(normalize_input(unit_range(images)))
                loss_sum += training.segmentation_loss(logits, masks).item() * len(images)
                stats += [metrics.segmentation_stats(pred.numpy(), mask.numpy(), 4)
                          for pred, mask in zip(logits.argmax(1), masks, strict=True)]
    expected = metrics.dice_iou(np.stack(stats))["dice_pooled"]
    np.testing.assert_allclose(load_checkpoint(checkpoint_path)["val_dice"], expected, atol=2e-5)
    log = pd.read_csv(ddp_run / "run" / "checkpoint" / "log.csv")
    np.testing.assert_allclose(log[["dice_benign", "dice_mass", "dice_calc"]].iloc[-1],
                               expected[1:], atol=1e-4)
    assert log["val_loss"].iloc[-1] == pytest.approx(loss_sum / len(val), abs=2e-5)


def test_ddp_soft_dice_pools_both_ranks_batches(ddp_run):
    # Each rank holds half the batch; benign is only in rank 0's half, calc only in rank 1's.
    logits, target = ddp_probe.dice_batch()
    logits.requires_grad_()
    whole = training.soft_dice_loss(logits, target)
    whole.backward()
    for rank in (0, 1):
        result = torch.load(ddp_run / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], whole.detach())  # the whole batch's Dice
        # Each rank's gradient is world size (2) times its share of the whole batch's gradient,
        # which DDP's average over ranks turns into the whole batch's gradient.
        torch.testing.assert_close(result["grad"] / 2, logits.grad[2 * rank:2 * rank + 2])


# ----------------------------------------------------------------------------- loss, optimizer


def test_loss_is_cross_entropy_plus_soft_dice_by_hand():
    # Uniform logits over 4 classes on a 2x2 image with one benign pixel. Cross-entropy: ln 4.
    # Soft Dice of the one class present (benign; every probability 1/4, eps 1e-5):
    # (2 * 1/4 + eps) / (4 * 1/4 + 1 + eps) = 1/4. Mass and calc are absent and left out: scored
    # (eps 1e-5) they would pull the mean to 1/12; the classic eps = 1 would make it 1/2.
    logits = torch.zeros(1, 4, 2, 2)
    target = torch.tensor([[[1, 0], [0, 0]]])
    assert training.segmentation_loss(logits, target).item() == pytest.approx(
        math.log(4) + 0.75, abs=1e-5)
    assert training.segmentation_loss(logits, target, dice_weight=2).item() == pytest.approx(
        math.log(4) + 1.5, abs=1e-5)


def test_soft_dice_scores_only_the_classes_in_the_batch():
    # A batch with a mass and nothing else: the Dice term is the mass's soft Dice alone, pooled
    # over the batch, whatever probability benign and calc get (they are not there to find).
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = cbis.MASS
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mass = logits.softmax(1)[:, cbis.MASS]
    truth = (target == cbis.MASS).float()
    expected = 1 - (2 * (mass * truth).sum() + 1e-5) / (mass.sum() + truth.sum() + 1e-5)
    assert training.soft_dice_loss(logits, target).item() == pytest.approx(expected.item())


def test_weight_decay_spares_batchnorm_and_biases():
    # With zero gradients an AdamW step only decays: a decayed weight shrinks by lr * decay.
    args, _ = runs.parse_args(["--backbone", "resnet18", "--decoder-channels", "16",
                                   "--lr", "0.1", "--weight-decay", "0.5"])
    model, optimizer, _, _ = training.build_training_state(args, torch.device("cpu"), None, 1, 10)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            old = before[f"{module_name}.{name}"]
            if isinstance(module, torch.nn.BatchNorm2d) or name == "bias":
                assert torch.equal(p, old), f"{module_name}.{name} decayed"
            else:
                torch.testing.assert_close(p, old * (1 - 0.1 * 0.5))


@pytest.mark.parametrize(("max_norm", "expected_step"), [(1.0, [0.6, 0.8]), (0.0, [3.0, 4.0])])
def test_gradient_clipping_sees_the_unscaled_gradient(max_norm, expected_step):
    # loss = w . (3, 4): gradient (3, 4), norm 5, scaled by 1024 for the backward pass. Clipped
    # to norm 1 after un-scaling it is (0.6, 0.8); clipped before, it would be ~1e-3 after; an
    # SGD step of lr 1 moves the weights by it. max_norm 0: no clipping.
    weights = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weights], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(weights @ torch.tensor([3.0, 4.0])).backward()
    training.clip_gradients(torch.nn.ParameterList([weights]), optimizer, scaler, max_norm)
    scaler.step(optimizer)
    torch.testing.assert_close(-weights.detach(), torch.tensor(expected_step))


def test_cosine_schedule_ends_on_its_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = training.warmup_cosine(optimizer, warmup_steps=2, total_steps=10, min_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up 1/2, 1; cosine from 1 (step 2) to 0.1 (step 10): halfway (step 6) 0.55; then 0.1
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[6] == pytest.approx(0.55) and lrs[10:] == pytest.approx([0.1, 0.1])
    assert training.last_step_lr(scheduler) == pytest.approx(0.1)


def test_epoch_seeds_of_different_runs_do_not_coincide():
    # seed + epoch gave run s's epoch e + 1 the stream of run s + 1's epoch e.
    streams = [(tag, seed, epoch, rank) for tag in (training.TORCH_SEED, training.AUGMENT_SEED)
               for seed in range(8) for epoch in range(8) for rank in range(3)]
    seeds = {derive_seed(*stream) for stream in streams}
    assert len(seeds) == len(streams)
    assert all(0 <= seed < 2**62 for seed in seeds)
