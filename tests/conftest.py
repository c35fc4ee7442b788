"""Shared fixtures: one small synthetic CBIS-DDSM tree and its retrieval CSVs per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

import main_retrieval
from synthetic import make_synthetic_dataset

# Small enough for CPU tests, large enough for every class in train, val and test.
SIZE = (64, 48)  # training input (H, W) used by the fast tests


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, patients=14, size=(240, 150), seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def csv_dir(synthetic_root: Path) -> Path:
    out = synthetic_root / "csv"
    args = ["--data-root", str(synthetic_root), "--out-dir", str(out), "--val-fraction", "0.25"]
    assert main_retrieval.main(args) == 0
    return out


def train_args(csv_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Flags of a tiny CPU training run (resnet18, 64x48 inputs)."""
    return ["--csv-dir", str(csv_dir), "--checkpoint-dir", str(run_dir / "checkpoint"),
            "--cache-dir", str(run_dir.parent / "cache"), "--backbone", "resnet18",
            "--size", str(SIZE[0]), str(SIZE[1]), "--batch-size", "4", "--workers", "0",
            "--lr", "1e-3", "--no-progress", *extra]
