"""--tensorboard: a training run's curves and a few validation overlays as TensorBoard events.

    tensorboard --logdir checkpoint        # then open http://localhost:6006

Per epoch, into checkpoint-dir/tensorboard/: loss/train, loss/val, lr, dice/<class> (pooled
validation Dice), dice/mean, dice/ema (what picks best.pth), images_per_s, and
validation/<k>: the first OVERLAYS validation mammograms as image | truth | prediction. The
tensorboard package is optional (requirements-dev.txt); log.csv and training_curves.png are
written with or without it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from utils import UsageError

TENSORBOARD_DIR = "tensorboard"
OVERLAYS = 3
OVERLAY_ROWS = 384  # px: TensorBoard shows images at their size


def check_tensorboard() -> None:
    """UsageError before any long work when --tensorboard cannot be honoured."""
    try:
        import tensorboard  # noqa: F401 - SummaryWriter needs it
    except ImportError as error:
        raise UsageError("--tensorboard needs the tensorboard package: pip install "
                         "tensorboard==2.21.0 (as in requirements-dev.txt), or leave the flag "
                         "out") from error


class EpochBoard:
    """The event writer of one run folder; epochs are TensorBoard's steps (1-based)."""

    def __init__(self, run_folder: Path, epochs_done: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what a killed one logged after its checkpoint, as log.csv does.
        self.writer = SummaryWriter(run_folder / TENSORBOARD_DIR, purge_step=epochs_done + 1)

    def log_epoch(self, row: dict, overlays: list[np.ndarray]) -> None:
        """row: the epoch's log.csv row; overlays: RGB uint8 panels."""
        step = row["epoch"]
        scalars = {"loss/train": row["train_loss"], "loss/val": row["val_loss"],
                   "lr": row["lr"], "dice/mean": row["mean_fg_dice"],
                   "dice/ema": row["ema_fg_dice"], "images_per_s": row["train_images_per_s"],
                   **{f"dice/{key[5:]}": value for key, value in row.items()
                      if key.startswith("dice_")}}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for k, panel in enumerate(overlays):
            self.writer.add_image(f"validation/{k}", panel, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def small_panel(panel: np.ndarray) -> np.ndarray:
    """An overlay panel at most OVERLAY_ROWS tall."""
    height, width = panel.shape[:2]
    if height <= OVERLAY_ROWS:
        return panel
    size = (max(1, round(width * OVERLAY_ROWS / height)), OVERLAY_ROWS)
    return cv2.resize(panel, size, interpolation=cv2.INTER_AREA)
