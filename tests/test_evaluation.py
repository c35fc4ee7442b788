"""evaluation.py's per-image figures on hand-made probabilities (no model)."""

from __future__ import annotations

import numpy as np
import pytest

import evaluation
import metrics


@pytest.mark.parametrize(("min_area", "candidates", "benign_pixels"), [(16, 1, 0), (1, 2, 4)])
def test_evaluation_scores_the_mask_predict_writes(min_area, candidates, benign_pixels):
    # A 6x6 mass that matches its ROI and a 2x2 benign speck, geometry the identity. Under
    # min_area (predict.py's and the test script's default 16) the speck is background, in the
    # pixel counts and in the lesion candidates alike; with min_area 1 it is a false positive.
    probs = np.zeros((4, 30, 20), np.float32)
    probs[0] = 1
    probs[:, 5:11, 4:10] = np.array([0, 0, 1, 0])[:, None, None]
    probs[:, 20:22, 14:16] = np.array([0, 1, 0, 0])[:, None, None]
    roi = np.zeros((30, 20), bool)
    roi[5:11, 4:10] = True
    meta = {"original_shape": [30, 20], "box": [0, 30, 0, 20], "flipped": False}
    acc = evaluation.Accumulator()
    row = evaluation.evaluate_image(acc, probs, probs.argmax(0), meta, [roi], (2,), 0.2,
                                    min_area=min_area)
    assert row["n_candidates"] == candidates and row["false_positives"] == candidates - 1
    assert row["rois_found"] == 1 and row["dice_mass"] == 1.0
    intersection, predicted, true = acc.stats[-1][1]
    assert (intersection, predicted, true) == (0, benign_pixels, 0)
    assert row["lesion_dice"] == pytest.approx(2 * 36 / (36 + benign_pixels + 36))
    assert metrics.MIN_LESION_AREA == 16
