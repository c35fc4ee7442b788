"""export.py and predict.py --onnx: onnxruntime gives torch's output, any input size, and the
same predictions through the same preprocessing and sliding window (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

import export
import inference
import model
import predict
import preprocessing
from augmentation import INPUT_MEAN, INPUT_STD
from cbis import CLASS_NAMES
from tests.conftest import mammogram

MAX_ABS_DIFF = 1e-4  # float32 logits of order 10-100; measured ~1e-6


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, its ONNX file): an untrained resnet18 patch checkpoint (64-px windows at
    half scale) whose logits are sharpened into a mix of classes, and fold 3 recorded."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(4)
    net = model.build_model("resnet18", 4, 1, 16, None, 16)
    with torch.no_grad():
        net.classifier.weight.mul_(30)
    config = {"backbone": "resnet18", "num_classes": 4, "in_channels": 1, "output_stride": 16,
              "decoder_channels": 16, "size": [1024, 640], "patch_size": [64, 64],
              "scale": 0.5, "sw_overlap": 0.25, "canonical_flip": True,
              "preprocess_version": preprocessing.PREPROCESS_VERSION,
              "class_names": list(CLASS_NAMES)}
    checkpoint = folder / "best.pth"
    torch.save({"model": net.state_dict(), "config": config, "epoch": 0, "fold": 3}, checkpoint)
    onnx_file = folder / "model.onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(onnx_file)]) == 0
    return checkpoint, onnx_file


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (3, 1, 200, 136)])
def test_onnxruntime_gives_torchs_logits_at_any_size(exported, shape):
    checkpoint, onnx_file = exported
    net, _ = inference.load_trained_model(checkpoint, torch.device("cpu"))
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(images)
    got = inference.load_onnx_model(onnx_file).model(images)
    difference = (got - expected).abs().max().item()
    print(f"onnxruntime vs torch, {shape}: max abs difference {difference:.2e}")
    assert got.shape == expected.shape and difference < MAX_ABS_DIFF


def test_the_file_carries_the_preprocessing_facts(exported):
    checkpoint, onnx_file = exported
    proto = onnx.load(onnx_file)
    metadata = {p.key: p.value for p in proto.metadata_props}
    config = torch.load(checkpoint, weights_only=True)["config"]
    assert json.loads(metadata[inference.CONFIG_KEY]) == config
    assert json.loads(metadata["normalisation"]) == {"mean": INPUT_MEAN, "std": INPUT_STD}
    assert metadata["opset"] == str(export.OPSET)
    assert any(o.version == export.OPSET for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    member = inference.load_onnx_model(onnx_file)
    assert member.config == config and member.fold == 3
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # N, 1, H, W


def test_predict_with_onnx_writes_the_checkpoints_predictions(exported, tmp_path):
    checkpoint, onnx_file = exported
    scans = tmp_path / "scans"
    scans.mkdir()
    for k, right in enumerate((False, True)):
        cv2.imwrite(str(scans / f"scan{k}.png"), mammogram(300, 180, right, k))
    common = ["--no-progress", str(scans)]
    assert predict.main(["--checkpoint", str(checkpoint), "--device", "cpu",
                         "--out", str(tmp_path / "torch"), *common]) == 0
    assert predict.main(["--onnx", str(onnx_file), "--out", str(tmp_path / "onnx"), *common]) == 0
    for k in range(2):
        masks = [cv2.imread(str(tmp_path / run / f"scan{k}_mask.png"), cv2.IMREAD_UNCHANGED)
                 for run in ("torch", "onnx")]
        assert len(np.unique(masks[0])) > 1  # a mix of classes: the comparison means something
        assert (masks[0] == masks[1]).mean() > 0.999
        records = [json.loads((tmp_path / run / f"scan{k}.json").read_text())
                   for run in ("torch", "onnx")]
        assert records[0]["malignancy_score"] == pytest.approx(records[1]["malignancy_score"],
                                                               abs=1e-3)


def test_onnx_errors_are_one_line(exported, tmp_path, capsys):
    checkpoint, onnx_file = exported
    scan = tmp_path / "scan.png"
    cv2.imwrite(str(scan), mammogram(300, 180, False, 0))
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(onnx_file)
    del proto.metadata_props[:]
    onnx.save_model(proto, bare)
    for argv, message in (
            (["--onnx", str(onnx_file), "--checkpoint", str(checkpoint)], "not both"),
            (["--onnx", str(bare)], "no cbis_ddsm_config metadata"),
            (["--onnx", str(tmp_path / "missing.onnx")], "no ONNX file"),
            (["--onnx", str(checkpoint)], "cannot load ONNX file")):
        assert predict.main([*argv, "--out", str(tmp_path / "out"), str(scan)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
