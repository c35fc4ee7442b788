"""Segment new mammograms with a trained checkpoint (or an ensemble: --checkpoint repeated, or a
folder of fold runs): DICOM, PNG or JPEG files, or folders of them.

    python predict.py --checkpoint checkpoint/best.pth scans/ extra.png --out predictions
    python predict.py --checkpoint folds --tta scans/      # the fold runs' mean, with flips
    python predict.py --onnx model.onnx scans/             # export.py's file, onnxruntime

Per image, into --out:
  <name>_mask.png     uint8 class ids (0 background, 1 benign, 2 mass, 3 calc) at the original size
  <name>_overlay.png  image | predicted classes blended over it, at most OVERLAY_HEIGHT px tall
  <name>.json         source, original_size {height, width}, breast_box and flipped (the crop
                      the model saw), malignancy_score (max of p(mass), p(calc) at the
                      model's resolution) and lesions: class, class_id, score (max abnormality
                      probability), bbox [x0, y0, x1, y1] (end-exclusive, original pixels),
                      area, centroid [x, y]
  <name>_seg.dcm      DICOM inputs where a lesion is found: the mask as a DICOM Segmentation
                      (one segment per class found; see dicom_seg.py)
  <name>_probs.npz    with --save-probabilities: the class probabilities (float16) at the
                      model's resolution and the geometry back to the original pixels (see
                      inference.probabilities_npz)

Files whose DICOM header calls them ROI masks or cropped images (a TCIA case tree holds both
beside the mammograms) and, where no SeriesDescription says what a file is, images that look like
masks are skipped with a message; images too small to be mammograms are predicted with a warning.

The model sees the breast crop as it was trained (resized to its training size, or at its cache
scale through a sliding window: see inference.py); its probabilities are mapped back through
the crop and flip with linear interpolation and the class is their argmax, so everything outside
the crop is background. <name> is the file stem, or where stems repeat (the TCIA tree calls every
file 1-1.dcm) the CBIS-DDSM case folder on its path (e.g. Mass-Test_P_00016_LEFT_CC), else its
path from the input folder down with the parts joined by "__".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from tqdm import tqdm

from cbis import CLASS_COLOURS, CLASS_NAMES, MALIGNANT, image_folder_name
from dicom_seg import SegAlgorithm, encode_dicom_seg, segmentation_algorithm
from imaging import (
    IMAGE_SUFFIXES,
    DatasetError,
    is_dicom,
    kind_from_description,
    looks_like_mask,
    read_pixels,
)
from inference import (
    Member,
    add_model_flags,
    ensemble_probabilities,
    load_ensemble,
    load_onnx_model,
    predict_at_original,
    probabilities_npz,
    resolution_of,
    resolve_checkpoints,
)
from metrics import MIN_LESION_AREA, drop_small_lesions
from preprocessing import prepare_image, scale_intensities
from report import overlay_panel
from utils import (
    CheckpointError,
    DiskFullError,
    HelpFormatter,
    UsageError,
    add_device_flags,
    atomic_write_all,
    positive_int,
    resolve_device,
)

INPUT_SUFFIXES = (".dcm", *IMAGE_SUFFIXES)  # searched for in folders, with other DICOM files
OVERLAY_HEIGHT = 1024
MIN_MAMMOGRAM_SIDE = 1000  # px, longer side; CBIS-DDSM's are ~5300x3000, lesion crops ~100-600


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment mammograms (DICOM, 8/16-bit PNG or JPEG files, or folders searched "
                    "recursively for *.dcm, *.png, *.jpg and other DICOM files) with a "
                    "trained DeepLabV3+ checkpoint; writes <name>_mask.png, <name>_overlay.png "
                    "and <name>.json per image, and <name>_seg.dcm (DICOM SEG) per DICOM. "
                    "Exit code 0 if any image was processed, 1 if none, 2 on a usage error.",
        formatter_class=HelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", type=Path, metavar="INPUT",
        help="a DICOM, PNG or JPEG file, or a folder of them (searched recursively)")
    add_model_flags(parser)
    add("--onnx", type=Path, default=None, metavar="FILE",
        help="run an export.py ONNX file with onnxruntime (CPU) instead of a checkpoint: the "
             "same preprocessing, sliding window and outputs; not with --checkpoint, and "
             "--device and --amp do not apply")
    add("--checkpoint-dir", type=Path, default=Path("checkpoint"),
        help="folder searched for --checkpoint names")
    add("--out", type=Path, default=Path("predictions"),
        help="output folder (files already in it are overwritten; it is never read as input)")
    add("--batch-size", type=positive_int, default=4, help="images per forward pass")
    add_device_flags(parser)
    add("--min-area", type=positive_int, default=MIN_LESION_AREA,
        help="predicted components smaller than this many original pixels are dropped from "
             "the mask, the overlay and the lesion list (the test script's default too)")
    add("--save-probabilities", action="store_true",
        help="also write <name>_probs.npz: the class probabilities (float16) at the model's "
             "resolution, with the geometry that maps them to the original pixels")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


# ----------------------------------------------------------------------------- inputs


def collect_inputs(paths: list[Path], exclude: Path | None = None) -> list[Path]:
    """The files to predict, in order, each once: files as given, folders searched recursively
    (sorted) for *.dcm, *.png, *.jpg, *.jpeg and any other file that starts with the DICOM
    preamble (extensionless, or named by its UID), outside `exclude` (the output folder, so
    outputs are not re-read). A path that does not exist raises DatasetError."""
    excluded = exclude.resolve() if exclude is not None else None
    files, seen = [], set()
    for path in paths:
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file()
                           and (f.suffix.lower() in INPUT_SUFFIXES or is_dicom(f))
                           and excluded not in f.resolve().parents)
        elif path.is_file():
            found = [path]
        else:
            raise DatasetError(f"no file or folder {path}")
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    return files


def output_names(files: list[Path], roots: list[Path]) -> list[str]:
    """A distinct, file-system-safe <name> per file (see the module docstring).

    `roots` are the inputs the files were collected from: a repeated stem is replaced by the
    file's path below the first folder among them that holds it, or by its path as given.
    """
    stems = Counter(file.stem for file in files)
    names, taken = [], set()
    for file in files:
        if stems[file.stem] == 1:
            name = file.stem
        else:
            root = next((r for r in roots if r.is_dir() and file.is_relative_to(r)), None)
            # From the input folder's own name down: in a TCIA tree that holds the case folder.
            relative = file.relative_to(root.parent) if root else file.relative_to(file.anchor)
            parts = [p for p in relative.with_suffix("").parts if p != ".."]
            name = image_folder_name("/".join(parts))
        name = re.sub(r"[^\w.-]+", "_", name)
        unique, k = name, 1
        while unique.casefold() in taken:  # also distinct on case-insensitive file systems
            k += 1
            unique = f"{name}_{k}"
        taken.add(unique.casefold())
        names.append(unique)
    return names


def load_image(path: Path) -> np.ndarray:
    """The 2-D grayscale pixels of a DICOM, PNG or JPEG (see imaging.read_pixels).

    Raises DatasetError naming the file and the reason for an unreadable file, an ROI mask or
    a cropped image (by its DICOM SeriesDescription; where none says what the file is, a mask
    by its two grey levels); prints a warning for an image too small to be a mammogram.
    """
    description = ""  # PNG and JPEG have none, nor have some CBIS-DDSM masks
    if is_dicom(path):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SeriesDescription"])
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for a damaged file
            raise DatasetError(f"cannot read DICOM {path}: {error}") from error
        description = str(header.get("SeriesDescription", ""))
        if kind_from_description(description) in ("mask", "crop"):
            raise DatasetError(f"{path} is not a mammogram (SeriesDescription {description!r})")
    image = read_pixels(path)
    if not description and looks_like_mask(image[::8, ::8]):
        raise DatasetError(f"{path} is not a mammogram: nearly all of it is at two grey "
                            "levels, like an ROI mask")
    if max(image.shape) < MIN_MAMMOGRAM_SIDE:
        tqdm.write(f"warning: {path} is {image.shape[0]}x{image.shape[1]} px, small for a "
                   "mammogram (CBIS-DDSM's are about 5300x3000): a lesion crop or a thumbnail "
                   "gives meaningless predictions", file=sys.stderr)
    return image


# ----------------------------------------------------------------------------- outputs


def _display_image(image: np.ndarray) -> np.ndarray:
    """The image at most OVERLAY_HEIGHT tall, windowed to [0, 1] for viewing."""
    height, width = image.shape
    if height > OVERLAY_HEIGHT:
        scale = OVERLAY_HEIGHT / height
        image = cv2.resize(image, (max(1, round(width * scale)), OVERLAY_HEIGHT),
                           interpolation=cv2.INTER_AREA)
    return scale_intensities(image).astype(np.float32) / 65535


def _encode_png(path: Path, image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path}")
    return encoded.tobytes()


def _write_set(files: dict[Path, bytes]) -> None:
    """One image's outputs together or none of them (JSON last: it marks a complete set)."""
    atomic_write_all({path: lambda tmp, data=data: Path(tmp).write_bytes(data)
                      for path, data in files.items()})


@dataclass
class _Loaded:
    path: Path
    name: str
    image: np.ndarray  # uint16 at the checkpoint's resolution, as the model was trained on
    meta: dict  # prepare_image's geometry
    display: np.ndarray  # small float copy for the overlay


def _write_outputs(item: _Loaded, probs: np.ndarray, out: Path, min_area: int,
                   algorithm: SegAlgorithm | None = None,
                   save_probabilities: bool = False) -> dict:
    """Mask, overlay, JSON, for a DICOM with `algorithm` given DICOM SEG, and the probabilities
    if asked, of one image from its (C, H, W) probabilities at the model's resolution; returns
    the JSON's content."""
    mask, abnormality = predict_at_original(probs, item.meta)
    lesions = []
    for candidate in drop_small_lesions(abnormality, mask, min_area):
        x0, y0, x1, y1 = candidate.bbox
        lesions.append({"class": CLASS_NAMES[candidate.cls], "class_id": candidate.cls,
                        "score": round(candidate.score, 4), "bbox": [x0, y0, x1, y1],
                        "area": candidate.area,
                        "centroid": [round(v, 1) for v in candidate.centroid]})
    lesions.sort(key=lambda lesion: -lesion["score"])
    files = {out / f"{item.name}_mask.png": _encode_png(out / f"{item.name}_mask.png", mask)}
    seg_path, seg = out / f"{item.name}_seg.dcm", None
    if algorithm is not None and is_dicom(item.path):
        seg = encode_dicom_seg(item.path, mask, algorithm)
    if seg is not None:
        files[seg_path] = seg

    height, width = mask.shape
    small_h, small_w = item.display.shape
    small_mask = cv2.resize(mask, (small_w, small_h), interpolation=cv2.INTER_NEAREST_EXACT)
    panel = overlay_panel(item.display, small_mask)
    scale, offset = small_w / width, small_w + 4
    for lesion in lesions:  # boxes keep lesions too small to survive the downscale visible
        x0, y0, x1, y1 = (round(v * scale) for v in lesion["bbox"])
        cv2.rectangle(panel, (offset + x0, y0), (offset + max(x0, x1 - 1), max(y0, y1 - 1)),
                      CLASS_COLOURS[lesion["class_id"]], 1)
    overlay = out / f"{item.name}_overlay.png"
    files[overlay] = _encode_png(overlay, cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    if save_probabilities:
        files[out / f"{item.name}_probs.npz"] = probabilities_npz(probs, item.meta)

    y0, y1, x0, x1 = item.meta["box"]
    record = {"source": str(item.path.absolute()), "name": item.name,
              "original_size": {"height": height, "width": width},
              "breast_box": [x0, y0, x1, y1], "flipped": item.meta["flipped"],
              "malignancy_score": round(float(probs[MALIGNANT].max()), 4),
              "lesions": lesions}
    files[out / f"{item.name}.json"] = json.dumps(record, indent=2).encode()
    _write_set(files)
    if seg is None:  # an earlier run's Segmentation would contradict this mask
        seg_path.unlink(missing_ok=True)
    return record


# ----------------------------------------------------------------------------- the run


@dataclass
class Summary:
    records: list[dict] = field(default_factory=list)  # the JSON of every image written
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)


def predict_files(files: list[Path], names: list[str], members: list[Member], out: Path,
                  device: torch.device, *, batch_size: int = 4, amp: str = "auto",
                  min_area: int = MIN_LESION_AREA, progress: bool = True,
                  algorithm: SegAlgorithm | None = None, tta: bool = False,
                  save_probabilities: bool = False, stitch: str = "auto") -> Summary:
    """Predict every file in batches with the members' mean (one member: one checkpoint) and
    write its outputs as <name>_* into out (a DICOM SEG per DICOM when `algorithm` identifies
    the model); files that cannot be read, ROI masks and crops are reported on stderr (one
    line each) and skipped. A patch-trained checkpoint sees one image at a time through its
    sliding window, batch_size tiles at once."""
    out.mkdir(parents=True, exist_ok=True)
    config = members[0].config  # the input mode every member shares
    resolution = resolution_of(config)
    images_per_batch = 1 if config.get("patch_size") else batch_size
    summary = Summary()
    todo = list(zip(files, names, strict=True))
    bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=not progress)
    for start in range(0, len(todo), images_per_batch):
        batch = []
        for path, name in todo[start:start + images_per_batch]:
            try:
                image = load_image(path)
            except DatasetError as error:
                reason = " ".join(str(error).split())  # one line, whatever the reader said
                summary.skipped.append((path, reason))
                tqdm.write(f"skipped: {reason}", file=sys.stderr)
                bar.update()
                continue
            prepared, meta = prepare_image(image, resolution, config["canonical_flip"])
            batch.append(_Loaded(path, name, prepared, meta, _display_image(image)))
        if not batch:
            continue
        images = torch.from_numpy(np.stack([item.image for item in batch])).unsqueeze(1)
        probs_batch = ensemble_probabilities(members, images, device, amp, batch_size, tta,
                                             stitch)
        for item, probs in zip(batch, probs_batch, strict=True):
            summary.records.append(_write_outputs(item, probs, out, min_area, algorithm,
                                                  save_probabilities))
            bar.update()
    bar.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        files = collect_inputs(args.inputs, exclude=args.out)
        if args.onnx is not None:
            if args.checkpoint:
                raise UsageError("pass --onnx or --checkpoint, not both")
            device, members = torch.device("cpu"), [load_onnx_model(args.onnx)]
        else:
            device = resolve_device(args.device)
            members = load_ensemble(resolve_checkpoints(args.checkpoint, args.checkpoint_dir),
                                    device)
    except (CheckpointError, DatasetError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no DICOM, PNG or JPEG files in {', '.join(map(str, args.inputs))}",
              file=sys.stderr)
        return 1
    try:
        summary = predict_files(files, output_names(files, args.inputs), members, args.out,
                                device, batch_size=args.batch_size, amp=args.amp,
                                min_area=args.min_area, progress=args.progress,
                                algorithm=segmentation_algorithm(members, args.tta),
                                tta=args.tta, save_probabilities=args.save_probabilities,
                                stitch=args.stitch)
    except DiskFullError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(summary.records)} of {len(files)} images predicted into {args.out}, "
          f"{len(summary.skipped)} skipped (unreadable, or not a mammogram)")
    return 0 if summary.records else 1


if __name__ == "__main__":
    raise SystemExit(main())
