"""Small shared helpers: checkpoints, seeding, distributed set-up, atomic writes, devices."""

from __future__ import annotations

import argparse
import csv
import os
import random
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

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


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --amp, the same for every script that runs the model."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                        help="autocast precision: auto = bf16 on CUDA, none on CPU")


# ----------------------------------------------------------------------------- randomness, devices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*entropy: int) -> int:
    """A 62-bit seed from np.random.SeedSequence(entropy): distinct tuples give unrelated streams,
    where seed + epoch would give run s's epoch e + 1 the stream of run s + 1's epoch e. Pass a
    fixed-length tuple per use (trailing zeros do not change a SeedSequence); 62 bits leave room
    for DistributedSampler's seed + epoch."""
    state = np.random.SeedSequence([e % 2**64 for e in entropy]).generate_state(1, np.uint64)
    return int(state[0] >> 2)


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


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them at the
    start of each forward, but each rank's last training forward then updates its own copy: without
    this, validation on the other ranks would use statistics the saved model does not have."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
