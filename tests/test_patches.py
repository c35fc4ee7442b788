"""Patch mode: the scale cache, patch sampling, the sliding window, and a patch-trained run
through the test script and predict.py (CPU, tiny sizes)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evaluation
import inference
import predict
import runs
import training
from dataset import EpochSampler, MammogramDataset, PatchDataset, read_window
from imaging import read_pixels
from preprocessing import _init_cache_worker
from synthetic import write_dicom
from tests.conftest import train_args

REPO = Path(__file__).resolve().parents[1]
SCALE = 0.5  # the conftest set's 240x150 mammograms -> crops of ~110x70 in the cache


@pytest.fixture(scope="module")
def scale_cache(csv_dir, tmp_path_factory) -> MammogramDataset:
    images = MammogramDataset.from_csv(csv_dir / "train.csv",
                                       tmp_path_factory.mktemp("cache"), SCALE)
    images.prepare(progress=False)
    return images


def test_scale_cache_keeps_the_aspect_of_each_breast_crop(scale_cache):
    for index in range(len(scale_cache)):
        meta = scale_cache.meta(index)
        y0, y1, x0, x1 = meta["box"]
        assert meta["size"] == [round((y1 - y0) * SCALE), round((x1 - x0) * SCALE)]
        image, mask = scale_cache.cache.load(scale_cache.mammograms[index], mmap=True)
        assert isinstance(image, np.memmap) and image.shape == mask.shape == tuple(meta["size"])


def test_foreground_patches_hold_a_lesion_and_every_class_is_drawn(scale_cache):
    patches = PatchDataset(scale_cache, (32, 32), patches_per_image=20, foreground_fraction=1.0)
    classes = []
    for position in range(len(patches)):
        _, mask, _ = patches[(position, 0)]
        assert mask.shape == (32, 32) and mask.any()
        classes.append(set(mask.unique().tolist()) - {0})
    # A class is chosen uniformly before the mammogram: each class shows up in about a third.
    for cls in (1, 2, 3):
        share = np.mean([cls in found for found in classes])
        assert share > 0.25, (cls, share)


def test_patches_are_drawn_anew_each_epoch_and_replayed_exactly(scale_cache):
    patches = PatchDataset(scale_cache, (32, 32), foreground_fraction=0.5, seed=7)
    first = [patches[(i, 3)][0] for i in range(8)]
    assert all(torch.equal(a, patches[(i, 3)][0]) for i, a in enumerate(first))
    later = [patches[(i, 4)][0] for i in range(8)]
    assert sum(torch.equal(a, b) for a, b in zip(first, later, strict=True)) <= 1
    sampler = EpochSampler(patches, num_replicas=1, rank=0, shuffle=True)
    sampler.set_epoch(5)
    assert {epoch for _, epoch in sampler} == {5}


def test_a_resumed_epoch_skips_the_items_already_trained_on(scale_cache):
    sampler = EpochSampler(scale_cache, num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.skip = 4  # a run preempted after 2 steps of 2
    assert len(sampler) == len(full) - 4 and list(sampler) == full[4:]
    assert list(sampler) == full  # once: the next epoch is whole again


def test_read_window_pads_outside_the_array():
    array = np.arange(12, dtype=np.uint16).reshape(3, 4) + 1
    window = read_window(array, -1, 2, (3, 3))
    assert window.tolist() == [[0, 0, 0], [3, 4, 0], [7, 8, 0]]


class PixelwiseNet(nn.Module):
    """A 1x1 convolution: each output pixel depends on its input pixel only, so a sliding
    window must reproduce the whole-image output exactly, tile seams included."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_sliding_window_matches_whole_image_for_a_pixelwise_model():
    torch.manual_seed(0)
    net = PixelwiseNet().eval()
    images = torch.rand(1, 1, 70, 45)
    whole = inference.predict_logits(net, images, {"patch_size": None})
    tiled = inference.predict_logits(net, images, {"patch_size": [32, 24], "sw_overlap": 0.5})
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def patch_run(csv_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("patch-run")
    argv = train_args(csv_dir, run, "--epochs", "2", "--patch-size", "32", "32", "--scale",
                      str(SCALE), "--patches-per-image", "2")
    training.train(*runs.parse_args(argv))
    return run / "checkpoint"


def count_windows(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = inference.sliding_window_inference

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_inference", counting)
    return calls


def test_patch_checkpoint_records_its_mode(patch_run):
    config = torch.load(patch_run / "best.pth", weights_only=True)["config"]
    assert config["patch_size"] == [32, 32] and config["scale"] == SCALE
    assert config["sw_overlap"] == 0.25


def test_test_script_uses_the_sliding_window_for_a_patch_checkpoint(patch_run, csv_dir,
                                                                    tmp_path, monkeypatch):
    calls = count_windows(monkeypatch)
    out = tmp_path / "results"
    argv = ["--checkpoint", str(patch_run / "best.pth"), "--csv", str(csv_dir / "test.csv"),
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
            "--bootstrap", "20", "--overlays", "1", "--no-progress"]
    assert evaluation.main(argv) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert len(calls) == results["n_images"] > 0
    assert results["model"]["patch_size"] == [32, 32]


def test_predict_uses_the_sliding_window_on_a_large_dicom(patch_run, tmp_path, monkeypatch):
    calls = count_windows(monkeypatch)
    height, width = 530, 300  # a 5300x3000 scan at a tenth of the size
    y, x = np.mgrid[:height, :width]
    image = np.full((height, width), 300, np.uint16)
    image[((y - height / 2) / (0.45 * height)) ** 2 + (x / (0.8 * width)) ** 2 < 1] = 30000
    write_dicom(tmp_path / "scan.dcm", image, patient_id="x", series_description="full")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(patch_run / "best.pth"), str(tmp_path / "scan.dcm"), "--out",
            str(out), "--no-progress"]
    assert predict.main(argv) == 0
    assert len(calls) == 1
    mask = read_pixels(out / "scan_mask.png")
    assert mask.shape == (height, width)


def test_stitching_moves_to_the_cpu_when_the_output_would_crowd_the_device():
    gib = 1 << 30
    assert inference.stitch_on_cpu(3 * gib, 4 * gib)  # auto: over half the free memory
    assert not inference.stitch_on_cpu(gib, 4 * gib)
    assert inference.stitch_on_cpu(1, 4 * gib, "cpu")
    assert not inference.stitch_on_cpu(3 * gib, 4 * gib, "device")
    with pytest.raises(ValueError):
        inference.stitch_on_cpu(1, 1, "gpu")


def test_stitch_device_counts_the_buffer_against_free_and_cached_gpu_memory(monkeypatch):
    gib, cuda = 1 << 30, torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: gib)  # 2 GiB cached
    # 4 bytes x 13 per pixel: 7000x4400 is 1.49 GiB, under half of the 4 GiB free with the
    # cached 2 GiB, over half of the 2 GiB the driver reports.
    assert inference.stitch_device((1, 1, 7000, 4400), cuda, 4) == cuda
    assert inference.stitch_device((1, 1, 9600, 4800), cuda, 4) == torch.device("cpu")
    assert inference.stitch_device((1, 1, 4800, 2400), cuda, 4, "cpu") == torch.device("cpu")
    assert inference.stitch_device((1, 1, 9600, 4800), cuda, 4, "device") == cuda
    assert inference.stitch_device((1, 1, 9600, 4800), torch.device("cpu"), 4) == torch.device(
        "cpu")


def test_predict_stitch_flag_reaches_the_sliding_window(patch_run, tmp_path, monkeypatch):
    asked, windows = [], []
    real_device, real_window = inference.stitch_device, inference.sliding_window_inference

    def stitch_device(shape, device, num_classes, stitch="auto"):
        asked.append(stitch)
        return real_device(shape, device, num_classes, stitch)

    def sliding_window_inference(*args, **kwargs):
        windows.append(kwargs)
        return real_window(*args, **kwargs)

    monkeypatch.setattr(inference, "stitch_device", stitch_device)
    monkeypatch.setattr(inference, "sliding_window_inference", sliding_window_inference)
    image = np.full((300, 180), 300, np.uint16)
    image[40:260, :120] = 30000
    write_dicom(tmp_path / "scan.dcm", image, patient_id="x", series_description="full")
    argv = ["--checkpoint", str(patch_run / "best.pth"), str(tmp_path / "scan.dcm"), "--out",
            str(tmp_path / "out"), "--no-progress", "--stitch", "cpu"]
    assert predict.main(argv) == 0
    assert asked == ["cpu"]
    assert [(w["sw_device"].type, w["device"].type) for w in windows] == [("cpu", "cpu")]


WORKER_SCRIPT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
sys.path.insert(0, {repo!r})
from preprocessing import _init_cache_worker

if __name__ == "__main__":
    pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=_init_cache_worker)
    futures = [pool.submit(sum, range(10**10)) for _ in range(2)]  # busy for minutes
    time.sleep(1.5)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    time.sleep(60)
"""


def test_cache_workers_die_with_their_parent(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(WORKER_SCRIPT.format(repo=str(REPO)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)  # as the OOM killer does: no cleanup runs
    parent.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if _running(pid)]
    assert not alive


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # zombie: exited


def parent_death_signal() -> int:
    """PR_GET_PDEATHSIG of this process."""
    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(value))
    return value.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_cache_workers_ask_to_be_killed_with_their_parent():
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"),
                             initializer=_init_cache_worker) as pool:
        assert pool.submit(parent_death_signal).result() == signal.SIGKILL
