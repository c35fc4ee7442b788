"""Mammograms from the retrieval CSVs as training samples.

The CSVs hold one row per abnormality; a sample is one mammogram with every ROI of its view
merged into one 4-class mask (see group_mammograms), preprocessed once into the disk cache
(preprocessing.py). Two resolutions: whole-image mode, where a sample is a whole mammogram
resized to one fixed size (MammogramDataset), and patch mode, where each breast crop is scaled
by one factor and a sample is a patch read from the memory-mapped cache (PatchDataset), a third
of them centred on a lesion. Samples stay uint16/uint8; augmentation.py runs on the device.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, DistributedSampler

from cbis import CSV_COLUMNS, FOLDS_COLUMNS, FOLDS_NAME, SCHEMA_VERSION, SIDECAR_NAME
from imaging import DatasetError
from preprocessing import Mammogram, PrepareReport, PreprocessCache, Resolution, prepare_cache

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


def read_training_splits(csv_dir: Path, fold: int | None = None
                         ) -> tuple[dict[str, pd.DataFrame], Path]:
    """{"train": rows, "val": rows} and the data root: train.csv and val.csv as retrieval split
    them, or with `fold` K the patients of fold K (folds.csv) as val and the other folds as
    train. Raises DatasetError naming the file and the fix."""
    splits, data_root = {}, None
    for split in ("train", "val"):
        splits[split], data_root = read_split_csv(csv_dir / f"{split}.csv")
    if fold is None:
        return splits, data_root
    path = csv_dir / FOLDS_NAME
    if not path.is_file():
        raise DatasetError(f"no {path}: run main_retrieval.py --folds 5 --out-dir {csv_dir}")
    folds = pd.read_csv(path, dtype={"patient_id": str})
    if list(folds.columns) != FOLDS_COLUMNS:
        raise DatasetError(f"{path} has columns {list(folds.columns)}, not {FOLDS_COLUMNS}: "
                           "re-run main_retrieval.py")
    n_folds = int(folds["fold"].max()) + 1
    if not 0 <= fold < n_folds:
        raise DatasetError(f"--fold {fold} is not in {path}, which has folds 0..{n_folds - 1}")
    rows = pd.concat(splits.values(), ignore_index=True)
    fold_of = rows["patient_id"].map(folds.set_index("patient_id")["fold"])
    if fold_of.isna().any():
        patient = rows["patient_id"][fold_of.isna()].iloc[0]
        raise DatasetError(f"{path} has no fold for patient {patient}: it is older than the "
                           "CSVs, re-run main_retrieval.py")
    rows["split"] = np.where(fold_of == fold, "val", "train")
    return {split: rows[rows["split"] == split].reset_index(drop=True)
            for split in ("train", "val")}, data_root


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
    def from_csv(cls, csv_path: Path, cache_dir: Path, resolution: Resolution,
                 canonical_flip: bool = True, data_root: Path | None = None) -> MammogramDataset:
        rows, recorded_root = read_split_csv(csv_path)
        return cls.from_rows(rows, cache_dir, data_root or recorded_root, resolution,
                             canonical_flip)

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, cache_dir: Path, data_root: Path,
                  resolution: Resolution, canonical_flip: bool = True) -> MammogramDataset:
        cache = PreprocessCache(cache_dir, data_root, resolution, canonical_flip)
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


class PatchDataset(Dataset):
    """Random patches of the cached mammograms, read through a memory map: (image uint16
    [1, h, w], mask uint8 [h, w], mammogram index).

    Item (i, epoch) draws from its own generator seeded by (seed, epoch, i), so an epoch is the
    same in any worker and after a resume. With probability foreground_fraction (nnU-Net forces
    a third) the patch contains a lesion: a lesion class is chosen uniformly among those in the
    set, then a mammogram with it and one of its pixels, so rare calcifications are not starved.
    Otherwise mammogram i % n and a uniform position. Patches larger than a crop are zero-padded.
    """

    def __init__(self, images: MammogramDataset, patch_size: tuple[int, int],
                 patches_per_image: int = 4, foreground_fraction: float = 1 / 3,
                 seed: int = 0) -> None:
        self.images = images
        self.patch_size = tuple(patch_size)
        self.patches_per_image = patches_per_image
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self._metas: list[dict] | None = None
        self._by_class: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.images) * self.patches_per_image

    @property
    def metas(self) -> list[dict]:
        if self._metas is None:  # after prepare(): every entry exists
            self._metas = [self.images.meta(i) for i in range(len(self.images))]
        return self._metas

    @property
    def with_class(self) -> dict[int, list[int]]:
        """Lesion class -> indices of the mammograms that show it."""
        if self._by_class is None:
            self._by_class = {}
            for index, meta in enumerate(self.metas):
                for cls in meta["foreground"]:
                    self._by_class.setdefault(int(cls), []).append(index)
        return self._by_class

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor, int]:
        position, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = np.random.default_rng([self.seed, epoch, position])
        index = position % len(self.images)
        by_class = self.with_class if rng.random() < self.foreground_fraction else {}
        if by_class:
            cls = sorted(by_class)[rng.integers(len(by_class))]
            index = by_class[cls][rng.integers(len(by_class[cls]))]
            points = self.metas[index]["foreground"][str(cls)]
            centre = points[rng.integers(len(points))]
        height, width = self.metas[index]["size"]
        patch_h, patch_w = self.patch_size
        if by_class:  # anywhere such that the lesion pixel is inside the patch
            top = centre[0] - int(rng.integers(patch_h))
            left = centre[1] - int(rng.integers(patch_w))
        else:
            top = int(rng.integers(min(0, height - patch_h), max(0, height - patch_h) + 1))
            left = int(rng.integers(min(0, width - patch_w), max(0, width - patch_w) + 1))
        # Keep the patch inside the crop where the crop is large enough.
        top = min(max(top, min(0, height - patch_h)), max(0, height - patch_h))
        left = min(max(left, min(0, width - patch_w)), max(0, width - patch_w))
        image, mask = self.images.cache.load(self.images.mammograms[index], mmap=True)
        return (torch.from_numpy(read_window(image, top, left, self.patch_size)).unsqueeze(0),
                torch.from_numpy(read_window(mask, top, left, self.patch_size)), index)


def read_window(array: np.ndarray, top: int, left: int, size: tuple[int, int]) -> np.ndarray:
    """array[top:top+h, left:left+w] with zeros where the window leaves the array."""
    height, width = size
    window = np.zeros((height, width), array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, array.shape[0]), min(left + width, array.shape[1])
    if y1 > y0 and x1 > x0:
        window[y0 - top:y1 - top, x0 - left:x1 - left] = array[y0:y1, x0:x1]
    return window


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next epoch can start part-way: `skip` items of this rank's
    share are left out once (a run resumed after a preemption, at the step it stopped)."""

    skip = 0

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EpochSampler(ResumableSampler):
    """ResumableSampler whose items are (index, epoch), so a PatchDataset draws new patches
    each epoch without state in the workers (persistent workers keep their own copies)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, self.epoch) for index in super().__iter__())
