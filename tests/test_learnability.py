"""The recipe learns realistic mammograms: on two mammograms with a malignant mass and two with
a malignant calcification cluster of the realistic synthetic profile (512x304, fine detail as on
a 2048-row scan; study.HANDFUL), each training mode fits the images it trains on within the
steps of study.FIT_FLAGS: whole images at 256x152 in 300 steps of 4, native-size 96-px patches
in 400 steps of 8. The Dice is the validation Dice of the last epoch, pooled over those four
images at the cache's resolution (sliding window in patch mode).

Chance is the lesions' share of the pixels (under 1%). Patch mode is held to a lower bar for
calcifications: at native size a cluster is sparse specks inside a loose outline, and in 400
steps the model outlines the specks before the whole ROI (docs/study.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import study


@pytest.fixture(scope="module")
def handful(tmp_path_factory) -> Path:
    return study.handful_csv(tmp_path_factory.mktemp("handful"))


def test_whole_image_mode_fits_its_training_images(handful, tmp_path):
    fitted = study.overfit(handful, tmp_path, "whole")
    assert fitted["steps"] == 300
    assert fitted["dice_mass"] >= 0.5, fitted
    assert fitted["dice_calc"] >= 0.5, fitted


def test_patch_mode_fits_its_training_images(handful, tmp_path):
    fitted = study.overfit(handful, tmp_path, "patch")
    assert fitted["steps"] == 400
    assert fitted["dice_mass"] >= 0.5, fitted
    assert fitted["dice_calc"] >= 0.25, fitted
