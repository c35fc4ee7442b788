"""Tests for metrics.py on hand-built arrays; every expected number is worked out here."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import metrics

# ---------------------------------------------------------------- segmentation overlap


def test_confusion_matrix_3x3():
    target = np.array([[0, 0, 1], [1, 1, 2], [2, 2, 0]])
    pred = np.array([[0, 1, 1], [1, 0, 2], [2, 1, 0]])
    # (truth, pred) pairs in raster order: (0,0) (0,1) (1,1) (1,1) (1,0) (2,2) (2,2) (2,1) (0,0)
    expected = np.array(
        [
            [2, 1, 0],  # truth 0: two right, one called 1
            [1, 2, 0],  # truth 1: two right, one called 0
            [0, 1, 2],  # truth 2: two right, one called 1
        ]
    )
    cm = metrics.confusion_matrix(pred, target, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 9
    with pytest.raises(ValueError):  # a label outside [0, C) would silently land in another bin
        metrics.confusion_matrix(pred, target, 2)


# Two 8-pixel "images" (any shape works), 4 classes; class 3 appears nowhere.
TARGET_A = np.array([0, 0, 0, 0, 1, 1, 2, 2])
PRED_A = np.array([0, 0, 0, 1, 1, 1, 2, 0])
TARGET_B = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # no class 2 in the truth ...
PRED_B = np.array([2, 2, 0, 0, 1, 1, 0, 0])  # ... but two false-positive class-2 pixels


def _stats() -> np.ndarray:
    return np.stack(
        [
            metrics.segmentation_stats(PRED_A, TARGET_A, 4),
            metrics.segmentation_stats(PRED_B, TARGET_B, 4),
        ]
    )


def test_segmentation_stats():
    # [intersection, predicted, true] per class
    np.testing.assert_array_equal(_stats()[0], [[3, 4, 4], [2, 3, 2], [1, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(_stats()[1], [[2, 4, 4], [2, 2, 4], [0, 2, 0], [0, 0, 0]])


def test_dice_iou_pooled_and_mean():
    r = metrics.dice_iou(_stats())
    # pooled: class 0 I=3+2, P=4+4, T=4+4; class 1 I=2+2, P=3+2, T=2+4; class 2 I=1, P=1+2, T=2
    np.testing.assert_allclose(r["dice_pooled"][:3], [2 * 5 / 16, 2 * 4 / 11, 2 * 1 / 5])
    np.testing.assert_allclose(r["iou_pooled"][:3], [5 / (16 - 5), 4 / (11 - 4), 1 / (5 - 1)])
    # mean over images containing the class: class 0 A 6/8, B 4/8; class 1 A 4/5, B 4/6;
    # class 2 only A counts (2/3): B's false positives are left out of the mean
    dice_mean = [(6 / 8 + 4 / 8) / 2, (4 / 5 + 4 / 6) / 2, 2 / 3]
    iou_mean = [(3 / 5 + 2 / 6) / 2, (2 / 3 + 2 / 4) / 2, 1 / 2]
    np.testing.assert_allclose(r["dice_mean"][:3], dice_mean)
    np.testing.assert_allclose(r["iou_mean"][:3], iou_mean)
    np.testing.assert_array_equal(r["n_images_with_class"], [2, 2, 1, 0])
    # class 3 neither predicted nor true anywhere: undefined, not 0 or 1
    for key in ("dice_pooled", "iou_pooled", "dice_mean", "iou_mean"):
        assert np.isnan(r[key][3])
    # B's false positives lower the pooled class-2 Dice (2/5) below A's own (2 * 1 / 3)
    assert metrics.dice_iou(_stats()[:1])["dice_pooled"][2] == pytest.approx(2 / 3)


def test_dice_iou_weights_equal_repetition():
    stats, w = _stats(), np.array([2, 1])
    weighted = metrics.dice_iou(stats, weights=w)
    repeated = metrics.dice_iou(np.repeat(stats, w, axis=0))  # A, A, B
    for key in weighted:
        np.testing.assert_allclose(weighted[key], repeated[key])
    # weight 0 drops B: its class-2 false positives no longer count
    only_a = metrics.dice_iou(stats, weights=np.array([1, 0]))
    assert only_a["dice_pooled"][2] == pytest.approx(2 / 3)
    # B alone has class-2 predictions but no class-2 truth: pooled Dice is undefined, not 0,
    # so a bootstrap resample without the class is left out instead of scoring 0
    only_b = metrics.dice_iou(stats, weights=np.array([0, 1]))
    assert np.isnan(only_b["dice_pooled"][2]) and np.isnan(only_b["iou_pooled"][2])
    assert np.isnan(metrics.pooled_dice(np.array([[0, 5, 0]])))


def test_lesion_stats_and_pooled_dice():
    # abnormality (> 0): A truth idx 4-7, pred idx 3-6 -> I=3 (4, 5, 6), P=4, T=4
    # B truth idx 4-7, pred idx 0, 1, 4, 5 -> I=2, P=4, T=4
    a, b = metrics.lesion_stats(PRED_A, TARGET_A), metrics.lesion_stats(PRED_B, TARGET_B)
    np.testing.assert_array_equal(a, [3, 4, 4])
    np.testing.assert_array_equal(b, [2, 4, 4])
    assert metrics.pooled_dice(np.stack([a, b])) == pytest.approx(2 * 5 / 16)
    # weights [1, 2]: I = 3 + 4, P + T = 8 + 16
    assert metrics.pooled_dice(np.stack([a, b]), np.array([1, 2])) == pytest.approx(14 / 24)
    assert np.isnan(metrics.pooled_dice(np.zeros((2, 3), dtype=np.int64)))


# ---------------------------------------------------------------- lesion detection


def test_lesion_candidates_two_blobs():
    pred = np.zeros((8, 10), dtype=np.uint8)
    prob = np.full((8, 10), 0.05)
    prob[0, 0] = 0.99  # outside every blob: must not score anything
    pred[1:3, 1:4] = 2  # blob 1: 2 x 3 = 6 px, five of them mass ...
    pred[1, 1] = 1  # ... one benign
    prob[1, 1], prob[2, 2] = 0.6, 0.9
    pred[5, 6] = pred[6, 7] = 3  # blob 2: diagonal neighbours join under 8-connectivity
    pred[6, 8] = 1
    prob[6, 8] = 0.7
    c1, c2 = metrics.lesion_candidates(prob, pred)
    assert (c1.score, c1.cls, c1.area, c1.bbox) == (0.9, 2, 6, (1, 1, 4, 3))
    assert c1.centroid == pytest.approx((2.0, 1.5))  # x mean of 1, 2, 3; y mean of 1, 2
    assert c1.mask.shape == (2, 3) and c1.mask.all()
    assert (c2.score, c2.cls, c2.area, c2.bbox) == (0.7, 3, 3, (6, 5, 9, 7))
    assert c2.centroid == pytest.approx(((6 + 7 + 8) / 3, (5 + 6 + 6) / 3))
    np.testing.assert_array_equal(c2.mask, [[1, 0, 0], [0, 1, 1]])
    # min_area drops the 3-pixel blob
    assert [c.area for c in metrics.lesion_candidates(prob, pred, min_area=4)] == [6]


def _blob(pred: np.ndarray, prob: np.ndarray, box: tuple, cls: int, score: float) -> None:
    pred[box] = cls
    prob[box] = score


def _froc_images() -> list[metrics.ImageDetections]:
    """Image 1: ROI a (mass) hit at 0.9, ROI b (benign) hit at 0.4 by a candidate predicted as
    mass (IoU 8/16), one FP at 0.8. Image 2: ROI c (calc) hit at 0.2, FPs at 0.7 and 0.3."""
    out = []
    rois = [
        [(np.s_[2:6, 2:6], 2), (np.s_[10:14, 10:14], 1)],
        [(np.s_[5:9, 5:9], 3)],
    ]
    blobs = [
        [(np.s_[2:6, 2:6], 2, 0.9), (np.s_[15:17, 0:2], 1, 0.8), (np.s_[10:12, 10:14], 2, 0.4)],
        [(np.s_[0:2, 15:17], 1, 0.7), (np.s_[15:17, 15:17], 1, 0.3), (np.s_[5:9, 5:9], 3, 0.2)],
    ]
    for roi_list, blob_list in zip(rois, blobs, strict=True):
        pred, prob = np.zeros((20, 20), dtype=np.uint8), np.full((20, 20), 0.01)
        for box, cls, score in blob_list:
            _blob(pred, prob, box, cls, score)
        masks = []
        for box, _ in roi_list:
            masks.append(np.zeros((20, 20), dtype=bool))
            masks[-1][box] = True
        cands = metrics.lesion_candidates(prob, pred)
        out.append(metrics.match_candidates(cands, masks, [c for _, c in roi_list]))
    return out


def test_match_candidates_records():
    d1, d2 = _froc_images()
    # candidates in raster order of their first pixel
    np.testing.assert_allclose(d1.scores, [0.9, 0.4, 0.8])
    np.testing.assert_array_equal(d1.is_tp, [True, True, False])
    np.testing.assert_allclose(d1.roi_hit_scores, [0.9, 0.4])
    np.testing.assert_array_equal(d1.roi_classes, [2, 1])
    np.testing.assert_allclose(d2.scores, [0.7, 0.2, 0.3])
    np.testing.assert_array_equal(d2.is_tp, [False, True, False])
    np.testing.assert_allclose(d2.roi_hit_scores, [0.2])


def test_froc_sensitivity_at_fp_rates():
    r = metrics.froc(_froc_images(), fp_rates=(0.125, 0.5, 1, 2))
    # threshold:   inf  0.9  0.8  0.7  0.4  0.3  0.2
    # FPs >= t:      0    0    1    2    2    3    3   / 2 images
    # ROIs hit:      0    1    1    1    2    2    3   / 3 ROIs
    np.testing.assert_allclose(r["curve_fppi"], [0, 0, 0.5, 1, 1, 1.5, 1.5])
    np.testing.assert_allclose(r["curve_sensitivity"], [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    # best sensitivity with fppi <= 0.125: 1/3 (t=0.9); <= 0.5: 1/3; <= 1: 2/3 (t=0.4); <= 2: 1
    np.testing.assert_allclose(r["sensitivity"], [1 / 3, 1 / 3, 2 / 3, 1])
    assert (r["n_lesions"], r["n_images"]) == (3, 2)


def test_froc_per_class_restricts_lesions_not_candidates():
    d = _froc_images()
    rates = (0.5, 1, 2)
    # mass ROI a is hit at 0.9, where fppi = 0: found at every rate
    np.testing.assert_allclose(metrics.froc(d, rates, lesion_class=2)["sensitivity"], [1, 1, 1])
    # benign ROI b is hit (by a candidate predicted as mass) at 0.4, where fppi = 2 / 2 = 1
    np.testing.assert_allclose(metrics.froc(d, rates, lesion_class=1)["sensitivity"], [0, 1, 1])
    # calc ROI c is hit at 0.2, where fppi = 3 / 2 = 1.5
    r = metrics.froc(d, rates, lesion_class=3)
    np.testing.assert_allclose(r["sensitivity"], [0, 0, 1])
    # the FP axis is the same for every class
    np.testing.assert_allclose(r["curve_fppi"], metrics.froc(d)["curve_fppi"])
    assert r["n_lesions"] == 1
    assert np.isnan(metrics.froc(d, rates, lesion_class=0)["sensitivity"]).all()  # no such lesions


def test_froc_weights_equal_repetition():
    d1, d2 = _froc_images()
    weighted = metrics.froc([d1, d2], weights=np.array([2, 1]))
    repeated = metrics.froc([d1, d1, d2])
    for key in weighted:
        np.testing.assert_allclose(weighted[key], repeated[key])
    # image 1 alone: ROIs a (0.9) and b (0.4), one FP (0.8) on one image;
    # fppi <= 0.5 keeps t = 0.9 only -> 1/2; fppi <= 1 reaches t = 0.4 -> 2/2
    r = metrics.froc([d1, d2], fp_rates=(0.5, 1), weights=np.array([1, 0]))
    np.testing.assert_allclose(r["sensitivity"], [0.5, 1])


def _one_candidate(box: tuple, roi_box: tuple) -> tuple[metrics.Candidate, np.ndarray]:
    pred, prob = np.zeros((20, 20), dtype=np.uint8), np.full((20, 20), 0.5)
    pred[box] = 2
    roi = np.zeros((20, 20), dtype=bool)
    roi[roi_box] = True
    (cand,) = metrics.lesion_candidates(prob, pred)
    return cand, roi


def test_centre_and_iou_criteria_disagree():
    roi_box = np.s_[0:10, 0:10]  # 100 px
    # thin line, row 5, cols 0-16 (17 px): centroid (x=8, y=5) inside the ROI, but
    # IoU = 10 / (100 + 17 - 10) = 0.093 < 0.2
    cand, roi = _one_candidate(np.s_[5, 0:17], roi_box)
    assert metrics.match_candidates([cand], [roi], [2], criterion="centre").is_tp[0]
    assert not metrics.match_candidates([cand], [roi], [2], criterion="iou").is_tp[0]
    # block rows 0-9, cols 6-15 (100 px): IoU = 40 / (100 + 100 - 40) = 0.25 >= 0.2, but its
    # centroid (x=10.5, y=4.5) lies in column 11, outside the ROI
    cand, roi = _one_candidate(np.s_[0:10, 6:16], roi_box)
    assert not metrics.match_candidates([cand], [roi], [2], criterion="centre").is_tp[0]
    assert metrics.match_candidates([cand], [roi], [2], criterion="iou").is_tp[0]
    # a stricter IoU threshold turns it into a false positive and leaves the ROI unhit
    d = metrics.match_candidates([cand], [roi], [2], iou_threshold=0.3)
    assert not d.is_tp[0] and d.roi_hit_scores[0] == -np.inf


def test_match_without_rois_or_candidates():
    cand, roi = _one_candidate(np.s_[0:3, 0:3], np.s_[10:12, 10:12])
    d = metrics.match_candidates([cand], [], [])
    np.testing.assert_array_equal(d.is_tp, [False])
    assert d.roi_hit_scores.shape == (0,)
    d = metrics.match_candidates([], [roi], [3])
    assert d.scores.shape == (0,) and d.roi_hit_scores[0] == -np.inf
    # an image with one missed ROI and no candidate: no FPs, sensitivity 0
    r = metrics.froc([d], fp_rates=(1,))
    assert r["sensitivity"][0] == 0 and r["curve_fppi"][-1] == 0
    with pytest.raises(ValueError):
        metrics.match_candidates([cand], [roi], [3], criterion="center")


# ---------------------------------------------------------------- image-level malignancy


def test_roc_auc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1; 0.8 beats both -> 3/4
    assert metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # ties count one half: positives 1, 2 vs negative 1 -> (0.5 + 1) / 2
    assert metrics.roc_auc(np.array([1, 1, 2]), np.array([0, 1, 1])) == 0.75
    assert np.isnan(metrics.roc_auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_roc_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=300).astype(float)  # six levels: many ties
    labels = rng.integers(0, 2, size=300)
    assert metrics.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    # integer weights = repeating samples
    w = rng.integers(0, 4, size=300)
    expected = roc_auc_score(np.repeat(labels, w), np.repeat(scores, w))
    assert metrics.roc_auc(scores, labels, w) == pytest.approx(expected)


def test_roc_curve_endpoints_and_area():
    rng = np.random.default_rng(2)
    scores, labels = rng.integers(0, 10, size=200) / 10, rng.integers(0, 2, size=200)
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    # the trapezoid rule counts ties one half, as the AUC does
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(scores, labels))


def test_sensitivity_specificity_by_hand():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    # t = 0.4: positives called: 0.8 of {0.35, 0.8} -> 1/2; negatives below: 0.1 of {0.1, 0.4}
    assert metrics.sensitivity_specificity(scores, labels, 0.4) == (0.5, 0.5)
    # t = 0.35: both positives (>= counts), negatives below: 0.1 only
    assert metrics.sensitivity_specificity(scores, labels, 0.35) == (1.0, 0.5)
    # weights 3, 1, 1, 1 at t = 0.4: specificity 3 / (3 + 1)
    w = np.array([3, 1, 1, 1])
    assert metrics.sensitivity_specificity(scores, labels, 0.4, w) == (0.5, 0.75)


# ---------------------------------------------------------------- patient bootstrap

# patient A: 9 images of value 1; patient B: 1 image of value 0
PATIENTS = np.array(["A"] * 9 + ["B"])
VALUES = np.array([1.0] * 9 + [0.0])


def _weighted_mean(w: np.ndarray) -> float:
    return float(w @ VALUES / w.sum())


def test_bootstrap_resamples_patients_not_images():
    W = metrics.bootstrap_weights(PATIENTS, n_resamples=500, seed=0)
    assert W.shape == (500, 10)
    # all of a patient's images carry the same weight, and two patients are drawn each time
    assert (W[:, :9] == W[:, :1]).all()
    assert (W[:, 0] + W[:, 9] == 2).all()
    # A drawn k = 0, 1, 2 times -> mean 0, 9/10, 1; resampling images would give e.g. 8/10
    means = np.array([_weighted_mean(w) for w in W])
    assert set(np.round(means, 12)) == {0.0, 0.9, 1.0}
    np.testing.assert_array_equal(W, metrics.bootstrap_weights(PATIENTS, n_resamples=500, seed=0))
    assert not np.array_equal(W, metrics.bootstrap_weights(PATIENTS, n_resamples=500, seed=1))


def test_bootstrap_ci():
    lo, hi, n_valid = metrics.bootstrap_ci(_weighted_mean, PATIENTS, n_resamples=400, seed=3)
    # P(k=0) = P(k=2) = 1/4, P(k=1) = 1/2: the 2.5% and 97.5% points are 0 and 1
    assert (float(lo), float(hi), int(n_valid)) == (0.0, 1.0, 400)
    # same seed, same result
    assert metrics.bootstrap_ci(_weighted_mean, PATIENTS, n_resamples=400, seed=3) == (
        lo, hi, n_valid)

    # NaN resamples (B not drawn) are left out, and counted: only 0 and 0.9 remain
    def mean_if_b(w: np.ndarray) -> float:
        return np.nan if w[9] == 0 else _weighted_mean(w)

    lo, hi, n_valid = metrics.bootstrap_ci(mean_if_b, PATIENTS, n_resamples=400, seed=3)
    assert (float(lo), float(hi)) == pytest.approx((0.0, 0.9))
    drawn_b = (metrics.bootstrap_weights(PATIENTS, n_resamples=400, seed=3)[:, 9] > 0).sum()
    assert n_valid == drawn_b and 250 < n_valid < 350  # B is drawn with probability 3/4


def test_bootstrap_ci_of_vector_statistic():
    stats = np.repeat(_stats(), [1, 1], axis=0)
    lo, hi, n_valid = metrics.bootstrap_ci(
        lambda w: metrics.dice_iou(stats, w)["dice_pooled"], np.array(["p1", "p2"]), n_resamples=50
    )
    assert lo.shape == hi.shape == n_valid.shape == (4,)
    assert np.all(lo[:3] <= hi[:3]) and np.isnan(lo[3]) and np.isnan(hi[3])
    assert n_valid[3] == 0  # no image has class 3: no resample defines its Dice
