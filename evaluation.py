"""Evaluate a trained checkpoint, or an ensemble of them, on a retrieval CSV (the official test
split by default).

Predictions are made as the model was trained (whole image at its training size, or a sliding
window over the breast crop at its cache scale; see inference.py), mapped back through the
breast crop and flip to the original mammogram's pixels and compared with the original ROI
masks, as the literature reports; the figures at the model's own resolution are kept too, under
"training_resolution". Confidence intervals come from a bootstrap over patients. An ensemble's
softmax probabilities are averaged (and --tta's flips) before any threshold; metrics.json lists
its checkpoints with their SHA-256.
Test_deep_labV3+.py is the command-line entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader
from tqdm import tqdm

import metrics
import report
from augmentation import unit_range
from cbis import CLASS_NAMES, LESION_IDS, MALIGNANT, MALIGNANT_IDS, image_folder_name
from dataset import MammogramDataset
from imaging import DatasetError
from inference import (
    FLIP_NAMES,
    add_model_flags,
    ensemble_probabilities,
    load_ensemble,
    predict_at_original,
    probabilities_npz,
    resolution_of,
    resolve_checkpoints,
    tta_flips,
)
from preprocessing import merge_masks, read_roi_masks
from utils import (
    CheckpointError,
    DiskFullError,
    HelpFormatter,
    UsageError,
    add_device_flags,
    atomic_write,
    resolve_device,
)

FP_RATES = (0.125, 0.25, 0.5, 1, 2, 4)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a DeepLabV3+ checkpoint: Dice/IoU, lesion FROC, malignancy AUC "
                    "with patient-bootstrap CIs; writes metrics.json, per_image.csv and plots.",
        formatter_class=HelpFormatter)
    add = parser.add_argument
    add_model_flags(parser)
    add("--checkpoint-dir", type=Path, default=Path("checkpoint"),
        help="folder searched for --checkpoint names (the training curves come from the "
             "log.csv beside a single checkpoint)")
    add("--csv", type=Path, default=Path("csv/test.csv"), help="the split to evaluate")
    add("--out", type=Path, default=None,
        help="results folder, emptied of a previous evaluation's files (default: "
             "results/<run folder name>/<checkpoint name>, for an ensemble results/<folder "
             "of the runs>/ensemble_of_<n>; with --tta, _tta appended)")
    add("--data-root", type=Path, default=None,
        help="CBIS-DDSM download folder, if it moved since main_retrieval.py recorded it")
    add("--cache-dir", type=Path, default=Path("cache"), help="preprocessed-image cache")
    add("--batch-size", type=int, default=4, help="images per forward pass")
    add("--workers", type=int, default=2, help="DataLoader workers and cache builders")
    add_device_flags(parser)
    add("--iou-threshold", type=float, default=0.2,
        help="a detected region hits an ROI when their IoU is at least this")
    add("--min-area", type=int, default=metrics.MIN_LESION_AREA,
        help="predicted components smaller than this many original pixels are background, as "
             "in predict.py's output (so the figures score the detector that ships)")
    add("--malignancy-threshold", type=float, default=0.5,
        help="operating point for image-level malignancy sensitivity/specificity")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (over patients)")
    add("--overlays", type=int, default=8, help="number of image|truth|prediction PNGs")
    add("--save-probabilities", action="store_true",
        help="also write probabilities/<case folder>.npz per image: the class probabilities "
             "(float16) at the model's resolution, with the geometry that maps them to the "
             "original pixels (inference.load_probabilities, predict_at_original)")
    add("--seed", type=int, default=0, help="bootstrap seed")
    add("--skip-unreadable", action="store_true",
        help="leave out (and list) test mammograms whose DICOMs cannot be read, instead of "
             "stopping; the figures then cover the readable ones only")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------- outputs

RESULT_SUFFIXES = (".json", ".csv", ".png")  # what run() writes, besides its folders
RESULT_FOLDERS = ("overlays", "probabilities")


def default_results_folder(checkpoints: list[Path], tta: bool) -> Path:
    """results/<run folder>/<checkpoint stem> (two runs' best.pth never share one); for an
    ensemble results/<the runs' common folder>/ensemble_of_<n>; _tta appended with --tta."""
    if len(checkpoints) == 1:
        folder, name = checkpoints[0].resolve().parent.name, checkpoints[0].stem
    else:
        common = os.path.commonpath([path.resolve().parent for path in checkpoints])
        folder, name = Path(common).name, f"ensemble_of_{len(checkpoints)}"
    return Path("results") / folder / (name + ("_tta" if tta else ""))


def prepare_results_folder(out: Path) -> Path:
    """out, emptied of a previous evaluation's files so no stale overlay, plot or probability
    file survives; a folder holding anything but results is refused (UsageError)."""
    entries = [e for e in out.iterdir() if not e.name.startswith(".")] if out.is_dir() else []
    if entries:
        ours = [e for e in entries if (e.name in RESULT_FOLDERS and e.is_dir())
                or (e.is_file() and e.suffix in RESULT_SUFFIXES)]
        foreign = [e for e in entries if e not in ours]
        if foreign or not ((out / "metrics.json").is_file() or (out / "per_image.csv").is_file()):
            raise UsageError(f"--out {out} holds {(foreign or entries)[0].name}, which is not a "
                             "result of this script: choose an empty or new folder")
        for entry in ours:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        print(f"cleared the previous evaluation's results from {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- per image


@dataclass
class Accumulator:
    """Small per-image records; the set-level metrics are computed from them at the end."""

    stats: list = field(default_factory=list)  # (C, 3) at original resolution
    stats_low: list = field(default_factory=list)  # (C, 3) at training resolution
    lesion: list = field(default_factory=list)  # (3,) binary abnormality map
    confusion: np.ndarray | None = None
    confusion_low: np.ndarray | None = None
    detections: list = field(default_factory=list)
    detections_centre: list = field(default_factory=list)
    rows: list = field(default_factory=list)

    def add_confusion(self, attribute: str, matrix: np.ndarray) -> None:
        current = getattr(self, attribute)
        setattr(self, attribute, matrix if current is None else current + matrix)


def evaluate_image(acc: Accumulator, probs: np.ndarray, mask_low: np.ndarray, meta: dict,
                   roi_masks: list[np.ndarray], class_ids: tuple[int, ...],
                   iou_threshold: float, min_area: int = metrics.MIN_LESION_AREA) -> dict:
    """Add one image's figures at both resolutions; returns its per-image row. At original
    resolution, components under min_area pixels are background (as predict.py writes them)."""
    num_classes = probs.shape[0]
    pred_low = probs.argmax(0)
    acc.stats_low.append(metrics.segmentation_stats(pred_low, mask_low, num_classes))
    acc.add_confusion("confusion_low", metrics.confusion_matrix(pred_low, mask_low, num_classes))

    pred, abnormality = predict_at_original(probs, meta)
    candidates = metrics.drop_small_lesions(abnormality, pred, min_area)
    truth = merge_masks(roi_masks, class_ids)
    stats = metrics.segmentation_stats(pred, truth, num_classes)
    acc.stats.append(stats)
    acc.lesion.append(metrics.lesion_stats(pred, truth))
    acc.add_confusion("confusion", metrics.confusion_matrix(pred, truth, num_classes))
    detections = metrics.match_candidates(candidates, roi_masks, class_ids, iou_threshold)
    acc.detections.append(detections)
    acc.detections_centre.append(
        metrics.match_candidates(candidates, roi_masks, class_ids, criterion="centre"))
    per_class = metrics.dice_iou(stats[None])["dice_pooled"]
    return {
        **{f"dice_{CLASS_NAMES[c]}": per_class[c] for c in LESION_IDS},
        "lesion_dice": metrics.pooled_dice(acc.lesion[-1][None]),
        "malignancy_score": float(probs[MALIGNANT].max()),
        "malignant": bool(any(c in MALIGNANT_IDS for c in class_ids)),
        "n_rois": len(roi_masks),
        "n_candidates": len(candidates),
        "rois_found": int(np.isfinite(detections.roi_hit_scores).sum()),
        "false_positives": int((~detections.is_tp).sum()),
    }


# ----------------------------------------------------------------------------- set level


def with_ci(values, patients: np.ndarray, statistic, args) -> dict:
    """{"value": ..., "ci95": [lo, hi], "valid_resamples": n} for a statistic of per-image
    weights; n counts the resamples where the statistic is defined (the CI rests on those)."""
    lo, hi, n_valid = metrics.bootstrap_ci(statistic, patients, args.bootstrap, args.seed)
    return {"value": _plain(values), "ci95": [_plain(lo), _plain(hi)],
            "valid_resamples": np.asarray(n_valid).tolist()}


def _plain(x):
    """numpy -> JSON-ready lists/floats, NaN -> None."""
    array = np.asarray(x, dtype=float)
    if array.ndim == 0:
        return None if np.isnan(array) else round(float(array), 4)
    return [_plain(v) for v in array]


def summarise(acc: Accumulator, table: pd.DataFrame, args) -> dict:
    """metrics.json's content: every figure with its patient-bootstrap 95% CI."""
    patients = table["patient_id"].to_numpy()
    stats, stats_low = np.stack(acc.stats), np.stack(acc.stats_low)
    scores = table["malignancy_score"].to_numpy()
    labels = table["malignant"].to_numpy()

    def segmentation(all_stats: np.ndarray) -> dict:
        result = {}
        for key in ("dice_pooled", "iou_pooled", "dice_mean", "iou_mean"):
            def statistic(w, key=key):
                return metrics.dice_iou(all_stats, w)[key]
            per_class = with_ci(metrics.dice_iou(all_stats)[key], patients, statistic, args)
            result[key] = {name: {"value": per_class["value"][c],
                                  "ci95": [per_class["ci95"][0][c], per_class["ci95"][1][c]],
                                  "valid_resamples": per_class["valid_resamples"][c]}
                           for c, name in enumerate(CLASS_NAMES)}
        result["n_images_with_class"] = dict(zip(
            CLASS_NAMES, metrics.dice_iou(all_stats)["n_images_with_class"].tolist(), strict=True))
        return result

    def collection_lesion_dice(collection: str) -> dict:
        # Binary lesion Dice (any class > 0 against background), as mass or calcification
        # segmentation papers report on the Mass-Test or Calc-Test images: benign ROIs count.
        on = (table["collection"] == collection).to_numpy()
        lesion = np.stack(acc.lesion)
        result = with_ci(metrics.pooled_dice(lesion, on.astype(float)), patients,
                         lambda w: metrics.pooled_dice(lesion, w * on), args)
        return {**result, "n_images": int(on.sum())}

    def detection(detections: list) -> dict:
        result = {}
        for name, cls in (("all", None), *((CLASS_NAMES[c], c) for c in LESION_IDS)):
            def statistic(w, cls=cls):
                return metrics.froc(detections, FP_RATES, w, cls)["sensitivity"]
            curve = metrics.froc(detections, FP_RATES, lesion_class=cls)
            result[name] = {**with_ci(curve["sensitivity"], patients, statistic, args),
                            "n_lesions": int(curve["n_lesions"])}
        result["curve"] = {k: _plain(v) for k, v in metrics.froc(detections, FP_RATES).items()
                           if k.startswith("curve_") and k != "curve_thresholds"}
        return result

    threshold = args.malignancy_threshold
    sens, spec = metrics.sensitivity_specificity(scores, labels, threshold)
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    return {
        "n_images": len(table), "n_patients": int(len(set(patients))),
        "n_lesions": int(table["n_rois"].sum()), "classes": list(CLASS_NAMES),
        "original_resolution": {
            **segmentation(stats),
            "confusion_matrix": acc.confusion.tolist(),
            "lesion_dice_on_mass_test_images": collection_lesion_dice("Mass-Test"),
            "lesion_dice_on_calc_test_images": collection_lesion_dice("Calc-Test"),
            "detection": {
                "fp_per_image": list(FP_RATES),
                "min_area": args.min_area,
                f"iou_at_least_{args.iou_threshold}": detection(acc.detections),
                "centre_inside_roi": detection(acc.detections_centre),
            },
        },
        "training_resolution": {**segmentation(stats_low),
                                "confusion_matrix": acc.confusion_low.tolist()},
        "malignancy": {
            "auc": with_ci(metrics.roc_auc(scores, labels), patients,
                           lambda w: metrics.roc_auc(scores, labels, w), args),
            "threshold": threshold,
            "sensitivity": with_ci(sens, patients, lambda w: metrics.sensitivity_specificity(
                scores, labels, threshold, w)[0], args),
            "specificity": with_ci(spec, patients, lambda w: metrics.sensitivity_specificity(
                scores, labels, threshold, w)[1], args),
            "n_malignant_images": int(labels.sum()), "n_other_images": int((~labels).sum()),
            "roc_curve": {"fpr": _plain(fpr), "tpr": _plain(tpr)},
        },
        "bootstrap": {"resamples": args.bootstrap, "unit": "patient", "seed": args.seed,
                      "interval": "percentile 95%"},
    }


# ----------------------------------------------------------------------------- the run


def run(args) -> dict:
    device = resolve_device(args.device)
    paths = resolve_checkpoints(args.checkpoint, args.checkpoint_dir)
    members = load_ensemble(paths, device)
    config = members[0].config  # the input mode every member shares
    out = prepare_results_folder(args.out or default_results_folder(paths, args.tta))
    try:
        dataset = MammogramDataset.from_csv(args.csv, args.cache_dir, resolution_of(config),
                                            config["canonical_flip"], args.data_root)
    except DatasetError as error:  # the CSV or its sidecar: before any long work
        raise UsageError(f"--csv: {error}") from error
    prepared = dataset.prepare(args.workers, args.skip_unreadable, args.progress)
    for img_path, error in prepared.skipped:
        print(f"skipped {img_path}: {error}", file=sys.stderr)
    # Patch mode: crops differ in size, one at a time; --batch-size counts sliding-window tiles.
    loader = DataLoader(dataset, batch_size=1 if config.get("patch_size") else args.batch_size,
                        num_workers=args.workers)
    acc = Accumulator()
    overlays = []
    bar = tqdm(total=len(dataset), desc="evaluating", unit="img", disable=not args.progress)
    for images, masks, indices in loader:
        probs = ensemble_probabilities(members, images, device, args.amp, args.batch_size,
                                       args.tta, args.stitch)
        for image, mask, index, prob in zip(images, masks, indices.tolist(), probs, strict=True):
            mammogram = dataset.mammograms[index]
            meta = dataset.meta(index)
            if args.save_probabilities:
                data = probabilities_npz(prob, meta)
                atomic_write(out / "probabilities" / f"{image_folder_name(mammogram.img_path)}.npz",
                             lambda tmp, data=data: Path(tmp).write_bytes(data))
            roi_masks, _ = read_roi_masks(mammogram, dataset.cache.data_root,
                                          tuple(meta["original_shape"]))
            row = evaluate_image(acc, prob, mask.numpy(), meta, roi_masks, mammogram.class_ids,
                                 args.iou_threshold, args.min_area)
            acc.rows.append({"img_path": mammogram.img_path, "patient_id": mammogram.patient_id,
                             "collection": mammogram.collection, **row})
            if len(overlays) < args.overlays:
                overlays.append((image_folder_name(mammogram.img_path),
                                 unit_range(image[0]).numpy(), mask.numpy(), prob.argmax(0)))
            bar.update()
    bar.close()
    table = pd.DataFrame(acc.rows)
    atomic_write(out / "per_image.csv", lambda tmp: table.to_csv(tmp, index=False))
    results = {"checkpoints": [member.record() for member in members], "csv": str(args.csv),
               "model": config,
               "test_time_flips": [FLIP_NAMES[f] for f in tta_flips(config, args.tta)],
               "skipped_unreadable": [path for path, _ in prepared.skipped],
               **summarise(acc, table, args)}
    atomic_write(out / "metrics.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    # An ensemble has no one training run to show.
    report.write_plots(results, out, paths[0].parent / "log.csv" if len(paths) == 1 else None)
    report.write_overlays(overlays, out / "overlays")
    print(report.headline_table(results))
    print(f"wrote {out}/metrics.json, per_image.csv, plots and {len(overlays)} overlays")
    return results


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when the results are written, 2 for a usage error (found before any long
    work), 1 when the evaluation failed (an unreadable DICOM, a full disk)."""
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DatasetError, DiskFullError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
