"""Training: the loss, one epoch, validation, and the checkpointed loop.

Runs on one device or, under torchrun, on many with DistributedDataParallel; only rank 0 writes
checkpoint-dir/{last,best}.pth, log.csv, train.log (the screen's lines, timestamped, with step
timings every --log-every steps) and training_curves.png (redrawn every epoch). The flags, their
checks, the run folder and resume are runs.py's; Train_deep_labv3+.py is the command-line entry.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import metrics
from augmentation import augment_batch, normalize_input, unit_range
from cbis import CLASS_NAMES, LESIONS, NUM_CLASSES
from dataset import EpochSampler, MammogramDataset, PatchDataset, ResumableSampler
from imaging import DatasetError
from inference import predict_logits, predict_probabilities
from model import build_model
from preemption import (
    EXIT_PREEMPTED,
    PreemptedError,
    PreemptionWatch,
    gather_rng_states,
    restore_rng_state,
    rng_state,
)
from report import overlay_panel, plot_training_curves
from runs import (
    drop_log_rows_after,
    model_config,
    parse_args,
    plain_args,
    prepare_run_folder,
    resolve_resume,
    split_datasets,
    validate_args,
)
from tensorboard_log import OVERLAYS, EpochBoard, small_panel
from utils import (
    CheckpointError,
    DiskFullError,
    DistInfo,
    StepLog,
    TeeStdout,
    UsageError,
    all_reduce_sum,
    append_csv_row,
    autocast_for,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    derive_seed,
    init_distributed,
    resolve_device,
    save_checkpoint,
    seed_everything,
)

# First words of the SeedSequence entropy of each random stream (see utils.derive_seed).
TORCH_SEED, AUGMENT_SEED, SAMPLER_SEED = 1, 2, 3

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


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   pool_ranks: bool = False) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes present in the batch, pooled over it.

    A class absent from the batch is left out of the mean: scored, its only gradient would push
    that class towards zero everywhere (with the classic eps = 1 that push is as strong as the
    whole loss), which on lesion-sparse batches teaches the model to predict background.
    pool_ranks (training under DDP): the sums are pooled over every rank's batch, as nnU-Net
    does, so a rank whose images lack a class does not score it alone. The all-reduce passes
    gradients back (summed over ranks, which DDP's averaging undoes); every rank must call it.
    """
    probs = logits.float().softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (0, 2, 3)
    sums = torch.stack([(probs * one_hot).sum(dims), probs.sum(dims), one_hot.sum(dims)])
    if pool_ranks and dist.is_available() and dist.is_initialized():
        sums = _AllReduceSum.apply(sums)
    intersection, predicted, present = sums
    dice = (2 * intersection + eps) / (predicted + present + eps)
    weight = (present > 0).float()
    return 1 - (dice * weight).sum() / weight.sum().clamp(min=1)


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


@dataclass
class EpochResult:
    loss: float  # mean training loss over all ranks (of the steps so far, when stopped)
    steps_taken: int  # by this call (a resumed epoch's first steps were taken before)
    stopped_at: dict | None = None  # preempted: last.pth's partial_epoch


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, device: torch.device, args,
                    generator: torch.Generator, dist_info: DistInfo,
                    watch: PreemptionWatch | None = None,
                    resumed: dict | None = None) -> EpochResult:
    """One pass over the training set, or its rest after a preemption (`resumed`: the
    checkpoint's partial_epoch; the loader's sampler skips the steps it took). With `watch`, a
    preemption signal stops it after the step in progress, with the record to resume from."""
    model.train()
    channels_last = device.type == "cuda"
    loss_sum = torch.zeros(2, device=device)
    steps_before = 0
    if resumed is not None:
        steps_before = resumed["step"]
        if dist_info.is_main:  # the sums are all-reduced: one rank carries them on
            loss_sum += torch.tensor(resumed["loss_sum"], device=device)
    bar = tqdm(loader, desc="train", leave=False, disable=not (args.progress and dist_info.is_main))
    steps = len(loader)
    rng_to_restore = resumed["rng"][dist_info.rank] if resumed is not None else None
    for step, (images, masks, _) in enumerate(bar, start=1):
        if rng_to_restore is not None:  # after the fetch: the streams as the stopped run left
            restore_rng_state(rng_to_restore, generator, device)
            rng_to_restore = None
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
        if not bar.disable and step % 10 == 1:  # .item() waits for the device: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if watch is not None and watch.requested(device, step):
            bar.close()
            total = all_reduce_sum(loss_sum)
            return EpochResult((total[0] / total[1]).item(), step, {
                "step": steps_before + step, "steps_per_epoch": steps_before + steps,
                "batch_size": args.batch_size, "loss_sum": total.tolist(),
                "rng": gather_rng_states(rng_state(generator, device))})
    loss_sum = all_reduce_sum(loss_sum)
    return EpochResult((loss_sum[0] / loss_sum[1]).item(), steps)


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, args,
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
            "dice": dice, "mean_fg_dice": float(np.nanmean(dice[LESIONS]))}


@torch.no_grad()
def validation_overlays(model: nn.Module, val_set: MammogramDataset, device: torch.device,
                        args, count: int = OVERLAYS) -> list[np.ndarray]:
    """image | truth | prediction of the first `count` validation mammograms (TensorBoard)."""
    model.eval()
    panels = []
    for index in range(min(count, len(val_set))):
        image, mask, _ = val_set[index]
        probs = predict_probabilities(model, image[None], device, model_config(args), args.amp,
                                      args.batch_size)
        panel = overlay_panel(image[0].numpy() / 65535, mask.numpy(),
                              probs[0].argmax(0).astype(np.uint8))
        panels.append(small_panel(panel))
    return panels


@contextmanager
def epoch_board(args, epochs_done: int, dist_info: DistInfo) -> Iterator[EpochBoard | None]:
    """--tensorboard's writer on rank 0, else None."""
    board = EpochBoard(args.checkpoint_dir, epochs_done) \
        if args.tensorboard and dist_info.is_main else None
    try:
        yield board
    finally:
        if board is not None:
            board.close()


# ----------------------------------------------------------------------------- the run


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
        sampler_type = EpochSampler if args.patch_size else ResumableSampler
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


def load_datasets(args, dist_info: DistInfo) -> tuple[Dataset, MammogramDataset]:
    """Train and val datasets with their cache built once (by rank 0, in parallel). In patch
    mode the training set yields patches and validation sees whole crops."""
    datasets = []
    for split, dataset in split_datasets(args).items():
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
    elif args.repeats > 1:
        train_set = ConcatDataset([train_set] * args.repeats)
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
        raise DatasetError(f"{len(train_set)} training mammograms, fewer than one batch")
    train_loader, train_sampler = make_loader(train_set, args, dist_info, True, device)
    val_loader, _ = make_loader(val_set, args, dist_info, False, device)

    config = model_config(args)
    steps_per_epoch = len(train_loader)
    model, optimizer, scheduler, scaler = build_training_state(
        args, device, None if checkpoint else args.pretrained,
        warmup_steps=max(1, round(args.warmup_epochs * steps_per_epoch)),
        total_steps=args.epochs * steps_per_epoch)
    start_epoch, best, ema, partial_epoch = 0, -1.0, None, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best_metric"]
        ema = checkpoint.get("ema_metric")
        partial_epoch = checkpoint.get("partial_epoch")  # preempted mid-epoch
        if partial_epoch is not None and partial_epoch["steps_per_epoch"] != steps_per_epoch:
            raise UsageError(f"the run stopped mid-epoch at {partial_epoch['steps_per_epoch']} "
                             f"steps an epoch, now {steps_per_epoch} (the training set changed):"
                             " resume it on its data, or start a new --checkpoint-dir")
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
        fold = "" if args.fold is None else f"fold {args.fold}: "
        print(f"{fold}training {args.backbone} DeepLabV3+ on {len(train_set)} "
              f"{'patches' if args.patch_size else 'mammograms'} per epoch "
              f"({len(val_set)} val mammograms) at {inputs}, {dist_info.world_size} "
              f"process(es) on {device}, epochs {start_epoch + 1}..{args.epochs}")

    def run_state(epochs_done: int) -> dict:
        """last.pth / best.pth: everything --resume and the test script need."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epochs_done - 1, "best_metric": best, "ema_metric": ema,
                "config": config, "args": plain_args(args), "data": data, "fold": args.fold}

    row, last_path = {}, args.checkpoint_dir / "last.pth"
    with PreemptionWatch() as watch, epoch_board(args, start_epoch, dist_info) as board:
        for epoch in range(start_epoch, args.epochs):
            start = time.perf_counter()
            # Everything random in an epoch derives from (seed, epoch): resuming replays it.
            torch.manual_seed(derive_seed(TORCH_SEED, args.seed, epoch))
            train_sampler.set_epoch(epoch)
            generator = torch.Generator().manual_seed(
                derive_seed(AUGMENT_SEED, args.seed, epoch, dist_info.rank))
            resumed = partial_epoch if epoch == start_epoch else None
            if resumed is not None:
                train_sampler.skip = resumed["step"] * args.batch_size
            result = train_one_epoch(trained, train_loader, optimizer, scheduler, scaler,
                                     device, args, generator, dist_info, watch, resumed)
            if result.stopped_at is not None:
                if dist_info.is_main:
                    save_checkpoint({**run_state(epoch), "partial_epoch": result.stopped_at},
                                    last_path)
                barrier()
                raise PreemptedError(f"{watch.signal_name} in epoch {epoch + 1}, after step "
                                     f"{result.stopped_at['step']}: {last_path} holds it")
            train_seconds = time.perf_counter() - start
            # The plain model: ranks may see different numbers of val batches, and DDP's
            # forward would wait for the others.
            broadcast_buffers(model)  # every rank validates the model rank 0 saves
            val = validate(model, val_loader, device, args, dist_info)
            seconds = time.perf_counter() - start
            ema = update_ema(ema, val["mean_fg_dice"])
            row = {"epoch": epoch + 1, "lr": last_step_lr(scheduler),
                   "train_loss": round(result.loss, 5), "val_loss": round(val["val_loss"], 5),
                   **{f"dice_{name}": round(float(d), 4) for name, d
                      in zip(CLASS_NAMES[LESIONS], val["dice"][LESIONS], strict=True)},
                   "mean_fg_dice": round(val["mean_fg_dice"], 4),
                   "ema_fg_dice": round(math.nan if ema is None else ema, 4),
                   "seconds": round(seconds, 1),
                   "train_images_per_s": round(result.steps_taken * args.batch_size
                                               * dist_info.world_size / train_seconds, 2)}
            improved = ema is not None and ema > best
            if improved:
                best = ema
            if dist_info.is_main:
                append_csv_row(log_path, row)
                plot_training_curves(log_path, args.checkpoint_dir / "training_curves.png")
                if board is not None:
                    board.log_epoch(row, validation_overlays(model, val_set, device, args))
                state = {**run_state(epoch + 1), "val_dice": [float(d) for d in val["dice"]]}
                save_checkpoint(state, last_path)
                if improved:
                    save_checkpoint(state, args.checkpoint_dir / "best.pth")
                print(f"epoch {epoch + 1}/{args.epochs}  train loss {result.loss:.4f}  "
                      f"val loss {val['val_loss']:.4f}  val Dice " + "  ".join(
                          f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("dice_"))
                      + f"  mean {val['mean_fg_dice']:.3f}  EMA {row['ema_fg_dice']:.3f}"
                      f"{'  *best' if improved else ''}  "
                      f"({seconds:.0f} s)")
            barrier()
            # A signal during validation or the checkpoint write: stop at this epoch's end.
            if epoch + 1 < args.epochs and watch.requested(device):
                raise PreemptedError(f"{watch.signal_name} in epoch {epoch + 1}: {last_path} "
                                     "holds it")
    return row


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when the run finished, 2 for a usage error (found before any long work), 1
    when the run failed (an unreadable DICOM, a full disk), EXIT_PREEMPTED (75) when a
    preemption signal stopped it with last.pth written (resume it with --resume)."""
    try:
        train(*parse_args(argv))
    except PreemptedError as stop:
        print(f"preempted: {stop}; continue with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except (UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DatasetError, DiskFullError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


