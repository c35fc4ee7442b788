"""Export a trained checkpoint to ONNX, for deployment without this repository's torch code.

    python export.py --checkpoint checkpoint/best.pth --out model.onnx
    python predict.py --onnx model.onnx scans/ --out predictions    # onnxruntime, CPU

The graph is the network alone: input "image" (N, 1, H, W) float32, already standardised, with
dynamic N, H and W; output "logits" (N, 4, H, W). What a deployment must do around it is in the
file's metadata (onnx metadata_props, read with onnxruntime's get_modelmeta()):
  cbis_ddsm_config  the checkpoint's config as JSON: mode (size for whole images, patch_size,
                    scale and sw_overlap for the sliding window), canonical_flip,
                    preprocess_version, class_names, backbone
  input             how "image" is made from a mammogram (preprocessing.prepare_image's crop,
                    flip and window to uint16, then / 65535, then the normalisation below)
  normalisation     {"mean": .., "std": ..} applied to the [0, 1] image
  fold, checkpoint_sha256, opset
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from augmentation import INPUT_MEAN, INPUT_STD
from inference import CONFIG_KEY, load_trained_model
from utils import (
    CheckpointError,
    HelpFormatter,
    UsageError,
    atomic_write,
    file_sha256,
    load_checkpoint,
)

OPSET = 18


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint to ONNX (opset 18, dynamic batch, height and width) "
                    "with its preprocessing facts in the file's metadata. Exit code 0 on "
                    "success, 2 for a bad checkpoint or a missing onnx package.",
        formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a .pth written by the training script (e.g. checkpoint/best.pth)")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--example-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size traced at export (any size runs afterwards); default: "
                             "the checkpoint's training size or patch size")
    return parser


def onnx_metadata(checkpoint: dict, path: Path) -> dict[str, str]:
    """The metadata_props of an exported checkpoint (see the module docstring)."""
    return {
        CONFIG_KEY: json.dumps(checkpoint["config"]),
        "input": "image (N, 1, H, W) float32: preprocessing.prepare_image's breast crop, "
                 "canonical flip and window (uint16) / 65535, then (x - mean) / std",
        "normalisation": json.dumps({"mean": INPUT_MEAN, "std": INPUT_STD}),
        "fold": json.dumps(checkpoint.get("fold")),
        "checkpoint_sha256": file_sha256(path),
        "opset": str(OPSET),
    }


def export_onnx(checkpoint_path: Path, out: Path, example_size: tuple[int, int] | None = None
                ) -> dict[str, str]:
    """Write checkpoint_path's network to `out` (atomically); returns the metadata written."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's exporter writes the graph with it
    except ImportError as error:
        raise UsageError(f"export needs the onnx and onnxscript packages ({error.name} is "
                         "missing): pip install -r requirements-dev.txt") from error
    checkpoint = load_checkpoint(checkpoint_path)
    model, config = load_trained_model(checkpoint_path, torch.device("cpu"))
    height, width = example_size or config["patch_size"] or config["size"]
    batch, h, w = (torch.export.Dim(name, min=2) for name in ("batch", "height", "width"))
    with warnings.catch_warnings():  # the exporter's chatter about its own internals
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.zeros(2, 1, height, width),), input_names=["image"],
            output_names=["logits"], opset_version=OPSET, dynamo=True, verbose=False,
            dynamic_shapes={"x": {0: batch, 2: h, 3: w}})
    proto = program.model_proto
    metadata = onnx_metadata(checkpoint, checkpoint_path)
    onnx.helper.set_model_props(proto, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: onnx.save_model(proto, tmp))
    return metadata


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        metadata = export_onnx(args.checkpoint, args.out,
                               tuple(args.example_size) if args.example_size else None)
    except (CheckpointError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = json.loads(metadata[CONFIG_KEY])
    print(f"wrote {args.out}: {config['backbone']} DeepLabV3+, opset {OPSET}, classes "
          f"{', '.join(config['class_names'])}; run it with predict.py --onnx {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
