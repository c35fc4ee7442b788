"""How visible a lesion is: the contrast-to-noise figures that calibrate the realistic synthetic
profile and that `study.py visibility` measures on the arrays a model reads.

Region CNR (masses): (mean inside the ROI - mean of the surrounding ring) / spread of the ring,
where the ring is the lesion-free tissue within one equivalent radius / 2 (at least 3 px) of the
ROI. A reader sees a region CNR of about 1 only knowing where to look; 2-3 is plainly visible.

Speck CNR (calcifications): the high-passed image (minus a Gaussian blur of SPECK_BLUR px) at the
ROI's SPECK_RANK-th brightest pixel, over the high-passed ring's spread: how far its brightest
handful of specks stand out of the fine noise. Ordinary tissue of the ROI's size scores the
ring's quantile at the same rank (about 3 for a normal spread over ~10^4 px), so a cluster is
visible where it scores well above that.

Pure numpy/OpenCV: imported by synthetic.py and study.py, it imports nothing from the project.
"""

from __future__ import annotations

import cv2
import numpy as np

SPECK_BLUR = 2.0  # px: the high-pass keeps structure of about a calcification's size
SPECK_RANK = 10  # the 10th brightest pixel: a handful of specks, not one hot pixel


def ring(lesion: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """Lesion-free pixels within max(3, r / 2) px of `lesion` (r: its equivalent radius).

    lesion: bool mask of one lesion; lesions: bool mask of every lesion of the image.
    """
    radius = np.sqrt(lesion.sum() / np.pi)
    width = max(3, round(radius / 2))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1,) * 2)
    return (cv2.dilate(lesion.astype(np.uint8), kernel) > 0) & ~lesions


def region_cnr(image: np.ndarray, lesion: np.ndarray, around: np.ndarray) -> float:
    """(mean inside - mean of the ring) / spread of the ring; nan when either is empty."""
    if not lesion.any() or around.sum() < 2:
        return float("nan")
    background = image[around]
    return float((image[lesion].mean() - background.mean()) / max(background.std(), 1e-9))


def high_pass(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return image - cv2.GaussianBlur(image, (0, 0), SPECK_BLUR)


def speck_cnr(image: np.ndarray, lesion: np.ndarray, around: np.ndarray) -> tuple[float, float]:
    """(score of the ROI, score of ordinary tissue of its size): the SPECK_RANK-th brightest
    high-passed pixel over the ring's high-passed spread (see the module docstring); nan when
    either is empty."""
    if not lesion.any() or around.sum() < 2:
        return float("nan"), float("nan")
    detail = high_pass(image)
    background = detail[around]
    spread = max(float(background.std()), 1e-9)
    inside = detail[lesion]
    rank = min(SPECK_RANK, inside.size)
    level = 1 - rank / inside.size
    return (float(np.partition(inside, inside.size - rank)[inside.size - rank]) / spread,
            float(np.quantile(background, level)) / spread)
