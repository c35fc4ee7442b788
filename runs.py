"""A training run's command line and folder: the flags, their checks before any long work, the
run-folder rules and resume.

A run folder (--checkpoint-dir) is a unit: a new run never writes into another run's folder
unless --overwrite says so, and --resume continues a run with the flags, data and cache it
started with. Every flag, path and the free space is checked before the cache build, so a
mistake costs seconds (UsageError: one line naming the flag or file and the fix).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import torch

from cbis import CLASS_NAMES, NUM_CLASSES
from dataset import MammogramDataset, read_training_splits
from imaging import DatasetError
from inference import resolution_of
from model import SUPPORTED_BACKBONES, build_model, pretrained_file
from preprocessing import PREPROCESS_VERSION
from tensorboard_log import TENSORBOARD_DIR, check_tensorboard
from utils import (
    HelpFormatter,
    UsageError,
    add_device_flags,
    check_config_matches,
    check_writable_dir,
    clean_stale_tmp,
    existing_ancestor,
    format_bytes,
    free_bytes,
    load_checkpoint,
    load_error_reason,
    positive_int,
)

# Flags that describe this machine or this command, not the run: a resumed run takes them from
# the command line. (--cache-dir and --data-root come from the run unless given: finding the
# run's cache again is the point of resuming.)
MACHINE_FLAGS = ("resume", "device", "workers", "checkpoint_dir", "progress", "overwrite",
                 "allow_changed_data", "log_every", "tensorboard")
# What a run writes into its --checkpoint-dir; --overwrite deletes these of the run it replaces.
RUN_FILES = ("last.pth", "best.pth", "log.csv", "train.log", "training_curves.png")
RUN_FOLDERS = (TENSORBOARD_DIR,)  # --tensorboard's
MIN_SIZE = 32  # px per side: the encoder downsamples 16-32x


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train DeepLabV3+ on the retrieval CSVs (4 classes: background, benign, "
                    "malignant mass, malignant calcification).",
        formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--csv-dir", type=Path, default=Path("csv"), help="folder with train.csv and val.csv")
    add("--data-root", type=Path, default=None,
        help="CBIS-DDSM download folder, if it moved since main_retrieval.py recorded it")
    add("--checkpoint-dir", type=Path, default=Path("checkpoint"),
        help="where last.pth, best.pth and log.csv are written")
    add("--cache-dir", type=Path, default=Path("cache"),
        help="preprocessed-image cache, shared by runs with the same size")
    add("--backbone", default="resnet50", choices=SUPPORTED_BACKBONES, help="ResNet encoder")
    add("--output-stride", type=int, default=16, choices=(8, 16), help="encoder output stride")
    add("--decoder-channels", type=int, default=256,
        help="width of ASPP and the V3+ decoder (the paper's 256; 64 for quick CPU runs)")
    add("--pretrained", default=None,
        help="ImageNet encoder weights: a local .pth file, or a torchvision weights name "
             "such as IMAGENET1K_V1 (downloads; needs network). Default: random init")
    add("--size", type=int, nargs=2, default=[1024, 640], metavar=("H", "W"),
        help="whole-image mode: every breast crop is resized to this height and width")
    add("--patch-size", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="patch mode: train on patches of this size cut from the breast crop at --scale, "
             "and infer with a sliding window (e.g. 512 512); default: whole-image mode")
    add("--scale", type=float, default=0.5,
        help="patch mode: the breast crop is cached at this fraction of its original size "
             "(1 = native resolution, ~50 um/px on CBIS-DDSM)")
    add("--patches-per-image", type=int, default=4,
        help="patch mode: patches drawn per training mammogram and epoch")
    add("--repeats", type=int, default=1,
        help="whole-image mode: times each training mammogram is seen per epoch, so that an "
             "epoch of a small set is worth its validation and checkpoint")
    add("--foreground-fraction", type=float, default=1 / 3,
        help="patch mode: share of patches centred on a lesion (class chosen uniformly)")
    add("--sw-overlap", type=float, default=0.25,
        help="patch mode: overlap of the sliding-window tiles at validation and test time")
    add("--no-canonical-flip", dest="canonical_flip", action="store_false",
        help="keep each breast's side instead of flipping the chest wall to the left")
    add("--epochs", type=int, default=40, help="number of epochs")
    add("--batch-size", type=int, default=8, help="images per device and step (at least 2)")
    add("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    add("--weight-decay", type=float, default=1e-4,
        help="AdamW weight decay of conv and linear weights (none on BatchNorm and biases)")
    add("--warmup-epochs", type=float, default=1.0,
        help="linear learning-rate warm-up, then cosine decay to --min-lr-ratio x --lr")
    add("--min-lr-ratio", type=float, default=0.01,
        help="floor of the cosine decay as a fraction of --lr: the last epochs still learn, "
             "at a rate 100x below the peak by default")
    add("--clip-grad-norm", type=float, default=12.0,
        help="clip the gradient norm (after un-scaling) to this; 0 turns clipping off")
    add("--dice-weight", type=float, default=1.0,
        help="weight of the soft Dice term added to cross-entropy")
    add("--no-augment", dest="augment", action="store_false",
        help="turn off flips, affine and intensity augmentation")
    add("--workers", type=int, default=4,
        help="DataLoader workers per process, also used to build the cache")
    add_device_flags(parser)
    add("--compile", action="store_true", help="torch.compile the model")
    add("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
        help="continue a run: from CHECKPOINT, or checkpoint-dir/last.pth when no path is given; "
             "the flags it was saved with are reused unless given again")
    add("--overwrite", action="store_true",
        help="start a new run in a --checkpoint-dir that holds another one, deleting its "
             "last.pth, best.pth, log.csv, train.log, training_curves.png and tensorboard/ "
             "(without it such a folder is refused)")
    add("--fold", type=int, default=None, metavar="K",
        help="cross-validation: validate on fold K of csv-dir/folds.csv (main_retrieval.py "
             "--folds) and train on the other folds, instead of on train.csv / val.csv; the "
             "fold is kept in the checkpoint. One run folder per fold, e.g. --checkpoint-dir "
             "folds/fold0 .. folds/fold4, which the test script and predict.py take as an "
             "ensemble with --checkpoint folds")
    add("--allow-changed-data", action="store_true",
        help="let --resume go on although the train/val rows or the data root differ from the "
             "run's (the validation patients then change mid-run)")
    add("--skip-unreadable", action="store_true",
        help="skip (and count) mammograms whose DICOMs cannot be read instead of stopping")
    add("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add("--tensorboard", action="store_true",
        help="also write TensorBoard events to checkpoint-dir/tensorboard: losses, lr, "
             "per-class validation Dice, images/s and 3 validation overlays per epoch (needs "
             "the tensorboard package; `tensorboard --logdir CHECKPOINT_DIR` shows them); "
             "give it again with --resume to go on logging")
    add("--log-every", type=positive_int, default=50,
        help="print data time, step time, images/s, ETA and peak memory every this many steps "
             "(also into checkpoint-dir/train.log)")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and which of them the command line gave (for --resume)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    probe = get_args_parser()
    for action in probe._actions:  # a flag the command line does not give stays unset
        action.default = argparse.SUPPRESS
    return args, set(vars(probe.parse_args(argv)))


# ----------------------------------------------------------------------------- the run record


def model_config(args) -> dict:
    """Everything needed to rebuild the model and its inputs, in plain types."""
    return {"backbone": args.backbone, "num_classes": NUM_CLASSES, "in_channels": 1,
            "output_stride": args.output_stride, "decoder_channels": args.decoder_channels,
            "size": list(args.size),
            "patch_size": list(args.patch_size) if args.patch_size else None,
            "scale": args.scale if args.patch_size else None,
            "sw_overlap": args.sw_overlap if args.patch_size else None,
            "canonical_flip": args.canonical_flip, "preprocess_version": PREPROCESS_VERSION,
            "class_names": list(CLASS_NAMES)}


def plain_args(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


# ----------------------------------------------------------------------------- resume


def resolve_resume(args, given: set[str]) -> tuple[argparse.Namespace, dict | None]:
    """With --resume, the saved flags fill in every flag the command line did not give."""
    if args.resume is None:
        return args, None
    path = resume_path(args)
    checkpoint = load_checkpoint(path)
    merged = dict(vars(args))
    path_flags = {action.dest for action in get_args_parser()._actions if action.type is Path}
    for key, value in checkpoint["args"].items():
        if key in MACHINE_FLAGS or key in given:
            continue
        merged[key] = Path(value) if key in path_flags and value is not None else value
    if "checkpoint_dir" not in given:  # --resume PATH continues that run, in its folder
        merged["checkpoint_dir"] = path.parent
    for key in ("csv_dir", "cache_dir"):  # absolute, as the run resolved them: any cwd will do
        if key not in given and "data" in checkpoint:
            merged[key] = Path(checkpoint["data"][key])
    resumed = argparse.Namespace(**merged)
    check_config_matches(checkpoint["config"], model_config(resumed), path)
    return resumed, checkpoint


def resume_path(args: argparse.Namespace) -> Path:
    return args.checkpoint_dir / "last.pth" if args.resume == "last" else Path(args.resume)


def continues_in_place(args: argparse.Namespace) -> bool:
    """--resume into the folder of the checkpoint it resumes from."""
    return (args.resume is not None
            and resume_path(args).parent.resolve() == args.checkpoint_dir.resolve())


# ----------------------------------------------------------------------------- checks first


def validate_args(args: argparse.Namespace, checkpoint: dict | None = None) -> dict:
    """Every flag, path and the free space, checked before the cache build and the first epoch.

    Raises UsageError (one line: the flag or file and the fix). Returns the data record the
    checkpoint keeps (data root, CSV and cache folders, fingerprint of the train/val rows); with
    `checkpoint` (a resumed run) the data must be the run's.
    """
    check_flag_values(args, checkpoint)
    for flag, folder in (("--checkpoint-dir", args.checkpoint_dir),
                         ("--cache-dir", args.cache_dir)):
        check_writable_dir(folder, flag)
    check_run_folder(args)
    try:
        splits, recorded_root = read_training_splits(args.csv_dir, args.fold)
    except DatasetError as error:
        raise UsageError(f"--csv-dir: {error}") from error
    root = Path(args.data_root or recorded_root)
    check_data_root(args, root, splits["train"])
    data = {"data_root": str(root.resolve()), "csv_dir": str(args.csv_dir.resolve()),
            "cache_dir": str(args.cache_dir.resolve()), "fingerprint": data_fingerprint(splits),
            "rows": {split: len(rows) for split, rows in splits.items()}, "fold": args.fold}
    if checkpoint is not None and not args.allow_changed_data:
        check_same_data(checkpoint.get("data"), data, args)
    check_free_space(args)
    return data


def check_flag_values(args: argparse.Namespace, checkpoint: dict | None) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    require(args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}")
    if checkpoint is not None:
        done = checkpoint["epoch"] + 1
        require(args.epochs > done, f"the run in {args.checkpoint_dir} has trained {done} of "
                                    f"--epochs {args.epochs} already: pass --epochs above {done} "
                                    "to train it further")
    partial = checkpoint.get("partial_epoch") if checkpoint is not None else None
    if partial is not None:  # stopped mid-epoch: the rest of it must be the same steps
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        require(len(partial["rng"]) == world_size,
                f"the run in {args.checkpoint_dir} stopped mid-epoch with {len(partial['rng'])} "
                f"process(es), this is {world_size}: resume it with as many")
        require(args.batch_size == partial["batch_size"],
                f"the run in {args.checkpoint_dir} stopped mid-epoch at --batch-size "
                f"{partial['batch_size']}: resume it with that (or leave --batch-size out)")
    require(args.batch_size >= 2,
            f"--batch-size must be at least 2 (batch norm in ASPP), got {args.batch_size}")
    require(math.isfinite(args.lr) and args.lr > 0,
            f"--lr must be a finite number above 0, got {args.lr} (e.g. --lr 3e-4)")
    for flag, value in (("--weight-decay", args.weight_decay),
                        ("--warmup-epochs", args.warmup_epochs),
                        ("--dice-weight", args.dice_weight),
                        ("--clip-grad-norm", args.clip_grad_norm)):
        require(math.isfinite(value) and value >= 0,
                f"{flag} must be a finite number >= 0, got {value}")
    require(0 <= args.min_lr_ratio <= 1,
            f"--min-lr-ratio must be in [0, 1] (a fraction of --lr), got {args.min_lr_ratio}")
    require(args.workers >= 0, f"--workers must be 0 (no worker processes) or more, "
                               f"got {args.workers}")
    require(min(args.size) >= MIN_SIZE, f"--size must be at least {MIN_SIZE} {MIN_SIZE} (the "
                                        f"encoder downsamples 16-32x), got {args.size[0]} "
                                        f"{args.size[1]}; e.g. --size 1024 640")
    require(args.repeats >= 1, f"--repeats must be at least 1, got {args.repeats}")
    require(args.decoder_channels >= 1,
            f"--decoder-channels must be at least 1, got {args.decoder_channels}")
    if args.patch_size:
        require(min(args.patch_size) >= MIN_SIZE,
                f"--patch-size must be at least {MIN_SIZE} {MIN_SIZE}, got {args.patch_size[0]} "
                f"{args.patch_size[1]}; e.g. --patch-size 512 512")
        require(math.isfinite(args.scale) and 0 < args.scale <= 1,
                f"--scale must be above 0 and at most 1 (native resolution), got {args.scale}")
        require(args.patches_per_image >= 1,
                f"--patches-per-image must be at least 1, got {args.patches_per_image}")
        require(args.repeats == 1, "--repeats is for whole-image mode: patch mode draws "
                                   "--patches-per-image patches per mammogram and epoch")
        require(0 <= args.foreground_fraction <= 1,
                f"--foreground-fraction must be in [0, 1], got {args.foreground_fraction}")
        require(0 <= args.sw_overlap < 1,
                f"--sw-overlap must be in [0, 1), got {args.sw_overlap}")
    if args.tensorboard:
        check_tensorboard()
    if args.pretrained is not None and checkpoint is None:  # a resumed run has its weights
        check_pretrained(args.pretrained, args.backbone)


def check_pretrained(pretrained: str, backbone: str) -> None:
    """A readable state dict file, or a torchvision weights name of the backbone (model.py's
    rule, pretrained_file)."""
    try:
        path = pretrained_file(pretrained, backbone)
    except ValueError as error:
        raise UsageError(f"--pretrained {error}") from error
    if path is not None:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises several types for a bad file
            raise UsageError(f"--pretrained {path} cannot be loaded ({load_error_reason(error)}):"
                             f" pass a torchvision {backbone} state dict saved with torch.save"
                             ) from error


def check_run_folder(args: argparse.Namespace) -> None:
    """A run folder is a unit: a new run never writes into another run's folder unless told."""
    folder = args.checkpoint_dir
    held = sorted(e.name for e in folder.iterdir() if not e.name.startswith(".")) \
        if folder.is_dir() else []
    if not held or args.overwrite or continues_in_place(args):
        return
    shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    if args.resume is None:
        raise UsageError(f"--checkpoint-dir {folder} already holds a run ({shown}): pass --resume "
                         "to continue it, --overwrite to replace it, or choose another folder")
    raise UsageError(f"--checkpoint-dir {folder} holds another run ({shown}), not the one of "
                     f"{resume_path(args)}: leave --checkpoint-dir out to continue in "
                     f"{resume_path(args).parent}, pass --overwrite to replace that run, or "
                     "choose an empty folder")


def check_data_root(args: argparse.Namespace, root: Path, train_rows: pd.DataFrame) -> None:
    """The images are where the CSVs (or --data-root) say, checked on the first one."""
    if train_rows.empty or (root / train_rows["img_path"].iloc[0]).exists():
        return
    first = root / train_rows["img_path"].iloc[0]
    if args.data_root is not None:
        raise UsageError(f"--data-root {root} has no {first.relative_to(root)}: pass the "
                         "folder main_retrieval.py read (the one holding CBIS-DDSM/)")
    raise UsageError(f"{first} is missing: if the data moved since main_retrieval.py recorded "
                     f"{root} in {args.csv_dir / 'dataset.json'}, pass --data-root NEW_FOLDER")


def data_fingerprint(splits: dict[str, pd.DataFrame]) -> str:
    """A hash of what a run trains and selects on: each split's patients, images, ROIs and
    classes (row order aside)."""
    digest = hashlib.sha1()
    for split, rows in sorted(splits.items()):
        keys = rows[["patient_id", "img_path", "roi_path", "class_id"]].astype(str)
        for record in sorted(map(tuple, keys.to_numpy().tolist())):
            digest.update(json.dumps([split, *record]).encode())
    return digest.hexdigest()


def check_same_data(saved: dict | None, data: dict, args: argparse.Namespace) -> None:
    """A resumed run goes on with the data it started on (else best.pth would be chosen on
    other validation patients, possibly ones it trained on)."""
    if saved is None:  # a checkpoint from before data records: nothing to compare with
        return
    if saved["fingerprint"] != data["fingerprint"]:
        counts = ", ".join(f"{split} {saved['rows'][split]} -> {data['rows'][split]}"
                           for split in ("train", "val"))
        raise UsageError(f"the train/val rows in {args.csv_dir} differ from the ones this run "
                         f"started on in {saved['csv_dir']} (rows: {counts}; retrieval re-run?): "
                         "restore them, start a new --checkpoint-dir, or pass "
                         "--allow-changed-data")
    if saved["data_root"] != data["data_root"]:
        raise UsageError(f"this run read its images from {saved['data_root']}, now "
                         f"{data['data_root']}: pass --data-root {saved['data_root']}, or "
                         "--allow-changed-data if the same data moved")


def check_free_space(args: argparse.Namespace) -> None:
    """Room for three checkpoints (last, best, the one being written) and the missing cache
    entries, per file system."""
    with torch.device("meta"):  # parameter count without allocating anything
        net = build_model(args.backbone, NUM_CLASSES, 1, args.output_stride, None,
                          args.decoder_channels)
    # Weights, AdamW's two moments and room for one more copy (e.g. an averaged model).
    checkpoint_bytes = 4 * 4 * sum(t.numel() for t in net.state_dict().values()) + (1 << 20)
    missing, first = 0, None
    for dataset in split_datasets(args).values():
        missing += len(dataset.cache.missing(dataset.mammograms))
        if first is None and dataset.mammograms:
            first = dataset.cache.data_root / dataset.mammograms[0].img_path
    height, width = args.size
    if args.patch_size:  # the breast crop at --scale: sized after the first mammogram
        height, width = (args.scale * side for side in mammogram_shape(first))
    cache_bytes = missing * int(3 * height * width + 12288)  # uint16 image, uint8 mask, slack
    needs: dict[int, list] = {}
    for flag, folder, size, what in (
            ("--checkpoint-dir", args.checkpoint_dir, 3 * checkpoint_bytes,
             f"3 checkpoints of {format_bytes(checkpoint_bytes)}"),
            ("--cache-dir", args.cache_dir, cache_bytes,
             f"{missing} cache entries of {format_bytes(cache_bytes / max(missing, 1))}")):
        device = existing_ancestor(folder).stat().st_dev
        need = needs.setdefault(device, [flag, folder, 0, []])
        need[2] += size
        need[3].append(what)
    for flag, folder, size, what in needs.values():
        free = free_bytes(folder)
        if free < size:
            raise UsageError(f"not enough free space for {flag} {folder}: {format_bytes(free)} "
                             f"free, this run needs about {format_bytes(size)} "
                             f"({' and '.join(what)}); free some space or choose another folder")


def split_datasets(args: argparse.Namespace) -> dict[str, MammogramDataset]:
    """{"train": ..., "val": ...} as the flags choose them (--fold, or train.csv / val.csv),
    on the run's cache; nothing is preprocessed yet."""
    splits, recorded_root = read_training_splits(args.csv_dir, args.fold)
    return {split: MammogramDataset.from_rows(rows, args.cache_dir, args.data_root or recorded_root,
                                              resolution_of(model_config(args)),
                                              args.canonical_flip)
            for split, rows in splits.items()}


def mammogram_shape(path: Path | None) -> tuple[int, int]:
    """(rows, columns) from a DICOM header, or a typical CBIS-DDSM mammogram's where there is
    none to read."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(header.Rows), int(header.Columns)
    except Exception:  # noqa: BLE001 - no file, another format: the estimate only needs a size
        return 5300, 3000


# ----------------------------------------------------------------------------- the run folder


def prepare_run_folder(args: argparse.Namespace) -> None:
    """Rank 0, before the first epoch: the folder exists, without the temporary files of a
    killed write and, with --overwrite, without the files of the run it replaces."""
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for path in clean_stale_tmp(args.checkpoint_dir, min_age_s=0):  # rank 0 is its one writer
        print(f"removed {path.name}, left by a killed write")
    if args.overwrite and not continues_in_place(args):
        for name in RUN_FILES:
            (args.checkpoint_dir / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(args.checkpoint_dir / name, ignore_errors=True)


def drop_log_rows_after(log_path: Path, epochs_done: int) -> None:
    """A run killed after logging an epoch but before its checkpoint re-runs that epoch."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    if epochs_done == 0:
        log_path.unlink()
        return
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) <= epochs_done]
    log_path.write_text("".join(kept))
