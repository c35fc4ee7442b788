"""Preprocessing a mammogram once, and the disk cache that keeps the result.

A mammogram and every ROI mask of it become one 4-class target (the higher class id wins where
ROIs overlap). Preprocessing decodes the image, crops it to the breast, flips the chest wall to
the left, windows the intensities robustly and resizes: to one fixed size (whole-image mode) or
by one factor, aspect kept (patch mode). The geometry is exact both ways: apply_geometry repeats
it on a mask, restore_to_original maps a prediction back to the original pixels.

The result is cached as .npy files keyed by its sources (paths, sizes, modification times), the
resolution and PREPROCESS_VERSION, built in parallel processes; epochs and runs after the first
read the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cbis import LESION_IDS
from imaging import DatasetError, read_pixels
from utils import atomic_write, clean_stale_tmp

PREPROCESS_VERSION = 5  # 3: centre-aligned nearest for labels; 4: scale mode, split files;
# 5: window up to the brightest breast pixel (no lesion clipped)
# Resolution of the cache: a fixed (H, W) every breast crop is resized to (whole-image mode), or
# a factor applied to the crop's own size, aspect kept (patch mode; 0.5 = half of native).
Resolution = tuple[int, int] | float
FOREGROUND_POINTS = 64  # lesion pixels remembered per class and mammogram, for patch centres


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
    meta: dict = field(default_factory=dict)  # original_shape, box, flipped, size, masks_resized,
    # rois_lost (ROIs with no pixel left after the crop and resize), foreground (class -> points)



# ----------------------------------------------------------------------------- preprocessing


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


def breast_region(image: np.ndarray, work_size: int = 512) -> tuple[Box, bool, np.ndarray]:
    """(y0, y1, x0, x1) box of the breast, whether its chest wall is on the right, and the
    breast's pixels on a downscaled copy of the box (bool, at most work_size per side).

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
        return (0, height, 0, width), False, np.ones(small.shape, bool)
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
    return box, bool(chest_wall_right), breast[y0:y1, x0:x1]


def scale_intensities(image: np.ndarray, breast: np.ndarray | None = None) -> np.ndarray:
    """Window to the full uint16 range: from the 0.5th percentile (the dark background) to the
    brightest pixel of the breast, so no lesion is clipped (lesions are the brightest pixels; a
    window ending at a percentile flattened the top of masses and calcifications).

    breast: bool mask of the breast at any size (stretched over the image); default: all of it.
    Film labels and scanner edges outside the breast may be clipped.
    """
    sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
    low = float(np.percentile(sample, 0.5))
    inside = None if breast is None else cv2.resize(
        breast.astype(np.uint8), image.shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT) > 0
    high = float(image[inside].max() if inside is not None and inside.any() else image.max())
    scaled = (image.astype(np.float32) - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 65535).astype(np.uint16)


def resized_shape(box: Box, resolution: Resolution) -> tuple[int, int]:
    """(H, W) a breast box is resized to: the fixed size, or the box scaled by the factor."""
    if isinstance(resolution, float | int) and not isinstance(resolution, bool):
        y0, y1, x0, x1 = box
        return max(1, round((y1 - y0) * resolution)), max(1, round((x1 - x0) * resolution))
    height, width = resolution
    return int(height), int(width)


def prepare_image(image: np.ndarray, resolution: Resolution,
                  canonical_flip: bool = True) -> tuple[np.ndarray, dict]:
    """Crop to the breast, flip the chest wall to the left, scale to uint16, resize.

    Returns the image and the geometry (original_shape, box, flipped, size) that apply_geometry
    applies to masks and restore_to_original inverts.
    """
    (y0, y1, x0, x1), chest_wall_right, breast = breast_region(image)
    meta = {"original_shape": list(image.shape), "box": [y0, y1, x0, x1],
            "flipped": bool(canonical_flip and chest_wall_right),
            "size": list(resized_shape((y0, y1, x0, x1), resolution))}
    cropped = scale_intensities(image[y0:y1, x0:x1], breast)
    return apply_geometry(cropped, meta, cv2.INTER_AREA, cropped=True), meta


def apply_geometry(array: np.ndarray, meta: dict, interpolation: int = cv2.INTER_NEAREST_EXACT,
                   cropped: bool = False) -> np.ndarray:
    """The crop, flip and resize of prepare_image applied to another array (e.g. a mask)."""
    if not cropped:
        y0, y1, x0, x1 = meta["box"]
        array = array[y0:y1, x0:x1]
    if meta["flipped"]:
        array = array[:, ::-1]
    height, width = meta["size"]
    return cv2.resize(np.ascontiguousarray(array), (width, height), interpolation=interpolation)


def foreground_points(mask: np.ndarray, rng: np.random.Generator,
                      count: int = FOREGROUND_POINTS) -> dict[str, list[list[int]]]:
    """Up to `count` random (y, x) pixels of each lesion class in mask, for patch centres."""
    points = {}
    for cls in LESION_IDS:
        ys, xs = np.nonzero(mask == cls)
        if len(ys):
            chosen = rng.choice(len(ys), size=min(count, len(ys)), replace=False)
            points[str(cls)] = np.stack([ys[chosen], xs[chosen]], 1).tolist()
    return points


def preprocess(mammogram: Mammogram, data_root: Path, resolution: Resolution,
               canonical_flip: bool = True) -> Preprocessed:
    """A mammogram and its merged mask, ready for the model (see prepare_image)."""
    image = read_pixels(data_root / mammogram.img_path)
    masks, resized = read_roi_masks(mammogram, data_root, image.shape)
    image, meta = prepare_image(image, resolution, canonical_flip)
    mask = apply_geometry(merge_masks(masks, mammogram.class_ids), meta)
    # A tiny ROI can fall between the pixels of the nearest-neighbour downscale: count it.
    lost = sum(not apply_geometry(roi.view(np.uint8), meta).any() for roi in masks)
    rng = np.random.default_rng(int(hashlib.sha1(mammogram.img_path.encode()).hexdigest(), 16))
    return Preprocessed(image, mask, {**meta, "masks_resized": resized, "rois_lost": lost,
                                      "foreground": foreground_points(mask, rng)})


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
    """Preprocessed mammograms on disk: <key>.json (meta), <key>.image.npy (uint16) and
    <key>.mask.npy (uint8); an entry counts as present once its mask file exists.

    Writes go to a temporary file renamed into place, so many DataLoader workers or ranks can
    fill the cache at once and a killed run never leaves a half-written entry. Separate files
    keep the mask at one byte per pixel and let patches be read by memory map.
    """

    def __init__(self, cache_dir: Path, data_root: Path, resolution: Resolution,
                 canonical_flip: bool = True) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data_root)
        self.resolution = resolution if isinstance(resolution, float) else tuple(resolution)
        self.canonical_flip = canonical_flip
        self._keys: dict[Mammogram, str] = {}

    def _source_stamp(self, relative: str) -> list:
        path = self.data_root / relative
        try:
            stat = path.stat()
        except OSError as error:
            raise DatasetError(
                f"cannot read {path}: {error.strerror}. If the CBIS-DDSM folder moved, pass "
                f"its new location with --data-root") from None
        return [str(path), stat.st_size, stat.st_mtime_ns]

    def key(self, mammogram: Mammogram) -> str:
        """Changes with any source file's path, size or modification time (a re-download)."""
        if mammogram not in self._keys:
            sources = [self._source_stamp(p) for p in (mammogram.img_path, *mammogram.roi_paths)]
            resolution = self.resolution if isinstance(self.resolution, float) \
                else list(self.resolution)
            source = [sources, mammogram.class_ids, resolution, self.canonical_flip,
                      PREPROCESS_VERSION]
            self._keys[mammogram] = hashlib.sha1(json.dumps(source).encode()).hexdigest()[:20]
        return self._keys[mammogram]

    def paths(self, mammogram: Mammogram) -> tuple[Path, Path, Path]:
        """(image .npy, mask .npy, meta .json) of an entry."""
        key = self.key(mammogram)
        return (self.dir / f"{key}.image.npy", self.dir / f"{key}.mask.npy",
                self.dir / f"{key}.json")

    def load(self, mammogram: Mammogram, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) from the cache, preprocessing and storing them first on a miss.

        mmap: memory-mapped arrays, for reading patches without loading the whole image. An
        entry that cannot be read (a damaged disk, a foreign file) is named, deleted and rebuilt.
        """
        image_path, mask_path, _ = self.paths(mammogram)
        if not mask_path.exists():
            self.build(mammogram)
        try:
            return self._read(image_path, mask_path, mmap)
        except (OSError, ValueError, EOFError) as error:
            print(f"warning: cache entry {image_path.name} of {mammogram.img_path} is damaged "
                  f"({error}); rebuilding it", file=sys.stderr)
            self.build(mammogram)
            return self._read(image_path, mask_path, mmap)

    @staticmethod
    def _read(image_path: Path, mask_path: Path, mmap: bool) -> tuple[np.ndarray, np.ndarray]:
        mode = "r" if mmap else None
        image, mask = np.load(image_path, mmap_mode=mode), np.load(mask_path, mmap_mode=mode)
        if image.dtype != np.uint16 or mask.dtype != np.uint8 or image.shape != mask.shape:
            raise ValueError(f"unexpected arrays {image.dtype}{image.shape}, "
                             f"{mask.dtype}{mask.shape}")
        return image, mask

    def meta(self, mammogram: Mammogram) -> dict:
        _, mask_path, meta_path = self.paths(mammogram)
        if not mask_path.exists():
            self.build(mammogram)
        return json.loads(meta_path.read_text())

    def build(self, mammogram: Mammogram) -> dict:
        result = preprocess(mammogram, self.data_root, self.resolution, self.canonical_flip)
        image_path, mask_path, meta_path = self.paths(mammogram)
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(result.meta)))
        for path, array in ((image_path, result.image), (mask_path, result.mask)):  # mask last
            atomic_write(path, lambda tmp, array=array: _save_npy(tmp, array))
        return result.meta

    def missing(self, mammograms: list[Mammogram]) -> list[Mammogram]:
        """The mammograms without an entry (an unreadable source counts: build reports it)."""
        todo = []
        for mammogram in mammograms:
            try:
                present = self.paths(mammogram)[1].exists()
            except DatasetError:
                present = False
            if not present:
                todo.append(mammogram)
        return todo


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add .npy to a name
        np.save(f, array)


def _init_cache_worker() -> None:
    """A cache-build process: one OpenCV thread (the processes already use every core), and
    killed with its parent, so an OOM-killed run leaves no worker holding gigabytes."""
    cv2.setNumThreads(1)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


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
    clean_stale_tmp(cache.dir)  # left by killed writers; other runs may be filling it now
    todo = cache.missing(mammograms)
    report = PrepareReport(cached=len(mammograms) - len(todo))
    if not todo:
        return report
    bar = tqdm(total=len(todo), desc="preprocessing (once)", unit="img", disable=not progress)
    if workers > 0:
        # One OpenCV thread per process: the processes already use every core.
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                   initializer=_init_cache_worker)
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

