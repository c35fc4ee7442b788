"""Cross-validation folds, checkpoint ensembles, test-time flips and saved probabilities (CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import evaluation
import inference
import predict
import runs
import training
from cbis import BENIGN, CALC, FOLDS_NAME, MASS, NUM_CLASSES
from dataset import read_split_csv, read_training_splits
from main_retrieval import assign_folds
from model import build_model
from tests.conftest import SIZE, mammogram, train_args
from utils import CheckpointError, UsageError, load_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------- folds


def patients(rows: pd.DataFrame) -> set[str]:
    return set(rows["patient_id"].astype(str))


def test_folds_are_patient_disjoint_and_cover_every_training_patient_once(csv_dir):
    training_patients = set()
    for split in ("train", "val"):
        training_patients |= patients(read_split_csv(csv_dir / f"{split}.csv")[0])
    folds = pd.read_csv(csv_dir / FOLDS_NAME, dtype={"patient_id": str})
    assert set(folds["patient_id"]) == training_patients  # no test patient, none missing
    assert not patients(read_split_csv(csv_dir / "test.csv")[0]) & set(folds["patient_id"])
    validated = []
    for fold in range(5):
        splits, _ = read_training_splits(csv_dir, fold)
        assert not patients(splits["train"]) & patients(splits["val"])
        assert patients(splits["train"]) | patients(splits["val"]) == training_patients
        validated += sorted(patients(splits["val"]))
    assert sorted(validated) == sorted(training_patients)  # each validated exactly once
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1


def test_folds_spread_each_class_evenly():
    # 15 patients, 5 with each class: every fold of 5 gets one of each.
    classes = [BENIGN] * 5 + [MASS] * 5 + [CALC] * 5
    rows = pd.DataFrame({"patient_id": [f"P_{i:05d}" for i in range(15)], "class_id": classes,
                         "split": ["train"] * 12 + ["val"] * 3})
    folds = assign_folds(rows, 5, seed=0).merge(rows, on="patient_id")
    assert (pd.crosstab(folds["fold"], folds["class_id"]) == 1).all().all()
    assert not assign_folds(rows, 5, seed=1)["fold"].equals(assign_folds(rows, 5, 0)["fold"])


def test_fold_run_validates_on_its_fold_and_records_it(csv_dir, tmp_path):
    training.train(*runs.parse_args(train_args(csv_dir, tmp_path, "--fold", "1", "--epochs",
                                               "1")))
    checkpoint = load_checkpoint(tmp_path / "checkpoint" / "last.pth")
    splits, _ = read_training_splits(csv_dir, 1)
    assert checkpoint["fold"] == 1 and checkpoint["data"]["fold"] == 1
    assert checkpoint["data"]["rows"] == {split: len(rows) for split, rows in splits.items()}
    args, _ = runs.parse_args(train_args(csv_dir, tmp_path / "other", "--fold", "5"))
    with pytest.raises(UsageError, match="--fold 5 is not in"):
        runs.validate_args(args)


# ----------------------------------------------------------------------------- ensembles


def save_random_checkpoint(path: Path, *flags: str, seed: int = 0) -> Path:
    """A checkpoint as training writes it (model and config), with random weights."""
    args = runs.get_args_parser().parse_args(
        ["--backbone", "resnet18", "--decoder-channels", "8", "--size", *map(str, SIZE),
         *flags])
    config = runs.model_config(args)
    torch.manual_seed(seed)
    net = build_model(config["backbone"], config["num_classes"], config["in_channels"],
                      config["output_stride"], decoder_channels=config["decoder_channels"])
    save_checkpoint({"model": net.state_dict(), "config": config}, path)
    return path


def images(count: int = 2, height: int = SIZE[0], width: int = SIZE[1]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 65535, (count, 1, height, width), generator=generator,
                         dtype=torch.int32).to(torch.uint16)


def test_an_ensemble_of_two_identical_checkpoints_equals_the_single_checkpoint(tmp_path):
    one = save_random_checkpoint(tmp_path / "a.pth")
    two = shutil.copy(one, tmp_path / "b.pth")
    cpu = torch.device("cpu")
    single = inference.ensemble_probabilities(inference.load_ensemble([one], cpu), images(), cpu)
    pair = inference.ensemble_probabilities(inference.load_ensemble([one, Path(two)], cpu),
                                            images(), cpu)
    np.testing.assert_array_equal(pair, single)


def test_an_ensemble_averages_its_members_probabilities(tmp_path):
    cpu = torch.device("cpu")
    members = inference.load_ensemble(
        [save_random_checkpoint(tmp_path / f"{seed}.pth", seed=seed) for seed in (0, 1)], cpu)
    each = [inference.predict_probabilities(m.model, images(), cpu, m.config) for m in members]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(inference.ensemble_probabilities(members, images(), cpu),
                               (each[0] + each[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("flags", [("--size", "96", "64"), ("--no-canonical-flip",),
                                   ("--patch-size", "32", "32")])
def test_checkpoints_that_disagree_on_input_mode_are_refused(tmp_path, flags):
    first = save_random_checkpoint(tmp_path / "a.pth")
    other = save_random_checkpoint(tmp_path / "b.pth", *flags)
    with pytest.raises(CheckpointError, match="cannot join an ensemble with .*a.pth: "):
        inference.load_ensemble([first, other], torch.device("cpu"))


def test_checkpoints_that_disagree_on_classes_are_refused(tmp_path):
    first = save_random_checkpoint(tmp_path / "a.pth")
    state = load_checkpoint(first)
    state["config"]["class_names"] = ["background", "lesion", "mass", "calc"]
    save_checkpoint(state, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="classes"):
        inference.load_ensemble([first, tmp_path / "b.pth"], torch.device("cpu"))


def test_a_folder_of_runs_is_their_best_checkpoints_once_each(tmp_path):
    for fold in (1, 0):
        (tmp_path / "folds" / f"fold{fold}").mkdir(parents=True)
        save_random_checkpoint(tmp_path / "folds" / f"fold{fold}" / "best.pth")
    found = inference.resolve_checkpoints([str(tmp_path / "folds")], tmp_path)
    assert found == [tmp_path / "folds" / f"fold{k}" / "best.pth" for k in (0, 1)]
    with pytest.raises(CheckpointError, match="given twice"):
        inference.resolve_checkpoints([str(tmp_path / "folds"), str(found[0])], tmp_path)
    with pytest.raises(CheckpointError, match="without run folders"):
        inference.resolve_checkpoints([str(tmp_path)], tmp_path)


def test_test_script_records_the_ensemble_and_saves_probabilities(csv_dir, tmp_path, capsys):
    one = save_random_checkpoint(tmp_path / "a.pth")
    two = save_random_checkpoint(tmp_path / "b.pth", seed=1)
    common = ["--csv", str(csv_dir / "test.csv"), "--cache-dir", str(tmp_path / "cache"),
              "--workers", "0", "--bootstrap", "10", "--overlays", "0", "--no-progress"]
    argv = ["--checkpoint", str(one), "--checkpoint", str(two), "--tta", "--save-probabilities",
            "--out", str(tmp_path / "out"), *common]
    assert evaluation.main(argv) == 0
    results = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [c["sha256"] for c in results["checkpoints"]] == [
        hashlib.sha256(path.read_bytes()).hexdigest() for path in (one, two)]
    assert results["test_time_flips"] == ["none", "vertical"]
    saved = sorted((tmp_path / "out" / "probabilities").glob("*.npz"))
    assert len(saved) == results["n_images"]
    probs, meta = inference.load_probabilities(saved[0])
    assert probs.dtype == np.float16 and probs.shape == (NUM_CLASSES, *SIZE)
    assert "original_shape" in meta and "box" in meta
    assert "an ensemble of 2 checkpoints, test-time flips: vertical" in capsys.readouterr().out

    refused = save_random_checkpoint(tmp_path / "c.pth", "--size", "96", "64")
    argv = ["--checkpoint", str(one), "--checkpoint", str(refused), "--out",
            str(tmp_path / "refused"), *common]
    assert evaluation.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot join an ensemble" in error


def test_predict_saves_the_probabilities_it_used(tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "a.pth")
    image = tmp_path / "in" / "scan.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), mammogram(96, 64, chest_wall_right=True))
    out = tmp_path / "out"
    argv = [str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--tta",
            "--save-probabilities", "--no-progress"]
    assert predict.main(argv) == 0
    probs, meta = inference.load_probabilities(out / "scan_probs.npz")
    [member] = inference.load_ensemble([checkpoint], torch.device("cpu"))
    expected, expected_meta = inference.predict_image(member.model, cv2.imread(
        str(image), cv2.IMREAD_UNCHANGED), torch.device("cpu"), member.config, tta=True)
    assert probs.dtype == np.float16 and meta == json.loads(json.dumps(expected_meta))
    np.testing.assert_allclose(probs, expected, atol=1e-3)
    mask, _ = inference.predict_at_original(probs.astype(np.float32), meta)
    assert mask.shape == (96, 64)


# ----------------------------------------------------------------------------- test-time flips


class Pixelwise(nn.Module):
    """A 1x1 convolution: equivariant to every flip, whole image and sliding window alike."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LooksDown(nn.Module):
    """Each pixel's logits from the pixel below it too: not flip-equivariant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, NUM_CLASSES, (3, 1), padding=(1, 0))
        with torch.no_grad():
            self.conv.weight[:, :, 0] = 0  # nothing from above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


WHOLE = {"patch_size": None, "canonical_flip": True}
PATCHES = {"patch_size": [32, 24], "sw_overlap": 0.5, "canonical_flip": True}


@pytest.mark.parametrize("config", [WHOLE, PATCHES], ids=["whole-image", "sliding-window"])
def test_tta_of_a_flip_equivariant_model_equals_no_tta(config):
    cpu, batch = torch.device("cpu"), images(height=80, width=56)
    plain = inference.predict_probabilities(Pixelwise().eval(), batch, cpu, config)
    flipped = inference.predict_probabilities(Pixelwise().eval(), batch, cpu, config, tta=True)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


@pytest.mark.parametrize("config", [WHOLE, PATCHES], ids=["whole-image", "sliding-window"])
def test_tta_averages_the_image_and_its_vertical_flip_only(config):
    cpu, batch = torch.device("cpu"), images(height=80, width=56)
    net = LooksDown().eval()
    plain = inference.predict_probabilities(net, batch, cpu, config)
    upside_down = inference.predict_probabilities(net, batch.flip(2), cpu, config)[:, :, ::-1]
    assert not np.allclose(plain, upside_down, atol=1e-3)
    tta = inference.predict_probabilities(net, batch, cpu, config, tta=True)
    np.testing.assert_allclose(tta, (plain + upside_down) / 2, atol=1e-6)


def test_horizontal_flips_only_for_checkpoints_that_kept_both_sides():
    assert inference.tta_flips({"canonical_flip": True}, tta=False) == [()]
    assert inference.tta_flips({"canonical_flip": True}, tta=True) == [(), (2,)]
    assert inference.tta_flips({"canonical_flip": False}, tta=True) == [(), (2,), (3,), (2, 3)]
