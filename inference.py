"""One way to run a trained model (or an ensemble of them) over mammograms and map its output
back to original pixels, and the checkpoint loading that gives those models.

Whole-image checkpoints see the breast crop resized to their training size in one forward pass;
patch checkpoints see the crop at their cache scale through a sliding window of their patch size
(MONAI's sliding_window_inference: overlapping windows blended with Gaussian weights, batched).
The checkpoint's config says which, so validation, the test script and predict.py infer the way
the model was trained with no extra flags.

An ensemble (several --checkpoint, or a folder of fold runs) averages its members' softmax
probabilities before any argmax or threshold. Its members must share classes and input mode
(resolution, canonical side, channels), so the mean is taken on one grid; mapping back to the
original pixels is linear, so that mean is also the mean at original resolution. Test-time
flips (--tta) average each member over the image and its vertical flip, the one flip training
augments with; a horizontal flip would put the chest wall on the right, which a checkpoint
trained on canonically flipped breasts (the default) never saw, so only a --no-canonical-flip
checkpoint gets it (and both flips together).

The sliding window runs its windows on the model's device and stitches their blended output
where it fits (MONAI's sw_device / device split): on the device, or on the CPU when the
whole-image buffer would take more than half the device's free memory (--stitch forces either).
An exported ONNX file (export.py) can stand in for a checkpoint: OnnxModel runs it with
onnxruntime on the CPU, behind the same preprocessing, window and mapping back.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from augmentation import normalize_input, unit_range
from cbis import CLASS_NAMES, LESIONS
from model import build_model
from preprocessing import PREPROCESS_VERSION, Resolution, prepare_image, restore_to_original
from utils import CheckpointError, UsageError, autocast_for, file_sha256, load_checkpoint

# Dims of an (N, C, H, W) batch flipped by each test-time view; () is the image itself.
VERTICAL, HORIZONTAL = 2, 3
FLIP_NAMES = {(): "none", (VERTICAL,): "vertical", (HORIZONTAL,): "horizontal",
              (VERTICAL, HORIZONTAL): "both"}
STITCH_CHOICES = ("auto", "device", "cpu")
CONFIG_KEY = "cbis_ddsm_config"  # the ONNX metadata entry holding a checkpoint's config


def resolution_of(config: dict) -> Resolution:
    """The cache resolution a checkpoint was trained at: a scale (patch mode) or a size."""
    return float(config["scale"]) if config.get("patch_size") else tuple(config["size"])


def stitch_on_cpu(buffer_bytes: int, free_bytes: int, stitch: str = "auto") -> bool:
    """Whether the sliding window stitches on the CPU: as --stitch says, or (auto) when its
    output buffer would take more than half the device's free memory."""
    if stitch not in STITCH_CHOICES:
        raise ValueError(f"stitch must be one of {STITCH_CHOICES}, got {stitch!r}")
    if stitch != "auto":
        return stitch == "cpu"
    return buffer_bytes > free_bytes // 2


def stitch_device(shape: torch.Size, device: torch.device, num_classes: int,
                  stitch: str = "auto") -> torch.device:
    """Where the sliding window's output for images of `shape` on `device` is assembled."""
    if device.type != "cuda":
        return device
    n, _, height, width = shape
    # float32 output and weight map (MONAI), then the softmax and a flipped copy of the output
    buffer_bytes = 4 * n * height * width * (3 * num_classes + 1)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # What torch's allocator holds but does not use is free to this process too.
    free_bytes += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.device("cpu") if stitch_on_cpu(buffer_bytes, free_bytes, stitch) else device


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, config: dict, amp: str = "auto",
                   windows_per_batch: int = 4, stitch: str = "auto") -> torch.Tensor:
    """Logits (N, C, H, W) float32 for images (N, 1, H, W) in [0, 1] on the model's device;
    a patch checkpoint's come back on stitch_device's device."""
    device = images.device

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, amp):
            return model(normalize_input(batch)).float()

    if not config.get("patch_size"):
        return forward(images)
    return sliding_window_inference(
        images, roi_size=tuple(config["patch_size"]), sw_batch_size=windows_per_batch,
        predictor=forward, overlap=config.get("sw_overlap", 0.25), mode="gaussian",
        padding_mode="constant", cval=0.0, sw_device=device,
        device=stitch_device(images.shape, device, len(config.get("class_names", CLASS_NAMES)),
                             stitch))


def tta_flips(config: dict, tta: bool) -> list[tuple[int, ...]]:
    """The views --tta averages (see the module docstring): the image alone without tta; with
    it also its vertical flip, and the horizontal ones only where training kept both sides."""
    if not tta:
        return [()]
    if config["canonical_flip"]:
        return [(), (VERTICAL,)]
    return list(FLIP_NAMES)


def predict_probabilities(model: nn.Module, images: torch.Tensor, device: torch.device,
                          config: dict, amp: str = "auto", windows_per_batch: int = 4,
                          tta: bool = False, stitch: str = "auto") -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 on the CPU for uint16 images as cached; with
    tta, their mean over the tta_flips views, each flipped back (whole image and sliding
    window alike)."""
    images = unit_range(images.to(device))
    flips = tta_flips(config, tta)
    total = sum(predict_logits(model, images.flip(dims), config, amp, windows_per_batch, stitch)
                .softmax(1).flip(dims) for dims in flips)
    return (total / len(flips)).cpu().numpy()


def predict_image(model: nn.Module, image: np.ndarray, device: torch.device, config: dict,
                  amp: str = "auto", windows_per_batch: int = 4, tta: bool = False,
                  stitch: str = "auto") -> tuple[np.ndarray, dict]:
    """(C, h, w) probabilities of one original mammogram at the checkpoint's resolution, and
    the geometry (prepare_image's meta) that predict_at_original needs."""
    prepared, meta = prepare_image(image, resolution_of(config), config["canonical_flip"])
    batch = torch.from_numpy(prepared)[None, None]
    return predict_probabilities(model, batch, device, config, amp, windows_per_batch,
                                 tta, stitch)[0], meta


@dataclass(frozen=True)
class Member:
    """One checkpoint of an ensemble; a single checkpoint is an ensemble of one."""

    model: nn.Module | OnnxModel
    config: dict
    path: Path | None = None  # None for a model made in memory (tests, the benchmark)
    sha256: str = ""
    fold: int | None = None  # Train_deep_labv3+.py --fold; None for train.csv / val.csv

    def record(self) -> dict:
        """What metrics.json and the DICOM SEG say about this member."""
        return {"path": str(self.path), "sha256": self.sha256, "fold": self.fold,
                "backbone": self.config["backbone"]}


def ensemble_probabilities(members: list[Member], images: torch.Tensor, device: torch.device,
                           amp: str = "auto", windows_per_batch: int = 4, tta: bool = False,
                           stitch: str = "auto") -> np.ndarray:
    """The mean of the members' predict_probabilities (N, C, H, W), before any argmax."""
    total = sum(predict_probabilities(m.model, images, device, m.config, amp, windows_per_batch,
                                      tta, stitch) for m in members)
    return total / len(members)


def predict_at_original(probs: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(class map uint8, abnormality probability) at the original mammogram's pixels.

    Probabilities (C, H, W) at the model's resolution are interpolated back through the breast
    crop and flip; outside the crop every probability is 0, so the argmax there is background.
    """
    restored = restore_to_original(np.ascontiguousarray(probs.transpose(1, 2, 0)), meta,
                                   cv2.INTER_LINEAR)
    # Summed lesion classes, not 1 - p(background): outside the crop both are 0, not 1.
    return restored.argmax(-1).astype(np.uint8), restored[..., LESIONS].sum(-1)


def probabilities_npz(probs: np.ndarray, meta: dict) -> bytes:
    """--save-probabilities' file: probs (C, h, w) as float16 at the model's resolution (the
    breast crop, flipped to the canonical side, at the checkpoint's size or scale; the
    original's pixels would be ~100x larger), with the class names and the geometry (meta, as
    JSON) that predict_at_original needs to map them to the original pixels. Compressed .npz."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probs.astype(np.float16),
                        class_names=np.array(CLASS_NAMES), meta=json.dumps(meta))
    return buffer.getvalue()


def load_probabilities(path: Path) -> tuple[np.ndarray, dict]:
    """(probabilities (C, h, w) float16, meta) of a --save-probabilities file."""
    with np.load(path) as data:
        return data["probabilities"], json.loads(str(data["meta"]))


# ----------------------------------------------------------------------------- checkpoints


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (repeatable: an ensemble) and --tta, the same in every script that infers."""
    parser.add_argument(
        "--checkpoint", action="append", default=None, metavar="CHECKPOINT",
        help="a checkpoint path, the name of one inside --checkpoint-dir, or a folder of run "
             "folders (its */best.pth, e.g. the fold runs of Train_deep_labv3+.py --fold); "
             "repeat it to combine several: their softmax probabilities are averaged "
             "(default: best.pth)")
    parser.add_argument(
        "--tta", action="store_true",
        help="test-time flips: average over the image and its vertical flip (2x the inference "
             "time; a horizontal flip only for checkpoints trained with --no-canonical-flip, "
             "4x: the default canonical side puts every chest wall on the left)")
    parser.add_argument(
        "--stitch", choices=STITCH_CHOICES, default="auto",
        help="patch checkpoints on a GPU: where the sliding window assembles the whole-image "
             "output; auto: on the CPU when it would take more than half the free GPU memory "
             "(large images on small GPUs), else on the GPU")


def resolve_checkpoints(names: list[str] | None, checkpoint_dir: Path) -> list[Path]:
    """The --checkpoint values as files (default best.pth): a folder gives its */best.pth."""
    paths = []
    for name in names or ["best.pth"]:
        folder = Path(name)
        if folder.is_dir():
            found = sorted(folder.glob("*/best.pth"))
            if not found:
                raise CheckpointError(f"--checkpoint {folder} is a folder without run folders "
                                      "holding best.pth: pass checkpoint files, or a folder "
                                      "like folds/ (folds/fold0/best.pth, ...)")
            paths += found
        else:
            paths.append(resolve_checkpoint(name, checkpoint_dir))
    seen = set()
    for path in paths:
        if path.resolve() in seen:  # it would weigh twice in the mean
            raise CheckpointError(f"--checkpoint {path} is given twice: pass each checkpoint "
                                  "once")
        seen.add(path.resolve())
    return paths


def input_mode(config: dict) -> dict:
    """What an ensemble's members must share: the classes, and the grid and side they see."""
    return {"classes": config.get("class_names", config["num_classes"]),
            "resolution": resolution_of(config), "canonical_flip": config["canonical_flip"],
            "in_channels": config["in_channels"]}


def load_ensemble(paths: list[Path], device: torch.device) -> list[Member]:
    """Every checkpoint as a Member; CheckpointError (one line) when two disagree on classes or
    input mode."""
    members = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        model, config = _trained_model(checkpoint, path, device)
        members.append(Member(model, config, path, file_sha256(path), checkpoint.get("fold")))
        first, this = input_mode(members[0].config), input_mode(config)
        for key, value in first.items():
            if this[key] != value:
                raise CheckpointError(
                    f"{path} cannot join an ensemble with {members[0].path}: {key} "
                    f"{this[key]!r} vs {value!r}; combine checkpoints trained with the same "
                    "classes and input mode (--size, or --patch-size and --scale, and "
                    "--no-canonical-flip)")
    return members


def resolve_checkpoint(name: str, checkpoint_dir: Path) -> Path:
    """--checkpoint as a path, else as the name of a file inside --checkpoint-dir."""
    path = Path(name)
    if path.is_file():
        return path
    if (checkpoint_dir / name).is_file():
        return checkpoint_dir / name
    raise CheckpointError(f"no checkpoint {name!r} (looked in . and {checkpoint_dir}): "
                          "pass a path or a file name inside --checkpoint-dir")


def load_trained_model(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The model a checkpoint describes, with its weights, in eval mode; and its config."""
    return _trained_model(load_checkpoint(path), path, device)


def check_preprocess_version(config: dict, path: Path) -> None:
    if config.get("preprocess_version") != PREPROCESS_VERSION:
        raise CheckpointError(
            f"{path} was trained on preprocessing version {config.get('preprocess_version')}, "
            f"this code makes version {PREPROCESS_VERSION}: use the matching release")


def _trained_model(checkpoint: dict, path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    config = checkpoint["config"]
    check_preprocess_version(config, path)
    model = build_model(config["backbone"], config["num_classes"], config["in_channels"],
                        config["output_stride"], decoder_channels=config["decoder_channels"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit a {config['backbone']} DeepLabV3+ with "
                              f"{config['num_classes']} classes: {error}") from error
    return model.to(device).eval(), config


# ----------------------------------------------------------------------------- ONNX


class OnnxModel:
    """An exported network (export.py) run by onnxruntime on the CPU, called as the torch model
    is: standardised images (N, 1, H, W) in, logits out, as CPU tensors."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_onnx_model(path: Path, threads: int = 0) -> Member:
    """An export.py file as a Member (its config from the file's metadata); UsageError when
    onnxruntime is missing, CheckpointError for a file that is not one of ours."""
    try:
        import onnxruntime
    except ImportError as error:
        raise UsageError("--onnx needs onnxruntime: pip install onnxruntime (pinned in "
                         "requirements-dev.txt)") from error
    if not path.is_file():
        raise CheckpointError(f"no ONNX file at {path}: pass a file export.py wrote")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's choice, one per core
    try:
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types per failure
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot load ONNX file {path}: {reason}") from error
    metadata = session.get_modelmeta().custom_metadata_map
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path} has no {CONFIG_KEY} metadata: export it with export.py")
    config = json.loads(metadata[CONFIG_KEY])
    check_preprocess_version(config, path)
    return Member(OnnxModel(session), config, path, file_sha256(path),
                  json.loads(metadata.get("fold", "null")))
