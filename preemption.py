"""Preemption: a cluster scheduler's warning signal ends a training run at a step boundary.

SLURM (`--signal`), Kubernetes and most schedulers send SIGTERM (or a chosen signal such as
SIGUSR1) some time before they kill a job. While a PreemptionWatch is active those signals only
raise a flag: the training loop finishes the step in progress, writes last.pth with the step
reached within the epoch and every random stream's state, and exits with EXIT_PREEMPTED, so a
requeued job's `--resume` continues from that step and ends with the same weights as a run that
was never interrupted. See docs/preemption.md for a SLURM script.
"""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later", what a requeue script tests
DDP_CHECK_EVERY = 10  # steps between the ranks' comparisons of their flags (each waits for the GPU)


class PreemptedError(Exception):
    """Raised once last.pth is written after a preemption signal."""


class PreemptionWatch:
    """While entered, PREEMPT_SIGNALS set `signal_name` instead of ending the process.

    DataLoader workers forked inside it inherit the handler, so a signal sent to the whole
    process group does not end them before the step in progress has its batch.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionWatch:
        for signum in PREEMPT_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, device: torch.device, step: int | None = None) -> bool:
        """Whether any rank got a signal. Under DDP every rank must ask at the same points; at a
        training step (`step` given) they compare flags every DDP_CHECK_EVERY steps only."""
        stop = self.signal_name is not None
        if dist.is_available() and dist.is_initialized():
            if step is not None and step % DDP_CHECK_EVERY:
                return False
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signal_name is None:
                self.signal_name = "a signal to another rank"
        return stop


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """This rank's random streams mid-epoch: augmentation and the global ones (dropout)."""
    state = {"augment": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(state: dict) -> list[dict]:
    """Every rank's rng_state, in rank order, on every rank (one process: [state])."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
