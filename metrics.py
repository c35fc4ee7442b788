"""Evaluation metrics: Dice/IoU, confusion matrix, lesion detection (FROC), malignancy AUC and
patient-level bootstrap confidence intervals.

Pure functions over numpy arrays. The evaluation script calls the per-image functions
(`segmentation_stats`, `lesion_stats`, `lesion_candidates` + `match_candidates`) once per image,
keeps the small records they return, and then calls the set-level functions once over the set.
Every set-level function takes an optional `weights` vector (non-negative, one per image,
default all ones): image i counts `weights[i]` times, which is how the bootstrap resamples
patients without copying arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from cbis import BACKGROUND

# Predicted components smaller than this (original pixels) are no lesion: evaluation scores and
# predict.py ships the same detector (see drop_small_lesions).
MIN_LESION_AREA = 16


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """Per-image multiplicities; integer ones by default so that unweighted counts stay ints."""
    if weights is None:
        return np.ones(n, dtype=np.int64)
    w = np.asarray(weights)
    if w.shape != (n,) or np.any(w < 0):
        raise ValueError(f"weights must be {n} non-negative numbers, got shape {w.shape}")
    return w


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den, NaN where den == 0 (a metric that is undefined, not zero)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


# ---------------------------------------------------------------- segmentation overlap


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts, (C, C) int64: entry [t, p] = pixels of true class t predicted as p."""
    t, p = np.asarray(target).ravel(), np.asarray(pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"pred {np.shape(pred)} and target {np.shape(target)} differ in shape")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    # a uint8 bin index makes a 3000x5000 image ~5x faster than int64
    dtype = np.uint8 if num_classes * num_classes <= 256 else np.int64
    counts = np.bincount(
        t.astype(dtype) * num_classes + p.astype(dtype), minlength=num_classes * num_classes
    )
    return counts.reshape(num_classes, num_classes)


def segmentation_stats(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image sufficient statistics, (C, 3) int64: [intersection, predicted, true] pixels."""
    cm = confusion_matrix(pred, target, num_classes)
    return np.stack([np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)], axis=1)


def dice_iou(stats: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-class Dice and IoU over a set, from `stats` (N, C, 3) of `segmentation_stats`.

    Returns arrays of length C:
    - `dice_pooled`, `iou_pooled`: from the pixel counts summed over all images; NaN where no
      image's truth has the class (Dice is undefined there; its false positives still show in
      the confusion matrix and detection FPs, and a bootstrap resample without the class is left
      out rather than scored 0). False positives on images that lack the class count.
    - `dice_mean`, `iou_mean`: mean of the per-image scores over the images whose truth contains
      the class; images without the class in their truth are left out of that class's mean, so
      false positives on them do not lower it (the pooled figure and the detection FPs do count
      them). NaN where no image contains the class.
    - `n_images_with_class`: (weighted) number of images whose truth contains the class.
    """
    stats = np.asarray(stats)
    w = _weights(weights, stats.shape[0])
    inter, pred, true = np.moveaxis(stats, -1, 0)  # each (N, C)
    tot_i, tot_p, tot_t = np.tensordot(w, stats, axes=1).T
    has = true > 0
    dice_img = _ratio(2 * inter, pred + true)
    iou_img = _ratio(inter, pred + true - inter)
    n_with = w @ has
    return {
        "dice_pooled": np.where(tot_t > 0, _ratio(2 * tot_i, tot_p + tot_t), np.nan),
        "iou_pooled": np.where(tot_t > 0, _ratio(tot_i, tot_p + tot_t - tot_i), np.nan),
        # where(has, ..., 0) drops the NaNs of images that lack the class before summing
        "dice_mean": _ratio(w @ np.where(has, dice_img, 0.0), n_with),
        "iou_mean": _ratio(w @ np.where(has, iou_img, 0.0), n_with),
        "n_images_with_class": n_with,
    }


def lesion_stats(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image [intersection, predicted, true] pixels, (3,) int64, of the binary abnormality map
    (any class but background, whatever its class) of prediction and truth."""
    p, t = np.asarray(pred) != BACKGROUND, np.asarray(target) != BACKGROUND
    return np.array([np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)])


def pooled_dice(stats: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Dice from (N, 3) [intersection, predicted, true] counts summed over images (pixel-pooled);
    NaN when nothing is true anywhere (see dice_iou)."""
    stats = np.asarray(stats)
    inter, pred, true = _weights(weights, stats.shape[0]) @ stats
    return float(_ratio(2 * inter, pred + true)) if true > 0 else float("nan")


# ---------------------------------------------------------------- lesion detection


@dataclass(eq=False)
class Candidate:
    """One connected component of the predicted abnormality map.

    `score` is the highest abnormality probability inside it, `cls` its majority predicted class
    (ties go to the lower id), `bbox` (x0, y0, x1, y1) with x1, y1 exclusive, `centroid` (x, y) in
    pixels, and `mask` its pixels as a boolean array over the bbox (shape (y1 - y0, x1 - x0)).
    """

    score: float
    cls: int
    bbox: tuple[int, int, int, int]
    area: int
    centroid: tuple[float, float]
    mask: np.ndarray


@dataclass(eq=False)
class ImageDetections:
    """Matching result of one image: per candidate its score and whether it hits any ROI; per ROI
    its class and its hit score (highest score of the candidates hitting it, -inf if none)."""

    scores: np.ndarray  # (K,) float64
    is_tp: np.ndarray  # (K,) bool
    roi_hit_scores: np.ndarray  # (R,) float64
    roi_classes: np.ndarray  # (R,) int64


def lesion_candidates(
    abnormality_prob: np.ndarray, pred: np.ndarray, min_area: int = 1
) -> list[Candidate]:
    """Connected components (8-connectivity) of the lesion pixels of `pred` (any class but
    background) with at least `min_area` pixels, each scored by the maximum of
    `abnormality_prob` (= 1 - p(background)) inside it."""
    if abnormality_prob.shape != pred.shape:
        raise ValueError(f"prob {abnormality_prob.shape} and pred {pred.shape} differ in shape")
    n, labels, cc, centroids = cv2.connectedComponentsWithStats(
        (pred != BACKGROUND).astype(np.uint8), connectivity=8
    )
    out = []
    for k in range(1, n):  # label 0 is the background
        x0, y0, w, h, area = (int(v) for v in cc[k])
        if area < min_area:
            continue
        box = np.s_[y0 : y0 + h, x0 : x0 + w]
        mask = labels[box] == k
        out.append(
            Candidate(
                score=float(abnormality_prob[box][mask].max()),
                cls=int(np.bincount(pred[box][mask].astype(np.int64)).argmax()),
                bbox=(x0, y0, x0 + w, y0 + h),
                area=area,
                centroid=(float(centroids[k, 0]), float(centroids[k, 1])),
                mask=mask,
            )
        )
    return out


def drop_small_lesions(
    abnormality_prob: np.ndarray, pred: np.ndarray, min_area: int = MIN_LESION_AREA
) -> list[Candidate]:
    """The lesion candidates of `pred` with at least `min_area` pixels; the pixels of smaller
    components are set to background in `pred` (in place), so the mask and the list agree."""
    kept = []
    for candidate in lesion_candidates(abnormality_prob, pred):
        if candidate.area >= min_area:
            kept.append(candidate)
        else:
            x0, y0, x1, y1 = candidate.bbox
            pred[y0:y1, x0:x1][candidate.mask] = BACKGROUND
    return kept


def match_candidates(
    candidates: Sequence[Candidate],
    roi_masks: Sequence[np.ndarray],
    roi_classes: Sequence[int],
    iou_threshold: float = 0.2,
    criterion: str = "iou",
) -> ImageDetections:
    """Match one image's candidates against its ground-truth ROIs (one boolean mask each).

    criterion "iou": candidate hits ROI j when IoU(candidate, ROI j) >= `iou_threshold`;
    "centre": when the pixel holding the candidate's centroid lies inside ROI j. Matching ignores
    classes: a candidate of any predicted class may hit an ROI of any class. Candidates must be
    disjoint, as the components of `lesion_candidates` are.
    """
    if criterion not in ("iou", "centre"):
        raise ValueError(f"criterion must be 'iou' or 'centre', got {criterion!r}")
    if len(roi_masks) != len(roi_classes):
        raise ValueError("need one class per ROI mask")
    scores = np.array([c.score for c in candidates], dtype=np.float64)
    hits = np.zeros((len(candidates), len(roi_masks)), dtype=bool)
    if len(candidates) and len(roi_masks):
        rois = [np.asarray(m, dtype=bool) for m in roi_masks]
        if criterion == "centre":
            # the centroid (x, y) lies in pixel (floor(y + .5), floor(x + .5))
            cx, cy = np.floor(np.array([c.centroid for c in candidates]) + 0.5).astype(int).T
            hits = np.stack([roi[cy, cx] for roi in rois], axis=1)
        else:
            # one label image of all candidates, then one bincount per ROI gives every
            # intersection at once: O(pixels x ROIs), not O(pixels x candidates x ROIs)
            labels = np.zeros(rois[0].shape, dtype=np.int32)
            for k, c in enumerate(candidates, start=1):
                x0, y0, x1, y1 = c.bbox
                labels[y0:y1, x0:x1][c.mask] = k
            areas = np.array([c.area for c in candidates])
            for j, roi in enumerate(rois):
                inter = np.bincount(labels[roi], minlength=len(candidates) + 1)[1:]
                hits[:, j] = inter / (areas + np.count_nonzero(roi) - inter) >= iou_threshold
    roi_hit = np.where(hits, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    return ImageDetections(scores, hits.any(axis=1), roi_hit, np.asarray(roi_classes, np.int64))


def _cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    """Concatenate per-image arrays; an empty list gives an empty array."""
    return np.concatenate([np.zeros(0, dtype), *arrays]).astype(dtype)


def _count_ge(values: np.ndarray, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Weighted number of `values` >= each threshold, by sorting once (O(n log n))."""
    order = np.argsort(values)
    cum = np.concatenate([[0.0], np.cumsum(weights[order], dtype=np.float64)])
    return cum[-1] - cum[np.searchsorted(values[order], thresholds, side="left")]


def froc(
    detections: Sequence[ImageDetections],
    fp_rates: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4),
    weights: np.ndarray | None = None,
    lesion_class: int | None = None,
) -> dict[str, np.ndarray | float]:
    """Free-response ROC: lesion sensitivity against false positives per image.

    At threshold t, sensitivity = (weighted) fraction of ROIs whose hit score is >= t, and FPs per
    image = (weighted) number of candidates scoring >= t that hit no ROI / (weighted) number of
    images. `sensitivity[i]` is the highest sensitivity at any threshold with FPs per image <=
    `fp_rates[i]`. Detection is class-agnostic: `lesion_class` only restricts which ROIs are
    counted as lesions; a candidate hitting an ROI of another class is still no false positive,
    so the FPs are the same for every class.

    Returns `fp_rates`, `sensitivity`, the curve (`curve_fppi`, `curve_sensitivity`,
    `curve_thresholds`, starting at threshold +inf with no detections), `n_lesions` and
    `n_images` (both weighted).
    """
    w = _weights(weights, len(detections))
    scores = _cat([d.scores for d in detections], np.float64)
    fp = ~_cat([d.is_tp for d in detections], bool)
    cand_w = np.repeat(w, [len(d.scores) for d in detections])
    roi_hit = _cat([d.roi_hit_scores for d in detections], np.float64)
    roi_w = np.repeat(w, [len(d.roi_hit_scores) for d in detections])
    if lesion_class is not None:
        keep = _cat([d.roi_classes for d in detections], np.int64) == lesion_class
        roi_hit, roi_w = roi_hit[keep], roi_w[keep]
    n_lesions, n_images = roi_w.sum(), w.sum()

    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    fppi = _ratio(_count_ge(scores[fp], cand_w[fp], thresholds), n_images)
    sens = _ratio(_count_ge(roi_hit, roi_w, thresholds), n_lesions)
    # both decrease with t, so "best sensitivity within the FP budget" is a masked max
    at_rate = [np.max(sens, where=fppi <= r, initial=-np.inf) for r in fp_rates]
    return {
        "fp_rates": np.asarray(fp_rates, dtype=np.float64),
        "sensitivity": np.where(np.isfinite(at_rate), at_rate, np.nan),
        "curve_fppi": fppi,
        "curve_sensitivity": sens,
        "curve_thresholds": thresholds,
        "n_lesions": n_lesions,
        "n_images": n_images,
    }


# ---------------------------------------------------------------- image-level malignancy


def _roc_counts(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) with the weight of positives and of negatives at each."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    w = _weights(weights, len(scores)).astype(np.float64)
    uniq, inv = np.unique(scores, return_inverse=True)
    pos = np.bincount(inv, weights=w * labels, minlength=len(uniq))
    neg = np.bincount(inv, weights=w * ~labels, minlength=len(uniq))
    return uniq[::-1], pos[::-1], neg[::-1]


def roc_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve = probability that a positive scores above a negative, ties
    counting one half (weighted Mann-Whitney U / (W_pos W_neg)); NaN when a class is absent."""
    _, pos, neg = _roc_counts(scores, labels, weights)
    neg_above = np.cumsum(neg) - neg  # negatives scoring strictly higher than each level
    # a positive beats the negatives below its level and ties half of those at it
    wins = pos @ (neg.sum() - neg_above - neg) + 0.5 * (pos @ neg)
    return float(_ratio(wins, pos.sum() * neg.sum()))


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with score >= threshold called positive; thresholds descend from
    +inf, so the curve runs from (0, 0) to (1, 1). NaN rates where a class is absent."""
    thr, pos, neg = _roc_counts(scores, labels, weights)
    tp = np.concatenate([[0.0], np.cumsum(pos)])
    fp = np.concatenate([[0.0], np.cumsum(neg)])
    return _ratio(fp, fp[-1]), _ratio(tp, tp[-1]), np.concatenate([[np.inf], thr])


def sensitivity_specificity(
    scores: np.ndarray, labels: np.ndarray, threshold: float, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """(sensitivity, specificity) when score >= `threshold` is called positive (malignant)."""
    called = np.asarray(scores) >= threshold
    labels = np.asarray(labels).astype(bool)
    w = _weights(weights, len(labels))
    sens = _ratio(w @ (called & labels), w @ labels)
    spec = _ratio(w @ (~called & ~labels), w @ ~labels)
    return float(sens), float(spec)


# ---------------------------------------------------------------- patient bootstrap


def bootstrap_weights(
    patient_ids: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """(n_resamples, n_images) int64: in each resample the distinct patients are drawn with
    replacement, and image i's weight is how many times its patient was drawn. Resampling
    patients, not images, keeps the correlation between one patient's images in the interval."""
    uniq, inv = np.unique(np.asarray(patient_ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    # counts of each patient among len(uniq) draws with replacement
    counts = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n_resamples)
    return counts[:, inv]


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | np.ndarray],
    patient_ids: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile (1 - alpha) interval (lo, hi) of `statistic(weights)` over patient resamples,
    and how many resamples it rests on.

    `statistic` receives one per-image weight vector and returns a number or an array (then the
    interval is elementwise). Resamples where it is NaN (e.g. a class not drawn) are left out;
    `n_valid` (int, shaped like the statistic) counts the others, so a reader sees when an
    interval rests on fewer resamples than were drawn.
    """
    values = np.array(
        [statistic(w) for w in bootstrap_weights(patient_ids, n_resamples, seed)], dtype=np.float64
    )
    with warnings.catch_warnings():  # all-NaN entries give NaN bounds; that is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi, (~np.isnan(values)).sum(axis=0)
