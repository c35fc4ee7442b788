"""Small shared helpers: checkpoints, seeding, distributed set-up, atomic writes, devices, and
the training log (a timestamped copy of the screen, step timings)."""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(Exception):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- files


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path) then rename over path, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint dict, loaded without unpickling code (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a .pth the training script wrote")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model/config)")
    return checkpoint


def check_config_matches(saved: dict, wanted: dict, source: Path) -> None:
    """Refuse to load weights into a model built differently (backbone, classes, size...)."""
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"{source} was trained with {key}={saved[key]!r}, not {value!r}: "
                f"pass the matching flag or start a new --checkpoint-dir"
            )


def append_csv_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


# ----------------------------------------------------------------------------- command lines


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only where a default says something (not for None or switches)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --amp, the same for every script that runs the model."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                        help="autocast precision: auto = bf16 on CUDA, none on CPU")


# ----------------------------------------------------------------------------- randomness, devices


def autocast_for(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast context for --amp on this device (auto: bf16 on CUDA, none on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but CUDA is not available here")
    return device


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op otherwise."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    # Rank 0 builds the preprocessing cache while the others wait at a barrier: on the full
    # data set that can take longer than the default 10-minute collective timeout.
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            timeout=timedelta(hours=3))
    return info


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- training log


class TeeStdout:
    """Within `with`, every line printed to stdout also goes to `path` (appended), stamped with
    the time; disabled, it does nothing (e.g. on ranks other than 0)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.screen: TextIO = sys.stdout
        self.file: TextIO | None = None
        self.pending = ""

    def __enter__(self) -> TeeStdout:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
            self.screen, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            sys.stdout = self.screen
            self._log([self.pending] if self.pending else [])
            self.file.close()
            self.file = None

    def write(self, text: str) -> int:
        self.screen.write(text)
        if self.file is not None:
            *lines, self.pending = (self.pending + text).split("\n")
            self._log(lines)
        return len(text)

    def _log(self, lines: list[str]) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.file.writelines(f"{stamp}  {line}\n" for line in lines)
        self.file.flush()  # a run killed later keeps every line so far

    def flush(self) -> None:
        self.screen.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno...: the screen's
        return getattr(self.screen, name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, else this process's peak resident memory (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KB


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class StepLog:
    """The training loader, wrapped: every `every` steps and at each epoch's end it prints
    (torchvision MetricLogger style) the mean time waiting for data and computing the step,
    images/s, the run's ETA and peak memory. Each iteration is one epoch; the ETA counts the
    epochs after it at the last epoch's whole wall time (validation included)."""

    def __init__(self, loader: Iterable, every: int, epochs: int, start_epoch: int,
                 images_per_step: int, device: torch.device, enabled: bool = True) -> None:
        self.loader, self.every, self.epochs = loader, every, epochs
        self.epoch = start_epoch
        self.images_per_step, self.device, self.enabled = images_per_step, device, enabled
        self.epoch_started: float | None = None
        self.epoch_seconds: float | None = None  # the last whole epoch, validation included

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset...: the loader's
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        now = time.perf_counter()
        if self.epoch_started is not None:
            self.epoch_seconds = now - self.epoch_started
        self.epoch_started, self.epoch = now, self.epoch + 1
        steps, window, data, compute = len(self.loader), 0, 0.0, 0.0
        end = now
        for step, batch in enumerate(self.loader, start=1):
            fetched = time.perf_counter()
            data += fetched - end
            yield batch
            if self.device.type == "cuda" and (step % self.every == 0 or step == steps):
                torch.cuda.synchronize(self.device)  # the step's kernels, not just their launch
            end = time.perf_counter()
            compute += end - fetched
            window += 1
            if self.enabled and (step % self.every == 0 or step == steps):
                self._print(step, steps, window, data, compute, end)
                window, data, compute = 0, 0.0, 0.0

    def _print(self, step: int, steps: int, window: int, data: float, compute: float,
               now: float) -> None:
        per_step = (now - self.epoch_started) / step
        later_epochs = (self.epochs - self.epoch) * (self.epoch_seconds or steps * per_step)
        eta = (steps - step) * per_step + later_epochs
        print(f"epoch {self.epoch}/{self.epochs} step {step}/{steps}  "
              f"data {data / window:.3f} s  step {compute / window:.3f} s  "
              f"{self.images_per_step * window / (data + compute):.1f} img/s  "
              f"eta {_duration(eta)}  peak {'CUDA' if self.device.type == 'cuda' else 'RSS'} "
              f"{peak_memory_mb(self.device):.0f} MB",
              flush=True)
