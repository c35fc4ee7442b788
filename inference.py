"""One way to run a trained model over mammograms and map its output back to original pixels.

Whole-image checkpoints see the breast crop resized to their training size in one forward pass;
patch checkpoints see the crop at their cache scale through a sliding window of their patch size
(MONAI's sliding_window_inference: overlapping windows blended with Gaussian weights, batched).
The checkpoint's config says which, so validation, the test script and predict.py infer the way
the model was trained with no extra flags.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from augmentation import normalize_input, unit_range
from preprocessing import Resolution, prepare_image, restore_to_original
from utils import autocast_for


def resolution_of(config: dict) -> Resolution:
    """The cache resolution a checkpoint was trained at: a scale (patch mode) or a size."""
    return float(config["scale"]) if config.get("patch_size") else tuple(config["size"])


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, config: dict, amp: str = "auto",
                   windows_per_batch: int = 4) -> torch.Tensor:
    """Logits (N, C, H, W) float32 for images (N, 1, H, W) in [0, 1] on the model's device."""
    device = images.device

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, amp):
            return model(normalize_input(batch)).float()

    if not config.get("patch_size"):
        return forward(images)
    return sliding_window_inference(
        images, roi_size=tuple(config["patch_size"]), sw_batch_size=windows_per_batch,
        predictor=forward, overlap=config.get("sw_overlap", 0.25), mode="gaussian",
        padding_mode="constant", cval=0.0)


def predict_probabilities(model: nn.Module, images: torch.Tensor, device: torch.device,
                          config: dict, amp: str = "auto",
                          windows_per_batch: int = 4) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 on the CPU for uint16 images as cached."""
    logits = predict_logits(model, unit_range(images.to(device)), config, amp, windows_per_batch)
    return logits.softmax(1).cpu().numpy()


def predict_image(model: nn.Module, image: np.ndarray, device: torch.device, config: dict,
                  amp: str = "auto", windows_per_batch: int = 4) -> tuple[np.ndarray, dict]:
    """(C, h, w) probabilities of one original mammogram at the checkpoint's resolution, and
    the geometry (prepare_image's meta) that predict_at_original needs."""
    prepared, meta = prepare_image(image, resolution_of(config), config["canonical_flip"])
    batch = torch.from_numpy(prepared)[None, None]
    return predict_probabilities(model, batch, device, config, amp, windows_per_batch)[0], meta


def predict_at_original(probs: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(class map uint8, abnormality probability) at the original mammogram's pixels.

    Probabilities (C, H, W) at the model's resolution are interpolated back through the breast
    crop and flip; outside the crop every probability is 0, so the argmax there is background.
    """
    restored = restore_to_original(np.ascontiguousarray(probs.transpose(1, 2, 0)), meta,
                                   cv2.INTER_LINEAR)
    # Summed lesion classes, not 1 - p(background): outside the crop both are 0, not 1.
    return restored.argmax(-1).astype(np.uint8), restored[..., 1:].sum(-1)
