"""Reading an image file and telling what it holds: the pixels of a DICOM, PNG or JPEG; whether a
file is DICOM (by its preamble, whatever its name); a full mammogram, a cropped image or an ROI
mask by its SeriesDescription, or a mask by its grey levels where nothing says. Shared by
retrieval, preprocessing and predict.py.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # decoded with OpenCV; any other file is DICOM


class DatasetError(Exception):
    """Input the pipeline cannot use: the message names the file and the fix."""


def read_pixels(path: Path, label_map: bool = False) -> np.ndarray:
    """The 2-D pixels of a DICOM, PNG or JPEG file (8 or 16 bit; colour turned grey), bright =
    dense; errors name the file. Every later step windows 8-bit input like 16-bit.

    label_map: a mask, whose values are labels, not intensities: never inverted.
    """
    if not path.is_file():
        raise DatasetError(f"no file {path}: if the data folder moved, pass --data-root with "
                           "its new place")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        level = cv2.getLogLevel()
        cv2.setLogLevel(0)  # the reason goes into our one-line error, not OpenCV's log lines
        try:
            data = np.fromfile(path, np.uint8)
            pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        except (OSError, cv2.error) as error:
            raise DatasetError(f"cannot read image {path}: {error}") from error
        finally:
            cv2.setLogLevel(level)
        if pixels is None:
            raise DatasetError(f"cannot read image {path}: not a PNG or JPEG image, or damaged")
        if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY if pixels.shape[2] == 3
                                  else cv2.COLOR_BGRA2GRAY)
    else:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for a damaged file
            raise DatasetError(f"cannot read DICOM {path}: {error}") from error
        if not label_map and ds.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = pixels.max() - pixels
    if pixels.ndim != 2:
        raise DatasetError(f"{path} is not a single grayscale image (pixels {pixels.shape})")
    return pixels


def is_dicom(path: Path) -> bool:
    """Whether a file starts with the DICOM preamble ('DICM' after 128 bytes), whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def kind_from_description(description: str) -> str | None:
    """"full", "crop" or "mask" as a SeriesDescription says, None where it says none of them."""
    text = description.lower()
    if "mask" in text:
        return "mask"
    if "crop" in text:
        return "crop"
    if "full" in text:
        return "full"
    return None


def looks_like_mask(pixels: np.ndarray) -> bool:
    """Nearly every pixel at the darkest or the brightest level (JPEG turns a mask's 0 and 255
    into a dozen grey levels near its edges); a crop or a mammogram spreads over many levels."""
    low, high = float(pixels.min()), float(pixels.max())
    band = 0.1 * (high - low)
    return bool(((pixels <= low + band) | (pixels >= high - band)).mean() >= 0.9)
