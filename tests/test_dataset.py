"""dataset.py, preprocessing.py and augmentation.py: merged masks, the decode-once cache, defects,
geometry and augmentation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import preprocessing
from augmentation import augment_batch
from dataset import MammogramDataset, group_mammograms, read_split_csv
from imaging import DatasetError, read_pixels
from inference import predict_at_original
from preprocessing import (
    apply_geometry,
    merge_masks,
    prepare_image,
    read_roi_masks,
    restore_to_original,
)
from synthetic import write_dicom
from tests.conftest import SIZE, mammogram


def test_overlapping_rois_higher_class_wins():
    benign, mass, calc = (np.zeros((6, 6), bool) for _ in range(3))
    benign[0:4, 0:4] = True
    mass[2:6, 2:6] = True
    calc[5, 0] = True
    merged = merge_masks([mass, benign, calc], (2, 1, 3))
    assert merged[0, 0] == 1 and merged[3, 3] == 2 and merged[5, 5] == 2 and merged[5, 0] == 3
    assert merged[0, 5] == 0


def test_every_roi_of_a_mammogram_is_in_its_one_target(csv_dir, tmp_path):
    rows, root = read_split_csv(csv_dir / "train.csv")
    mammograms = group_mammograms(rows)
    assert len(mammograms) == rows["img_path"].nunique()
    multi = next(m for m in mammograms if len(set(m.class_ids)) > 1)
    masks, _ = read_roi_masks(multi, root, read_pixels(root / multi.img_path).shape)
    merged = merge_masks(masks, multi.class_ids)
    for roi, cls in zip(masks, multi.class_ids, strict=True):
        # Every lesion pixel keeps a lesion label: its own class or a higher overlapping one.
        assert (merged[roi] >= cls).all()
    assert set(np.unique(merged)) == {0, *multi.class_ids}


def test_view_in_both_collections_gets_the_rois_of_both():
    # CBIS-DDSM publishes such a view twice (Mass-... and Calc-... folders), each copy
    # annotated for its own type; neither copy may have the other's lesion as background.
    common = {"patient_id": "P_00001", "side": "LEFT", "view": "CC", "split": "train"}
    rows = pd.DataFrame([
        {**common, "img_path": "Mass-Training_P_00001_LEFT_CC/a/b/1-1.dcm", "roi_path": "m1",
         "class_id": 2, "collection": "Mass-Training"},
        {**common, "img_path": "Calc-Training_P_00001_LEFT_CC/a/b/1-1.dcm", "roi_path": "c1",
         "class_id": 1, "collection": "Calc-Training"},
        {**common, "side": "RIGHT", "img_path": "Calc-Training_P_00001_RIGHT_CC/a/b/1-1.dcm",
         "roi_path": "c2", "class_id": 3, "collection": "Calc-Training"},
    ])  # fmt: skip
    mass_copy, calc_copy, other_side = group_mammograms(rows)
    assert mass_copy.roi_paths == calc_copy.roi_paths == ("m1", "c1")
    assert mass_copy.class_ids == calc_copy.class_ids == (2, 1)
    assert mass_copy.collection == "Mass-Training" and calc_copy.collection == "Calc-Training"
    assert other_side.roi_paths == ("c2",)


def test_cache_hit_means_no_second_decode(csv_dir, tmp_path, monkeypatch):
    decoded = []
    real_read = preprocessing.read_pixels
    monkeypatch.setattr(preprocessing, "read_pixels",
                        lambda path, **kw: decoded.append(path) or real_read(path, **kw))
    data = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", SIZE)
    first = [data[i] for i in range(len(data))]
    n_files = sum(1 + len(m.roi_paths) for m in data.mammograms)
    assert len(decoded) == n_files
    second = [data[i] for i in range(len(data))]
    assert len(decoded) == n_files  # the second epoch read the cache only
    for (image_a, mask_a, _), (image_b, mask_b, _) in zip(first, second, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    image, mask, _ = first[0]
    assert image.shape == (1, *SIZE) and image.dtype == torch.uint16
    assert mask.shape == SIZE and mask.dtype == torch.uint8 and mask.max() <= 3
    # A new dataset object (a later run) hits the same cache.
    again = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", SIZE)
    assert again.prepare(progress=False).cached == len(again)
    assert len(decoded) == n_files


def _copy_of_val_set(csv_dir: Path, tmp_path: Path) -> tuple[MammogramDataset, Path]:
    """The val split over a private copy of its DICOMs (so a test may replace or damage them)."""
    rows, root = read_split_csv(csv_dir / "val.csv")
    copy_root = tmp_path / "data"
    for relative in {*rows["img_path"], *rows["roi_path"]}:
        (copy_root / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy_root / relative).write_bytes((root / relative).read_bytes())
    data = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", SIZE,
                                     data_root=copy_root)
    return data, copy_root


def test_dicom_replaced_in_place_is_preprocessed_again(csv_dir, tmp_path):
    data, copy_root = _copy_of_val_set(csv_dir, tmp_path)
    assert data.prepare(progress=False).built == len(data)
    source = copy_root / data.mammograms[0].img_path
    image = read_pixels(source)
    write_dicom(source, (65535 - image).astype(np.uint16), patient_id="x",
                series_description="full mammogram images")  # a corrected re-download
    again = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", SIZE,
                                      data_root=copy_root)
    report = again.prepare(progress=False)
    assert report.built == 1 and report.cached == len(data) - 1


def test_damaged_cache_entry_is_named_and_rebuilt(csv_dir, tmp_path, capsys):
    data, _ = _copy_of_val_set(csv_dir, tmp_path)
    data.prepare(progress=False)
    expected = data[0]
    image_path, _, _ = data.cache.paths(data.mammograms[0])
    image_path.write_bytes(image_path.read_bytes()[:200])  # truncated by a full disk
    image, mask, _ = data[0]
    assert torch.equal(image, expected[0]) and torch.equal(mask, expected[1])
    assert image_path.name in capsys.readouterr().err


def test_prepare_builds_in_parallel_processes_and_cleans_stale_temporaries(csv_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".abc.image.npy.k1l2m3n4.tmp", cache / ".abc.mask.npy.x1y2z3w4.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600,) * 2)  # a killed writer's, an hour ago
    data = MammogramDataset.from_csv(csv_dir / "val.csv", cache, SIZE)
    report = data.prepare(workers=2, progress=False)
    assert report.built == len(data) and not report.skipped
    # Another run may be writing the fresh one into the shared cache right now.
    assert not stale.exists() and fresh.exists()


def test_size_mismatched_mask_is_resized_and_counted(tmp_path):
    image = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50)
    mask = np.zeros((20, 15), np.uint8)
    mask[5:10, 5:10] = 255
    write_dicom(tmp_path / "img.dcm", image, patient_id="x", series_description="full")
    write_dicom(tmp_path / "roi.dcm", mask, patient_id="x_1", series_description="ROI mask")
    mammogram = preprocessing.Mammogram("img.dcm", ("roi.dcm",), (2,), "P_1", "Mass-Test")
    masks, resized = read_roi_masks(mammogram, tmp_path, image.shape)
    assert resized == 1 and masks[0].shape == image.shape
    assert masks[0][10:20, 10:20].all() and masks[0].sum() == 100  # nearest: 2x in each axis
    result = preprocessing.preprocess(mammogram, tmp_path, (32, 24))
    assert result.meta["masks_resized"] == 1 and result.meta["rois_lost"] == 0


def test_roi_lost_in_the_downscale_is_counted(tmp_path):
    image = np.zeros((400, 300), np.uint16)
    image[20:380, :200] = 30000
    speck = np.zeros(image.shape, np.uint8)
    speck[101, 101] = 255  # one pixel: nearest neighbour at 1/10 scale misses it
    write_dicom(tmp_path / "img.dcm", image, patient_id="x", series_description="full")
    write_dicom(tmp_path / "roi.dcm", speck, patient_id="x_1", series_description="ROI mask")
    mammogram = preprocessing.Mammogram("img.dcm", ("roi.dcm",), (3,), "P_1", "Calc-Test")
    result = preprocessing.preprocess(mammogram, tmp_path, (36, 20))
    assert result.meta["rois_lost"] == 1 and not result.mask.any()


def test_unreadable_dicom_named_or_skipped_and_counted(csv_dir, tmp_path):
    rows, root = read_split_csv(csv_dir / "val.csv")
    copy_root = tmp_path / "data"
    bad_path = rows["img_path"].iloc[0]
    for relative in set(rows["img_path"]) | set(rows["roi_path"]):
        (copy_root / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy_root / relative).write_bytes((root / relative).read_bytes())
    (copy_root / bad_path).write_bytes(b"not a dicom")
    data = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", SIZE,
                                     data_root=copy_root)
    n = len(data)
    with pytest.raises(DatasetError, match=bad_path.split("/")[-1]):
        data.prepare(progress=False)
    report = data.prepare(skip_unreadable=True, progress=False)
    assert [p for p, _ in report.skipped] == [bad_path] and len(data) == n - 1


def test_csv_from_another_version_is_refused(csv_dir, tmp_path):
    rows = pd.read_csv(csv_dir / "train.csv")
    rows.drop(columns=["class_id"]).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "dataset.json").write_text((csv_dir / "dataset.json").read_text())
    with pytest.raises(DatasetError, match="another version"):
        read_split_csv(tmp_path / "train.csv")
    sidecar = json.loads((csv_dir / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**sidecar, "schema_version": 0}))
    rows.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DatasetError, match="re-run"):
        read_split_csv(tmp_path / "train.csv")


@pytest.mark.parametrize("chest_wall_right", [False, True])
def test_prediction_maps_back_through_crop_and_flip(chest_wall_right):
    # A breast (bright) against one edge, a film label in the far corner, a lesion inside.
    image = np.zeros((300, 200), np.uint16)
    image[40:260, :120] = 30000
    image[10:20, 180:195] = 60000  # label: a separate component, outside the box
    lesion = np.zeros(image.shape, np.uint8)
    lesion[100:140, 40:80] = 2
    if chest_wall_right:
        image, lesion = image[:, ::-1].copy(), lesion[:, ::-1].copy()
    resized, meta = prepare_image(image, (110, 60))
    assert meta["flipped"] == chest_wall_right
    y0, y1, x0, x1 = meta["box"]
    assert y0 <= 40 and y1 >= 260 and y1 - y0 < 240 and x1 - x0 < 140  # label dropped
    small = apply_geometry(lesion, meta)
    assert small.shape == resized.shape == (110, 60)
    # A "prediction" equal to the small truth maps back onto the original lesion.
    restored = restore_to_original(small, meta, interpolation=0)
    assert restored.shape == image.shape
    overlap = ((restored == 2) & (lesion == 2)).sum() / (lesion == 2).sum()
    assert overlap > 0.9 and ((restored == 2) & (lesion == 0)).sum() < 0.1 * (lesion == 2).sum()


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask)).mean(axis=1)


def test_exact_geometry_round_trip_off_centre_lesion_on_flipped_breast(tmp_path):
    # Worked by hand: a 997x613 breast against the right edge (so it is flipped to the canonical
    # side), a lesion of radius 40 px off the box's centre, training size 256x160 (scale ~3.3 and
    # ~3.9, not whole numbers). A prediction equal to the training target must land back on the
    # lesion: centre-aligned nearest keeps the centroid within 0.5 px (plain INTER_NEAREST moves
    # it ~1.5 px down and sideways; a missing un-flip moves it ~180 px) and Dice >= 0.98.
    height, width = 997, 613
    yy, xx = np.mgrid[:height, :width]
    image = np.zeros((height, width), np.uint16)
    image[((yy - 500) / 420) ** 2 + ((xx - width) / 520) ** 2 < 1] = 30000
    image[20:50, 10:80] = 60000  # film label in the far corner
    lesion = ((yy - 310.3) ** 2 + (xx - (width - 170.6)) ** 2 < 40**2).astype(np.uint8) * 255
    write_dicom(tmp_path / "img.dcm", image, patient_id="x", series_description="full")
    write_dicom(tmp_path / "roi.dcm", lesion, patient_id="x_1", series_description="ROI mask")
    mammogram = preprocessing.Mammogram("img.dcm", ("roi.dcm",), (3,), "P_1", "Calc-Test")
    result = preprocessing.preprocess(mammogram, tmp_path, (256, 160))
    assert result.meta["flipped"] and result.mask.shape == (256, 160)
    assert set(np.unique(result.mask)) == {0, 3}  # labels resized as labels, not blended
    perfect = np.eye(4, dtype=np.float32)[result.mask].transpose(2, 0, 1)
    predicted, _ = predict_at_original(perfect, result.meta)
    truth = lesion > 0
    found = predicted == 3
    assert np.abs(_centroid(found) - _centroid(truth)).max() < 0.5
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) >= 0.98


def test_size_mismatched_mask_keeps_its_centre(tmp_path):
    # A mask stored at 87% of its mammogram's size (like Mass-Test_P_00145_LEFT_CC) is scaled up
    # centre-aligned: a square centred at (40, 60) of the small mask is centred at
    # (40 + 0.5) * 230 / 200 - 0.5 = 46.1 and (60 + 0.5) * 200 / 174 - 0.5 = 69.0 of the
    # mammogram (plain INTER_NEAREST puts it at 46.5).
    image = np.full((230, 200), 20000, np.uint16)
    small = np.zeros((200, 174), np.uint8)
    small[30:51, 50:71] = 255
    write_dicom(tmp_path / "img.dcm", image, patient_id="x", series_description="full")
    write_dicom(tmp_path / "roi.dcm", small, patient_id="x_1", series_description="ROI mask")
    mammogram = preprocessing.Mammogram("img.dcm", ("roi.dcm",), (2,), "P_1", "Mass-Test")
    (mask,), resized = read_roi_masks(mammogram, tmp_path, image.shape)
    expected = [(40 + 0.5) * 230 / 200 - 0.5, (60 + 0.5) * 200 / 174 - 0.5]
    assert resized == 1 and np.abs(_centroid(mask) - expected).max() < 0.25


def test_augmentation_keeps_labels_and_is_seeded():
    images = torch.rand(3, 1, 40, 24)
    masks = torch.randint(0, 4, (3, 40, 24), dtype=torch.uint8)
    out_a = augment_batch(images, masks, torch.Generator().manual_seed(1))
    out_b = augment_batch(images, masks, torch.Generator().manual_seed(1))
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    assert out_a[0].shape == images.shape and out_a[1].shape == masks.shape
    assert set(out_a[1].unique().tolist()) <= {0, 1, 2, 3}  # nearest: no blended labels
    assert out_a[0].min() >= 0 and out_a[0].max() <= 1
    assert not torch.equal(out_a[0], images)


def test_paths_in_csv_are_relative_to_recorded_root(csv_dir):
    _, root = read_split_csv(csv_dir / "test.csv")
    rows = pd.read_csv(csv_dir / "test.csv")
    assert all((root / p).is_file() for p in rows["img_path"])
    assert not any(Path(p).is_absolute() for p in rows["roi_path"])


def test_kaggle_jpeg_copy_gives_the_same_targets_and_8_bit_images(csv_dir, kaggle_csv_dir):
    """The same study from both layouts: the JPEG masks, thresholded, are the DICOM masks; the
    JPEG images are the DICOM images at 8 bits (plus JPEG's small loss)."""
    for split in ("train", "val", "test"):
        dicom_rows, dicom_root = read_split_csv(csv_dir / f"{split}.csv")
        jpeg_rows, jpeg_root = read_split_csv(kaggle_csv_dir / f"{split}.csv")
        pairs = zip(group_mammograms(dicom_rows), group_mammograms(jpeg_rows), strict=True)
        for dicom, jpeg in pairs:
            assert (dicom.patient_id, dicom.class_ids) == (jpeg.patient_id, jpeg.class_ids)
            image16 = read_pixels(dicom_root / dicom.img_path).astype(float)
            image8 = read_pixels(jpeg_root / jpeg.img_path)
            assert image8.dtype == np.uint8 and image8.shape == image16.shape
            scaled = (image16 - image16.min()) / (image16.max() - image16.min()) * 255
            assert np.abs(image8 - scaled).mean() < 1.5
            masks16, _ = read_roi_masks(dicom, dicom_root, image16.shape)
            masks8, _ = read_roi_masks(jpeg, jpeg_root, image8.shape)
            for mask16, mask8 in zip(masks16, masks8, strict=True):
                np.testing.assert_array_equal(mask16, mask8)


def test_augmentation_moves_each_mask_with_its_image():
    # With no rotation, scaling or shift the only warp left is the random vertical flip, which
    # maps row i onto row H - 1 - i exactly (pixel centres onto pixel centres): each sample must
    # come out unchanged or upside down, image and mask alike. Lesions are bright (0.8 on 0.2),
    # and gamma/contrast keep them above 0.5 and the rest below.
    masks = torch.zeros(8, 40, 24, dtype=torch.uint8)
    masks[:, 5:17, 3:13] = 2
    masks[:, 26:30, 15:21] = 3
    images = 0.2 + 0.6 * (masks > 0).float()[:, None]
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0),
                                          max_rotation=0, max_scale=0, max_shift=0)
    flipped = []
    for image, mask, original in zip(out_images, out_masks, masks, strict=True):
        assert torch.equal(image[0] > 0.5, mask > 0)
        flipped.append(torch.equal(mask, original.flip(0)))
        assert flipped[-1] or torch.equal(mask, original)
    assert any(flipped) and not all(flipped)
    # The full random affine: the bright region and the warped mask still coincide (up to the
    # edge pixels, where bilinear and nearest differ), and the lesions did move.
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0))
    for image, mask in zip(out_images, out_masks, strict=True):
        bright, lesion = image[0] > 0.5, mask > 0
        assert (bright & lesion).sum() / (bright | lesion).sum() > 0.8
    assert not torch.equal(out_masks, masks)


def test_preprocessed_mask_takes_the_label_at_each_pixel_centre(tmp_path):
    # A benign and a malignant calcification ROI side by side on a breast against the right edge
    # (so flipped), scaled down by non-integer factors. Worked by hand: training-size pixel
    # (i, j) is the label of the cropped, flipped original at (floor((i + 0.5) h / H),
    # floor((j + 0.5) w / W)): only labels 0, 1 and 3 (linear interpolation would blend the
    # 1|3 edge into 2 and the 0|3 edge into 1 or 2).
    image = np.full((400, 260), 300, np.uint16)
    image[30:370, 90:] = 30000
    benign, calc = np.zeros(image.shape, np.uint8), np.zeros(image.shape, np.uint8)
    benign[100:183, 150:201] = 255
    calc[100:183, 201:243] = 255
    write_dicom(tmp_path / "img.dcm", image, patient_id="x", series_description="full")
    for name, roi in (("benign", benign), ("calc", calc)):
        write_dicom(tmp_path / f"{name}.dcm", roi, patient_id="x_1", series_description="ROI")
    mammogram = preprocessing.Mammogram("img.dcm", ("benign.dcm", "calc.dcm"), (1, 3), "P_1",
                                  "Calc-Test")
    result = preprocessing.preprocess(mammogram, tmp_path, (61, 37))
    assert result.meta["flipped"]
    y0, y1, x0, x1 = result.meta["box"]
    merged = np.maximum(benign // 255, 3 * (calc // 255))[y0:y1, x0:x1][:, ::-1]
    rows = np.floor((np.arange(61) + 0.5) * (y1 - y0) / 61).astype(int)
    columns = np.floor((np.arange(37) + 0.5) * (x1 - x0) / 37).astype(int)
    np.testing.assert_array_equal(result.mask, merged[rows][:, columns])
    assert set(np.unique(result.mask)) == {0, 1, 3}


def test_cache_is_rebuilt_for_another_size_or_preprocessing_version(csv_dir, tmp_path,
                                                                    monkeypatch):
    def prepare(size: tuple[int, int]) -> tuple[int, int]:
        data = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", size)
        report = data.prepare(progress=False)
        return report.built, report.cached

    n = pd.read_csv(csv_dir / "val.csv")["img_path"].nunique()
    assert prepare(SIZE) == (n, 0)
    assert prepare(SIZE) == (0, n)
    assert prepare((32, 24)) == (n, 0)  # another size: its own entries
    data = MammogramDataset.from_csv(csv_dir / "val.csv", tmp_path / "cache", (32, 24))
    assert data[0][0].shape == (1, 32, 24) and data[0][1].shape == (32, 24)
    monkeypatch.setattr(preprocessing, "PREPROCESS_VERSION", preprocessing.PREPROCESS_VERSION + 1)
    assert prepare(SIZE) == (n, 0)  # new preprocessing code: nothing old is reused


def test_window_keeps_the_brightest_lesion_pixels_apart():
    # Lesions are the brightest pixels of a breast: a bright mass covering 3% of the image, its
    # core brighter than its rim, must keep that detail after the window (a window ending at
    # the 99.5th percentile flattened the top of such masses to white). A film label outside
    # the breast, brighter still, may clip.
    image = mammogram(400, 240, chest_wall_right=False)
    y, x = np.mgrid[:400, :240]
    radius = np.hypot(y - 200, x - 60)
    image[radius < 24] = (52000 - 300 * radius[radius < 24]).astype(np.uint16)
    image[10:30, 200:236] = 65000  # a film label in a far corner
    prepared, meta = prepare_image(image, 1.0)
    core = apply_geometry((radius < 24).astype(np.uint8), meta) > 0
    values = prepared[core]
    assert (values == values.max()).mean() < 0.01, "the mass's core is flattened to one value"
    assert np.corrcoef(values, apply_geometry(radius.astype(np.float32), meta)[core])[0, 1] < -0.99
