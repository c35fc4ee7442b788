"""Small shared helpers: checkpoints, seeding, distributed set-up, atomic writes, devices."""

from __future__ import annotations

import argparse
import csv
import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(Exception):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


class UsageError(Exception):
    """A flag or path that cannot work, found before any long work: the message names the flag
    or file and the fix; the scripts exit with code 2."""


class DiskFullError(OSError):
    """A write that failed for want of space; the message names the folder and its free space."""


# ----------------------------------------------------------------------------- files

# mkstemp's names: "." + the file's name + "." + 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_LOW_SPACE = 1 << 20  # bytes: below this a writer's error without an errno means "disk full"


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) then rename over path, so a crash never leaves half a file."""
    atomic_write_all({path: write})


def atomic_write_all(writes: dict[Path, Callable[[str], Any]]) -> None:
    """Each write(tmp_path) into a hidden temporary file beside its path, then every rename:
    a crash never leaves half a file, and a failed write leaves none of the set.

    Files get the mode open() would give them (0666 less the umask), not mkstemp's 0600; a full
    disk raises DiskFullError naming the folder and its free space.
    """
    temps: dict[Path, str] = {}
    path = next(iter(writes), Path("."))
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                               suffix=".tmp")
            os.close(fd)
            os.chmod(temps[path], 0o666 & ~current_umask())
            write(temps[path])
        for target, tmp in temps.items():
            os.replace(tmp, target)
    except BaseException as error:
        full = _is_disk_full(error, path.parent)
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                f"no space left on device writing {path}: {path.parent} has "
                f"{format_bytes(free_bytes(path.parent))} free; free some space there or "
                "write elsewhere") from error
        raise


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC or EDQUOT, or a writer that hides the errno (torch.save raises RuntimeError
    'basic_ios::clear' or '... requested and ... written') on a folder with no space left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, RuntimeError | OSError) and free_bytes(folder) < _LOW_SPACE


def current_umask() -> int:
    """The process umask, read from /proc where it can be (os.umask can only read it by
    setting it, for every thread at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def existing_ancestor(path: Path) -> Path:
    """path itself if it exists, else its nearest ancestor that does."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: Path) -> int:
    """Space the current user can still write in folder (or where it would be created)."""
    return shutil.disk_usage(existing_ancestor(folder)).free


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def check_writable_dir(folder: Path, flag: str) -> None:
    """Raise UsageError unless folder is, or can be created as, a folder this user can write
    to; nothing is created (a probe file comes and goes in the nearest existing ancestor)."""
    base = existing_ancestor(folder)
    if not base.is_dir():
        raise UsageError(f"cannot create {flag} {folder}: {base} is a file, not a folder; "
                         "choose another path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        where = "" if base == folder.absolute() else f" (its existing parent {base})"
        raise UsageError(f"cannot write to {flag} {folder}{where}: {error.strerror}; choose a "
                         "writable folder") from error


def clean_stale_tmp(folder: Path, min_age_s: float = 600.0) -> list[Path]:
    """Delete the hidden temporary files (.NAME.XXXXXXXX.tmp) that killed atomic writes left in
    folder, unmodified for min_age_s; returns them. Pass min_age_s=0 only where no other process
    can be writing into folder now (another run could be filling a shared cache)."""
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for entry in folder.iterdir():
        if not _TEMP_NAME.match(entry.name):
            continue
        try:
            if entry.is_file() and now - entry.stat().st_mtime >= min_age_s:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # its writer renamed or removed it just now
            continue
    return removed


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint dict, loaded without unpickling code (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a .pth the training script wrote")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error_reason(error)}; "
                              "pass a .pth the training script wrote") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model/config)")
    return checkpoint


def load_error_reason(error: Exception) -> str:
    """torch.load's error on one line (its weights_only refusal runs to a dozen lines)."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds pickled objects, not only tensors (refused: weights_only loading)"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
