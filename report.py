"""What a reader looks at: the headline table, plots (FROC, ROC, confusion, training curves) and
image | truth | prediction overlays. Pure presentation over evaluation.py's metrics dict."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pandas as pd

import cbis
from utils import atomic_write

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

FROC_XLIM = (0.01, 8.0)  # false positives per image shown on the FROC plot
CLASS_COLOURS = np.array(cbis.CLASS_COLOURS, np.uint8)  # indexed by a class map


def _value(entry: dict) -> str:
    value, (lo, hi) = entry["value"], entry["ci95"]
    if value is None:
        return "n/a"
    bounds = "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"
    return f"{value:.3f}{bounds}"


def headline_table(results: dict) -> str:
    """The numbers a reader compares, each with its patient-bootstrap 95% CI and the number of
    resamples that CI rests on (those where the figure is defined), on one screen. The labels
    say what is computed; docs/metrics.md has the details."""
    original = results["original_resolution"]
    detection_key = next(k for k in original["detection"] if k.startswith("iou"))
    detection = original["detection"][detection_key]
    rates = original["detection"]["fp_per_image"]
    iou = detection_key.removeprefix("iou_at_least_")
    min_area = original["detection"]["min_area"]
    rows = [(f"Dice {name}, pixels pooled over all images", original["dice_pooled"][name])
            for name in results["classes"][cbis.LESIONS]]
    rows += [("Lesion Dice (any class), Mass-Test images",
              original["lesion_dice_on_mass_test_images"]),
             ("Lesion Dice (any class), Calc-Test images",
              original["lesion_dice_on_calc_test_images"])]
    for rate in (0.5, 1, 2):
        i = rates.index(rate)
        rows.append((f"Lesion sensitivity at {rate} FP/image",
                     {"value": detection["all"]["value"][i],
                      "ci95": [detection["all"]["ci95"][0][i], detection["all"]["ci95"][1][i]],
                      "valid_resamples": detection["all"]["valid_resamples"][i]}))
    rows.append(("Malignancy AUC, image score = max p(mass), p(calc)",
                 results["malignancy"]["auc"]))
    label_width = max(len(label) for label, _ in rows) + 2
    resamples = results["bootstrap"]["resamples"]
    checkpoints = len(results["checkpoints"])
    model = f"an ensemble of {checkpoints} checkpoints" if checkpoints > 1 else "one checkpoint"
    flips = [flip for flip in results["test_time_flips"] if flip != "none"]
    lines = [f"{results['n_images']} images, {results['n_lesions']} lesions, "
             f"{results['n_patients']} patients ({results['csv']}); {model}"
             + (f", test-time flips: {', '.join(flips)}" if flips else ""),
             f"original resolution; lesions: predicted components >= {min_area} px, "
             f"a hit at IoU >= {iou}",
             f"{'metric':<{label_width}}{'value [95% CI]':<24}valid/{resamples} resamples"]
    lines += [f"{label:<{label_width}}{_value(entry):<24}{entry['valid_resamples']}"
              for label, entry in rows]
    width = max(len(line) for line in lines)
    return "\n".join(["=" * width, *lines, "=" * width])


def write_plots(results: dict, out: Path, log_path: Path | None) -> list[Path]:
    """froc.png, roc.png, confusion_matrix.png and, if log.csv exists, training_curves.png."""
    written = []
    detection = results["original_resolution"]["detection"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, key in (("IoU criterion", next(k for k in detection if k.startswith("iou"))),
                       ("centre criterion", "centre_inside_roi")):
        curve = detection[key]["curve"]
        # A log axis has no 0: start at the left edge and carry the last point to the right.
        fppi = np.clip([*curve["curve_fppi"], FROC_XLIM[1]], FROC_XLIM[0], None)
        sensitivity = [*curve["curve_sensitivity"], curve["curve_sensitivity"][-1]]
        ax.step(fppi, sensitivity, where="post", label=label)
    ax.set(xscale="log", xlim=FROC_XLIM, ylim=(0, 1.02), xlabel="false positives per image",
           ylabel="lesion sensitivity", title="FROC")
    ax.legend(loc="lower right")
    written.append(_save(fig, out / "froc.png"))

    roc = results["malignancy"]["roc_curve"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    auc = results["malignancy"]["auc"]["value"]
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {auc:.3f}" if auc is not None else "AUC n/a")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Image-level malignancy ROC")
    ax.legend(loc="lower right")
    written.append(_save(fig, out / "roc.png"))

    matrix = np.array(results["original_resolution"]["confusion_matrix"], dtype=float)
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    names = results["classes"]
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names,
           yticklabels=names, xlabel="prediction", ylabel="truth",
           title="Pixel confusion (row-normalised)")
    for (i, j), value in np.ndenumerate(normalised):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                color="white" if value > 0.5 else "black")
    fig.colorbar(image, ax=ax)
    written.append(_save(fig, out / "confusion_matrix.png"))

    if log_path is not None and log_path.exists():
        written.append(plot_training_curves(log_path, out / "training_curves.png"))
    return written


def plot_training_curves(log_path: Path, path: Path) -> Path:
    """Losses and per-class validation Dice per epoch from training's log.csv."""
    log = pd.read_csv(log_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(log["epoch"], log["train_loss"], label="train")
    left.plot(log["epoch"], log["val_loss"], label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="Loss")
    left.legend()
    for column in [c for c in log.columns if c.startswith("dice_")
                   or c in ("mean_fg_dice", "ema_fg_dice")]:
        right.plot(log["epoch"], log[column], label=column.replace("_", " "))
    right.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1), title="Validation Dice")
    right.legend()
    return _save(fig, path)


def plot_study_curves(logs: dict[str, Path], path: Path) -> Path:
    """Validation Dice of each lesion class per epoch, against minutes of training, one panel
    per class with a line per run (name -> its log.csv): equal time, not equal epochs."""
    names = [cbis.CLASS_NAMES[c] for c in cbis.LESION_IDS]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True)
    for run, log_path in logs.items():
        log = pd.read_csv(log_path)
        minutes = log["seconds"].cumsum() / 60
        for axis, name in zip(axes, names, strict=True):
            axis.plot(minutes, log[f"dice_{name}"], marker=".", label=run)
    for axis, name in zip(axes, names, strict=True):
        axis.set(xlabel="training minutes", title=f"validation Dice, {name}", ylim=(0, 1))
    axes[0].set_ylabel("Dice (pooled over the validation set)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # Atomic: training redraws its curves every epoch while someone may be looking at them.
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def colourise(mask: np.ndarray) -> np.ndarray:
    return CLASS_COLOURS[mask]


def blend(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A class mask blended in its colours over an RGB uint8 image."""
    blended = grey.copy()
    lesion = mask != cbis.BACKGROUND
    blended[lesion] = (0.45 * grey[lesion] + 0.55 * colourise(mask)[lesion]).astype(np.uint8)
    return blended


def overlay_panel(image: np.ndarray, *masks: np.ndarray) -> np.ndarray:
    """image | mask | mask ... side by side (RGB uint8), e.g. image | truth | prediction."""
    grey = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    gap = np.full((grey.shape[0], 4, 3), 255, np.uint8)
    panels = [grey]
    for mask in masks:
        panels += [gap, blend(grey, mask)]
    return np.concatenate(panels, axis=1)


def write_overlays(items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                   folder: Path) -> None:
    """One PNG per (name, image, truth, prediction)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, truth, prediction in items:
        panel = overlay_panel(image, truth, prediction)
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
