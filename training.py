"""Training: flags, the loss, one epoch, validation, and the checkpointed loop.

Runs on one device or, under torchrun, on many with DistributedDataParallel; only rank 0 writes
checkpoint-dir/{last,best}.pth, log.csv, train.log (the screen's lines, timestamped, with step
timings every --log-every steps) and training_curves.png (redrawn every epoch).
Train_deep_labv3+.py is the command-line entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import metrics
from augmentation import augment_batch, normalize_input, unit_range
from cbis import CLASS_NAMES, NUM_CLASSES
from dataset import EpochSampler, MammogramDataset, PatchDataset, read_split_csv
from imaging import DatasetError
from inference import predict_logits, resolution_of
from model import SUPPORTED_BACKBONES, build_model
from preprocessing import PREPROCESS_VERSION
from report import plot_training_curves
from utils import (
    CheckpointError,
    DiskFullError,
    DistInfo,
    HelpFormatter,
    StepLog,
    TeeStdout,
    UsageError,
    add_device_flags,
    all_reduce_sum,
    append_csv_row,
    autocast_for,
    barrier,
    broadcast_buffers,
    check_config_matches,
    check_writable_dir,
    clean_stale_tmp,
    cleanup_distributed,
    derive_seed,
    existing_ancestor,
    format_bytes,
    free_bytes,
    init_distributed,
    load_checkpoint,
    load_error_reason,
    positive_int,
    resolve_device,
    save_checkpoint,
    seed_everything,
)

# First words of the SeedSequence entropy of each random stream (see utils.derive_seed).
TORCH_SEED, AUGMENT_SEED, SAMPLER_SEED = 1, 2, 3
# Flags that describe this machine or this command, not the run: a resumed run takes them from
# the command line. (--cache-dir and --data-root come from the run unless given: finding the
# run's cache again is the point of resuming.)
MACHINE_FLAGS = ("resume", "device", "workers", "checkpoint_dir", "progress", "overwrite",
                 "allow_changed_data", "log_every")
# What a run writes into its --checkpoint-dir; --overwrite deletes these of the run it replaces.
RUN_FILES = ("last.pth", "best.pth", "log.csv", "train.log", "training_curves.png")
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
             "last.pth, best.pth and log.csv (without it such a folder is refused)")
    add("--allow-changed-data", action="store_true",
        help="let --resume go on although the train/val rows or the data root differ from the "
             "run's (the validation patients then change mid-run)")
    add("--skip-unreadable", action="store_true",
        help="skip (and count) mammograms whose DICOMs cannot be read instead of stopping")
    add("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add("--log-every", type=positive_int, default=50,
        help="print data time, step time, images/s, ETA and peak memory every this many steps "
             "(also into checkpoint-dir/train.log)")
    return parser


# ----------------------------------------------------------------------------- loss, schedule


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (nnU-Net's AllGatherGrad
    with the sum taken at once): each rank's sums feed every rank's loss."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                   pool_ranks: bool = False) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, pooled over the batch.

    pool_ranks (training under DDP): the sums are pooled over every rank's batch, as nnU-Net
    does, so a rank whose images lack a class does not score it alone. The all-reduce passes
    gradients back (summed over ranks, which DDP's averaging undoes); every rank must call it.
    """
    probs = logits.float().softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (0, 2, 3)
    sums = torch.stack([(probs * one_hot).sum(dims), probs.sum(dims) + one_hot.sum(dims)])
    if pool_ranks and dist.is_available() and dist.is_initialized():
        sums = _AllReduceSum.apply(sums)
    intersection, total = sums
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      pool_ranks: bool = False) -> torch.Tensor:
    """Cross-entropy plus soft Dice: lesions are under 2% of the pixels. target: class ids."""
    target = target.long()
    return (F.cross_entropy(logits.float(), target)
            + dice_weight * soft_dice_loss(logits, target, pool_ranks=pool_ranks))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then cosine decay to min_ratio x the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def last_step_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate of the last optimizer step taken (param_groups hold the next one's)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying BatchNorm scales and biases
    shrinks them for nothing (nanoGPT and torchvision's --norm-weight-decay 0)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, max_norm: float) -> None:
    """Clip the gradient norm to max_norm (0: off) on the true, un-scaled gradients."""
    if max_norm > 0:
        scaler.unscale_(optimizer)  # scaler.step knows and does not un-scale twice
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def update_ema(ema: float | None, value: float, decay: float = 0.9) -> float | None:
    """nnU-Net's smoothing of the validation Dice (0.9 old, 0.1 new), which picks best.pth: one
    lucky epoch on a small validation set does not. A NaN epoch (no class present) is skipped."""
    if math.isnan(value):
        return ema
    return value if ema is None else decay * ema + (1 - decay) * value


# ----------------------------------------------------------------------------- steps


def to_device(images: torch.Tensor, masks: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the dataset gives it (uint16, uint8) -> float images in [0, 1] on device."""
    images = unit_range(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, device: torch.device, args,
                    generator: torch.Generator, dist_info: DistInfo) -> float:
    """One pass over the training set; returns the mean loss over all ranks."""
    model.train()
    channels_last = device.type == "cuda"
    loss_sum = torch.zeros(2, device=device)
    bar = tqdm(loader, desc="train", leave=False, disable=not (args.progress and dist_info.is_main))
    for step, (images, masks, _) in enumerate(bar):
        images, masks = to_device(images, masks, device, channels_last)
        if args.augment:
            images, masks = augment_batch(images, masks, generator)
        with autocast_for(device, args.amp):
            logits = model(normalize_input(images))
        loss = segmentation_loss(logits, masks, args.dice_weight, pool_ranks=dist_info.enabled)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        clip_gradients(model, optimizer, scaler, args.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum[0] += loss.detach() * len(images)
        loss_sum[1] += len(images)
        if not bar.disable and step % 10 == 0:  # .item() waits for the device: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}")
    loss_sum = all_reduce_sum(loss_sum)
    return (loss_sum[0] / loss_sum[1]).item()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, args,
             dist_info: DistInfo) -> dict:
    """Validation loss and per-class Dice pooled over the set (all ranks), at the cache's
    resolution: whole images, or whole breast crops through the sliding window in patch mode."""
    model.eval()
    config = model_config(args)
    stats = torch.zeros(NUM_CLASSES, 3, dtype=torch.float64, device=device)  # inter, pred, truth
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    bar = tqdm(loader, desc="val", leave=False, disable=not (args.progress and dist_info.is_main))
    for images, masks, _ in bar:
        images, masks = to_device(images, masks, device, device.type == "cuda")
        logits = predict_logits(model, images, config, args.amp, args.batch_size)
        loss_sum[0] += segmentation_loss(logits, masks, args.dice_weight) * len(images)
        loss_sum[1] += len(images)
        pred = logits.argmax(1)
        for cls in range(NUM_CLASSES):
            p, t = pred == cls, masks == cls
            stats[cls] += torch.stack([(p & t).sum(), p.sum(), t.sum()]).double()
    stats, loss_sum = all_reduce_sum(stats).cpu().numpy(), all_reduce_sum(loss_sum)
    dice = metrics.dice_iou(stats[None])["dice_pooled"]
    return {"val_loss": (loss_sum[0] / loss_sum[1]).item(),
            "dice": dice, "mean_fg_dice": float(np.nanmean(dice[1:]))}


# ----------------------------------------------------------------------------- the run


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


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and which of them the command line gave (for --resume)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    probe = get_args_parser()
    for action in probe._actions:  # a flag the command line does not give stays unset
        action.default = argparse.SUPPRESS
    return args, set(vars(probe.parse_args(argv)))


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
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split], recorded_root = read_split_csv(args.csv_dir / f"{split}.csv")
        except DatasetError as error:
            raise UsageError(f"--csv-dir: {error}") from error
    root = Path(args.data_root or recorded_root)
    check_data_root(args, root, splits["train"])
    data = {"data_root": str(root.resolve()), "csv_dir": str(args.csv_dir.resolve()),
            "cache_dir": str(args.cache_dir.resolve()), "fingerprint": data_fingerprint(splits),
            "rows": {split: len(rows) for split, rows in splits.items()}}
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
        require(0 <= args.foreground_fraction <= 1,
                f"--foreground-fraction must be in [0, 1], got {args.foreground_fraction}")
        require(0 <= args.sw_overlap < 1,
                f"--sw-overlap must be in [0, 1), got {args.sw_overlap}")
    if args.pretrained is not None and checkpoint is None:  # a resumed run has its weights
        check_pretrained(args.pretrained, args.backbone)


def check_pretrained(pretrained: str, backbone: str) -> None:
    """A readable state dict file, or a torchvision weights name of the backbone."""
    path = Path(pretrained)
    if path.is_file():
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises several types for a bad file
            raise UsageError(f"--pretrained {path} cannot be loaded ({load_error_reason(error)}):"
                             f" pass a torchvision {backbone} state dict saved with torch.save"
                             ) from error
        return
    names = list(torchvision.models.get_model_weights(backbone).__members__)
    if pretrained not in names:
        raise UsageError(f"--pretrained {pretrained!r} is neither a file nor a torchvision "
                         f"{backbone} weights name: pass a .pth path or one of {', '.join(names)}")


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
    for split in ("train", "val"):
        dataset = MammogramDataset.from_csv(args.csv_dir / f"{split}.csv", args.cache_dir,
                                            resolution_of(model_config(args)),
                                            args.canonical_flip, args.data_root)
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


def mammogram_shape(path: Path | None) -> tuple[int, int]:
    """(rows, columns) from a DICOM header, or a typical CBIS-DDSM mammogram's where there is
    none to read."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(header.Rows), int(header.Columns)
    except Exception:  # noqa: BLE001 - no file, another format: the estimate only needs a size
        return 5300, 3000


def plain_args(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def build_training_state(args, device: torch.device, pretrained: str | None, warmup_steps: int,
                         total_steps: int):
    """(model, AdamW, warm-up + cosine schedule, grad scaler) as --flags describe them."""
    model = build_model(args.backbone, NUM_CLASSES, 1, args.output_stride, pretrained,
                        args.decoder_channels).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    scheduler = warmup_cosine(optimizer, warmup_steps, total_steps, args.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return model, optimizer, scheduler, scaler


def make_loader(dataset: MammogramDataset | PatchDataset, args, dist_info: DistInfo, train: bool,
                device: torch.device) -> tuple[DataLoader, DistributedSampler | list[int]]:
    """Training: a shuffling DistributedSampler (set_epoch gives each epoch its own order), also
    with one process; for patches it hands each item its epoch too. Validation: each rank a
    disjoint, unpadded share, so no image counts twice; one crop at a time in patch mode, where
    crops differ in size (the sliding window batches its tiles).
    """
    if train:
        sampler_type = EpochSampler if args.patch_size else DistributedSampler
        sampler = sampler_type(dataset, num_replicas=dist_info.world_size,
                               rank=dist_info.rank, shuffle=True,
                               seed=derive_seed(SAMPLER_SEED, args.seed))
    else:
        sampler = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    batch_size = 1 if args.patch_size and not train else args.batch_size
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, drop_last=train,
                        prefetch_factor=4 if args.workers > 0 else None)
    return loader, sampler


def load_datasets(args, dist_info: DistInfo) -> tuple[MammogramDataset | PatchDataset,
                                                      MammogramDataset]:
    """Train and val datasets with their cache built once (by rank 0, in parallel). In patch
    mode the training set yields patches and validation sees whole crops."""
    datasets = []
    for split in ("train", "val"):
        dataset = MammogramDataset.from_csv(args.csv_dir / f"{split}.csv", args.cache_dir,
                                            resolution_of(model_config(args)),
                                            args.canonical_flip, args.data_root)
        if dist_info.is_main:
            report = dataset.prepare(args.workers, args.skip_unreadable, args.progress)
            for img_path, error in report.skipped:
                print(f"skipped {img_path}: {error}")
            if report.built:
                print(f"{split}: preprocessed {report.built} mammograms into {args.cache_dir} "
                      f"({report.masks_resized} masks resized to their image, "
                      f"{report.rois_lost} ROIs too small to survive the resize)")
        barrier()
        if not dist_info.is_main:  # the cache is complete now; this drops what rank 0 skipped
            dataset.prepare(0, args.skip_unreadable, progress=False)
        datasets.append(dataset)
    train_set, val_set = datasets
    if args.patch_size:
        train_set = PatchDataset(train_set, tuple(args.patch_size), args.patches_per_image,
                                 args.foreground_fraction, args.seed)
    return train_set, val_set


def train(args, given: set[str] = frozenset()) -> dict:
    """The whole run; returns the last epoch's log row. given: flags the command line gave."""
    args, checkpoint = resolve_resume(args, given)
    data = validate_args(args, checkpoint)
    device = resolve_device(args.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(args.seed)
    try:
        # Printed lines are kept from here; train.log gets them once the run folder is ready.
        with TeeStdout(enabled=dist_info.is_main) as log:
            return _train(args, checkpoint, device, dist_info, data, log)
    finally:
        cleanup_distributed()


def _train(args, checkpoint: dict | None, device: torch.device, dist_info: DistInfo,
           data: dict, log: TeeStdout) -> dict:
    train_set, val_set = load_datasets(args, dist_info)
    if len(train_set) < args.batch_size * dist_info.world_size:
        raise SystemExit(f"error: {len(train_set)} training mammograms, fewer than one batch")
    train_loader, train_sampler = make_loader(train_set, args, dist_info, True, device)
    val_loader, _ = make_loader(val_set, args, dist_info, False, device)

    config = model_config(args)
    steps_per_epoch = len(train_loader)
    model, optimizer, scheduler, scaler = build_training_state(
        args, device, None if checkpoint else args.pretrained,
        warmup_steps=max(1, round(args.warmup_epochs * steps_per_epoch)),
        total_steps=args.epochs * steps_per_epoch)
    start_epoch, best, ema = 0, -1.0, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best_metric"]
        ema = checkpoint.get("ema_metric")
    trained = model
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        trained = torch.compile(trained)

    train_loader = StepLog(train_loader, args.log_every, args.epochs, start_epoch,
                           args.batch_size * dist_info.world_size, device, dist_info.is_main)
    log_path = args.checkpoint_dir / "log.csv"
    if dist_info.is_main:
        prepare_run_folder(args)
        log.open(args.checkpoint_dir / "train.log")
        drop_log_rows_after(log_path, start_epoch)
        inputs = (f"{args.patch_size[0]}x{args.patch_size[1]} patches at scale {args.scale}"
                  if args.patch_size else f"{args.size[0]}x{args.size[1]}")
        print(f"training {args.backbone} DeepLabV3+ on {len(train_set)} "
              f"{'patches per epoch' if args.patch_size else 'mammograms'} "
              f"({len(val_set)} val mammograms) at {inputs}, {dist_info.world_size} "
              f"process(es) on {device}, epochs {start_epoch + 1}..{args.epochs}")
    row = {}
    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        # Everything random in an epoch derives from (seed, epoch): resuming replays it exactly.
        torch.manual_seed(derive_seed(TORCH_SEED, args.seed, epoch))
        train_sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(
            derive_seed(AUGMENT_SEED, args.seed, epoch, dist_info.rank))
        train_loss = train_one_epoch(trained, train_loader, optimizer, scheduler, scaler, device,
                                     args, generator, dist_info)
        train_seconds = time.perf_counter() - start
        # The plain model: ranks may see different numbers of val batches, and DDP's forward
        # would wait for the others.
        broadcast_buffers(model)  # every rank validates the model rank 0 saves
        val = evaluate(model, val_loader, device, args, dist_info)
        seconds = time.perf_counter() - start
        ema = update_ema(ema, val["mean_fg_dice"])
        row = {"epoch": epoch + 1, "lr": last_step_lr(scheduler),
               "train_loss": round(train_loss, 5), "val_loss": round(val["val_loss"], 5),
               **{f"dice_{name}": round(float(d), 4)
                  for name, d in zip(CLASS_NAMES[1:], val["dice"][1:], strict=True)},
               "mean_fg_dice": round(val["mean_fg_dice"], 4),
               "ema_fg_dice": round(math.nan if ema is None else ema, 4),
               "seconds": round(seconds, 1),
               "train_images_per_s": round(len(train_loader) * args.batch_size
                                           * dist_info.world_size / train_seconds, 2)}
        improved = ema is not None and ema > best
        if improved:
            best = ema
        if dist_info.is_main:
            append_csv_row(log_path, row)
            plot_training_curves(log_path, args.checkpoint_dir / "training_curves.png")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "best_metric": best, "ema_metric": ema, "config": config,
                     "args": plain_args(args), "val_dice": [float(d) for d in val["dice"]],
                     "data": data}
            save_checkpoint(state, args.checkpoint_dir / "last.pth")
            if improved:
                save_checkpoint(state, args.checkpoint_dir / "best.pth")
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {train_loss:.4f}  "
                  f"val loss {val['val_loss']:.4f}  val Dice " + "  ".join(
                      f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("dice_"))
                  + f"  mean {val['mean_fg_dice']:.3f}  EMA {row['ema_fg_dice']:.3f}"
                  f"{'  *best' if improved else ''}  "
                  f"({seconds:.0f} s)")
        barrier()
    return row


def prepare_run_folder(args: argparse.Namespace) -> None:
    """Rank 0, before the first epoch: the folder exists, without the temporary files of a
    killed write and, with --overwrite, without the files of the run it replaces."""
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for path in clean_stale_tmp(args.checkpoint_dir, min_age_s=0):  # rank 0 is its one writer
        print(f"removed {path.name}, left by a killed write")
    if args.overwrite and not continues_in_place(args):
        for name in RUN_FILES:
            (args.checkpoint_dir / name).unlink(missing_ok=True)


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


def main(argv: list[str] | None = None) -> int:
    try:
        train(*parse_args(argv))
    except (UsageError, CheckpointError) as error:  # found before any long work
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DatasetError, DiskFullError) as error:
        raise SystemExit(f"error: {error}") from None
    return 0


