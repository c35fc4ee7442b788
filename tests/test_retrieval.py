"""main_retrieval on a tree shaped like the real download and on the synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import main_retrieval
from main_retrieval import CSV_COLUMNS, DESCRIPTION_FILES, load_descriptions, retrieve
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
    assert report["files_typed_by_content"] == len(range(0, 3568, 7))
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

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main_retrieval.main([*args, "--out-dir", str(blocker / "csv")]) == 2
    assert "cannot write to --out-dir" in capsys.readouterr().err
