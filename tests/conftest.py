"""Shared fixtures: one small synthetic CBIS-DDSM study, in the TCIA layout and in the Kaggle
JPEG layout, and the retrieval CSVs of each, per test session; and the helpers several test
files use (the flags of a tiny training run, a hand-made mammogram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import main_retrieval
from synthetic import make_synthetic_dataset

# Small enough for CPU tests, large enough for every class in train, val and test.
SIZE = (64, 48)  # training input (H, W) used by the fast tests
STUDY = {"patients": 14, "size": (240, 150), "seed": 3}  # the synthetic study of every layout


def retrieve_into(root: Path, out: Path) -> Path:
    args = ["--data-root", str(root), "--out-dir", str(out), "--val-fraction", "0.25"]
    assert main_retrieval.main(args) == 0
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, **STUDY, progress=False)
    return root


@pytest.fixture(scope="session")
def csv_dir(synthetic_root: Path) -> Path:
    return retrieve_into(synthetic_root, synthetic_root / "csv")


@pytest.fixture(scope="session")
def kaggle_root(tmp_path_factory) -> Path:
    """The same study as synthetic_root, as the Kaggle JPEG copy (csv/, jpeg/)."""
    root = tmp_path_factory.mktemp("kaggle")
    make_synthetic_dataset(root, **STUDY, progress=False, layout="kaggle")
    return root


@pytest.fixture(scope="session")
def kaggle_csv_dir(kaggle_root: Path) -> Path:
    return retrieve_into(kaggle_root, kaggle_root / "retrieved")  # csv/ is the copy's own


def tiny_run_args(csv_dir: Path, checkpoint_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    """Flags of a tiny CPU training run (resnet18, 64x48 inputs, batch 4, no worker processes)."""
    return ["--csv-dir", str(csv_dir), "--checkpoint-dir", str(checkpoint_dir),
            "--cache-dir", str(cache_dir), "--backbone", "resnet18",
            "--size", str(SIZE[0]), str(SIZE[1]), "--batch-size", "4", "--workers", "0",
            "--lr", "1e-3", "--no-progress", *extra]


def train_args(csv_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """tiny_run_args with the run in run_dir/checkpoint and the cache beside run_dir."""
    return tiny_run_args(csv_dir, run_dir / "checkpoint", run_dir.parent / "cache", *extra)


def mammogram(height: int, width: int, chest_wall_right: bool, seed: int = 0) -> np.ndarray:
    """A bright half-ellipse breast against its chest wall on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    wall = width - 1 if chest_wall_right else 0
    breast = ((y - height / 2) / (0.42 * height)) ** 2 + ((x - wall) / (0.8 * width)) ** 2 < 1
    image = rng.normal(400, 50, (height, width))
    image[breast] = rng.normal(30000, 3000, int(breast.sum()))
    return np.clip(image, 0, 65535).astype(np.uint16)
