"""benchmark.py end to end in its smallest configuration (CPU, tiny sizes, one step each)."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest
import torch

import benchmark
from utils import peak_memory_mb


def test_benchmark_writes_the_three_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--size", "64", "64", "--batch-size", "2", "--backbone", "resnet18",
            "--dicom-size", "240", "150", "--images", "2", "--warmup", "1", "--steps", "1",
            "--repeats", "1", "--workers", "0", "--patch-size", "64", "64", "--work-dir",
            str(tmp_path), "--json", str(out)]
    assert benchmark.main(argv) == 0
    results = json.loads(out.read_text())
    for key in ("data_path_speedup", "model_step_speedup", "end_to_end_fraction"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0
    assert results["device"] == "cpu"
    patch = results["patch_mode"]
    assert patch["original"] == [240, 150] and patch["windows"] >= 2 and patch["seconds"] > 0
    assert patch["cache_mb_per_image"] > 0
    assert results["settings"]["backbone"] == "resnet18"
    tta = results["tta"]
    assert tta["views"] == 2 and tta["ratio"] == tta["tta_seconds_per_batch"] / tta[
        "seconds_per_batch"] > 0
    onnx = results["onnx"]
    assert onnx["original"] == [240, 150] and onnx["ratio"] == onnx["onnxruntime_seconds"] / onnx[
        "torch_seconds"] > 0
    assert "onnxruntime / torch" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # temporary data removed


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux's")
def test_peak_memory_of_a_spawned_process_is_its_own():
    # ru_maxrss of a spawned process starts at its parent's peak: the sliding-window and
    # model-step figures, each measured in a fresh process, would read 0 growth.
    held = np.ones(2**30 // 8)  # 1 GiB, touched
    parent = peak_memory_mb(torch.device("cpu"))
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        child = pool.submit(peak_memory_mb, torch.device("cpu")).result()
    assert parent > 1024 and child < parent - 512, (parent, child)
    del held
