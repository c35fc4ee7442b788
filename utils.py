"""Small shared helpers: checkpoints, seeding, distributed set-up, atomic writes, devices, and
the training log (a timestamped copy of the screen, step timings)."""

from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import os
import pickle
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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


class UsageError(Exception):
    """A flag or path that cannot work, found before any long work: the message names the flag
    or file and the fix. Every script exits with code 2 for it, with 1 for a failure during the
    work and 0 on success."""


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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (hex), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision --amp means on this device: auto is bf16 on CUDA, none on CPU."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    return amp


def autocast_for(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast context for --amp on this device (see resolve_amp)."""
    amp = resolve_amp(amp, device)
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
        raise UsageError(f"--device {name} asked for, but CUDA is not available here: pass "
                         "--device cpu")
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


# ----------------------------------------------------------------------------- training log


class TeeStdout:
    """Within `with`, every line printed to stdout is also kept, stamped with the time: in
    memory until open(path) names its file (a run that fails before its folder is ready leaves
    none), then appended there as it comes. Disabled, it does nothing (ranks other than 0)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.screen: TextIO = sys.stdout
        self.file: TextIO | None = None
        self.kept: list[str] = []  # stamped lines before open()
        self.pending = ""

    def __enter__(self) -> TeeStdout:
        if self.enabled:
            self.screen, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            sys.stdout = self.screen
            self._log([self.pending] if self.pending else [])
            if self.file is not None:
                self.file.close()

    def open(self, path: Path) -> None:
        """Append the lines so far and every later one to `path`."""
        if self.enabled:
            self.file = path.open("a", encoding="utf-8")
            self.file.writelines(self.kept)
            self.file.flush()

    def write(self, text: str) -> int:
        self.screen.write(text)
        if self.enabled:
            *lines, self.pending = (self.pending + text).split("\n")
            self._log(lines)
        return len(text)

    def _log(self, lines: list[str]) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        stamped = [f"{stamp}  {line}\n" for line in lines]
        if self.file is None:
            self.kept += stamped
        else:
            self.file.writelines(stamped)
            self.file.flush()  # a run killed later keeps every line so far

    def flush(self) -> None:
        self.screen.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno...: the screen's
        return getattr(self.screen, name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, else this process's peak resident memory (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # Linux: the high-water mark of this process's own memory. ru_maxrss is not: a
        # spawned process starts from its parent's peak (fork, then exec keeps it).
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status
                        if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS: bytes


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
