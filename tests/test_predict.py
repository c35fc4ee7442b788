"""predict.py on synthetic DICOM, PNG and JPEG files with untrained tiny checkpoints (CPU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

import dicom_seg
import imaging
import inference
import model
import predict
import preprocessing
from cbis import CLASS_NAMES
from synthetic import write_dicom
from tests.conftest import mammogram

LESION_KEYS = {"class", "class_id", "score", "bbox", "area", "centroid"}
RECORD_KEYS = {"source", "name", "original_size", "breast_box", "flipped", "malignancy_score",
               "lesions"}


def save_checkpoint(path: Path, kind: str) -> Path:
    """An untrained resnet18 checkpoint at 64x48. "mass" outputs a constant malignant mass, so
    the expected mask is exactly the breast crop box, "background" nothing; "patchwork" has its
    random logits sharpened into a mix of classes and components of many sizes."""
    torch.manual_seed(1)
    architecture = {"backbone": "resnet18", "num_classes": 4, "in_channels": 1,
                    "output_stride": 16, "decoder_channels": 256}  # what build_model takes
    net = model.build_model(**architecture)
    with torch.no_grad():
        if kind in ("mass", "background"):
            net.classifier.weight.zero_()
            net.classifier.bias.copy_(torch.tensor([10.0 * (kind == "background"), 0.0,
                                                    10.0 * (kind == "mass"), 0.0]))
        else:
            net.classifier.weight.mul_(30)
    config = {**architecture, "size": [64, 48], "canonical_flip": True,
              "preprocess_version": preprocessing.PREPROCESS_VERSION,
              "class_names": list(CLASS_NAMES)}
    torch.save({"model": net.state_dict(), "config": config, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {kind: save_checkpoint(folder / f"{kind}.pth", kind)
            for kind in ("mass", "patchwork", "background")}


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """A TCIA-like tree (two 1-1.dcm, one corrupt DICOM, a 16-bit PNG) and a colour PNG."""
    scans = tmp_path / "scans"
    paths = {
        "left": scans / "Calc-Test_P_00001_LEFT_CC" / "08-29-2017-DDSM-1"
        / "1.000000-full mammogram images-1" / "1-1.dcm",
        "right": scans / "Mass-Test_P_00002_RIGHT_MLO" / "08-29-2017-DDSM-2"
        / "1.000000-full mammogram images-2" / "1-1.dcm",
        "corrupt": scans / "broken" / "1-3.dcm",
        "png16": scans / "pngs" / "scan16.png",
        "colour": tmp_path / "colour.png",
    }
    write_dicom(paths["left"], mammogram(200, 120, False, 1), patient_id="P_00001",
                series_description="full mammogram images")
    write_dicom(paths["right"], mammogram(200, 120, True, 2), patient_id="P_00002",
                series_description="full mammogram images")
    paths["corrupt"].parent.mkdir(parents=True)
    paths["corrupt"].write_bytes(b"not a DICOM file")
    paths["png16"].parent.mkdir(parents=True)
    cv2.imwrite(str(paths["png16"]), mammogram(150, 90, True, 3))
    grey8 = (mammogram(90, 70, False, 4) // 256).astype(np.uint8)
    cv2.imwrite(str(paths["colour"]), np.repeat(grey8[..., None], 3, axis=-1))
    return paths


def run(checkpoint: Path, out: Path, *paths: Path, extra: tuple[str, ...] = ()) -> int:
    return predict.main(["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                         "--batch-size", "3", "--no-progress", *extra, *map(str, paths)])


def read_outputs(out: Path) -> dict[str, tuple[dict, np.ndarray, np.ndarray]]:
    """Source path -> (record, mask, overlay) for every JSON written."""
    outputs = {}
    for path in out.glob("*.json"):
        record = json.loads(path.read_text())
        mask = cv2.imread(str(out / f"{record['name']}_mask.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / f"{record['name']}_overlay.png"), cv2.IMREAD_UNCHANGED)
        outputs[record["source"]] = record, mask, overlay
    return outputs


def test_predicts_at_original_size_and_skips_unreadable_files(checkpoints, inputs, tmp_path,
                                                              capsys):
    out = tmp_path / "predictions"
    assert run(checkpoints["mass"], out, inputs["left"].parents[3], inputs["colour"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and str(inputs["corrupt"]) in skipped[0]
    assert "4 of 5 images" in captured.out and "1 skipped" in captured.out

    outputs = read_outputs(out)
    assert set(outputs) == {str(inputs[k]) for k in ("left", "right", "png16", "colour")}
    sizes = {"left": (200, 120), "right": (200, 120), "png16": (150, 90), "colour": (90, 70)}
    for key, (height, width) in sizes.items():
        record, mask, overlay = outputs[str(inputs[key])]
        assert set(record) == RECORD_KEYS
        assert record["original_size"] == {"height": height, "width": width}
        assert mask.dtype == np.uint8 and mask.shape == (height, width)
        assert overlay.shape == (height, 2 * width + 4, 3)  # image | prediction
        # Constant "mass" output: mass exactly inside the crop box, background outside.
        x0, y0, x1, y1 = record["breast_box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        expected = np.zeros((height, width), np.uint8)
        expected[y0:y1, x0:x1] = 2
        np.testing.assert_array_equal(mask, expected)
        [lesion] = record["lesions"]
        assert set(lesion) == LESION_KEYS
        assert lesion["class"] == "mass" and lesion["class_id"] == 2
        assert lesion["bbox"] == [x0, y0, x1, y1] and lesion["area"] == (x1 - x0) * (y1 - y0)
        assert lesion["score"] > 0.99 and record["malignancy_score"] > 0.99
    assert outputs[str(inputs["right"])][0]["flipped"]
    assert not outputs[str(inputs["left"])][0]["flipped"]


def test_small_components_leave_mask_and_lesion_list_together(checkpoints, inputs, tmp_path):
    files = [inputs[k] for k in ("left", "right", "png16")]
    assert run(checkpoints["patchwork"], tmp_path / "all", *files, extra=("--min-area", "1")) == 0
    assert run(checkpoints["patchwork"], tmp_path / "big", *files, extra=("--min-area", "40")) == 0
    every, big = read_outputs(tmp_path / "all"), read_outputs(tmp_path / "big")
    for source, (record, mask, _) in big.items():
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        height, width = mask.shape
        count, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8),
                                                              connectivity=8)
        assert (stats[1:, cv2.CC_STAT_AREA] >= 40).all()
        assert len(record["lesions"]) == count - 1
        for lesion in record["lesions"]:
            x0, y0, x1, y1 = lesion["bbox"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert lesion["class"] in CLASS_NAMES[1:] and 0 <= lesion["score"] <= 1
            assert (mask[y0:y1, x0:x1] > 0).sum() >= lesion["area"] >= 40
        # Dropping a component only clears its pixels: the rest of the mask is unchanged.
        all_mask = every[source][1]
        np.testing.assert_array_equal(mask[mask > 0], all_mask[mask > 0])
    dropped = sum(len(every[s][0]["lesions"]) - len(big[s][0]["lesions"]) for s in big)
    assert dropped > 0 and sum(len(record["lesions"]) for record, _, _ in big.values()) >= 3


def test_files_named_alike_get_distinct_names(tmp_path):
    root = tmp_path / "scans"
    files = [root / "Calc-Test_P_1_LEFT_CC" / "a b" / "1-1.dcm",
             root / "Mass-Test_P_2_LEFT_CC" / "c" / "1-1.dcm",
             root / "other.png", root / "plain" / "1-1.dcm",
             tmp_path / "x" / "1-1.dcm", tmp_path / "y" / "1-1.dcm"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.touch()
    names = predict.output_names(files, [root, *files[4:]])
    # A TCIA case folder names the file; otherwise the path from the input folder's name down.
    assert names[:4] == ["Calc-Test_P_1_LEFT_CC", "Mass-Test_P_2_LEFT_CC", "other",
                         "scans__plain__1-1"]
    assert len({name.casefold() for name in names}) == len(files)


def test_collect_inputs_searches_folders_once_and_not_the_output_folder(inputs, tmp_path):
    scans = inputs["left"].parents[3]
    out = scans / "predictions"
    out.mkdir()
    (out / "old_mask.png").touch()
    files = predict.collect_inputs([scans, inputs["left"], inputs["colour"]], exclude=out)
    assert set(files) == {inputs[k] for k in ("left", "right", "corrupt", "png16", "colour")}
    assert len(files) == 5
    with pytest.raises(imaging.DatasetError, match="no file or folder"):
        predict.collect_inputs([tmp_path / "missing"])


def test_usage_errors_exit_2_and_nothing_readable_exits_1(checkpoints, inputs, tmp_path,
                                                          capsys):
    out = tmp_path / "predictions"
    assert run(tmp_path / "missing.pth", out, inputs["left"]) == 2
    assert run(checkpoints["mass"], out, tmp_path / "no_such_scan.dcm") == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert not out.exists()
    assert run(checkpoints["mass"], out, inputs["corrupt"]) == 1
    assert "0 of 1 images" in capsys.readouterr().out


def test_jpeg_files_folders_of_them_and_extensionless_dicom(checkpoints, tmp_path, capsys):
    scans = tmp_path / "scans"
    jpeg = scans / "jpeg" / "1.3.6.1.4.1.9590.100.1.2.1" / "2-17.jpg"
    jpeg.parent.mkdir(parents=True)
    cv2.imwrite(str(jpeg), (mammogram(120, 80, False, 5) // 256).astype(np.uint8))
    extensionless = scans / "DICOMDIR_LIKE" / "IM0001"
    write_dicom(extensionless, mammogram(110, 70, True, 6), patient_id="P",
                series_description=None)
    (scans / "notes").write_text("not an image")  # no DICM preamble: not collected
    (scans / "1.2.840.5").write_text("not an image either")
    assert set(predict.collect_inputs([scans])) == {jpeg, extensionless}
    out = tmp_path / "out"
    assert run(checkpoints["mass"], out, scans) == 0
    outputs = read_outputs(out)
    assert {source: mask.shape for source, (_, mask, _) in outputs.items()} == {
        str(jpeg): (120, 80), str(extensionless): (110, 70)}
    assert [p.name for p in out.glob("*_seg.dcm")] == ["IM0001_seg.dcm"]  # DICOM inputs only
    assert capsys.readouterr().err.count("warning:") == 2  # both far too small for mammograms


def with_frame_of_reference(path: Path) -> None:
    """The spatial attributes of a modern mammogram (the scanned CBIS-DDSM films have none)."""
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID, ds.PixelSpacing, ds.BodyPartThickness = generate_uid(), [0.05] * 2, 45
    ds.save_as(path)


def test_dicom_seg_matches_the_mask_png_and_references_its_source(checkpoints, tmp_path):
    sources = {"plain": tmp_path / "plain.dcm", "referenced": tmp_path / "referenced.dcm"}
    for seed, path in enumerate(sources.values()):
        write_dicom(path, mammogram(200, 120, bool(seed), seed), patient_id=f"P_{seed}",
                    series_description="full mammogram images")
    with_frame_of_reference(sources["referenced"])
    out = tmp_path / "out"
    assert run(checkpoints["patchwork"], out, *sources.values(), extra=("--min-area", "1")) == 0
    digest = hashlib.sha256(checkpoints["patchwork"].read_bytes()).hexdigest()
    for name, path in sources.items():
        source = pydicom.dcmread(path)
        mask = cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        classes = [int(c) for c in np.unique(mask) if c]
        assert len(classes) >= 2
        ds = pydicom.dcmread(out / f"{name}_seg.dcm")
        assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        [series] = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        assert ds.get("FrameOfReferenceUID") == source.get("FrameOfReferenceUID")
        if name == "referenced":
            measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            assert list(measures.PixelSpacing) == [0.05, 0.05]
            assert measures.SliceThickness == 45  # the compressed breast
        # One segment per class found, coded, with the checkpoint's identity.
        segments = ds.SegmentSequence
        assert [s.SegmentLabel for s in segments] == [dicom_seg.SEGMENTS[c][0] for c in classes]
        for segment, cls in zip(segments, classes, strict=True):
            _, property_type, modifier = dicom_seg.SEGMENTS[cls]
            coded = segment.SegmentedPropertyTypeCodeSequence[0]
            assert coded.CodeValue == property_type.value
            assert coded.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == modifier.value
            assert segment.SegmentAlgorithmType == "AUTOMATIC"
            algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmVersion == f"sha256:{digest[:16]}"
            assert algorithm.AlgorithmName == "DeepLabV3+ resnet18 CBIS-DDSM"
        # The frames, read by pydicom and by highdicom, are the PNG mask's classes.
        numbers = [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
                   for f in ds.PerFrameFunctionalGroupsSequence]
        for frame, number in zip(ds.pixel_array.reshape(-1, *mask.shape), numbers, strict=True):
            np.testing.assert_array_equal(frame, mask == classes[number - 1])
        seg = hd.seg.segread(out / f"{name}_seg.dcm")
        assert seg.get_source_image_uids() == [
            (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)]
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID])
        assert pixels.shape == (1, *mask.shape, len(classes))
        for k, cls in enumerate(classes):
            np.testing.assert_array_equal(pixels[0, ..., k], mask == cls)
    # Nothing found: no Segmentation (it needs a segment), and none left from the last run.
    assert run(checkpoints["background"], out, sources["plain"]) == 0
    assert not (out / "plain_seg.dcm").exists() and (out / "referenced_seg.dcm").exists()
    assert not cv2.imread(str(out / "plain_mask.png"), cv2.IMREAD_UNCHANGED).any()


def test_tcia_case_tree_skips_roi_masks_and_crops_and_warns_on_small_images(checkpoints,
                                                                         tmp_path, capsys):
    case = tmp_path / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC"
    roi = case.parent / "Mass-Training_P_00001_LEFT_CC_1" / "07-21-2016-DDSM-1"
    full = case / "07-20-2016-DDSM-1" / "1.000000-full mammogram images-1" / "1-1.dcm"
    image = mammogram(1100, 660, False, 7)
    write_dicom(full, image, patient_id=case.name, series_description="full mammogram images")
    lesion = np.zeros(image.shape, np.uint8)
    lesion[500:560, 200:260] = 255
    files = {"crop": roi / "1.000000-ROI mask images-2" / "1-1.dcm",
             "mask": roi / "1.000000-ROI mask images-2" / "1-2.dcm",
             "quirky mask": roi / "1.000000-ROI mask images-3" / "1-1.dcm"}
    write_dicom(files["crop"], image[500:560, 200:260], patient_id=roi.parent.name,
                series_description="cropped images")
    write_dicom(files["mask"], lesion, patient_id=roi.parent.name,
                series_description="ROI mask images")
    write_dicom(files["quirky mask"], lesion, patient_id="P_00001_LEFT_CC_1.dcm",
                series_description=None)
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), mammogram(200, 120, True, 8))
    out = tmp_path / "out"
    assert run(checkpoints["mass"], out, tmp_path / "CBIS-DDSM", small) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 3
    assert str(files["crop"]) in skipped[0] and "'cropped images'" in skipped[0]
    assert str(files["mask"]) in skipped[1] and "'ROI mask images'" in skipped[1]
    assert str(files["quirky mask"]) in skipped[2] and "like an ROI mask" in skipped[2]
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(small) in warnings[0]
    assert "2 of 5 images" in captured.out and "3 skipped" in captured.out
    assert set(read_outputs(out)) == {str(full), str(small)}


class MassOnTheLeft(torch.nn.Module):
    """Logits of a malignant mass on the left half of the model's input, background elsewhere:
    an output that depends on position, unlike the constant checkpoints above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 0] = 5.0
        logits[:, 2, :, : x.shape[3] // 2] = 10.0
        return logits


def test_prediction_lands_on_the_chest_wall_side_of_either_breast(inputs, tmp_path):
    # The model sees every breast with its chest wall on the left and predicts a mass on the left
    # half. Mapped back to original pixels, the mass covers the breast box's half on the
    # chest-wall side: the left half for a left breast, the right half for a right one (flipped
    # back). Worked by hand: the probabilities are interpolated linearly from 48 columns to the
    # box's w, so the mass/background edge lies at w / 2 - 0.5 in the model's frame.
    files = [inputs["left"], inputs["right"]]
    config = {"size": [64, 48], "canonical_flip": True}
    summary = predict.predict_files(files, ["left", "right"],
                                    [inference.Member(MassOnTheLeft(), config)],
                                    tmp_path / "out", torch.device("cpu"), progress=False)
    assert len(summary.records) == 2
    for record in summary.records:
        mask = cv2.imread(str(tmp_path / "out" / f"{record['name']}_mask.png"),
                          cv2.IMREAD_UNCHANGED)
        x0, y0, x1, y1 = record["breast_box"]
        width = x1 - x0
        inside = (np.arange(width) + 0.5) < width / 2  # model-frame columns left of the edge
        if record["flipped"]:
            inside = inside[::-1]
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1][:, inside] = 2
        assert record["flipped"] == (record["name"] == "right")
        assert (mask != expected).sum() <= y1 - y0  # at most the edge column may differ
        assert set(np.unique(mask)) == {0, 2}
