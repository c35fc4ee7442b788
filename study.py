"""The resolution study: whole-image training at a low resolution against patch training at the
native resolution, on the realistic synthetic CBIS-DDSM, at about equal training time.

    python study.py --out runs/study          # what `make study` runs (2 CPU cores: 37 minutes)

Steps: synthetic.py --profile realistic -> main_retrieval.py -> Train_deep_labv3+.py twice
(whole image at 1/--downsample of the synthetic native size; patches at scale 1) -> the test
script on the official test split for each -> OUT/study.md, a table of per-class Dice (pooled, at
original resolution), lesion sensitivity at 0.5/1/2 false positives per image and malignancy AUC,
each with its patient-bootstrap 95% CI, plus the exact commands and their wall times.

The downsample default (5) is the ratio of a real ~5300-row scan to the usual 1024-row whole-image
input. What the study can and cannot show about real data is written in README.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import evaluation
import main_retrieval
import synthetic
import training
from cbis import CLASS_NAMES
from utils import HelpFormatter

FP_RATES_SHOWN = (0.5, 1, 2)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/study"), help="folder for data, runs and results")
    add("--patients", type=int, default=80, help="synthetic patients (1-3 mammograms each)")
    add("--native-size", type=int, nargs=2, default=[2048, 1216], metavar=("H", "W"),
        help="synthetic mammogram size; every lesion size scales with it")
    add("--downsample", type=float, default=5.0,
        help="whole-image mode trains at native size / this (a real scan at 1024x640 is ~5x)")
    add("--patch-size", type=int, nargs=2, default=[192, 192], metavar=("H", "W"),
        help="patch mode: tile size at native resolution")
    add("--whole-epochs", type=int, default=35, help="epochs of the whole-image run")
    add("--patch-epochs", type=int, default=8, help="epochs of the patch run")
    add("--patches-per-image", type=int, default=8, help="patch mode: patches per image, epoch")
    add("--backbone", default="resnet18", help="encoder of both runs")
    add("--workers", type=int, default=2, help="DataLoader workers and cache builders")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples of each CI")
    add("--seed", type=int, default=0, help="seed of the data and both runs")
    add("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def timed(commands: list[dict], name: str, script: str, main: Callable[[list[str]], int],
          argv: list[str]) -> None:
    """Run one step in this process, record its command line and wall time; stop on failure."""
    line = f"python {script} {shlex.join(argv)}"
    print(f"\n$ {line}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(f"error: step {name!r} exited with {code}: {line}")
    commands.append({"step": name, "command": line, "seconds": time.perf_counter() - start})


def _cell(entry: dict, index: int | None = None) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if index is not None:
        value, low, high = value[index], low[index], high[index]
    if value is None:
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{value:.3f}"


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per figure, one column per mode."""
    modes = list(results)
    rows = []
    for cls in CLASS_NAMES[1:]:
        rows.append((f"Dice {cls} (pooled, original pixels)", [
            _cell(results[m]["original_resolution"]["dice_pooled"][cls]) for m in modes]))
    for cls in CLASS_NAMES[1:]:
        for rate in FP_RATES_SHOWN:
            cells = []
            for m in modes:
                detection = results[m]["original_resolution"]["detection"]
                index = detection["fp_per_image"].index(rate)
                found = next(v for k, v in detection.items() if k.startswith("iou_at_least"))
                cells.append(_cell(found[cls], index))
            rows.append((f"{cls} lesion sensitivity at {rate} FP/image", cells))
    rows.append(("malignancy AUC (image level)",
                 [_cell(results[m]["malignancy"]["auc"]) for m in modes]))
    header = ["figure (95% CI)", *modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    out = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} is not empty: pass --overwrite or another --out")
    height, width = args.native_size
    low = [round(height / args.downsample), round(width / args.downsample)]
    data, csv_dir, commands = out / "data", out / "csv", []
    timed(commands, "synthetic data", "synthetic.py", synthetic.main, [
        "--out", str(data), "--profile", "realistic", "--patients", str(args.patients),
        "--size", str(height), str(width), "--seed", str(args.seed), "--overwrite",
        "--no-progress"])
    timed(commands, "retrieval", "main_retrieval.py", main_retrieval.main, [
        "--data-root", str(data), "--out-dir", str(csv_dir), "--val-fraction", "0.15"])
    common = ["--csv-dir", str(csv_dir), "--cache-dir", str(out / "cache"), "--backbone",
              args.backbone, "--decoder-channels", "64", "--batch-size", "8", "--lr", "1e-3",
              "--workers", str(args.workers), "--seed", str(args.seed), "--no-progress"]
    modes = {
        f"whole image {low[0]}x{low[1]}": ["--size", *map(str, low),
                                           "--epochs", str(args.whole_epochs)],
        f"patches {args.patch_size[0]}x{args.patch_size[1]} at native {height}x{width}": [
            "--patch-size", *map(str, args.patch_size), "--scale", "1.0",
            "--patches-per-image", str(args.patches_per_image),
            "--epochs", str(args.patch_epochs)],
    }
    results = {}
    for index, (mode, flags) in enumerate(modes.items()):
        run_dir = out / ("whole" if index == 0 else "patch")
        timed(commands, f"train: {mode}", "Train_deep_labv3+.py", training.main,
              # OUT is new or --overwrite was given: a previous study's run gives way
              [*common, "--checkpoint-dir", str(run_dir), *flags, "--overwrite"])
        timed(commands, f"test: {mode}", "Test_deep_labV3+.py", evaluation.main, [
            "--checkpoint", str(run_dir / "best.pth"), "--csv", str(csv_dir / "test.csv"),
            "--out", str(out / "results" / run_dir.name), "--cache-dir", str(out / "cache"),
            "--workers", str(args.workers), "--bootstrap", str(args.bootstrap),
            "--seed", str(args.seed), "--no-progress"])
        results[mode] = json.loads((out / "results" / run_dir.name / "metrics.json").read_text())
    any_result = next(iter(results.values()))
    text = "\n".join([
        f"Realistic synthetic set, seed {args.seed}: {any_result['n_images']} test mammograms "
        f"of {any_result['n_patients']} patients, {any_result['n_lesions']} lesions.", "",
        table(results), "",
        "| step | command | wall time |", "|---|---|---|",
        *(f"| {c['step']} | `{c['command']}` | {c['seconds'] / 60:.1f} min |" for c in commands),
    ])
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps({"commands": commands, "results": {
        mode: {k: r[k] for k in ("original_resolution", "malignancy", "n_images")}
        for mode, r in results.items()}}, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    text = run(get_args_parser().parse_args(argv))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
