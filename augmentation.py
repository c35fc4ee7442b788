"""What happens to a batch on the training device before the model: uint16 images to [0, 1],
batched random flips, small affine and contrast/gamma (training only), and standardisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Inputs in [0, 1] are standardised with these before the model (see normalize_input).
INPUT_MEAN, INPUT_STD = 0.45, 0.25


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint16 images (as cached) -> float32 in [0, 1]."""
    return images.float().div_(65535)


def normalize_input(images: torch.Tensor) -> torch.Tensor:
    return (images - INPUT_MEAN) / INPUT_STD


def augment_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                  max_rotation: float = 10.0, max_scale: float = 0.1, max_shift: float = 0.05,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random vertical flip, small affine and contrast/gamma, batched on the images' device.

    images (N, 1, H, W) float in [0, 1]; masks (N, H, W) uint8, warped with nearest neighbour.
    Random draws come from `generator` (CPU) so a resumed run replays the same augmentations.
    """
    n, _, height, width = images.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = torch.deg2rad(uniform(-max_rotation, max_rotation))
    scale = uniform(1 - max_scale, 1 + max_scale)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift_x, shift_y = uniform(-max_shift, max_shift) * 2, uniform(-max_shift, max_shift) * 2
    # Rotation in pixel units, expressed in affine_grid's normalised [-1, 1] coordinates.
    aspect = height / width
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin * aspect, shift_x], dim=1),
        torch.stack([sin / aspect * flip, cos * flip, shift_y], dim=1),
    ], dim=1).to(images.device)  # fmt: skip
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Bilinear weights sum to 1 and padding is 0, so warped images stay in [0, 1].
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].to(torch.uint8)
    gamma = torch.exp(uniform(-0.3, 0.3)).to(images.device).view(n, 1, 1, 1)
    contrast = uniform(0.85, 1.15).to(images.device).view(n, 1, 1, 1)
    # In place: at 1024x640 every extra full-size temporary costs as much as the warp.
    images.pow_(gamma).sub_(0.5).mul_(contrast).add_(0.5).clamp_(0, 1)
    return images, masks
