"""One way to run a trained model over mammograms and map its output back to original pixels,
and the checkpoint loading that gives that model.

Whole-image checkpoints see the breast crop resized to their training size in one forward pass;
patch checkpoints see the crop at their cache scale through a sliding window of their patch size
(MONAI's sliding_window_inference: overlapping windows blended with Gaussian weights, batched).
The checkpoint's config says which, so validation, the test script and predict.py infer the way
the model was trained with no extra flags.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from augmentation import normalize_input, unit_range
from cbis import LESIONS
from model import build_model
from preprocessing import PREPROCESS_VERSION, Resolution, prepare_image, restore_to_original
from utils import CheckpointError, autocast_for, load_checkpoint


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
    return restored.argmax(-1).astype(np.uint8), restored[..., LESIONS].sum(-1)


# ----------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(name: str, checkpoint_dir: Path) -> Path:
    """--checkpoint as a path, else as the name of a file inside --checkpoint-dir."""
    path = Path(name)
    if path.is_file():
        return path
    if (checkpoint_dir / name).is_file():
        return checkpoint_dir / name
    raise CheckpointError(f"no checkpoint {name!r} (looked in . and {checkpoint_dir}): "
                          "pass a path or a file name inside --checkpoint-dir")


def load_trained_model(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The model a checkpoint describes, with its weights, in eval mode; and its config."""
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    if config.get("preprocess_version") != PREPROCESS_VERSION:
        raise CheckpointError(
            f"{path} was trained on preprocessing version {config.get('preprocess_version')}, "
            f"this code makes version {PREPROCESS_VERSION}: use the matching release")
    model = build_model(config["backbone"], config["num_classes"], config["in_channels"],
                        config["output_stride"], decoder_channels=config["decoder_channels"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit a {config['backbone']} DeepLabV3+ with "
                              f"{config['num_classes']} classes: {error}") from error
    return model.to(device).eval(), config
