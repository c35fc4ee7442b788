"""training.main under torchrun, with probes for test_training's DDP tests (gloo on CPU):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_probe.py OUT ...

Each rank writes OUT/rank<RANK>.json, the training images it read in each epoch (a list per
epoch; needs --workers 0), and OUT/rank<RANK>.pt, the soft Dice loss of its half of
dice_batch() pooled over the ranks, and that half's gradient (computed once the process group
is up, before the first epoch).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import training
from dataset import MammogramDataset


def dice_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of 4 images; benign only in the first two, calc only in the last."""
    logits = torch.randn(4, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(4, 8, 6, dtype=torch.long)
    target[0, 2:5, 1:4] = 1
    target[2, 5:7, 0:2] = 2
    target[3, 1:3, 2:5] = 3
    return logits, target


def pooled_soft_dice(rank: int, out: Path) -> None:
    logits, target = dice_batch()
    share = slice(2 * rank, 2 * rank + 2)
    local = logits[share].clone().requires_grad_()
    loss = training.soft_dice_loss(local, target[share], pool_ranks=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local.grad}, out / f"rank{rank}.pt")


def main(out: Path, argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    reads: list[list[str]] = []
    in_training = [False]
    real_epoch, real_getitem = training.train_one_epoch, MammogramDataset.__getitem__

    def train_one_epoch(*args, **kwargs):
        if not reads:
            pooled_soft_dice(rank, out)
        reads.append([])
        in_training[0] = True
        try:
            return real_epoch(*args, **kwargs)
        finally:
            in_training[0] = False

    def getitem(self: MammogramDataset, index: int):
        if in_training[0]:
            reads[-1].append(self.mammograms[index].img_path)
        return real_getitem(self, index)

    training.train_one_epoch = train_one_epoch
    MammogramDataset.__getitem__ = getitem
    code = training.main(argv)
    (out / f"rank{rank}.json").write_text(json.dumps(reads))
    return code


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), sys.argv[2:]))
