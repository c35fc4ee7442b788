"""synthetic.py: NBIA layout, DICOM headers, description CSVs, defects, determinism, lesions."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

import synthetic

METADATA = Path(__file__).resolve().parents[1] / "metadata"
CSV_NAMES = [
    f"{kind}_case_description_{split}_set.csv"
    for kind in ("mass", "calc")
    for split in ("train", "test")
]
FOLDER = re.compile(r"^(Mass|Calc)-(Training|Test)_P_\d{5}_(LEFT|RIGHT)_(CC|MLO)(_\d+)?$")
BITS = {"full mammogram images": 16, "cropped images": 16, "ROI mask images": 8, None: 8}
SIZE = (320, 200)


def generate(out: Path, seed: int = 5) -> dict:
    return synthetic.make_synthetic_dataset(out, patients=12, size=SIZE, seed=seed, progress=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out)


@pytest.fixture(scope="module")
def dicoms(generated) -> dict[Path, pydicom.Dataset]:
    root = generated[0] / "CBIS-DDSM"
    return {path.relative_to(root): pydicom.dcmread(path) for path in root.rglob("*.dcm")}


def full_image(dicoms: dict, folder: str) -> np.ndarray:
    return next(ds.pixel_array for path, ds in dicoms.items() if path.parts[0] == folder)


def masks(dicoms: dict) -> list[tuple[Path, np.ndarray]]:
    return [(path, ds.pixel_array) for path, ds in dicoms.items() if ds.BitsStored == 8]


def test_folder_names_and_both_series_layouts(generated, dicoms):
    out, summary = generated
    folders = [p.name for p in (out / "CBIS-DDSM").iterdir()]
    assert folders and all(FOLDER.match(name) for name in folders)
    files_per_series = Counter(path.parts[:3] for path in dicoms)
    one_series = [s for s, n in files_per_series.items() if "ROI mask" in s[2] and n == 2]
    cropped = [s for s in files_per_series if s[2].startswith("1.000000-cropped images-")]
    assert one_series and cropped  # both real download layouts
    assert (len(one_series), len(cropped)) == tuple(summary["layouts"].values())
    for path in dicoms:
        assert re.fullmatch(r"\d\d-\d\d-\d{4}-DDSM-\d{5}", path.parts[1])
        assert re.fullmatch(
            r"1\.000000-(full mammogram|cropped|ROI mask) images-\d{5}", path.parts[2]
        )


def test_headers_match_series_description(dicoms):
    for path, ds in dicoms.items():
        description = ds.get("SeriesDescription")
        assert ds.BitsStored == BITS[description], path
        assert ds.pixel_array.dtype == (np.uint16 if ds.BitsStored == 16 else np.uint8)
        assert ds.Modality == "MG" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.ImageLaterality == path.parts[0].split("_")[3][0]
        if description is None:  # the real defect: PatientID like P_00562_LEFT_CC_2.dcm
            assert re.fullmatch(r"P_\d{5}_(LEFT|RIGHT)_(CC|MLO)_\d+\.dcm", ds.PatientID)
        else:
            assert ds.PatientID == path.parts[0]
    full = [ds for ds in dicoms.values() if ds.get("SeriesDescription") == "full mammogram images"]
    assert {ds.SOPClassUID for ds in full} == {synthetic.MAMMOGRAPHY_SOP_CLASS}
    assert {(ds.Rows, ds.Columns) for ds in full} == {SIZE}


def test_masks_binary_and_full_size_except_the_defect(generated, dicoms):
    _, summary = generated
    (resized,) = summary["defects"]["mask_size_mismatch"]
    for path, mask in masks(dicoms):
        assert set(np.unique(mask)) == {0, 255}
        image = full_image(dicoms, path.parts[0].rsplit("_", 1)[0])
        if path.parts[0] == resized:
            assert mask.shape == (round(0.87 * SIZE[0]), round(0.87 * SIZE[1]))
        else:
            assert mask.shape == image.shape


def test_crop_is_the_lesion_bounding_box(dicoms):
    crops = {
        p.parts[0]: ds.pixel_array
        for p, ds in dicoms.items()
        if ds.get("SeriesDescription") == "cropped images"
    }
    for path, mask in masks(dicoms):
        if mask.shape != SIZE:
            continue
        x, y, w, h = cv2.boundingRect(mask)
        image = full_image(dicoms, path.parts[0].rsplit("_", 1)[0])
        np.testing.assert_array_equal(crops[path.parts[0]], image[y : y + h, x : x + w])


def test_csv_headers_are_the_real_ones(generated):
    out, _ = generated
    for name in CSV_NAMES:
        real = (METADATA / name).read_bytes().split(b"\r\n", 1)[0]
        ours = (out / name).read_bytes()
        assert ours.split(b"\r\n", 1)[0] == real
        assert ours.endswith(b"\r\n") and b'.dcm\n"' in ours  # CRLF rows, a bare LF in one path


def test_csv_rows_point_at_written_folders(generated):
    out, summary = generated
    rows = pd.concat([pd.read_csv(out / name) for name in CSV_NAMES])
    assert len(rows) == sum(summary["abnormalities"].values())
    assert set(rows["pathology"]) <= {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}
    assert set(rows["abnormality type"]) == {"mass", "calcification"}
    written = {p.name for p in (out / "CBIS-DDSM").iterdir()}
    images = rows["image file path"].str.split("/").str[0]
    rois = rows["ROI mask file path"].str.split("/").str[0]
    crops = rows["cropped image file path"].str.split("/").str[0]
    assert set(images) <= written and (rois == crops).all()
    assert set(rois) - written == set(summary["defects"]["missing_roi"])
    assert len(summary["defects"]["missing_roi"]) == 1
    assert (rois == images + "_" + rows["abnormality id"].astype(str)).all()
    assert rows["ROI mask file path"].str.match(r".+/1\.3\.6\.1\.4\.1\.9590\.100\.1\.2\.\d+/").all()


def test_defects_are_single_lesion_training_mammograms(generated):
    out, summary = generated
    defects = [folder for names in summary["defects"].values() for folder in names]
    assert len(defects) == 2
    for folder in defects:
        assert folder.startswith(("Mass-Training", "Calc-Training")) and folder.endswith("_1")
        assert not (out / "CBIS-DDSM" / f"{folder[:-2]}_2").exists()


def test_no_patient_in_both_splits(generated):
    out, _ = generated
    splits: dict[str, set[str]] = {"Training": set(), "Test": set()}
    for folder in (out / "CBIS-DDSM").iterdir():
        split, patient = re.match(r"\w+-(\w+)_(P_\d{5})", folder.name).groups()
        splits[split].add(patient)
    assert splits["Training"] and splits["Test"] and not splits["Training"] & splits["Test"]


def test_same_seed_same_bytes(generated, tmp_path):
    out, _ = generated
    generate(tmp_path)
    first, second = (
        sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()) for d in (out, tmp_path)
    )
    assert first == second and len(first) > 50
    for relative in first:
        assert (out / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative


def test_lesions_brighter_than_surrounding_tissue(dicoms):
    checked = 0
    for path, mask in masks(dicoms):
        image = full_image(dicoms, path.parts[0].rsplit("_", 1)[0]).astype(float)
        if mask.shape != image.shape:
            continue
        ring = cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0
        ring &= (mask == 0) & (image > 0.15 * synthetic.MAX_VALUE)  # breast tissue only
        assert image[mask > 0].mean() > image[ring].mean() + 1000, path
        checked += 1
    assert checked >= 10


def test_label_clear_of_the_breast_and_values_in_range(dicoms):
    for path, ds in dicoms.items():
        if ds.get("SeriesDescription") != "full mammogram images":
            continue
        image = ds.pixel_array
        assert image.max() <= synthetic.MAX_VALUE and np.median(image[image < 2000]) < 1000
        # The breast fills most of the chest-wall edge; the film label is a bright thing apart.
        count, labels = cv2.connectedComponents(
            (image > 0.15 * synthetic.MAX_VALUE).astype(np.uint8)
        )
        wall = labels[:, 0 if path.parts[0].split("_")[3] == "LEFT" else -1]
        assert np.bincount(wall).argmax() > 0  # the breast, not background
        assert count >= 3  # background, breast and at least the label


def test_write_dicom_round_trip_and_dtype_check(tmp_path):
    odd = np.zeros((7, 9), np.uint8)
    odd[2:5, 3:6] = 255
    synthetic.write_dicom(tmp_path / "a" / "m.dcm", odd, patient_id="x", series_description=None)
    ds = pydicom.dcmread(tmp_path / "a" / "m.dcm")
    np.testing.assert_array_equal(ds.pixel_array, odd)
    assert "SeriesDescription" not in ds and ds.HighBit == 7
    with pytest.raises(ValueError):
        synthetic.write_dicom(
            tmp_path / "f.dcm", odd.astype(float), patient_id="x", series_description=None
        )


def test_cli_refuses_existing_tree_unless_overwrite(tmp_path, capsys):
    flags = ["--patients", "2", "--size", "128", "80", "--no-defects", "--quiet"]
    args = ["--out", str(tmp_path), *flags]
    assert synthetic.main(args) == 0
    assert '"missing_roi": []' in capsys.readouterr().out
    assert synthetic.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err
    assert synthetic.main([*args, "--overwrite"]) == 0


def test_kaggle_layout_has_the_copys_files_and_quirks(kaggle_root):
    info = pd.read_csv(kaggle_root / "csv" / "dicom_info.csv", dtype=str, keep_default_na=False)
    assert {p.name for p in (kaggle_root / "csv").iterdir()} >= {*CSV_NAMES, "meta.csv"}
    files = sorted((kaggle_root / "jpeg").rglob("*"))
    jpegs = [p.relative_to(kaggle_root).as_posix() for p in files if p.is_file()]
    assert sorted("CBIS-DDSM/" + path for path in jpegs) == sorted(info["image_path"])
    info["pixels"] = [cv2.imread(str(kaggle_root / p.split("/", 1)[1]), cv2.IMREAD_UNCHANGED)
                      for p in info["image_path"]]
    info["folder"] = info["image_path"].str.split("/").str[2]
    info["prefix"] = info["image_path"].str.rsplit("/", n=1).str[1].str[0]
    assert info["image_path"].str.fullmatch(r"CBIS-DDSM/jpeg/[\d.]+/[12]-\d+\.jpg").all()
    for row in info.itertuples():
        assert row.pixels.dtype == np.uint8
        assert row.pixels.shape == (int(row.Rows), int(row.Columns))
        assert row.folder == row.SeriesInstanceUID
    masks = info[info["SeriesDescription"].isin(["ROI mask images", ""])]
    # Non-binary JPEG masks, whose lesion a threshold at 127 recovers.
    assert all(len(np.unique(m)) > 2 and ((m > 127) == (m > 30)).mean() > 0.99
               for m in masks["pixels"])
    # In a crop+mask folder the mask is 1- in some folders and 2- in others.
    shared = info.groupby("folder")["folder"].transform("size") == 2
    assert set(masks.loc[shared, "prefix"]) == {"1", "2"} and (~shared[masks.index]).any()
    quirky = masks[masks["SeriesDescription"] == ""]
    assert len(quirky) and quirky["PatientID"].str.fullmatch(
        r"P_\d{5}_(LEFT|RIGHT)_(CC|MLO)_\d+\.dcm").all()
    full = info[info["SeriesDescription"] == "full mammogram images"]
    assert {(int(r), int(c)) for r, c in zip(full["Rows"], full["Columns"], strict=True)} == {
        (240, 150)}
    assert (masks["Rows"] != "240").sum() == 1  # the mask of another size
    # The description CSVs' third path part names the JPEG folders; one ROI's are missing.
    rows = pd.concat([pd.read_csv(kaggle_root / "csv" / name) for name in CSV_NAMES])
    folders = {column: rows[column].str.split("/").str[2] for column in
               ("image file path", "cropped image file path", "ROI mask file path")}
    assert set(info["folder"]) <= set(pd.concat(folders.values()))
    written = {column: named.isin(info["folder"]) for column, named in folders.items()}
    assert written["image file path"].all() and (~written["ROI mask file path"]).sum() == 1
    assert (written["ROI mask file path"] == written["cropped image file path"]).all()
