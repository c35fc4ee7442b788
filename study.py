"""The resolution study: whole-image training at a real scan's ~5x downscale against patch
training at native resolution, on the realistic synthetic CBIS-DDSM, at about equal training
time; and the visibility tool that says how hard a set is.

    python study.py run --out runs/study                # `make study`: 2 CPU cores, <= 40 min
    python study.py run --preset full --out runs/full   # real-scan sizes, resnet50: for a GPU
    python study.py visibility --csv csv/train.csv      # lesion CNR per subtlety, any CSV

`run`: synthetic.py --profile realistic -> main_retrieval.py -> the visibility table of the test
split (native and whole-image resolution) -> Train_deep_labv3+.py twice (whole image at
1/--downsample of the native size; patches at native size) -> Test_deep_labV3+.py on the
official test split for each -> OUT/study.md: per-class Dice (pooled, original pixels), lesion
sensitivity at 0.5/1/2 false positives per image per class, malignancy AUC, each with its
patient-bootstrap 95% CI; whether each design learned masses; whether patches beat the whole
image on calcifications by more than the CIs' half-width; the exact commands with their wall
times; OUT/study_curves.png, both runs' validation Dice per epoch against training time.

The cpu preset is a stand-in for a real scan sized for 2 CPU cores: 1024-row mammograms whose
fine detail (calcification specks, grain) is drawn as on a 2048-row scan (synthetic.py
--detail-rows), so specks stay visible at native size and are lost at the 5x downsample, as
real 0.1-1 mm calcifications are on a 5300-row scan taken to 1024 rows. docs/study.md says what
the result shows and what it does not.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

import evaluation
import main_retrieval
import synthetic
import training
import visibility
from cbis import CALC, CLASS_NAMES, LESION_IDS, MASS, SIDECAR_NAME
from dataset import MammogramDataset, read_split_csv
from imaging import DatasetError
from preprocessing import apply_geometry, read_roi_masks
from report import plot_study_curves
from utils import HelpFormatter, UsageError, load_checkpoint

FP_RATES_SHOWN = (0.5, 1, 2)
# Each preset's defaults; any flag given on the command line wins.
PRESETS = {
    # Half the patients are test patients: more test lesions narrow the CIs the verdicts use.
    "cpu": {"patients": 120, "test_share": 0.5, "native_size": [1024, 608], "detail_rows": 2048,
            "downsample": 5.0, "patch_size": [160, 160], "whole_epochs": 45, "patch_epochs": 9,
            "patches_per_image": 16, "backbone": "resnet18", "decoder_channels": 64,
            "batch_size": 8},
    # Real-scan sizes (a 4096-row scan, whole images at 819x486, 512-px patches at half the
    # native size as a real run would use): for a GPU.
    "full": {"patients": 200, "test_share": 0.4, "native_size": [4096, 2432], "detail_rows": None,
             "downsample": 5.0, "patch_size": [512, 512], "patch_scale": 0.5,
             "whole_epochs": 30, "patch_epochs": 12, "patches_per_image": 16,
             "backbone": "resnet50", "decoder_channels": 256, "batch_size": 16},
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", formatter_class=HelpFormatter,
        help="the study: data, both trainings, both tests, OUT/study.md",
        description="Whole image at 1/--downsample against native-size patches, equal time.")
    add = run_parser.add_argument
    add("--out", type=Path, default=Path("runs/study"), help="folder for data, runs and results")
    add("--preset", choices=sorted(PRESETS), default="cpu",
        help="cpu: sized for 2 CPU cores (about 40 minutes); full: real-scan sizes, resnet50, "
             "for a GPU. The flags below override the preset's values")
    add("--patients", type=int, help="synthetic patients (1-3 mammograms each)")
    add("--test-share", type=float, help="share of the patients in the test split")
    add("--native-size", type=int, nargs=2, metavar=("H", "W"),
        help="synthetic mammogram size; lesion boxes and anatomy scale with it")
    add("--detail-rows", type=int,
        help="draw the fine detail as on a scan of this many rows (synthetic.py --detail-rows)")
    add("--downsample", type=float,
        help="whole-image mode trains at native size / this (a real scan at 1024x640 is ~5x)")
    add("--patch-size", type=int, nargs=2, metavar=("H", "W"), help="patch mode: tile size")
    add("--patch-scale", type=float,
        help="patch mode: the cache's fraction of the native size (1 = native)")
    add("--whole-epochs", type=int, help="epochs of the whole-image run")
    add("--patch-epochs", type=int, help="epochs of the patch run")
    add("--patches-per-image", type=int, help="patch mode: patches per image and epoch")
    add("--backbone", help="encoder of both runs")
    add("--decoder-channels", type=int, help="ASPP and decoder width of both runs")
    add("--batch-size", type=int, help="batch of both runs")
    add("--pretrained", type=Path, default=None,
        help="a local torchvision state dict of --backbone's ImageNet weights (default: random)")
    add("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add("--workers", type=int, default=2, help="DataLoader workers and cache builders")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples of each CI")
    add("--seed", type=int, default=0, help="seed of the data and both runs")
    add("--overwrite", action="store_true", help="replace an existing OUT")

    fit_parser = commands.add_parser(
        "learnability", formatter_class=HelpFormatter,
        help="the overfit check: does the recipe fit a handful of realistic mammograms?",
        description="Train on two mammograms with a malignant mass and two with a malignant "
                    "calcification cluster and score the same images (tests/test_learnability.py "
                    "runs it at the defaults). A contrast ladder (--contrast 0.25 0.5 1 2) finds "
                    "where learning starts.")
    add = fit_parser.add_argument
    add("--out", type=Path, default=Path("runs/learnability"), help="folder for data and runs")
    add("--mode", nargs="+", choices=sorted(FIT_FLAGS), default=sorted(FIT_FLAGS),
        help="whole: whole images at half the native size; patch: native-size patches")
    add("--size", type=int, nargs=2, default=list(HANDFUL["size"]), metavar=("H", "W"),
        help="native size of the synthetic mammograms")
    add("--seed", type=int, default=HANDFUL["seed"], help="seed of the synthetic set")
    add("--patients", type=int, default=HANDFUL["patients"],
        help="patients generated to find the four mammograms among")
    add("--contrast", type=float, nargs="+", default=[1.0],
        help="lesion visibility factors to try (synthetic.py --lesion-contrast)")
    add("--subtlety", type=int, nargs=2, default=[1, 5], metavar=("LOW", "HIGH"),
        help="subtlety ratings drawn (1 3: the subtle end)")
    add("--density", type=int, nargs=2, default=[1, 4], metavar=("LOW", "HIGH"),
        help="breast densities drawn (3 4: dense breasts)")
    add("--overwrite", action="store_true", help="replace an existing OUT")

    visibility_parser = commands.add_parser(
        "visibility", formatter_class=HelpFormatter,
        help="how visible each class is, per subtlety, in the arrays a model reads",
        description="Median region CNR (masses) and speck CNR (calcifications) per subtlety, "
                    "as visibility.py defines them, after the breast crop and window.")
    add = visibility_parser.add_argument
    add("--csv", type=Path, required=True, help="a retrieval CSV (e.g. csv/train.csv)")
    add("--scale", type=float, nargs="+", default=[1.0, 0.2],
        help="the resolutions to measure at, as fractions of the native size")
    add("--cache-dir", type=Path, default=Path("cache"), help="preprocessed-image cache")
    add("--data-root", type=Path, default=None,
        help="the images' folder, if it moved since main_retrieval.py recorded it")
    return parser


# ----------------------------------------------------------------------------- visibility


def measure_visibility(csv_path: Path, cache_dir: Path, scale: float,
                       data_root: Path | None = None) -> pd.DataFrame:
    """One row per ROI of csv_path: its type, class, subtlety, density and visibility figures
    (visibility.py) in the arrays a model reads at `scale` (breast crop, window, resize)."""
    dataset = MammogramDataset.from_csv(csv_path, cache_dir, float(scale), data_root=data_root)
    dataset.prepare(progress=False)
    rows = read_split_csv(csv_path)[0].set_index("roi_path")
    records = []
    for index, mammogram in enumerate(dataset.mammograms):
        image, mask = dataset.cache.load(mammogram)
        image, meta = image.astype(np.float32) / 65535, dataset.meta(index)
        rois, _ = read_roi_masks(mammogram, dataset.cache.data_root, meta["original_shape"])
        for roi_path, cls, roi in zip(mammogram.roi_paths, mammogram.class_ids, rois,
                                      strict=True):
            lesion = (apply_geometry(roi.view(np.uint8), meta) > 0) & (mask == cls)
            if roi_path not in rows.index or lesion.sum() < 4:  # another copy's ROI; lost
                continue
            row = rows.loc[roi_path]
            around = visibility.ring(lesion, mask > 0)
            speck, tissue = visibility.speck_cnr(image, lesion, around)
            records.append({"type": row["abnormality_type"], "class": CLASS_NAMES[cls],
                            "subtlety": int(row["subtlety"]),
                            "density": int(row["breast_density"]),
                            "region_cnr": visibility.region_cnr(image, lesion, around),
                            "speck_cnr": speck, "tissue_speck_cnr": tissue})
    return pd.DataFrame(records)


def visibility_table(figures: dict[str, pd.DataFrame]) -> str:
    """Markdown: per abnormality type and class, the median figure by subtlety, for each
    resolution in `figures` (name -> measure_visibility's rows). Masses: region CNR;
    calcifications: speck CNR beside what ordinary tissue of the ROI's size scores."""
    header = ["resolution", "lesions", "figure", *(f"subtlety {s}" for s in range(1, 6)),
              "all", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, frame in figures.items():
        for (kind, cls), group in frame.groupby(["type", "class"]):
            column = "region_cnr" if kind == "mass" else "speck_cnr"
            by_subtlety = group.groupby("subtlety")[column].median()
            cells = [f"{by_subtlety[s]:.2f}" if s in by_subtlety else "" for s in range(1, 6)]
            figure = "region CNR" if kind == "mass" else (
                f"speck CNR (tissue {group['tissue_speck_cnr'].median():.2f})")
            pathology = "benign" if cls == CLASS_NAMES[LESION_IDS[0]] else "malignant"
            lines.append(f"| {name} | {kind} {pathology} | {figure} | " + " | ".join(cells)
                         + f" | {group[column].median():.2f} | {len(group)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- learnability

# The overfit check (tests/test_learnability.py, `study.py learnability`): can the recipe fit a
# handful of realistic mammograms it trains on? Whole images at half the native size, batch 4,
# 300 steps; 96-px patches at native size, half of them on a lesion, batch 8, 400 steps.
HANDFUL = {"patients": 12, "size": (512, 304), "seed": 2, "detail_rows": 2048}
FIT_FLAGS = {
    "whole": ["--batch-size", "4", "--repeats", "25", "--epochs", "12"],
    "patch": ["--patch-size", "96", "96", "--scale", "1.0", "--patches-per-image", "100",
              "--foreground-fraction", "0.5", "--batch-size", "8", "--epochs", "8"],
}


def handful_csv(out: Path, size: tuple[int, int] = HANDFUL["size"], seed: int = HANDFUL["seed"],
                patients: int = HANDFUL["patients"], contrast: float = 1.0,
                subtlety: tuple[int, int] = (1, 5), density: tuple[int, int] = (1, 4),
                detail_rows: int | None = HANDFUL["detail_rows"]) -> Path:
    """OUT/csv: two training mammograms with a malignant mass and two with a malignant
    calcification cluster of a realistic synthetic set, as train.csv and as val.csv (the check
    scores the images it trains on)."""
    synthetic.make_synthetic_dataset(out / "data", patients, tuple(size), seed, defects=False,
                                     progress=False, profile="realistic", contrast=contrast,
                                     detail_rows=detail_rows, subtlety=subtlety, density=density)
    retrieved = out / "retrieved"
    if main_retrieval.main(["--data-root", str(out / "data"), "--out-dir", str(retrieved),
                            "--val-fraction", "0.01"]):
        raise RuntimeError(f"retrieval of {out / 'data'} failed")
    rows = pd.read_csv(retrieved / "train.csv", dtype={"patient_id": str})
    classes = rows.groupby("img_path", sort=False)["class_id"].apply(set)
    chosen = [img for img, found in classes.items() if MASS in found][:2]
    chosen += [img for img, found in classes.items() if CALC in found and img not in chosen][:2]
    if len(chosen) < 4:
        raise UsageError(f"seed {seed} with {patients} patients has fewer than two training "
                         "mammograms of each malignant class: pass more patients or another seed")
    csv_dir = out / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        rows[rows["img_path"].isin(chosen)].to_csv(csv_dir / f"{split}.csv", index=False)
    (csv_dir / SIDECAR_NAME).write_text((retrieved / SIDECAR_NAME).read_text())
    return csv_dir


def overfit(csv_dir: Path, out: Path, mode: str, size: tuple[int, int] = HANDFUL["size"],
            extra: tuple[str, ...] = ()) -> dict:
    """Train `mode` (whole or patch, FIT_FLAGS) on csv_dir, scored on its own training images;
    the last epoch's log row (per-class validation Dice) with the run's steps and seconds."""
    half = [str(side // 2) for side in size]
    flags = ["--size", *half, *FIT_FLAGS[mode]] if mode == "whole" else FIT_FLAGS[mode]
    start = time.perf_counter()
    code = training.main(["--csv-dir", str(csv_dir), "--checkpoint-dir", str(out / mode),
                          "--cache-dir", str(out / "cache"), "--backbone", "resnet18",
                          "--decoder-channels", "64", "--lr", "1e-3", "--workers", "0",
                          "--no-progress", "--overwrite", "--log-every", "1000000", *flags,
                          *extra])
    if code:
        raise RuntimeError(f"the {mode} overfit run exited with {code}")
    log = pd.read_csv(out / mode / "log.csv")
    steps = load_checkpoint(out / mode / "last.pth")["scheduler"]["last_epoch"]
    return {**log.iloc[-1].to_dict(), "steps": steps, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- the study


def resolve_preset(args: argparse.Namespace) -> argparse.Namespace:
    """The preset's values for every flag the command line left out."""
    preset = {"patch_scale": 1.0, **PRESETS[args.preset]}
    return argparse.Namespace(**{**vars(args), **{key: value for key, value in preset.items()
                                                  if getattr(args, key) is None}})


def timed(commands: list[dict], name: str, script: str, main: Callable[[list[str]], int],
          argv: list[str]) -> None:
    """Run one step in this process, record its command line and wall time; stop on failure."""
    line = f"python {script} {shlex.join(argv)}"
    print(f"\n$ {line}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code:
        raise RuntimeError(f"step {name!r} exited with {code}: {line}")
    commands.append({"step": name, "command": line, "seconds": time.perf_counter() - start})


def _figure(entry: dict, index: int | None = None) -> tuple[float | None, float | None,
                                                            float | None]:
    value, (low, high) = entry["value"], entry["ci95"]
    if index is not None:
        value, low, high = value[index], low[index], high[index]
    return value, low, high


def _cell(figure: tuple) -> str:
    value, low, high = figure
    if value is None:
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{value:.3f}"


def figures_of(result: dict) -> dict[str, tuple]:
    """(value, CI low, CI high) of each figure the study reports, by its row name."""
    original = result["original_resolution"]
    detection = original["detection"]
    found = next(v for k, v in detection.items() if k.startswith("iou_at_least"))
    figures = {}
    for cls in LESION_IDS:
        name = CLASS_NAMES[cls]
        figures[f"Dice {name} (pooled, original pixels)"] = _figure(
            original["dice_pooled"][name])
    for cls in LESION_IDS:
        for rate in FP_RATES_SHOWN:
            figures[f"{CLASS_NAMES[cls]} lesion sensitivity at {rate} FP/image"] = _figure(
                found[CLASS_NAMES[cls]], detection["fp_per_image"].index(rate))
    figures["malignancy AUC (image level)"] = _figure(result["malignancy"]["auc"])
    return figures


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per figure, one column per mode."""
    modes = list(results)
    figures = {mode: figures_of(results[mode]) for mode in modes}
    header = ["figure (95% CI)", *modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in figures[modes[0]]:
        lines.append("| " + " | ".join([name, *(_cell(figures[m][name]) for m in modes)]) + " |")
    return "\n".join(lines)


def verdicts(whole: dict, patch: dict) -> list[str]:
    """The study's questions answered from the two runs' figures, one sentence each."""
    lines = []
    mass_dice = f"Dice {CLASS_NAMES[MASS]} (pooled, original pixels)"
    mass_found = f"{CLASS_NAMES[MASS]} lesion sensitivity at 1 FP/image"
    for name, figures in (("whole image", whole), ("patches", patch)):
        learned = all(figures[row][1] is not None and figures[row][1] > 0
                      for row in (mass_dice, mass_found))
        lines.append(f"- {name}: {'learned' if learned else 'did not learn'} the malignant "
                     f"masses (Dice and sensitivity at 1 FP/image above zero by their CIs: "
                     f"{_cell(figures[mass_dice])}, {_cell(figures[mass_found])}).")
    calc_found = f"{CLASS_NAMES[CALC]} lesion sensitivity at 1 FP/image"
    unsaturated = whole[calc_found][0] is not None and whole[calc_found][0] < 0.9
    lines.append(f"- whole-image calcification sensitivity at 1 FP/image: "
                 f"{_cell(whole[calc_found])} ({'below' if unsaturated else 'not below'} 0.9: "
                 f"the benchmark is {'not ' if unsaturated else ''}saturated).")
    for row in (f"Dice {CLASS_NAMES[CALC]} (pooled, original pixels)", calc_found):
        (w, w_low, w_high), (p, p_low, p_high) = whole[row], patch[row]
        if None in (w, w_low, p, p_low):
            lines.append(f"- {row}: undefined in one run, no comparison.")
            continue
        half_width = max((w_high - w_low) / 2, (p_high - p_low) / 2)
        beats = p - w > half_width
        lines.append(f"- {row}: patches {p:.3f} vs whole image {w:.3f}, difference "
                     f"{p - w:+.3f} against the larger CI half-width {half_width:.3f}: patches "
                     f"{'beat' if beats else 'do not beat'} the whole image by more than it.")
    return lines


def run(args: argparse.Namespace) -> str:
    out = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} is not empty: pass --overwrite or another --out")
    height, width = args.native_size
    low = [round(height / args.downsample), round(width / args.downsample)]
    data, csv_dir, cache, commands = out / "data", out / "csv", out / "cache", []
    detail = ["--detail-rows", str(args.detail_rows)] if args.detail_rows else []
    timed(commands, "synthetic data", "synthetic.py", synthetic.main, [
        "--out", str(data), "--profile", "realistic", "--patients", str(args.patients),
        "--size", str(height), str(width), *detail, "--test-share", str(args.test_share),
        "--seed", str(args.seed), "--overwrite",
        "--no-progress"])
    timed(commands, "retrieval", "main_retrieval.py", main_retrieval.main, [
        "--data-root", str(data), "--out-dir", str(csv_dir), "--val-fraction", "0.15"])
    seen = {f"native {height}x{width}": measure_visibility(csv_dir / "test.csv", cache, 1.0),
            f"1/{args.downsample:g}": measure_visibility(csv_dir / "test.csv", cache,
                                                         1 / args.downsample)}
    common = ["--csv-dir", str(csv_dir), "--cache-dir", str(cache), "--backbone", args.backbone,
              "--decoder-channels", str(args.decoder_channels), "--batch-size",
              str(args.batch_size), "--lr", "1e-3", "--workers", str(args.workers), "--seed",
              str(args.seed), "--device", args.device, "--no-progress"]
    if args.pretrained:
        common += ["--pretrained", str(args.pretrained)]
    patch_at = (f"native {height}x{width}" if args.patch_scale == 1
                else f"{args.patch_scale:g} x native {height}x{width}")
    modes = {
        "whole": (f"whole image {low[0]}x{low[1]}",
                  ["--size", *map(str, low), "--epochs", str(args.whole_epochs)]),
        "patch": (f"patches {args.patch_size[0]}x{args.patch_size[1]} at {patch_at}",
                  ["--patch-size", *map(str, args.patch_size), "--scale", str(args.patch_scale),
                   "--patches-per-image", str(args.patches_per_image),
                   "--epochs", str(args.patch_epochs)]),
    }
    results = {}
    for folder, (mode, flags) in modes.items():
        run_dir = out / folder
        timed(commands, f"train: {mode}", "Train_deep_labv3+.py", training.main,
              # OUT is new or --overwrite was given: a previous study's run gives way
              [*common, "--checkpoint-dir", str(run_dir), *flags, "--overwrite"])
        timed(commands, f"test: {mode}", "Test_deep_labV3+.py", evaluation.main, [
            "--checkpoint", str(run_dir / "best.pth"), "--csv", str(csv_dir / "test.csv"),
            "--out", str(out / "results" / folder), "--cache-dir", str(cache),
            "--workers", str(args.workers), "--bootstrap", str(args.bootstrap),
            "--seed", str(args.seed), "--device", args.device, "--no-progress"])
        results[mode] = json.loads((out / "results" / folder / "metrics.json").read_text())
    plot_study_curves({mode: out / folder / "log.csv" for folder, (mode, _) in modes.items()},
                      out / "study_curves.png")
    whole, patch = (figures_of(results[mode]) for mode, _ in modes.values())
    any_result = next(iter(results.values()))
    text = "\n".join([
        f"Realistic synthetic set ({args.preset} preset), seed {args.seed}: "
        f"{any_result['n_images']} test mammograms of {any_result['n_patients']} patients, "
        f"{any_result['n_lesions']} lesions.", "",
        "How visible the test lesions are (study.py visibility; medians):", "",
        visibility_table(seen), "",
        table(results), "", *verdicts(whole, patch), "",
        "| step | command | wall time |", "|---|---|---|",
        *(f"| {c['step']} | `{c['command']}` | {c['seconds'] / 60:.1f} min |" for c in commands),
        "", f"In all: {sum(c['seconds'] for c in commands) / 60:.1f} minutes. Learning curves: "
        "study_curves.png.",
    ])
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps({"commands": commands, "results": {
        mode: {k: r[k] for k in ("original_resolution", "malignancy", "n_images")}
        for mode, r in results.items()}}, indent=2))
    return text


def learnability(args: argparse.Namespace) -> str:
    """Markdown: the overfit check's last-epoch Dice per contrast and mode."""
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.out} is not empty: pass --overwrite or another --out")
    lines = ["| contrast | mode | steps | Dice benign | Dice mass | Dice calc | minutes |",
             "|---|---|---|---|---|---|---|"]
    for contrast in args.contrast:
        out = args.out / f"contrast_{contrast:g}"
        shutil.rmtree(out, ignore_errors=True)
        csv_dir = handful_csv(out, tuple(args.size), args.seed, args.patients, contrast,
                              tuple(args.subtlety), tuple(args.density))
        for mode in args.mode:
            row = overfit(csv_dir, out, mode, tuple(args.size))
            dice = [f"{row[f'dice_{CLASS_NAMES[c]}']:.3f}" for c in LESION_IDS]
            lines.append(f"| x{contrast:g} | {mode} | {row['steps']} | " + " | ".join(dice)
                         + f" | {row['seconds'] / 60:.1f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "learnability":
            text = learnability(args)
        elif args.command == "visibility":
            text = visibility_table({f"scale {scale:g}": measure_visibility(
                args.csv, args.cache_dir, scale, args.data_root) for scale in args.scale})
        else:
            text = run(resolve_preset(args))
    except (UsageError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
