"""synthetic.py: NBIA layout, DICOM headers, description CSVs, defects, determinism, lesions."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

import synthetic
import visibility

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
    flags = ["--patients", "2", "--size", "128", "80", "--no-defects", "--no-progress"]
    args = ["--out", str(tmp_path), *flags]
    assert synthetic.main(args) == 0
    assert '"missing_roi": []' in capsys.readouterr().out
    assert synthetic.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err
    assert synthetic.main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_test_share_is_the_share_of_test_patients(share):
    plan = synthetic._plan(40, False, np.random.default_rng(3), test_share=share)
    test_patients = {m.patient for m in plan if m.split == "Test"}
    assert len(test_patients) == round(share * 40)
    assert not test_patients & {m.patient for m in plan if m.split == "Training"}


def test_cli_refuses_a_test_share_outside_0_1(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--patients", "2", "--size", "128", "80", "--no-progress"]
    assert synthetic.main([*args, "--test-share", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "test_share" in err and "\n" not in err
    assert not (tmp_path / "CBIS-DDSM").exists()


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


# The realistic profile: calibration to the real CBIS-DDSM (synthetic.py's docstring).

REALISTIC_SIZES = ((320, 190), (640, 380))


def render_realistic(m, index: int, size: tuple[int, int]) -> tuple[np.ndarray, list]:
    return synthetic._render(m, *size, np.random.default_rng([11, index]), "realistic")


@pytest.fixture(scope="module")
def realistic() -> dict:
    """{size: [(planned mammogram, image, masks, draws)]}: the same 40 patients at two sizes;
    draws are the (quantiles, ratio) of each box-height draw, the lesions' first."""
    plan = synthetic._plan(40, False, np.random.default_rng(11))
    box_ratio, draws = synthetic._box_ratio, []

    def record(quantiles, cap, rng):
        draws.append((quantiles, box_ratio(quantiles, cap, rng)))
        return draws[-1][1]

    renders: dict = {size: [] for size in REALISTIC_SIZES}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "_box_ratio", record)
        for size, (index, m) in itertools.product(REALISTIC_SIZES, enumerate(plan)):
            draws.clear()
            renders[size].append((m, *render_realistic(m, index, size), list(draws)))
    return renders


def calc_abnormality(pathology: str, kind: str, distribution: str, seed: int = 0):
    planned = synthetic._plan_abnormality(1, "Calc", np.random.default_rng(seed))
    return dataclasses.replace(planned, pathology=pathology, descriptors=(kind, distribution))


CALC_KINDS = [
    ("MALIGNANT", "PLEOMORPHIC", "CLUSTERED"),
    ("MALIGNANT", "FINE_LINEAR_BRANCHING", "SEGMENTAL"),
    ("BENIGN", "ROUND_AND_REGULAR", "DIFFUSELY_SCATTERED"),
    ("BENIGN", "LARGE_RODLIKE", "REGIONAL"),
]


def test_box_ratio_draws_match_the_real_quantiles():
    rng = np.random.default_rng(0)
    for quantiles, cap in ((synthetic.MASS_BOX_RATIO, 0.15), (synthetic.CALC_BOX_RATIO, 0.22)):
        draws = [synthetic._box_ratio(quantiles, cap, rng) for _ in range(4000)]
        median, p5, p95 = quantiles
        np.testing.assert_allclose(np.percentile(draws, [50, 5, 95]), [median, p5, p95], rtol=0.06)


def test_realistic_box_heights_are_real_fractions_of_the_image_at_any_size(realistic):
    quantiles = {"Mass": synthetic.MASS_BOX_RATIO, "Calc": synthetic.CALC_BOX_RATIO}
    first = {}  # (size, mammogram index) -> the first lesion's box height / image height
    for (h, w), renders in realistic.items():
        ratios, drawn_ratios, shrunk = {"Mass": [], "Calc": []}, {"Mass": [], "Calc": []}, set()
        for index, (m, image, masks, draws) in enumerate(renders):
            assert image.shape == (h, w)
            heights = [cv2.boundingRect(mask)[3] / h for mask in masks]
            for n, (height, (drawn_from, drawn)) in enumerate(zip(heights, draws, strict=False)):
                assert drawn_from == quantiles[m.collection]
                assert height <= drawn + 2 / h  # at most 1 px rounding each end...
                if height < drawn - 2 / h:  # ...or shrunk to fit a small breast
                    shrunk.add((index, n))
            ratios[m.collection] += heights
            drawn_ratios[m.collection] += [drawn for _, drawn in draws[:len(heights)]]
            if (index, 0) not in shrunk:
                first[(h, index)] = heights[0]
        assert len(shrunk) <= 0.03 * sum(map(len, ratios.values()))
        # The rendered boxes are the drawn ones (the draws' quantiles are the real ones:
        # test_box_ratio_draws_match_the_real_quantiles, on 4000 draws).
        for collection in ratios:
            assert np.median(ratios[collection]) == pytest.approx(
                np.median(drawn_ratios[collection]), rel=0.05)
    (small, _), (large, _) = REALISTIC_SIZES
    both = [index for index in range(len(realistic[REALISTIC_SIZES[0]])) if (small, index) in first]
    assert len(both) > 60
    for index in both:
        assert first[(small, index)] == pytest.approx(first[(large, index)], abs=3 / small)


def test_realistic_masks_are_one_blob_each_and_inside_the_breast_crop(realistic):
    from preprocessing import breast_region

    for m, image, masks, _ in realistic[REALISTIC_SIZES[1]]:
        (y0, y1, x0, x1), chest_wall_right, _ = breast_region(image)
        assert chest_wall_right == (m.side == "RIGHT")
        assert x1 - x0 < 0.8 * image.shape[1]  # the scanner strip and label stay out...
        outer_edge = image[:, -1] if m.side == "LEFT" else image[:, 0]
        assert outer_edge.mean() > 0.45 * synthetic.MAX_VALUE  # ...though they are there
        outside = np.ones(image.shape, bool)
        outside[y0:y1, x0:x1] = False
        label = image[outside] == round(0.85 * synthetic.MAX_VALUE)
        assert label.sum() > 0.002 * image.size
        for mask in masks:
            assert cv2.connectedComponents(mask)[0] == 2  # background and one outline
            ys, xs = np.nonzero(mask)
            assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1


def test_lookalikes_exist_and_are_background(realistic, monkeypatch):
    size = REALISTIC_SIZES[0]
    monkeypatch.setattr(synthetic, "_lookalikes", lambda *args: None)
    shapes = Counter()  # mammograms with a blob-like (dense island) or a thin look-alike
    for index, (m, image, masks, _) in enumerate(realistic[size]):
        plain, plain_masks = render_realistic(m, index, size)
        for mask, plain_mask in zip(masks, plain_masks, strict=True):
            np.testing.assert_array_equal(mask, plain_mask)  # they move no lesion
        changed = image != plain
        assert (image[changed] > plain[changed]).all()  # bright structures
        assert not any((mask > 0)[changed].any() for mask in masks)
        _, _, stats, _ = cv2.connectedComponentsWithStats(changed.astype(np.uint8))
        found = set()
        for _, _, width, height, area in stats[1:]:
            if area >= 0.4 * width * height and min(width, height) >= 0.02 * size[0]:
                found.add("blob")
            elif area >= 10 and area < 0.3 * width * height:  # vessels and skin folds
                found.add("thin")
        shapes.update(found)
    assert min(shapes["blob"], shapes["thin"]) >= 0.2 * len(realistic[size]), shapes


@pytest.mark.parametrize(("pathology", "kind", "distribution"), CALC_KINDS)
def test_speck_sizes_scale_with_height_and_masks_outline_whole_clusters(
    pathology, kind, distribution, monkeypatch
):
    lengths = {}
    speck = synthetic._speck

    def record(patch, y, x, length, *rest):
        lengths[rows].append(length)
        speck(patch, y, x, length, *rest)

    monkeypatch.setattr(synthetic, "_speck", record)
    signal = {}
    for rows in (1325, 5300):  # a quarter of a real scan's size, and the real size
        lengths[rows] = []
        abn = calc_abnormality(pathology, kind, distribution)
        scale = rows / synthetic.NATIVE_ROWS
        patch, inside = synthetic._realistic_calcs(
            abn, 0.05 * rows, rows, scale, np.random.default_rng(1)
        )
        specks = patch > 0
        box_height = cv2.boundingRect(inside.astype(np.uint8))[3]
        assert box_height == pytest.approx(0.05 * rows, abs=2)
        assert inside[specks].all()  # whole specks are inside the outline...
        assert inside.sum() > 5 * specks.sum()  # ...which is loose, not the specks themselves
        assert cv2.connectedComponents(inside.astype(np.uint8))[0] == 2
        signal[rows] = patch.sum()
    np.testing.assert_allclose(np.divide(lengths[5300], lengths[1325]), 4)
    assert min(lengths[5300]) >= 1.2 and max(lengths[5300]) <= 20  # px at real size, buds too
    assert signal[5300] / signal[1325] == pytest.approx(16, rel=0.1)  # area-sampled


def test_malignant_specks_fine_and_many_benign_coarse_and_few(monkeypatch):
    areas: dict[str, list] = {kind: [] for _, kind, _ in CALC_KINDS}  # length x width, px
    counts: dict[str, list] = {kind: [] for _, kind, _ in CALC_KINDS}  # specks per cluster
    speck = synthetic._speck

    def record(patch, y, x, length, width, *rest):
        areas[kind].append(length * width)
        speck(patch, y, x, length, width, *rest)

    monkeypatch.setattr(synthetic, "_speck", record)
    for seed, (pathology, kind, distribution) in itertools.product(range(6), CALC_KINDS):
        before = len(areas[kind])
        abn = calc_abnormality(pathology, kind, distribution, seed)
        synthetic._realistic_calcs(abn, 100, 1000, 1.0, np.random.default_rng(seed))
        counts[kind].append(len(areas[kind]) - before)
    malignant = [kind for pathology, kind, _ in CALC_KINDS if pathology == "MALIGNANT"]
    benign = [kind for pathology, kind, _ in CALC_KINDS if pathology != "MALIGNANT"]
    assert min(np.median(areas[k]) for k in benign) > 3 * max(
        np.median(areas[k]) for k in malignant
    )
    assert min(np.mean(counts[k]) for k in malignant) > 2 * max(np.mean(counts[k]) for k in benign)


@pytest.mark.parametrize(
    ("shape", "margins"),
    [("ROUND", "CIRCUMSCRIBED"), ("OVAL", "OBSCURED"), ("IRREGULAR", "ILL_DEFINED")],
)
def test_mass_masks_are_loose_outlines_of_the_mass(shape, margins):
    rng = np.random.default_rng(3)
    for _ in range(5):
        planned = synthetic._plan_abnormality(1, "Mass", rng)
        abn = dataclasses.replace(planned, descriptors=(shape, margins))
        add, inside = synthetic._realistic_mass(abn, 120, 1000, rng)
        assert cv2.boundingRect(inside.astype(np.uint8))[3] == pytest.approx(120, abs=2)
        body = add > 0.25 * add.max()  # about the edge's half-height: the mass proper
        assert inside[body].all() and inside.sum() > 1.15 * body.sum()
        assert add.max() == pytest.approx(1.0, abs=0.05)  # a shape: _calibrate sets its gain


@pytest.mark.parametrize("target", [1.0, 3.0])
def test_calibrated_mass_shows_its_target_region_cnr_on_the_film(target):
    rng = np.random.default_rng(6)
    anatomy = synthetic._anatomy(600, 360, 3, rng)
    grain = synthetic._grain(600, 360, 600 / synthetic.NATIVE_ROWS, rng)
    add, inside = synthetic._realistic_mass(synthetic._plan_abnormality(1, "Mass", rng), 60,
                                            600, rng)
    y0, x0 = 270, 100
    none = np.zeros(anatomy.attenuation.shape, bool)
    gain = synthetic._calibrate(anatomy.attenuation, grain, add, y0, x0, inside, none, target,
                                specks=False)
    attenuation = anatomy.attenuation.copy()
    attenuation[y0:y0 + add.shape[0], x0:x0 + add.shape[1]] += gain * add
    film = synthetic._expose(attenuation, grain)
    lesion = none.copy()
    lesion[y0:y0 + add.shape[0], x0:x0 + add.shape[1]] = inside
    shown = visibility.region_cnr(film, lesion, visibility.ring(lesion, lesion))
    assert shown == pytest.approx(target, rel=0.05)


def test_spiculated_masses_reach_out_of_their_outline():
    rng = np.random.default_rng(4)
    planned = synthetic._plan_abnormality(1, "Mass", rng)
    abn = dataclasses.replace(planned, descriptors=("IRREGULAR", "SPICULATED"))
    add, inside = synthetic._realistic_mass(abn, 120, 1000, rng)
    rays = (add > 0.1 * add.max()) & ~inside
    assert rays.sum() > 0.03 * inside.sum()
    count, _ = cv2.connectedComponents(rays.astype(np.uint8))
    assert count - 1 >= 5  # several separate rays


def test_density_levels_differ():
    """More glandular tissue at a higher BI-RADS density, and brighter and more mottled."""
    shares, brightness, glands, mottle = [], [], [], []
    for density in (1, 2, 3, 4):
        anatomy = synthetic._anatomy(400, 240, density, np.random.default_rng(5))
        breast = anatomy.attenuation > 0.2
        image = synthetic._expose(anatomy.attenuation,
                                  synthetic._grain(400, 240, 400 / synthetic.NATIVE_ROWS,
                                                   np.random.default_rng(5)))
        fine = anatomy.attenuation - cv2.GaussianBlur(anatomy.attenuation, (0, 0), 3)
        shares.append(anatomy.glandular[breast].mean())
        brightness.append(np.median(image[breast]))
        glands.append(np.median(image[breast & (anatomy.glandular > 0.9)]))
        mottle.append(fine[cv2.erode(breast.astype(np.uint8), np.ones((9, 9))) > 0].std())
    np.testing.assert_allclose(shares, list(synthetic.DENSE_FRACTION.values()), atol=0.1)
    for values in (shares, brightness, mottle):
        assert np.all(np.diff(values) > 0), values
    assert np.all(np.diff(glands) > 0.01), glands  # _expose: fraction of the range


def test_realistic_same_seed_same_bytes(tmp_path):
    def make(out: Path) -> dict:
        return synthetic.make_synthetic_dataset(
            out, patients=3, size=(400, 240), seed=2, progress=False, profile="realistic"
        )

    assert make(tmp_path / "a")["profile"] == "realistic"
    make(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    assert len(files) > 5
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    with pytest.raises(ValueError, match="profile"):
        synthetic.make_synthetic_dataset(tmp_path / "c", profile="real")
