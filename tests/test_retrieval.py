"""main_retrieval on a tree shaped like the real download and on the synthetic set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import main_retrieval
from cbis import CSV_COLUMNS
from main_retrieval import DESCRIPTION_FILES, load_descriptions, retrieve
from synthetic import write_dicom

REAL_METADATA = main_retrieval.BUNDLED_METADATA


def build_real_shaped_tree(root: Path) -> pd.DataFrame:
    """Tiny DICOMs for every abnormality of the real description CSVs, in the NBIA layout.

    Crop and mask alternate between the two download layouts (one series folder with 1-1/1-2 in
    either order, or two series folders) and every seventh mask has no SeriesDescription, as in
    the real data, so pairing has to read headers and, for those, pixels.
    """
    descriptions = load_descriptions(REAL_METADATA)
    full = np.arange(64, dtype=np.uint16).reshape(8, 8) * 900
    crop = np.arange(16, dtype=np.uint16).reshape(4, 4) * 3000
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    study = "01-01-2000-DDSM-00001"
    for folder in descriptions["image file path"].str.split("/").str[0].unique():
        series = root / "CBIS-DDSM" / folder / study / "1.000000-full mammogram images-00001"
        write_dicom(series / "1-1.dcm", full, patient_id=folder,
                    series_description="full mammogram images")
    roi_folders = descriptions["ROI mask file path"].str.split("/").str[0]
    for index, folder in enumerate(roi_folders):
        base = root / "CBIS-DDSM" / folder / study
        mask_description = None if index % 7 == 0 else "ROI mask images"
        if index % 3 == 0:  # newer layout: two series folders
            crop_path = base / "1.000000-cropped images-00002" / "1-1.dcm"
            mask_path = base / "1.000000-ROI mask images-00003" / "1-1.dcm"
        else:  # older layout: one folder, crop and mask in either order
            names = ("1-1.dcm", "1-2.dcm") if index % 3 == 1 else ("1-2.dcm", "1-1.dcm")
            crop_path, mask_path = (base / "1.000000-ROI mask images-00003" / n for n in names)
        write_dicom(crop_path, crop, patient_id=folder, series_description="cropped images")
        write_dicom(mask_path, mask, patient_id=folder, series_description=mask_description)
    return descriptions


@pytest.fixture(scope="module")
def real_shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis")
    descriptions = build_real_shaped_tree(root)
    rows, report = retrieve(root, REAL_METADATA, val_fraction=0.1, seed=0)
    return descriptions, rows, report


def test_real_csvs_every_mammogram_and_roi_found(real_shaped):
    descriptions, rows, report = real_shaped
    assert len(descriptions) == 3568
    assert len(rows) == 3568 and report["skipped"] == []
    assert rows["img_path"].nunique() == 3103
    official_train = rows[rows["split"].isin(["train", "val"])]
    assert official_train["img_path"].nunique() == 2458
    assert rows.loc[rows["split"] == "test", "img_path"].nunique() == 645
    assert list(rows.columns) == CSV_COLUMNS
    assert report["roi_files_typed_without_description"] == len(range(0, 3568, 7))
    # Same patient, side, view and official split in both the Mass and the Calc collection.
    assert report["views_in_both_collections"] == 42


def test_real_csvs_labels_follow_pathology_and_type(real_shaped):
    descriptions, rows, _ = real_shaped
    truth = descriptions.assign(roi=descriptions["ROI mask file path"].str.split("/").str[0])
    rows = rows.assign(roi=rows["roi_path"].str.split("/").str[1]).merge(truth, on="roi")
    malignant = rows["pathology_x"] == "MALIGNANT"
    mass = rows["abnormality type"] == "mass"
    assert (rows.loc[~malignant, "class_id"] == 1).all()
    assert (rows.loc[malignant & mass, "class_id"] == 2).all()
    assert (rows.loc[malignant & ~mass, "class_id"] == 3).all()
    expected_label = np.where(mass, 3, 1) + (~malignant)
    assert (rows["label"].to_numpy() == expected_label).all()
    # Class counts from the published files (TCIA README): benign = all non-malignant rows.
    assert (rows["class_id"] == 2).sum() == 637 + 147
    assert (rows["class_id"] == 3).sum() == 544 + 129
    assert (rows["class_id"] == 1).sum() == 3568 - 637 - 147 - 544 - 129


def test_real_csvs_mask_and_crop_told_apart_by_header_or_content(real_shaped, tmp_path):
    import pydicom

    _, rows, report = real_shaped
    root = Path(report["data_root"])
    for record in rows.sample(40, random_state=0).itertuples():
        assert pydicom.dcmread(root / record.roi_path).BitsStored == 8
        assert pydicom.dcmread(root / record.crop_path).BitsStored == 16


def test_real_csvs_patient_level_split(real_shaped):
    _, rows, _ = real_shaped
    train = set(rows.loc[rows["split"] == "train", "patient_id"])
    val = set(rows.loc[rows["split"] == "val", "patient_id"])
    assert train and val and not train & val
    assert 0.05 < len(val) / len(train | val) < 0.15
    # The official test set is never moved into train or val.
    assert (rows.loc[rows["collection"].str.endswith("Test"), "split"] == "test").all()


MISSING_ROI = "Calc-Training_P_01563_RIGHT_MLO_2"  # the Kaggle copy lacks its folder
SMALL_MASK = "Mass-Training_P_00059_LEFT_MLO_1"  # its mask is smaller than its mammogram


def build_kaggle_tree(root: Path) -> tuple[dict[str, str], dict[str, tuple[str, str]], int]:
    """Tiny JPEGs for every abnormality of the real description CSVs, in the Kaggle layout.

    jpeg/<uid>/ folders are named by the CSV paths' third part: crop and mask share one folder
    (1- and 2- in either order) or, where the CSV names two series, have one each. csv/ holds
    the four real CSVs and a dicom_info.csv in which every seventh mask has an empty
    SeriesDescription (and a PatientID like P_00562_LEFT_CC_2.dcm) and every 50th crop no row
    at all; the masks are JPEG-compressed (non-binary). As in the real copy one ROI folder is
    missing and one mask is smaller than its mammogram. Returns the truth: case folder -> full
    mammogram, ROI folder -> (mask, crop), and how many ROI files no description types.
    """
    descriptions = load_descriptions(REAL_METADATA)
    (root / "csv").mkdir(parents=True)
    for name in DESCRIPTION_FILES.values():
        shutil.copy(REAL_METADATA / name, root / "csv" / name)
    mask = np.zeros((16, 12), np.uint8)
    mask[4:9, 3:8] = 255
    small_mask = np.zeros((14, 10), np.uint8)
    small_mask[4:9, 3:8] = 255
    images = {"full": np.arange(192, dtype=np.uint8).reshape(16, 12),
              "crop": np.arange(30, dtype=np.uint8).reshape(6, 5) * 8,
              "mask": mask, "small_mask": small_mask}
    encoded = {what: cv2.imencode(".jpg", pixels)[1].tobytes() for what, pixels in images.items()}
    info, fulls, rois, untyped = [], {}, {}, 0

    def write(uid: str, name: str, what: str, description: str, patient: str) -> str:
        relative = f"jpeg/{uid}/{name}"
        (root / "jpeg" / uid).mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(encoded[what])
        height, width = images[what].shape
        info.append({"image_path": f"CBIS-DDSM/{relative}", "SeriesDescription": description,
                     "PatientID": patient, "Rows": height, "Columns": width,
                     "SeriesInstanceUID": uid})
        return relative

    for path in descriptions["image file path"].unique():
        folder, _, uid, _ = path.split("/")
        fulls[folder] = write(uid, "1-1.jpg", "full", "full mammogram images", folder)
    for index, fields in enumerate(descriptions.to_dict("records")):
        folder, _, mask_uid, _ = fields["ROI mask file path"].split("/")
        crop_uid = fields["cropped image file path"].split("/")[2]
        if folder == MISSING_ROI:
            continue
        quirk = index % 7 == 0 or folder == SMALL_MASK
        patient = f"{folder.split('_', 1)[1]}.dcm" if quirk else folder
        names = ("1", "2") if index % 2 else ("2", "1")  # the mask's and the crop's prefix
        if crop_uid != mask_uid:
            names = ("1", "1")
        mask_path = write(mask_uid, f"{names[0]}-{index}.jpg",
                          "small_mask" if folder == SMALL_MASK else "mask",
                          "" if quirk else "ROI mask images", patient)
        crop_path = write(crop_uid, f"{names[1]}-{index}.jpg", "crop", "cropped images", folder)
        if index % 50 == 1:
            info.pop()  # no row: retrieval has to measure that JPEG
        untyped += quirk + (index % 50 == 1)
        rois[folder] = (mask_path, crop_path)
    pd.DataFrame(info).to_csv(root / "csv" / "dicom_info.csv", index=False)
    return fulls, rois, untyped


@pytest.fixture(scope="module")
def kaggle_shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    truth = build_kaggle_tree(root)
    rows, report = retrieve(root, val_fraction=0.1, seed=0)
    return root, truth, rows, report


def test_kaggle_copy_pairs_every_abnormality_with_its_mammogram_and_mask(kaggle_shaped,
                                                                          real_shaped):
    root, (fulls, rois, untyped), rows, report = kaggle_shaped
    assert report["layout"] == "kaggle"
    assert report["metadata_dir"] == str((root / "csv").resolve())  # the CSVs in ROOT/csv
    # The missing folder, and the other two ROIs of its mammogram (else lesions as background).
    missing = [s for s in report["skipped"] if s["reason"] == "missing ROI folder"]
    assert [s["roi"] for s in missing] == [MISSING_ROI]
    assert report["skipped_by_reason"] == {"missing ROI folder": 1,
                                           "another ROI of this mammogram is unusable": 2}
    assert len(rows) == 3568 - 3 and rows["img_path"].nunique() == 3103 - 1
    assert [m["roi"] for m in report["mask_size_mismatch"]] == [SMALL_MASK]
    assert report["mask_size_mismatch"][0]["mask_size"] == [14, 10]
    assert report["roi_files_typed_without_description"] == untyped
    # Every abnormality: its own mammogram, its mask (not its crop), whatever the 1-/2- prefix.
    rows = rows.assign(roi=rows["collection"] + rows["patient_id"].radd("_") + "_" + rows["side"]
                       + "_" + rows["view"] + "_" + rows["abnormality_id"].astype(str))
    assert set(rows["roi"]) == set(rois) - {f"{MISSING_ROI[:-2]}_1", f"{MISSING_ROI[:-2]}_3"}
    assert (rows["roi_path"] == rows["roi"].map(lambda r: rois[r][0])).all()
    assert (rows["crop_path"] == rows["roi"].map(lambda r: rois[r][1])).all()
    assert (rows["img_path"] == rows["roi"].str.rsplit("_", n=1).str[0].map(fulls)).all()
    # The same labels and split as the DICOM download gives.
    _, dicom_rows, _ = real_shaped
    dicom_rows = dicom_rows.assign(roi=dicom_rows["roi_path"].str.split("/").str[1])
    merged = rows.merge(dicom_rows, on="roi", suffixes=("", "_dicom"))
    assert len(merged) == len(rows)
    for column in ("label", "class_id", "split", "pathology", "patient_id"):
        assert (merged[column] == merged[f"{column}_dicom"]).all(), column


@pytest.fixture(scope="module")
def synthetic_csvs(tmp_path_factory):
    from synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, patients=16, size=(160, 100), seed=1, progress=False)
    out = root / "csv"
    assert main_retrieval.main(["--data-root", str(root), "--out-dir", str(out)]) == 0
    return root, out


def test_synthetic_defects_reported_not_silently_labelled(synthetic_csvs):
    root, out = synthetic_csvs
    report = json.loads((out / "retrieval_report.json").read_text())
    assert report["skipped_by_reason"].get("missing ROI folder") == 1
    assert len(report["mask_size_mismatch"]) == 1
    assert report["metadata_dir"] == str(root.resolve())  # the CSVs beside the images win
    missing = next(s for s in report["skipped"] if s["reason"] == "missing ROI folder")
    written = pd.concat(pd.read_csv(out / f"{s}.csv") for s in ("train", "val", "test"))
    # The mammogram whose ROI is missing is not in any CSV (that lesion would be background).
    assert not written["img_path"].str.contains(missing["image"] + "/", regex=False).any()
    sidecar = json.loads((out / "dataset.json").read_text())
    assert sidecar["schema_version"] == main_retrieval.SCHEMA_VERSION
    assert sidecar["data_root"] == str(root.resolve())


def test_errors_are_one_line_and_nonzero(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main_retrieval.main(["--data-root", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no CBIS-DDSM folders" in capsys.readouterr().err

    data = tmp_path / "data" / "CBIS-DDSM" / "Mass-Test_P_00001_LEFT_CC"
    data.mkdir(parents=True)
    metadata = tmp_path / "meta"
    metadata.mkdir()
    for name in DESCRIPTION_FILES.values():
        (metadata / name).write_text("patient,foo\n1,2\n")
    args = ["--data-root", str(tmp_path / "data"), "--metadata-dir", str(metadata)]
    assert main_retrieval.main([*args, "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a CBIS-DDSM description CSV" in err and err.count("\n") == 1

    kaggle = tmp_path / "kaggle"
    (kaggle / "jpeg").mkdir(parents=True)
    (kaggle / "csv").mkdir()
    (kaggle / "csv" / "dicom_info.csv").write_text("image_path,Rows\nCBIS-DDSM/jpeg/1/1-1.jpg,4\n")
    assert main_retrieval.main(["--data-root", str(kaggle), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "dicom_info.csv is not the Kaggle copy's" in err and err.count("\n") == 1

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main_retrieval.main([*args, "--out-dir", str(blocker / "csv")]) == 2
    assert "cannot write to --out-dir" in capsys.readouterr().err
