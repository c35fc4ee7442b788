"""Mammograms from the retrieval CSVs, preprocessed once into a disk cache, and their augmentation.

One sample is one mammogram: every ROI of it is merged into one 4-class mask (0 background,
1 benign, 2 malignant mass, 3 malignant calcification; the higher id wins where ROIs overlap).
Preprocessing (decode, breast crop, canonical flip, robust intensity scaling, resize) runs once
per mammogram and is cached as uint16 .npy keyed by its sources, size and PREPROCESS_VERSION;
epochs after the first read the cache. Augmentation runs batched on the training device.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from main_retrieval import CSV_COLUMNS, SCHEMA_VERSION, SIDECAR_NAME
from utils import atomic_write

PREPROCESS_VERSION = 3  # 3: centre-aligned nearest for every label resize
NUM_CLASSES = 4
# Inputs in [0, 1] are standardised with these before the model (see normalize_input).
INPUT_MEAN, INPUT_STD = 0.45, 0.25


class DatasetError(Exception):
    """Input the dataset cannot use: the message names the file and the fix."""


@dataclass(frozen=True)
class Mammogram:
    """One full mammogram with all of its ROI masks (paths relative to the data root)."""

    img_path: str
    roi_paths: tuple[str, ...]
    class_ids: tuple[int, ...]
    patient_id: str
    collection: str


@dataclass
class Preprocessed:
    image: np.ndarray  # uint16 (H, W), breast cropped, flipped to canonical side, resized
    mask: np.ndarray  # uint8 (H, W) class ids
    meta: dict = field(default_factory=dict)  # original_shape, box, flipped, masks_resized,
    # rois_lost (ROIs with no pixel left after the crop and resize)


# ----------------------------------------------------------------------------- CSVs


def read_split_csv(path: Path) -> tuple[pd.DataFrame, Path]:
    """Rows of a retrieval CSV and the data root its sidecar records; checks the schema."""
    sidecar_path = path.parent / SIDECAR_NAME
    if not path.is_file():
        raise DatasetError(f"no CSV at {path}: run main_retrieval.py --out-dir {path.parent}")
    if not sidecar_path.is_file():
        raise DatasetError(f"{sidecar_path} is missing: re-run main_retrieval.py to write it")
    sidecar = json.loads(sidecar_path.read_text())
    rows = pd.read_csv(path, dtype={"patient_id": str, "img_path": str, "roi_path": str})
    if sidecar.get("schema_version") != SCHEMA_VERSION or list(rows.columns) != CSV_COLUMNS:
        raise DatasetError(
            f"{path} was written by another version of main_retrieval.py (schema "
            f"{sidecar.get('schema_version')}, expected {SCHEMA_VERSION}): re-run it"
        )
    return rows, Path(sidecar["data_root"])


def group_mammograms(rows: pd.DataFrame) -> list[Mammogram]:
    """One Mammogram per distinct img_path, in first-seen order, with every ROI of its view.

    CBIS-DDSM publishes a breast view that has both a mass and a calcification twice, once in
    each collection, each copy annotated for its own type only. Each copy's target gets the ROIs
    of both (same patient, side, view and split), so neither lesion is background in either.
    """
    view = [rows["patient_id"].astype(str), rows["side"], rows["view"], rows["split"]]
    rois_of_view = {key: group for key, group in rows.groupby(view, sort=False)}
    mammograms = []
    for img_path, group in rows.groupby("img_path", sort=False):
        first = group.iloc[0]
        rois = rois_of_view[(str(first["patient_id"]), first["side"], first["view"],
                             first["split"])]
        mammograms.append(Mammogram(
            img_path=img_path,
            roi_paths=tuple(rois["roi_path"]),
            class_ids=tuple(int(c) for c in rois["class_id"]),
            patient_id=str(first["patient_id"]),
            collection=str(first["collection"]),
        ))  # fmt: skip
    return mammograms


# ----------------------------------------------------------------------------- preprocessing


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # decoded with OpenCV; any other file is DICOM


def read_pixels(path: Path, label_map: bool = False) -> np.ndarray:
    """The 2-D pixels of a DICOM, PNG or JPEG file (8 or 16 bit; colour turned grey), bright =
    dense; errors name the file. Every later step windows 8-bit input like 16-bit.

    label_map: a mask, whose values are labels, not intensities: never inverted.
    """
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


def read_roi_masks(mammogram: Mammogram, data_root: Path,
                   shape: tuple[int, int]) -> tuple[list[np.ndarray], int]:
    """Each ROI as a boolean mask of `shape`; masks of another size are resized (nearest)."""
    masks, resized = [], 0
    for roi_path in mammogram.roi_paths:
        roi = read_pixels(data_root / roi_path, label_map=True)
        # Half the brightest level (> 127 for 0/255): JPEG blurs a mask's edges into grey levels.
        roi = roi > roi.max() / 2
        if roi.shape != shape:
            resized += 1
            roi = cv2.resize(roi.astype(np.uint8), shape[::-1],
                             interpolation=cv2.INTER_NEAREST_EXACT) > 0
        masks.append(roi)
    return masks, resized


def merge_masks(masks: list[np.ndarray], class_ids: tuple[int, ...]) -> np.ndarray:
    """One uint8 class map; where ROIs overlap the higher class id wins."""
    merged = np.zeros(masks[0].shape, np.uint8)
    for roi, cls in zip(masks, class_ids, strict=True):
        np.maximum(merged, roi.astype(np.uint8) * np.uint8(cls), out=merged)
    return merged


Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def breast_region(image: np.ndarray, work_size: int = 512) -> tuple[Box, bool]:
    """(y0, y1, x0, x1) box of the breast and whether its chest wall is on the right.

    On a downscaled copy: Otsu threshold, then the largest connected component is the breast;
    film labels and scanner marks are smaller separate components and fall outside the box.
    """
    height, width = image.shape
    scale = work_size / max(height, width)
    small = cv2.resize(image.astype(np.float32), (max(1, round(width * scale)),
                                                  max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA)
    small8 = cv2.normalize(small, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, foreground = cv2.threshold(small8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count < 2:
        return (0, height, 0, width), False
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = stats[largest, :4]
    breast = labels == largest
    half = breast.shape[1] // 2
    chest_wall_right = breast[:, half:].sum() > breast[:, :half].sum()
    margin = 2  # pixels of the small image, so the skin line stays inside
    y0, x0 = max(0, y - margin), max(0, x - margin)
    y1, x1 = min(small.shape[0], y + h + margin), min(small.shape[1], x + w + margin)
    box = (int(y0 / scale), min(height, math.ceil(y1 / scale)),
           int(x0 / scale), min(width, math.ceil(x1 / scale)))
    return box, bool(chest_wall_right)


def scale_intensities(image: np.ndarray) -> np.ndarray:
    """Robust window (0.5th-99.5th percentile of a subsample) to the full uint16 range."""
    sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
    low, high = np.percentile(sample, (0.5, 99.5))
    scaled = (image.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 65535).astype(np.uint16)


def prepare_image(image: np.ndarray, size: tuple[int, int],
                  canonical_flip: bool = True) -> tuple[np.ndarray, dict]:
    """Crop to the breast, flip the chest wall to the left, scale to uint16, resize to size.

    Returns the image and the geometry (original_shape, box, flipped) that apply_geometry
    applies to masks and restore_to_original inverts.
    """
    (y0, y1, x0, x1), chest_wall_right = breast_region(image)
    meta = {"original_shape": list(image.shape), "box": [y0, y1, x0, x1],
            "flipped": bool(canonical_flip and chest_wall_right)}
    cropped = scale_intensities(image[y0:y1, x0:x1])
    return apply_geometry(cropped, meta, size, cv2.INTER_AREA, cropped=True), meta


def apply_geometry(array: np.ndarray, meta: dict, size: tuple[int, int],
                   interpolation: int = cv2.INTER_NEAREST_EXACT, cropped: bool = False) -> np.ndarray:
    """The crop, flip and resize of prepare_image applied to another array (e.g. a mask)."""
    if not cropped:
        y0, y1, x0, x1 = meta["box"]
        array = array[y0:y1, x0:x1]
    if meta["flipped"]:
        array = array[:, ::-1]
    height, width = size
    return cv2.resize(np.ascontiguousarray(array), (width, height), interpolation=interpolation)


def preprocess(mammogram: Mammogram, data_root: Path, size: tuple[int, int],
               canonical_flip: bool = True) -> Preprocessed:
    """A mammogram and its merged mask, ready for the model (see prepare_image)."""
    image = read_pixels(data_root / mammogram.img_path)
    masks, resized = read_roi_masks(mammogram, data_root, image.shape)
    image, meta = prepare_image(image, size, canonical_flip)
    mask = apply_geometry(merge_masks(masks, mammogram.class_ids), meta, size)
    # A tiny ROI can fall between the pixels of the nearest-neighbour downscale: count it.
    lost = sum(not apply_geometry(roi.view(np.uint8), meta, size).any() for roi in masks)
    return Preprocessed(image, mask, {**meta, "masks_resized": resized, "rois_lost": lost})


def restore_to_original(array: np.ndarray, meta: dict, interpolation: int) -> np.ndarray:
    """Map a (H, W[, C]) array at training size back to the original mammogram's pixels.

    Inverse of preprocess: resize to the breast box, undo the flip, place into a zero canvas.
    """
    y0, y1, x0, x1 = meta["box"]
    restored = cv2.resize(array, (x1 - x0, y1 - y0), interpolation=interpolation)
    if meta["flipped"]:
        restored = restored[:, ::-1]
    canvas = np.zeros((*meta["original_shape"], *array.shape[2:]), array.dtype)
    canvas[y0:y1, x0:x1] = restored
    return canvas


# ----------------------------------------------------------------------------- cache


class PreprocessCache:
    """Preprocessed mammograms on disk: <key>.npy (uint16 [image, mask]) and <key>.json (meta).

    Writes go to a temporary file renamed into place, so many DataLoader workers or ranks can
    fill the cache at once and a killed run never leaves a half-written entry.
    """

    def __init__(self, cache_dir: Path, data_root: Path, size: tuple[int, int],
                 canonical_flip: bool = True) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data_root)
        self.size = tuple(size)
        self.canonical_flip = canonical_flip

    def key(self, mammogram: Mammogram) -> str:
        source = [str(self.data_root / mammogram.img_path), mammogram.roi_paths,
                  mammogram.class_ids, self.size, self.canonical_flip, PREPROCESS_VERSION]
        return hashlib.sha1(json.dumps(source).encode()).hexdigest()[:20]

    def paths(self, mammogram: Mammogram) -> tuple[Path, Path]:
        key = self.key(mammogram)
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def load(self, mammogram: Mammogram) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) from the cache, preprocessing and storing them first on a miss."""
        array_path, _ = self.paths(mammogram)
        if not array_path.exists():
            self.build(mammogram)
        stacked = np.load(array_path)
        return stacked[0], stacked[1].astype(np.uint8)

    def meta(self, mammogram: Mammogram) -> dict:
        _, meta_path = self.paths(mammogram)
        if not meta_path.exists():
            self.build(mammogram)
        return json.loads(meta_path.read_text())

    def build(self, mammogram: Mammogram) -> dict:
        result = preprocess(mammogram, self.data_root, self.size, self.canonical_flip)
        array_path, meta_path = self.paths(mammogram)
        # Meta first: an entry counts as present once its .npy exists.
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(result.meta)))

        def save_array(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a name
                np.save(f, np.stack([result.image, result.mask]))

        atomic_write(array_path, save_array)
        return result.meta

    def missing(self, mammograms: list[Mammogram]) -> list[Mammogram]:
        return [m for m in mammograms if not self.paths(m)[0].exists()]


def _build_entry(cache: PreprocessCache, mammogram: Mammogram) -> tuple[dict | None, str | None]:
    try:
        return cache.build(mammogram), None
    except DatasetError as error:
        return None, str(error)


@dataclass
class PrepareReport:
    built: int = 0
    cached: int = 0
    masks_resized: int = 0
    rois_lost: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (img_path, error)


def prepare_cache(cache: PreprocessCache, mammograms: list[Mammogram], workers: int = 0,
                  skip_unreadable: bool = False, progress: bool = True) -> PrepareReport:
    """Fill the cache for `mammograms` (in parallel processes when workers > 0).

    An unreadable DICOM raises DatasetError naming it, or with skip_unreadable is recorded in
    report.skipped (the caller drops that mammogram).
    """
    todo = cache.missing(mammograms)
    report = PrepareReport(cached=len(mammograms) - len(todo))
    if not todo:
        return report
    bar = tqdm(total=len(todo), desc="preprocessing (once)", unit="img", disable=not progress)
    if workers > 0:
        # One OpenCV thread per process: the processes already use every core.
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                   initializer=cv2.setNumThreads, initargs=(1,))
        results = pool.map(_build_entry, [cache] * len(todo), todo, chunksize=4)
    else:
        pool, results = None, (_build_entry(cache, m) for m in todo)
    try:
        for mammogram, (meta, error) in zip(todo, results, strict=True):
            bar.update()
            if error is None:
                report.built += 1
                report.masks_resized += meta["masks_resized"]
                report.rois_lost += meta["rois_lost"]
            elif skip_unreadable:
                report.skipped.append((mammogram.img_path, error))
            else:
                raise DatasetError(f"{error} (pass --skip-unreadable to skip such mammograms)")
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return report


# ----------------------------------------------------------------------------- dataset


class MammogramDataset(Dataset):
    """(image uint16 [1, H, W], mask uint8 [H, W], index) per mammogram.

    Samples stay in their compact cache types (a quarter of float32/int64's bytes through the
    DataLoader and to the device); unit_range converts images on the device.
    """

    def __init__(self, mammograms: list[Mammogram], cache: PreprocessCache) -> None:
        self.mammograms = list(mammograms)
        self.cache = cache

    @classmethod
    def from_csv(cls, csv_path: Path, cache_dir: Path, size: tuple[int, int],
                 canonical_flip: bool = True, data_root: Path | None = None) -> MammogramDataset:
        rows, recorded_root = read_split_csv(csv_path)
        cache = PreprocessCache(cache_dir, data_root or recorded_root, size, canonical_flip)
        return cls(group_mammograms(rows), cache)

    def prepare(self, workers: int = 0, skip_unreadable: bool = False,
                progress: bool = True) -> PrepareReport:
        """Preprocess every mammogram into the cache; drop the skipped ones from the dataset."""
        report = prepare_cache(self.cache, self.mammograms, workers, skip_unreadable, progress)
        if report.skipped:
            bad = {img_path for img_path, _ in report.skipped}
            self.mammograms = [m for m in self.mammograms if m.img_path not in bad]
        return report

    def __len__(self) -> int:
        return len(self.mammograms)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.cache.load(self.mammograms[index])
        return torch.from_numpy(image).unsqueeze(0), torch.from_numpy(mask), index

    def meta(self, index: int) -> dict:
        return self.cache.meta(self.mammograms[index])


# ----------------------------------------------------------------------------- augmentation


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
