"""Write a CBIS-DDSM-shaped tree, with quick-to-learn (demo) or realistic lesions.

Folder layout, DICOM headers and the four description CSVs follow the real TCIA download,
quirks included (docs/real-data.md), so the retrieval step and everything after it run unchanged.
With layout "kaggle" the same study is written as the Kaggle JPEG copy instead: csv/ (the four
description CSVs with TCIA-style paths, dicom_info.csv, meta.csv) and jpeg/<series uid>/ holding
8-bit JPEGs named 1-<n>.jpg or 2-<n>.jpg whatever they hold, with that copy's quirks (crop and
mask in either order, masks without SeriesDescription, non-binary JPEG masks, the defects).
Lesions are drawn in a chest-wall-on-the-left frame and the image is mirrored for RIGHT breasts.

The demo profile's lesions are sized and lit to survive the downsample to training resolution,
so a model learns them in minutes. The realistic profile is calibrated to the real set (DESIGN.md
"Real sizes"); every size is a fraction of the image, so any --size keeps the ratios and a
smaller one looks like a downsampled scan (specks and grain shrink as they would):

| parameter                       | realistic value                   | calibrated to            |
|---------------------------------|-----------------------------------|--------------------------|
| breast                          | 55-72% of the width deep, 82-92%  | judgement from real CC   |
|                                 | of the height tall; the image's   | views; real scans are    |
|                                 | aspect is --size's (2048 1216 is  | ~5300x3000               |
|                                 | close to the real one)            |                          |
| mass ROI box height / H         | two-piece log-normal: median      | 177 real lesions (crop   |
|                                 | 0.068, p5 0.033, p95 0.116        | sizes, dicom_info.csv)   |
| calcification cluster box / H   | median 0.054, p5 0.021, p95 0.209 | the same sample          |
| calcification length            | 2-9 px pleomorphic, 4-14 fine     | 0.1-1 mm at ~50 um/px    |
|                                 | linear, 7-20 round, 10-20 rod, at |                          |
|                                 | 5300 rows (times H / 5300)        |                          |
| lesion visibility, by the CSV's | each lesion's gain is solved for  | subtlety shares of the   |
| subtlety rating 1-5 (drawn from | on the written film so that it    | real training CSVs: Mass |
| the real shares)                | shows, x U(0.85, 1.15) x          | 3/8/20/29/41%, Calc      |
|                                 | --lesion-contrast: masses region  | 6/16/33/22/23%; radio-   |
|                                 | CNR 1.0/1.5/2.0/2.5/3.0;          | logists outlined what    |
|                                 | calcification clusters speck CNR  | they saw, so a rating-5  |
|                                 | 4/5/6/7/8 (ordinary tissue ~3)    | lesion is plainly seen   |
| dense islands, vessel specks    | calibrated the same way, targets  | hard negatives as        |
| (look-alikes)                   | drawn from the same shares        | visible as the lesions   |
| glandular share, density 1-4    | 12 / 37 / 62 / 85%, brighter and  | BI-RADS: <25, 25-50,     |
| (drawn from the real shares     | more mottled with density         | 51-75, >75% dense        |
| 16/38/31/15%)                   |                                   |                          |
| film curve, grain               | brightness saturates with tissue  | digitised film: dense    |
|                                 | (dense tissue swallows contrast); | tissue hides lesions     |
|                                 | grain 1.5% of the range at 5300   |                          |
|                                 | rows, falling with H / 5300       |                          |
| ROI masks                       | a smoothed, jittered outline      | CBIS-DDSM's hand-drawn   |
|                                 | 10-25% larger than the mass or    | outlines                 |
|                                 | the whole cluster                 |                          |
| margins, shapes, calcification  | drawn as the CSV row says: e.g.   | the CSV's descriptors    |
| type and distribution           | SPICULATED rays, PLEOMORPHIC      |                          |
|                                 | irregular specks, SEGMENTAL line  |                          |
| look-alikes (background)        | dense islands, calcified vessels  | judgement                |
|                                 | (specks along both walls), skin   |                          |
|                                 | folds; film label, scanner edges  |                          |

What that gives, measured by `study.py visibility` on the arrays a model reads (breast crop and
window) of the study's test split (`make study`: 1024x608 with fine detail drawn as on a
2048-row scan, seed 0; medians by subtlety 2/3/4/5, none of rating 1 drawn there):

| lesions                  | figure     | native 1024x608          | 1/5 (205x122)            |
|--------------------------|------------|--------------------------|--------------------------|
| malignant mass           | region CNR | 1.3 / 1.9 / 2.7 / 3.3    | 1.3 / 2.0 / 2.8 / 3.2    |
| benign mass              | region CNR | - / 2.1 / 2.6 / 3.1      | - / 2.2 / 2.7 / 3.3      |
| malignant calcifications | speck CNR  | - / 5.9 / 6.4 / 7.9,     | - / 1.4 / 1.4 / 2.4,     |
|                          |            | ordinary tissue 3.0      | ordinary tissue 1.8      |
| benign calcifications    | speck CNR  | 4.4 / 6.4 / 7.0 / 8.1,   | 1.9 / 0.6 / 1.4 / 2.2,   |
|                          |            | tissue 2.8               | tissue 1.6               |

What a reader sees (PNGs of lesions at both sizes, looked at while calibrating): a mass is a
smooth brighter oval or lobulated blob, faint but findable at subtlety 2, obvious at 4-5 with
its spicules visible at native size, and still plainly there at 1/5; a calcification cluster
is a sprinkle of 1-3 px specks inside a loose outline, seen at native size only by looking
closely, and gone into the mottle at 1/5 (its speck CNR falls to what ordinary tissue scores).
Dense islands and benign masses are as bright as the malignant masses: the class is in the
shape and margin, not the brightness.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

import visibility

MAMMOGRAPHY_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray, For Presentation
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
MAX_VALUE = 60000  # brightest pixel: real scans stay below the 16-bit ceiling
OLD_UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."  # the UID layout of the description CSVs' paths
LAYOUTS = ("tcia", "kaggle")
DICOM_INFO_COLUMNS = [  # the Kaggle copy's csv/dicom_info.csv (a subset of its columns)
    "file_path", "image_path", "BitsAllocated", "BitsStored", "Columns", "Laterality",
    "Modality", "PatientID", "PhotometricInterpretation", "Rows", "SeriesDescription",
    "SeriesInstanceUID", "StudyInstanceUID",
]  # fmt: skip
META_COLUMNS = ["SeriesInstanceUID", "StudyInstanceUID", "Subject ID", "Series Description",
                "Number of Images"]

_HEADER = (  # exactly the published files' header rows, which differ in these three places
    "patient_id,{density},left or right breast,image view,abnormality id,abnormality type,"
    "{first},{second},assessment,pathology,subtlety,image file path,cropped image file path,"
    "ROI mask file path"
)
CSV_HEADERS = {
    "Mass": _HEADER.format(density="breast_density", first="mass shape", second="mass margins"),
    "Calc": _HEADER.format(density="breast density", first="calc type", second="calc distribution"),
}
_DESCRIPTORS = {  # (collection, malignant) -> choices for the two descriptor columns
    ("Mass", True): (["IRREGULAR", "IRREGULAR", "LOBULATED"], ["SPICULATED", "ILL_DEFINED"]),
    ("Mass", False): (["OVAL", "ROUND", "LOBULATED"], ["CIRCUMSCRIBED", "OBSCURED"]),
    ("Calc", True): (["PLEOMORPHIC", "FINE_LINEAR_BRANCHING"], ["CLUSTERED", "SEGMENTAL"]),
    ("Calc", False): (["LARGE_RODLIKE", "ROUND_AND_REGULAR"], ["DIFFUSELY_SCATTERED", "REGIONAL"]),
}
_ASSESSMENT = {
    "MALIGNANT": [3, 4, 4, 5, 5],
    "BENIGN": [2, 3, 4, 4],
    "BENIGN_WITHOUT_CALLBACK": [2, 2, 3],
}
_PATHOLOGY = (["MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"], [0.45, 0.40, 0.15])
_VIEWS = [(side, view) for side in ("LEFT", "RIGHT") for view in ("CC", "MLO")]
PROFILES = ("demo", "realistic")

# The realistic profile's calibration (module docstring). Sizes are fractions of the image or px
# of a NATIVE_ROWS-row scan; intensities are attenuation, which FILM_GAMMA maps to brightness.
NATIVE_ROWS = 5300  # a real scan's rows at ~50 um/px
BREAST_DEPTH = (0.55, 0.72)  # chest wall to nipple, fraction of the width
BREAST_HALF_HEIGHT = (0.41, 0.46)  # fraction of the height: the breast fills 82-92% of it
MASS_BOX_RATIO = (0.068, 0.033, 0.116)  # box height / image height: median, p5, p95
CALC_BOX_RATIO = (0.054, 0.021, 0.209)
DENSE_FRACTION = {1: 0.12, 2: 0.37, 3: 0.62, 4: 0.85}  # BI-RADS: <25%, 25-50, 51-75, >75%
DENSE_ATTENUATION = {1: 0.08, 2: 0.12, 3: 0.16, 4: 0.2}  # over fat's 0.28
DENSE_TEXTURE = {1: 0.02, 2: 0.026, 3: 0.032, 4: 0.038}  # its mottle's spread
FILM_GAMMA, FILM_FOG = 2.0, 0.03
GRAIN = 0.015  # grain's spread at NATIVE_ROWS, fraction of the range
# Visibility by the CSV's subtlety rating (1 subtle .. 5 obvious), in the figures of visibility.py
# at the written size: each lesion's gain is solved for so that it shows its rating's figure (x a
# 0.85-1.15 jitter) against the tissue and grain it lies in. Masses: region CNR; calcification
# clusters: speck CNR (ordinary tissue scores ~3).
MASS_CNR = {1: 1.0, 2: 1.5, 3: 2.0, 4: 2.5, 5: 3.0}
SPECK_CNR = {1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0, 5: 8.0}
# Shares in the real training CSVs (1318 mass, 1546 calcification rows) of subtlety 1..5 and of
# BI-RADS density 1..4 (both collections).
SUBTLETY_SHARES = {"Mass": (0.031, 0.076, 0.196, 0.285, 0.412),
                   "Calc": (0.061, 0.157, 0.325, 0.224, 0.233)}
DENSITY_SHARES = (0.161, 0.379, 0.306, 0.154)
MAX_GAIN = 2.0  # attenuation: a target the film cannot show (saturated dense tissue) stops here
SPECK_LENGTH = {  # px at NATIVE_ROWS, log-uniform; real calcifications are 0.1-1 mm
    "PLEOMORPHIC": (2, 9),
    "FINE_LINEAR_BRANCHING": (4, 14),
    "ROUND_AND_REGULAR": (7, 20),
    "LARGE_RODLIKE": (10, 20),
}
SPECK_ASPECT = {  # length / width
    "PLEOMORPHIC": (1, 2.2),
    "FINE_LINEAR_BRANCHING": (2.5, 4.5),
    "ROUND_AND_REGULAR": (1, 1.25),
    "LARGE_RODLIKE": (2.5, 4),
}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str,
    series_description: str | None,
    laterality: str = "L",
    view: str = "CC",
    sop_class_uid: str = SECONDARY_CAPTURE_SOP_CLASS,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    study_date: str = "20170829",
    instance_number: int = 1,
) -> None:
    """Write a 2-D uint16 (16-bit) or uint8 (8-bit) image as a CBIS-DDSM-like DICOM file.

    Missing UIDs are random (uuid4-based, cheap); pass them for reproducible files.
    A series_description of None leaves the tag out, like the real defective masks.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"need a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}")
    bits = pixels.dtype.itemsize * 8
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate, ds.Modality = study_date, "MG"
    ds.PatientID = patient_id
    ds.BodyPartExamined, ds.ViewPosition = "BREAST", view
    ds.Laterality = ds.ImageLaterality = laterality
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.SeriesNumber, ds.InstanceNumber = 1, instance_number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.astype(f"<u{bits // 8}", copy=False).tobytes()
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class _Abnormality:
    n: int  # 1-based abnormality id
    pathology: str
    assessment: int
    subtlety: int
    descriptors: tuple[str, str]  # mass shape/margins or calc type/distribution
    one_series: bool  # older download layout: crop and mask in one series folder
    mask_first: bool  # in that layout, the mask is 1-1.dcm
    quirk: bool  # mask without SeriesDescription and a PatientID like P_00562_LEFT_CC_2.dcm
    old_uids: str  # "<uid>/<uid>" of the description CSVs' path
    crop_is_first: bool  # the CSV names the crop 000000.dcm (else 000001.dcm)
    defect: str | None = None  # "mask_size_mismatch" or "missing_roi"


@dataclass
class _Mammogram:
    collection: str  # Mass or Calc
    split: str  # Training or Test
    patient: str  # P_00038
    side: str
    view: str
    density: int
    date: str  # MM-DD-YYYY
    old_uids: str
    abnormalities: list[_Abnormality]

    @property
    def folder(self) -> str:
        return f"{self.collection}-{self.split}_{self.patient}_{self.side}_{self.view}"


def _old_uid(rng: np.random.Generator) -> str:
    return f"{OLD_UID_ROOT}{rng.integers(10**17, 10**18)}{rng.integers(0, 10**18):018d}"


def _draw(shares: tuple[float, ...], allowed: tuple[int, int], rng: np.random.Generator) -> int:
    """A level 1..len(shares) drawn with the real shares, only from allowed (lowest, highest)."""
    levels = np.arange(1, len(shares) + 1)
    weights = np.where((levels >= allowed[0]) & (levels <= allowed[1]), shares, 0)
    return int(rng.choice(levels, p=weights / weights.sum()))


def _plan_abnormality(n: int, collection: str, rng: np.random.Generator,
                      subtlety: tuple[int, int] = (1, 5)) -> _Abnormality:
    pathology = str(rng.choice(_PATHOLOGY[0], p=_PATHOLOGY[1]))
    first, second = _DESCRIPTORS[collection, pathology == "MALIGNANT"]
    return _Abnormality(
        n=n,
        pathology=pathology,
        assessment=int(rng.choice(_ASSESSMENT[pathology])),
        subtlety=_draw(SUBTLETY_SHARES[collection], subtlety, rng),
        descriptors=(str(rng.choice(first)), str(rng.choice(second))),
        one_series=bool(rng.random() < 0.5),
        mask_first=bool(rng.random() < 0.5),
        quirk=bool(rng.random() < 1 / 8),
        old_uids=f"{_old_uid(rng)}/{_old_uid(rng)}",
        crop_is_first=bool(rng.random() < 0.5),
    )


def _plan(patients: int, defects: bool, rng: np.random.Generator,
          subtlety: tuple[int, int] = (1, 5), densities: tuple[int, int] = (1, 4),
          test_share: float = 0.25) -> list[_Mammogram]:
    """Draw every random choice that is not pixels: patients, splits, views, clinical columns;
    subtlety and density only from their (lowest, highest) ranges."""
    ids = np.sort(rng.choice(np.arange(1, 2100), size=patients, replace=False))
    test = set(rng.choice(ids, size=round(test_share * patients), replace=False).tolist())
    plan = []
    for pid in ids.tolist():
        density = _draw(DENSITY_SHARES, densities, rng)
        views = rng.choice(4, size=rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]), replace=False)
        for k in sorted(views):
            collection = str(rng.choice(["Mass", "Calc"]))
            count = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
            abns = [_plan_abnormality(n, collection, rng, subtlety) for n in range(1, count + 1)]
            date = f"{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}-{rng.choice([2016, 2017])}"
            split = "Test" if pid in test else "Training"
            side, view = _VIEWS[k]
            uids = f"{_old_uid(rng)}/{_old_uid(rng)}"
            plan.append(
                _Mammogram(collection, split, f"P_{pid:05d}", side, view, density, date, uids, abns)
            )
    # The defects go on single-lesion training mammograms so the test split stays clean.
    singles = [m for m in plan if m.split == "Training" and len(m.abnormalities) == 1]
    chosen = rng.choice(len(singles), size=min(2, len(singles)), replace=False) if defects else []
    for index, defect in zip(chosen, ["mask_size_mismatch", "missing_roi"], strict=False):
        singles[index].abnormalities[0].defect = defect
    return plan


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-pass noise with about `cells` blobs across the width, the same look at any size."""
    coarse = rng.standard_normal((max(2, cells * h // w), cells)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _breast(
    h: int, w: int, ellipse: tuple[float, float, float], density: int, rng: np.random.Generator
) -> np.ndarray:
    """Half-ellipse breast on the left edge with fibroglandular texture, dark background."""
    a, b, cy = ellipse
    xs = np.arange(w, dtype=np.float32) / a
    ys = (np.arange(h, dtype=np.float32) - cy) / b
    inner = np.clip(1 - np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2), 0, 1)
    skin = np.minimum(inner / 0.08, 1)  # the compressed breast thins towards the skin line
    texture = 0.6 * _smooth_noise(h, w, 6, rng) + 0.4 * _smooth_noise(h, w, 20, rng)
    grain = rng.standard_normal((h, w), dtype=np.float32)
    tissue = 0.36 + 0.14 * inner + (0.02 + 0.01 * density + 0.04 * inner) * texture + 0.012 * grain
    return MAX_VALUE * (skin * tissue + (1 - skin) * 0.005 * np.abs(grain))


def _mass(r: float, malignant: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Benign: smooth oval, soft edge. Malignant: lobulated star with spicules, bright core."""
    spikes = rng.uniform(0.3, 0.6, rng.integers(7, 14)) * r if malignant else np.zeros(0)
    half = int(1.2 * (r + spikes.max(initial=0.3 * r))) + 2  # room for lobes and the soft edge
    dy, dx = np.ogrid[-half : half + 1, -half : half + 1]
    turn = rng.uniform(0, np.pi)
    u, v = dx * np.cos(turn) + dy * np.sin(turn), dy * np.cos(turn) - dx * np.sin(turn)
    rho = np.hypot(u, v / (rng.uniform(0.8, 1.0) if malignant else rng.uniform(0.6, 0.95)))
    phi = np.arctan2(v, u)
    edge = np.full_like(rho, r)
    if malignant:
        for k in range(2, 7):
            edge += r * rng.uniform(0, 0.05) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        for length in spikes:
            off = np.abs((phi - rng.uniform(-np.pi, np.pi) + np.pi) % (2 * np.pi) - np.pi)
            edge = np.maximum(edge, r + length * (1 - off / rng.uniform(0.05, 0.1)))
    q = rho / edge
    body = 1 / (1 + np.exp((q - 1) / (0.04 if malignant else 0.08)))
    core = np.exp(-((rho / (0.5 * r)) ** 2))
    gain = (0.26 + 0.14 * core) if malignant else (0.22 + 0.03 * core)
    return MAX_VALUE * body * gain, q <= 1


def _calcs(
    region: float, malignant: bool, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Malignant: 20-60 fine specks, compact. Benign: 6-15 coarse dots, spread. Mask: their hull."""
    n = int(rng.integers(20, 61) if malignant else rng.integers(6, 16))
    # Fine specks still >= ~2 px wide after the ~2.5x downsample to training resolution.
    radii = rng.uniform(*((2.0, 3.0) if malignant else (3.0, 6.0)), n) * scale
    angle, dist = rng.uniform(0, 2 * np.pi, n), region * np.sqrt(rng.uniform(0, 1, n))
    xs, ys = dist * np.cos(angle), dist * np.sin(angle)
    grow = radii.max() + 4 * scale
    half = int(np.ceil(region + grow + radii.max())) + 2
    hull = np.zeros((2 * half + 1, 2 * half + 1), np.uint8)
    points = np.round(np.stack([xs, ys], axis=1) + half).astype(np.int32)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * round(grow) + 1,) * 2)
    hull = cv2.dilate(hull, kernel)
    # A faint haze over the cluster region makes the mask's extent learnable, not just the specks.
    haze = cv2.GaussianBlur(hull.astype(np.float32), (0, 0), grow) * 0.06
    dy, dx = np.ogrid[-half : half + 1, -half : half + 1]
    specks = np.zeros_like(haze)
    for x, y, s, gain in zip(xs, ys, radii, rng.uniform(0.4, 0.5, n), strict=True):
        specks = np.maximum(specks, gain * np.clip(s + 0.5 - np.hypot(dx - x, dy - y), 0, 1))
    return MAX_VALUE * (haze + specks), hull.astype(bool)


def _place(
    half: int,
    ellipse: tuple[float, float, float],
    placed: list[tuple[int, int, int]],
    rng: np.random.Generator,
) -> tuple[int, int]:
    """A lesion centre whose patch lies inside the breast, clear of the skin fade and of others."""
    a, b, cy = ellipse
    margin = half + 0.08 * a
    for attempt in range(2000):
        y, x = round(rng.uniform(cy - b, cy + b)), round(rng.uniform(0, a))
        inside = x > margin and (x / (a - margin)) ** 2 + ((y - cy) / (b - margin)) ** 2 < 1
        apart = attempt > 1500 or all(  # late on, crowding beats failing
            np.hypot(y - py, x - px) > 0.75 * (half + ph) for py, px, ph in placed
        )
        if inside and apart:
            placed.append((y, x, half))
            return y, x
    raise RuntimeError("no room for a lesion in the breast: is the image much wider than tall?")


def _film_label(img: np.ndarray, rng: np.random.Generator) -> None:
    """Bright label with dark 'text' blocks in a far corner, clear of the breast by construction."""
    h, w = img.shape
    lh, lw = int(h * rng.uniform(0.04, 0.06)), int(w * rng.uniform(0.12, 0.18))
    y0 = int(0.03 * h) if rng.random() < 0.5 else int(0.97 * h) - lh
    x0 = int(0.96 * w) - lw
    img[y0 : y0 + lh, x0 : x0 + lw] = 0.85 * MAX_VALUE
    for _ in range(int(rng.integers(3, 7))):
        by, bx = y0 + int(rng.uniform(0.15, 0.6) * lh), x0 + int(rng.uniform(0.05, 0.8) * lw)
        img[by : by + max(1, lh // 4), bx : bx + max(1, lw // 8)] = 0.25 * MAX_VALUE


def _box_ratio(
    quantiles: tuple[float, float, float], cap: float, rng: np.random.Generator
) -> float:
    """Box height / image height from a two-piece log-normal through (median, p5, p95)."""
    median, p5, p95 = quantiles
    z = rng.standard_normal()
    spread = np.log(median / p5) if z < 0 else np.log(p95 / median)  # each tail fits its own
    return min(median * float(np.exp(z * spread / 1.6449)), cap)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, smooth between: soft edges that end exactly, unlike a Gaussian."""
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _fractal_noise(
    h: int, w: int, coarsest: int, finest: int, rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance noise with breast tissue's 1/f^3 power spectrum, from `coarsest` to `finest`
    cells across the width: each finer octave adds detail at 1/sqrt(2) the amplitude."""
    cells, amplitude, field = coarsest, 1.0, None
    while True:
        shape = (max(2, cells * h // w), cells)
        octave = amplitude * rng.standard_normal(shape, dtype=np.float32)
        if field is not None:
            octave += cv2.resize(field, shape[::-1], interpolation=cv2.INTER_CUBIC)
        field = octave
        if cells * 2 > min(finest, w // 2):
            break
        cells, amplitude = cells * 2, amplitude / np.sqrt(2)
    field = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    return field / field[::8, ::8].std()


@dataclass
class _Anatomy:
    ellipse: tuple[float, float, float]  # breast depth a, half height b, centre row
    attenuation: np.ndarray  # float32 (h, w), 0 outside the breast
    glandular: np.ndarray  # float32 (h, w), 0 (fat) to 1 (fibroglandular tissue)


def _anatomy(h: int, w: int, density: int, rng: np.random.Generator) -> _Anatomy:
    """Breast outline, fat and fibroglandular tissue for a BI-RADS density (1 fatty, 4 dense)."""
    a, b = w * rng.uniform(*BREAST_DEPTH), h * rng.uniform(*BREAST_HALF_HEIGHT)
    cy = h * rng.uniform(0.48, 0.52)
    xs = np.arange(w, dtype=np.float32) / a
    ys = (np.arange(h, dtype=np.float32) - cy) / b
    radius = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2)
    thickness = np.sqrt(np.clip((1 - radius) / 0.12, 0, 1))  # thins over the last 12% to the skin
    # Glands gather in the middle of the breast; fat lines the skin and the chest wall.
    tendency = _fractal_noise(h, w, 3, 24, rng) - 3 * ((xs[None, :] - 0.45) ** 2 + ys[:, None] ** 2)
    breast = radius[::8, ::8] < 1
    level = np.quantile(tendency[::8, ::8][breast], 1 - DENSE_FRACTION[density])
    glandular = _smoothstep((tendency - level) / 2.5 + 0.5)
    texture = _fractal_noise(h, w, 8, 256, rng)
    dense = DENSE_ATTENUATION[density] + DENSE_TEXTURE[density] * texture
    tissue = 0.28 + glandular * dense + 0.006 * texture
    return _Anatomy((a, b, cy), thickness * tissue, glandular)


def _expose(attenuation: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Film brightness in [0, 1]: it saturates with attenuation (dense tissue swallows
    contrast), plus the film's grain."""
    return FILM_FOG + (1 - FILM_FOG) * (1 - np.exp(-FILM_GAMMA * attenuation)) + grain


def _grain(h: int, w: int, detail: float, rng: np.random.Generator) -> np.ndarray:
    """Grain whose per-pixel spread falls with the pixel pitch (detail: NATIVE_ROWS scans' px
    per px), as when a real scan is downsampled."""
    return (GRAIN * detail) * rng.standard_normal((h, w), dtype=np.float32)


def _target(abn: _Abnormality, table: dict[int, float], contrast: float,
            rng: np.random.Generator) -> float:
    """The visibility figure a lesion is drawn to show: its subtlety's, jittered, x contrast."""
    return table[abn.subtlety] * rng.uniform(0.85, 1.15) * contrast


def _calibrate(attenuation: np.ndarray, grain: np.ndarray, add: np.ndarray, y0: int, x0: int,
               region: np.ndarray, lesions: np.ndarray, target: float, specks: bool) -> float:
    """The gain g for which attenuation + g * add (add's top-left corner at y0, x0) shows
    `target` as region CNR (masses) or speck CNR (specks) on the exposed film, by bisection.

    region: the patch's ROI (bool, add's shape); lesions: every ROI of the image so far.
    """
    kernel_reach = int(np.sqrt(region.sum() / np.pi) / 2) + 8  # the ring and the high-pass
    h, w = add.shape
    top, left = max(0, y0 - kernel_reach), max(0, x0 - kernel_reach)
    bottom = min(attenuation.shape[0], y0 + h + kernel_reach)
    right = min(attenuation.shape[1], x0 + w + kernel_reach)
    window = np.s_[top:bottom, left:right]
    inside = np.zeros((bottom - top, right - left), bool)
    inside[y0 - top:y0 - top + h, x0 - left:x0 - left + w] = region
    placed = np.zeros_like(inside, np.float32)
    placed[y0 - top:y0 - top + h, x0 - left:x0 - left + w] = add
    around = visibility.ring(inside, inside | lesions[window])
    base, noise = attenuation[window], grain[window]

    def shown(gain: float) -> float:
        film = _expose(base + gain * placed, noise)
        if specks:
            return visibility.speck_cnr(film, inside, around)[0]
        return visibility.region_cnr(film, inside, around)

    low, high = 0.0, MAX_GAIN
    if not shown(high) > target:
        return high
    for _ in range(24):
        middle = (low + high) / 2
        low, high = (middle, high) if shown(middle) < target else (low, middle)
    return (low + high) / 2


def _outline(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A loose hand-drawn outline around (x, y) points, as CBIS-DDSM's ROIs are: their hull
    blurred and cut at a wobbly level, ~10-25% larger. Returns the polygon in the points' units."""
    size = 96
    to_canvas = 0.3 * size / (np.abs(points).max() + 1e-6)
    hull = np.zeros((size, size), np.float32)
    corners = cv2.convexHull(np.round(points * to_canvas + size / 2).astype(np.int32))
    cv2.fillConvexPoly(hull, corners, 1.0)
    soft = cv2.GaussianBlur(hull, (0, 0), 0.05 * size)
    soft = soft / soft.max() + 0.04 * _smooth_noise(size, size, 5, rng)
    region = ((soft > rng.uniform(0.1, 0.3)) | (hull > 0)).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygon = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float32)
    return (polygon - size / 2) / to_canvas


def _outline_mask(polygon: np.ndarray, scale: float, half: int, pad: int) -> np.ndarray:
    """The outline filled on a (2 half + 1)^2 patch, grown by pad px to take in whole specks."""
    inside = np.zeros((2 * half + 1,) * 2, np.uint8)
    cv2.fillPoly(inside, [np.round(polygon * scale + half).astype(np.int32)], 1)
    if pad:
        inside = cv2.dilate(
            inside, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1,) * 2)
        )
    return inside.astype(bool)


def _boundary(shape: str, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """Edge radius by angle (about 1 on the long axis) for a mass shape: round, oval, lobulated
    or irregular."""
    aspect = rng.uniform(*{"ROUND": (0.85, 1.0), "OVAL": (0.55, 0.8)}.get(shape, (0.65, 1.0)))
    harmonics, strength = {"LOBULATED": ((2, 5), 0.15), "IRREGULAR": ((2, 8), 0.15)}.get(
        shape, ((2, 3), 0.02)
    )
    orders = np.arange(*harmonics)
    amplitudes = rng.uniform(0, strength, orders.size) * 2 / orders  # finer lobes smaller
    phases, turn = rng.uniform(0, 2 * np.pi, orders.size), rng.uniform(0, np.pi)

    def radius(theta: np.ndarray) -> np.ndarray:
        oval = 1 / np.sqrt(np.cos(theta - turn) ** 2 + (np.sin(theta - turn) / aspect) ** 2)
        lobes = np.cos(orders * theta[..., None] + phases) @ amplitudes
        return oval * (1 + lobes)

    return radius


def _blob(
    r: float, half: int, boundary: Callable, softness: float | Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """A dense mass-like body of mean radius r on a (2 half + 1)^2 patch, brighter inside."""
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    theta = np.arctan2(dy, dx)
    q = np.hypot(dx, dy) / (r * boundary(theta))
    if callable(softness):
        softness = softness(theta)
    dome = np.sqrt(np.clip(1 - q * q, 0, 1))  # a sphere's thickness along the beam
    return _smoothstep((1 - q) / softness + 0.5) * (0.6 + 0.4 * dome)


def _spicules(r: float, half: int, rng: np.random.Generator) -> np.ndarray:
    """Thin tapering rays out of the mass: the spiculated margin of invasive carcinomas."""
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    rays = np.zeros_like(dx)
    for angle in rng.uniform(0, 2 * np.pi, rng.integers(8, 18)):
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = dy * np.cos(angle) - dx * np.sin(angle)
        width = max(1.0, r * rng.uniform(0.03, 0.07))
        taper = np.clip(1 - along / (r * rng.uniform(1.4, 2.3)), 0, 1) * (along > 0)
        rays = np.maximum(rays, taper * _smoothstep(1 - np.abs(across) / width))
    return 0.8 * rays


def _realistic_mass(
    abn: _Abnormality, box_rows: float, max_half: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Benign circumscribed or obscured, malignant spiculated or ill-defined (the CSV's margins),
    at unit gain (_calibrate scales it); the mask is a loose outline box_rows tall (less where
    the patch would pass max_half)."""
    shape, margins = abn.descriptors
    boundary = _boundary(shape, rng)
    theta = np.linspace(-np.pi, np.pi, 90, endpoint=False)
    edge = boundary(theta)
    polygon = _outline(np.stack([edge * np.cos(theta), edge * np.sin(theta)], 1), rng)
    reach = max(np.abs(polygon).max(), (2.3 if margins == "SPICULATED" else 1.3) * edge.max())
    r = min((box_rows - 1) / np.ptp(polygon[:, 1]), (max_half - 2) / reach)  # mean radius
    half = int(np.ceil(r * reach)) + 2
    hidden = rng.uniform(0, 2 * np.pi)  # where an obscured mass's edge dissolves into tissue
    softness = {
        "CIRCUMSCRIBED": 0.05,
        "OBSCURED": lambda t: 0.05 + 0.4 * np.clip(np.cos(t - hidden), 0, 1) ** 2,
        "ILL_DEFINED": 0.35,
        "SPICULATED": 0.12,
    }[margins]
    body = _blob(r, half, boundary, softness)
    if margins == "SPICULATED":
        body = np.maximum(body, _spicules(r, half, rng))
    return body, _outline_mask(polygon, r, half, 0)


def _speck(
    patch: np.ndarray, y: float, x: float, length: float, width: float, angle: float, gain: float
) -> None:
    """Add one calcification, an ellipsoid length x width px, area-sampled so sub-pixel ones
    fade as they would when a scan is downsampled."""
    reach = int(np.ceil(length / 2)) + 1
    cy, cx, n = round(y), round(x), 2 * reach + 1
    sub = min(32, max(4, int(np.ceil(4 / width))))  # samples per pixel side, 4 across the speck
    steps = cy - reach - 0.5 + (np.arange(n * sub) + 0.5) / sub
    sy, sx = (steps - y)[:, None], (steps - cy + cx - x)[None, :]
    along = sx * np.cos(angle) + sy * np.sin(angle)
    across = sy * np.cos(angle) - sx * np.sin(angle)
    depth = np.sqrt(np.clip(1 - (2 * along / length) ** 2 - (2 * across / width) ** 2, 0, None))
    patch[cy - reach : cy + reach + 1, cx - reach : cx + reach + 1] += gain * depth.reshape(
        n, sub, n, sub
    ).mean(axis=(1, 3))


def _cluster_layout(
    distribution: str, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Speck centres (unit scale) and the main direction of a calcification distribution."""
    direction = rng.uniform(0, np.pi)
    axis = np.array([np.cos(direction), np.sin(direction)])
    normal = np.array([-axis[1], axis[0]])
    if distribution == "SEGMENTAL":  # along a duct and its branches
        along, across = rng.uniform(-1, 1, n), rng.normal(0, 0.2, n)
    elif distribution == "CLUSTERED":  # a few tight groups
        groups = rng.normal(0, 0.5, (rng.integers(1, 4), 2))
        return groups[rng.integers(0, len(groups), n)] + rng.normal(0, 0.35, (n, 2)), direction
    else:  # scattered over a region
        angle, dist = rng.uniform(0, 2 * np.pi, n), np.sqrt(rng.uniform(0, 1, n))
        along, across = dist * np.cos(angle), dist * np.sin(angle) * rng.uniform(0.5, 1)
    return along[:, None] * axis + across[:, None] * normal, direction


def _realistic_calcs(
    abn: _Abnormality, box_rows: float, max_half: int, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Malignant: many fine pleomorphic specks, clustered. Benign: few coarse round or rod-like
    ones, scattered. Sizes in px of a NATIVE_ROWS-row scan times scale; specks about unit gain
    (_calibrate scales the cluster). The mask is
    a loose outline of the whole cluster, box_rows tall (less where the patch would pass
    max_half)."""
    kind, distribution = abn.descriptors
    malignant = abn.pathology == "MALIGNANT"
    n = int(rng.integers(8, 41) if malignant else rng.integers(4, 13))
    centres, direction = _cluster_layout(distribution, n, rng)
    low, high = SPECK_LENGTH[kind]
    lengths = np.exp(rng.uniform(np.log(low), np.log(high), n)) * scale
    widths = lengths / rng.uniform(*SPECK_ASPECT[kind], n)
    polygon = _outline(centres, rng)
    pad = int(np.ceil(0.75 * lengths.max())) + 1  # a speck with its bud, seen from its centre
    tall, room = max(1.0, box_rows - 1 - 2 * pad), max(1.0, max_half - 2 * pad - 2)
    if tall / np.ptp(polygon[:, 1]) > room / np.abs(polygon).max():
        # Too wide for the breast at its drawn height: stand it upright (swap x and y).
        centres, polygon, direction = centres[:, ::-1], polygon[:, ::-1], np.pi / 2 - direction
    spread = min(tall / np.ptp(polygon[:, 1]), room / np.abs(polygon).max())
    half = int(np.ceil(spread * np.abs(polygon).max())) + 2 * pad + 2
    patch = np.zeros((2 * half + 1,) * 2, np.float32)
    rods = kind in ("FINE_LINEAR_BRANCHING", "LARGE_RODLIKE")  # lie along the ducts
    angles = direction + rng.normal(0, 0.3, n) if rods else rng.uniform(0, np.pi, n)
    gains = rng.uniform(0.67, 1.33, n)  # about the cluster's gain, which _calibrate sets
    for (x, y), length, width, angle, gain in zip(
        centres * spread + half, lengths, widths, angles, gains, strict=True
    ):
        _speck(patch, y, x, length, width, angle, gain)
        if malignant and kind == "PLEOMORPHIC" and rng.random() < 0.5:  # an irregular bud
            bud = rng.uniform(0, 2 * np.pi)
            dy, dx = 0.4 * length * np.sin(bud), 0.4 * length * np.cos(bud)
            _speck(patch, y + dy, x + dx, 0.6 * length, 0.6 * width, bud, gain)
    return patch, _outline_mask(polygon, spread, half, pad)


def _place_in_glands(
    half: int,
    anatomy: _Anatomy,
    placed: list[tuple[int, int, int]],
    rng: np.random.Generator,
    tries: int = 6,
) -> tuple[int, int]:
    """Calcifications form in ducts and lobules: the most glandular of a few candidate spots."""
    spots = [_place(half, anatomy.ellipse, list(placed), rng) for _ in range(tries)]
    y, x = max(spots, key=lambda spot: anatomy.glandular[spot])
    placed.append((y, x, half))
    return y, x


def _is_clear(lesions: np.ndarray, add: np.ndarray, y0: int, x0: int) -> bool:
    """A look-alike patch fits in the image and keeps clear of every lesion's mask (it must
    stay background)."""
    h, w = add.shape
    if y0 < 0 or x0 < 0 or y0 + h > lesions.shape[0] or x0 + w > lesions.shape[1]:
        return False
    near = cv2.dilate((add > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return not lesions[y0 : y0 + h, x0 : x0 + w][near].any()


def _dense_island(h: int, rng: np.random.Generator) -> np.ndarray:
    """A mass look-alike: a lump of glandular tissue as big as a mass, mottled and with a soft
    irregular edge, at unit gain (calibrated as bright as a mass where it is placed)."""
    r = h * _box_ratio(MASS_BOX_RATIO, 0.15, rng) / 2.4
    half = int(np.ceil(2 * r)) + 2
    body = _blob(r, half, _boundary("IRREGULAR", rng), rng.uniform(0.3, 0.6))
    mottle = 1 + 0.35 * _smooth_noise(2 * half + 1, 2 * half + 1, 6, rng)
    return body * np.clip(mottle, 0, None)


def _vessel(h: int, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A calcified artery: a faint curved tube and, apart (about unit gain, for _calibrate),
    the specks along both its walls (tram lines)."""
    length = h * rng.uniform(0.06, 0.16)
    t = np.linspace(-0.5, 0.5, 200)[:, None]
    turn = rng.uniform(-0.6, 0.6)  # arteries run towards the nipple
    axis, normal = np.array([np.cos(turn), np.sin(turn)]), np.array([-np.sin(turn), np.cos(turn)])
    bend = rng.uniform(-0.25, 0.25) * length
    path = length * t * axis + bend * (1 - 4 * t * t) * normal
    wall = max(1.0, rng.uniform(20, 40) * scale)  # 1-2 mm across
    half = int(np.ceil(np.abs(path).max() + wall + 14 * scale)) + 2  # room for the wall specks
    path += half
    tube = np.zeros((2 * half + 1,) * 2, np.float32)
    cv2.polylines(tube, [np.round(path).astype(np.int32)], False, 1.0, max(1, round(wall)))
    wall_shadow = 0.015 * cv2.GaussianBlur(tube, (0, 0), max(0.5, wall / 4)) * (tube > 0)
    specks = np.zeros_like(tube)
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    side = tangent[:, ::-1] * [-1, 1]
    calcified = _smooth_noise(1, len(path), 4, rng)[0] > -0.2  # in stretches, not all along
    for sign in (-1, 1):
        for index in np.flatnonzero(calcified & (rng.random(len(path)) < 0.15)):
            x, y = path[index] + sign * side[index] * wall / 2
            angle = float(np.arctan2(tangent[index, 1], tangent[index, 0]))
            length = rng.uniform(4, 14) * scale
            _speck(specks, y, x, length, length / 2.5, angle, rng.uniform(0.67, 1.33))
    return wall_shadow, specks


def _skin_fold(anatomy: _Anatomy, h: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """A bright curved line just inside and along the skin: a fold of skin caught in compression.
    Returns the patch and its top-left corner."""
    a, b, cy = anatomy.ellipse
    start, span = rng.uniform(-1.2, 0.8), rng.uniform(0.2, 0.5)
    at, width = rng.uniform(0.9, 0.97), h * rng.uniform(0.002, 0.005) / b
    ts = np.linspace(start, start + span, 50)
    corners = [(r * a * np.cos(ts), cy + r * b * np.sin(ts)) for r in (at - width, at + width)]
    x0, y0 = (int(min(c[i].min() for c in corners)) - 2 for i in (0, 1))
    x1, y1 = (int(max(c[i].max() for c in corners)) + 3 for i in (0, 1))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    radius, angle = np.hypot(xs / a, (ys - cy) / b), np.arctan2((ys - cy) / b, xs / a)
    along = np.clip((angle - start) / span, 0, 1)
    line = _smoothstep(1 - np.abs(radius - at) / width) * np.sin(np.pi * along)
    return rng.uniform(0.03, 0.06) * line, y0, x0


def _lookalikes(
    attenuation: np.ndarray,
    grain: np.ndarray,
    anatomy: _Anatomy,
    lesions: np.ndarray,
    placed: list[tuple[int, int, int]],
    max_half: int,
    density: int,
    detail: float,
    rng: np.random.Generator,
) -> None:
    """Normal structures that look like lesions and stay background: dense islands (more in
    dense breasts) as visible as masses, calcified vessels with specks as visible as clusters',
    and skin folds. One touching a lesion's mask is left out."""
    h = attenuation.shape[0]
    islands = [_dense_island(h, rng) for _ in range(rng.poisson(0.3 + 0.3 * density))]
    vessels = [_vessel(h, detail, rng) for _ in range(rng.poisson(0.8))]
    for base, add in [(None, island) for island in islands] + vessels:
        half = add.shape[0] // 2
        if half > max_half:  # no room for it in this breast
            continue
        y, x = _place(half, anatomy.ellipse, placed, rng)
        y0, x0 = y - half, x - half
        if not _is_clear(lesions, add, y0, x0):
            continue
        box = np.s_[y0 : y0 + add.shape[0], x0 : x0 + add.shape[1]]
        specks = base is not None
        if specks:  # the wall's shadow first: the specks are calibrated on top of it
            attenuation[box] += base
            region = cv2.dilate((add > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        else:
            region = add > 0.5 * add.max()
        # Drawn as visible as a lesion of a subtlety drawn like the real ones.
        collection = "Calc" if specks else "Mass"
        subtlety = 1 + int(rng.choice(5, p=SUBTLETY_SHARES[collection]))
        target = (SPECK_CNR if specks else MASS_CNR)[subtlety] * rng.uniform(0.85, 1.15)
        gain = _calibrate(attenuation, grain, add, y0, x0, region, lesions, target, specks)
        attenuation[box] += gain * add
    for _ in range(rng.poisson(0.6)):
        fold, y0, x0 = _skin_fold(anatomy, h, rng)
        if _is_clear(lesions, fold, y0, x0):
            attenuation[y0 : y0 + fold.shape[0], x0 : x0 + fold.shape[1]] += fold


def _scanner_edges(img: np.ndarray, breast_depth: float, rng: np.random.Generator) -> None:
    """Bright strips where the film's unexposed margin or the scanner's holder shows, along the
    outer edge and, past the breast, along the top or bottom; clear of the breast."""
    h, w = img.shape
    strip = max(1, round(w * rng.uniform(0.004, 0.025)))
    img[:, w - strip :] = MAX_VALUE * rng.uniform(0.55, 0.9) * np.linspace(0.9, 1, h)[:, None]
    if rng.random() < 0.6:
        rows = max(1, round(h * rng.uniform(0.003, 0.012)))
        band = np.s_[:rows] if rng.random() < 0.5 else np.s_[h - rows :]
        img[band, round(breast_depth + 0.03 * w) :] = MAX_VALUE * rng.uniform(0.5, 0.9)


def _render_realistic(
    m: _Mammogram, h: int, w: int, rng: np.random.Generator, contrast: float = 1.0,
    detail_rows: int | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Calibrated to the real CBIS-DDSM (module docstring); contrast multiplies every lesion's
    visibility target (look-alikes keep theirs); the fine detail (specks, vessel walls, grain)
    is sized as on a scan of detail_rows rows (default h). Anatomy, lesions, look-alikes and film
    draw from their own streams, so leaving one out leaves the others' pixels alone."""
    anatomy_rng, lesion_rng, lookalike_rng, film_rng = rng.spawn(4)
    detail = (detail_rows or h) / NATIVE_ROWS  # px of a NATIVE_ROWS-row scan per px here
    anatomy = _anatomy(h, w, m.density, anatomy_rng)
    grain = _grain(h, w, detail, film_rng)  # drawn first: lesions are calibrated against it
    attenuation, masks, placed = anatomy.attenuation, [], []
    lesions = np.zeros((h, w), bool)
    max_half = int(0.38 * anatomy.ellipse[0])  # _place needs the patch to fit inside the breast
    for abn in m.abnormalities:
        if m.collection == "Mass":
            box_rows = h * _box_ratio(MASS_BOX_RATIO, 0.15, lesion_rng)
            add, inside = _realistic_mass(abn, box_rows, max_half, lesion_rng)
            y, x = _place(add.shape[0] // 2, anatomy.ellipse, placed, lesion_rng)
        else:
            box_rows = h * _box_ratio(CALC_BOX_RATIO, 0.22, lesion_rng)
            add, inside = _realistic_calcs(abn, box_rows, max_half, detail, lesion_rng)
            y, x = _place_in_glands(add.shape[0] // 2, anatomy, placed, lesion_rng)
        specks = m.collection == "Calc"
        target = _target(abn, SPECK_CNR if specks else MASS_CNR, contrast, lesion_rng)
        half = add.shape[0] // 2
        gain = _calibrate(attenuation, grain, add, y - half, x - half, inside, lesions, target,
                          specks)
        masks.append(_paste(attenuation, gain * add, inside, y, x))
        lesions |= masks[-1] > 0
    _lookalikes(attenuation, grain, anatomy, lesions, placed, max_half, m.density, detail,
                lookalike_rng)
    img = MAX_VALUE * _expose(attenuation, grain)
    _film_label(img, film_rng)
    _scanner_edges(img, anatomy.ellipse[0], film_rng)
    return _finish(img, masks, m.side)


def _paste(img: np.ndarray, add: np.ndarray, inside: np.ndarray, y: int, x: int) -> np.ndarray:
    """Add a lesion's square patch centred at (y, x); return its full-size 0/255 mask."""
    half = add.shape[0] // 2
    box = np.s_[y - half : y + half + 1, x - half : x + half + 1]
    img[box] += add
    mask = np.zeros(img.shape, np.uint8)
    mask[box][inside] = 255
    return mask


def _finish(img: np.ndarray, masks: list[np.ndarray], side: str) -> tuple[np.ndarray, list]:
    """uint16 image and masks, mirrored for a RIGHT breast (drawn with the chest wall left)."""
    img = np.clip(img, 0, MAX_VALUE).astype(np.uint16)
    if side == "RIGHT":
        img, masks = img[:, ::-1], [mask[:, ::-1] for mask in masks]
    return np.ascontiguousarray(img), [np.ascontiguousarray(mask) for mask in masks]


def _render(
    m: _Mammogram, h: int, w: int, rng: np.random.Generator, profile: str = "demo",
    contrast: float = 1.0, detail_rows: int | None = None,
) -> tuple[np.ndarray, list]:
    """The uint16 mammogram and one uint8 0/255 mask per abnormality, mirrored for RIGHT."""
    if profile == "realistic":
        return _render_realistic(m, h, w, rng, contrast, detail_rows)
    ellipse = (w * rng.uniform(0.6, 0.78), h * rng.uniform(0.42, 0.47), h * rng.uniform(0.47, 0.53))
    img = _breast(h, w, ellipse, m.density, rng)
    masks, placed = [], []
    for abn in m.abnormalities:
        malignant = abn.pathology == "MALIGNANT"
        if m.collection == "Mass":
            add, inside = _mass(w * rng.uniform(0.05, 0.09), malignant, rng)
        else:
            region = w * (rng.uniform(0.06, 0.08) if malignant else rng.uniform(0.10, 0.12))
            add, inside = _calcs(region, malignant, w / 400, rng)
        y, x = _place(add.shape[0] // 2, ellipse, placed, rng)
        masks.append(_paste(img, add, inside, y, x))
    _film_label(img, rng)
    return _finish(img, masks, m.side)


def _crop_and_mask(
    abn: _Abnormality, image: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The lesion's cropped image and its ROI mask as published (the size defect applied)."""
    x, y, bw, bh = cv2.boundingRect(mask)
    crop = image[y : y + bh, x : x + bw]
    if abn.defect == "mask_size_mismatch":  # like Mass-Test_P_00145_LEFT_CC: mask ~87% size
        size = (round(0.87 * mask.shape[1]), round(0.87 * mask.shape[0]))
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return crop, mask


def _roi_uids(abn: _Abnormality) -> tuple[str, str]:
    """"<study uid>/<series uid>" of the crop and of the mask in the description CSVs: one series
    for both, or (newer layout) a series each, the crop's derived so the plan's draws stay put."""
    if abn.one_series:
        return abn.old_uids, abn.old_uids
    study, series = abn.old_uids.split("/")
    return f"{study}/{generate_uid(OLD_UID_ROOT, [series, 'crop'])}", abn.old_uids


def _write_abnormality(
    root: Path,
    m: _Mammogram,
    abn: _Abnormality,
    image: np.ndarray,
    mask: np.ndarray,
    uid: Callable[[], str],
    rng: np.random.Generator,
) -> None:
    crop, mask = _crop_and_mask(abn, image, mask)
    study = root / f"{m.folder}_{abn.n}" / f"{m.date}-DDSM-{rng.integers(100000):05d}"
    mask_dir = study / f"1.000000-ROI mask images-{rng.integers(100000):05d}"
    if abn.one_series:
        first, second = mask_dir / "1-1.dcm", mask_dir / "1-2.dcm"
        mask_path, crop_path = (first, second) if abn.mask_first else (second, first)
        series = (uid(),) * 2
    else:
        crop_path = study / f"1.000000-cropped images-{rng.integers(100000):05d}" / "1-1.dcm"
        mask_path, series = mask_dir / "1-1.dcm", (uid(), uid())
    name, study_uid = f"{m.folder}_{abn.n}", uid()
    mask_id = f"{m.patient}_{m.side}_{m.view}_{abn.n}.dcm" if abn.quirk else name
    files = [  # (path, pixels, PatientID, SeriesDescription, series UID)
        (crop_path, crop, name, "cropped images", series[0]),
        (mask_path, mask, mask_id, None if abn.quirk else "ROI mask images", series[1]),
    ]
    for path, pixels, patient_id, description, series_uid in files:
        write_dicom(
            path,
            pixels,
            patient_id=patient_id,
            series_description=description,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=uid(),
            instance_number=int(path.stem[-1]),
            **_tags(m),
        )


def _tags(m: _Mammogram) -> dict:
    """Header fields shared by a mammogram's files."""
    month, day, year = m.date.split("-")
    return {"laterality": m.side[0], "view": m.view, "study_date": f"{year}{month}{day}"}


def _write_mammogram(
    root: Path,
    m: _Mammogram,
    size: tuple[int, int],
    seed: int,
    index: int,
    profile: str = "demo",
    layout: str = "tcia",
    contrast: float = 1.0,
    detail_rows: int | None = None,
) -> list[dict]:
    """Render one mammogram and write its files; returns their dicom_info.csv rows (Kaggle)."""
    rng = np.random.default_rng([seed, index])  # own stream: pixels do not hinge on other images
    counter = itertools.count()

    def uid() -> str:  # seeded, so a rerun writes byte-identical files
        return generate_uid(entropy_srcs=[f"synthetic-{seed}-{index}-{next(counter)}"])

    image, masks = _render(m, *size, rng, profile, contrast, detail_rows)
    if layout == "kaggle":
        return _write_kaggle_mammogram(root, m, image, masks, uid, rng)
    series = root / m.folder / f"{m.date}-DDSM-{rng.integers(100000):05d}"
    path = series / f"1.000000-full mammogram images-{rng.integers(100000):05d}" / "1-1.dcm"
    write_dicom(
        path,
        image,
        patient_id=m.folder,
        series_description="full mammogram images",
        sop_class_uid=MAMMOGRAPHY_SOP_CLASS,
        study_uid=uid(),
        series_uid=uid(),
        sop_uid=uid(),
        **_tags(m),
    )
    for abn, mask in zip(m.abnormalities, masks, strict=True):
        if abn.defect != "missing_roi":
            _write_abnormality(root, m, abn, image, mask, uid, rng)
    return []


def _write_jpeg(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit JPEG as in the Kaggle copy: the image's range scaled to 0-255 (masks stay 0/255;
    the compression blurs their edges into a dozen grey levels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    eight_bit = cv2.normalize(pixels, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U)
    if not cv2.imwrite(str(path), eight_bit):
        raise OSError(f"cannot write {path}")


def _write_kaggle_mammogram(
    jpeg: Path,
    m: _Mammogram,
    image: np.ndarray,
    masks: list[np.ndarray],
    uid: Callable[[], str],
    rng: np.random.Generator,
) -> list[dict]:
    """jpeg/<series uid>/<1|2>-<n>.jpg for the mammogram and each abnormality's crop and mask,
    in the folders the description CSVs' paths name; returns their dicom_info.csv rows."""
    files = [(m.old_uids, "1", image, m.folder, "full mammogram images")]
    for abn, mask in zip(m.abnormalities, masks, strict=True):
        if abn.defect == "missing_roi":
            continue
        crop, mask = _crop_and_mask(abn, image, mask)
        crop_uids, mask_uids = _roi_uids(abn)
        # In one folder the 1-/2- prefix says nothing: the mask is 1- or 2- at random.
        mask_prefix = "1" if not abn.one_series or abn.mask_first else "2"
        crop_prefix = "1" if not abn.one_series or not abn.mask_first else "2"
        name = f"{m.folder}_{abn.n}"
        mask_id = f"{m.patient}_{m.side}_{m.view}_{abn.n}.dcm" if abn.quirk else name
        files += [(crop_uids, crop_prefix, crop, name, "cropped images"),
                  (mask_uids, mask_prefix, mask, mask_id, "" if abn.quirk else "ROI mask images")]
    rows = []
    for uids, prefix, pixels, patient_id, description in files:
        study, series = uids.split("/")
        relative = f"{series}/{prefix}-{rng.integers(1, 300)}.jpg"
        _write_jpeg(jpeg / relative, pixels)
        bits = 8 if description in ("", "ROI mask images") else 16  # the DICOMs' depth
        rows.append({
            "file_path": f"CBIS-DDSM/dicom/{uid()}.dcm", "image_path": f"CBIS-DDSM/jpeg/{relative}",
            "BitsAllocated": bits, "BitsStored": bits, "Columns": pixels.shape[1],
            "Laterality": m.side[0], "Modality": "MG", "PatientID": patient_id,
            "PhotometricInterpretation": "MONOCHROME2", "Rows": pixels.shape[0],
            "SeriesDescription": description, "SeriesInstanceUID": series,
            "StudyInstanceUID": study,
        })  # fmt: skip
    return rows


def _write_kaggle_csvs(csv_dir: Path, plan: list[_Mammogram], info: list[dict]) -> None:
    """The four description CSVs, dicom_info.csv and meta.csv (one row per series folder)."""
    csv_dir.mkdir(parents=True, exist_ok=True)
    _write_csvs(csv_dir, plan)
    with open(csv_dir / "dicom_info.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, DICOM_INFO_COLUMNS)
        writer.writeheader()
        writer.writerows(info)
    series: dict[str, list[dict]] = {}
    for row in info:
        series.setdefault(row["SeriesInstanceUID"], []).append(row)
    with open(csv_dir / "meta.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(META_COLUMNS)
        for uid, rows in series.items():
            first = rows[0]
            writer.writerow([uid, first["StudyInstanceUID"], first["PatientID"],
                             first["SeriesDescription"], len(rows)])


def _csv_row(m: _Mammogram, abn: _Abnormality) -> list:
    crop_uids, mask_uids = _roi_uids(abn)
    names = ("000000.dcm", "000001.dcm") if abn.crop_is_first else ("000001.dcm", "000000.dcm")
    crop = f"{m.folder}_{abn.n}/{crop_uids}/{names[0]}"
    roi = f"{m.folder}_{abn.n}/{mask_uids}/{names[1]}"
    # The published files carry a bare LF inside one path field per row; so do we.
    crop, roi = (crop, roi + "\n") if m.collection == "Mass" else (crop + "\n", roi)
    kind = "mass" if m.collection == "Mass" else "calcification"
    image = f"{m.folder}/{m.old_uids}/000000.dcm"
    head = [m.patient, m.density, m.side, m.view, abn.n, kind, *abn.descriptors]
    return [*head, abn.assessment, abn.pathology, abn.subtlety, image, crop, roi]


def _write_csvs(out_dir: Path, plan: list[_Mammogram]) -> None:
    for collection, split in itertools.product(("Mass", "Calc"), ("Training", "Test")):
        part = "train" if split == "Training" else "test"
        name = f"{collection.lower()}_case_description_{part}_set.csv"
        with open(out_dir / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\r\n")
            writer.writerow(CSV_HEADERS[collection].split(","))
            for m in plan:
                if (m.collection, m.split) == (collection, split):
                    writer.writerows(_csv_row(m, abn) for abn in m.abnormalities)


def _summary(
    plan: list[_Mammogram], out_dir: Path, size: tuple[int, int], seed: int, layout: str
) -> dict:
    groups = [f"{c}-{s}" for c in ("Mass", "Calc") for s in ("Training", "Test")]
    abns = [(m, a) for m in plan for a in m.abnormalities]
    images = Counter(f"{m.collection}-{m.split}" for m in plan)
    lesions = Counter(f"{m.collection}-{m.split}" for m, _ in abns)
    written = [a for _, a in abns if a.defect != "missing_roi"]
    return {
        "out_dir": str(out_dir),
        "layout": layout,
        "size": list(size),
        "seed": seed,
        "patients": len({m.patient for m in plan}),
        "mammograms": {g: images[g] for g in groups},
        "abnormalities": {g: lesions[g] for g in groups},
        "pathology": dict(Counter(a.pathology for _, a in abns)),
        "abnormality_folders_written": len(written),
        "layouts": {
            "one_series": sum(a.one_series for a in written),
            "two_series": sum(not a.one_series for a in written),
        },
        "masks_without_series_description": sum(a.quirk for a in written),
        "defects": {
            d: [f"{m.folder}_{a.n}" for m, a in abns if a.defect == d]
            for d in ("mask_size_mismatch", "missing_roi")
        },
    }


def make_synthetic_dataset(
    out_dir: Path,
    patients: int = 60,
    size: tuple[int, int] = (640, 400),
    seed: int = 0,
    defects: bool = True,
    progress: bool = True,
    profile: str = "demo",
    layout: str = "tcia",
    contrast: float = 1.0,
    detail_rows: int | None = None,
    subtlety: tuple[int, int] = (1, 5),
    density: tuple[int, int] = (1, 4),
    test_share: float = 0.25,
) -> dict:
    """Write out_dir/CBIS-DDSM/ and the four description CSVs (layout "tcia"), or out_dir/jpeg/
    and out_dir/csv/ (layout "kaggle"); return a summary of what was written.

    The defects need two single-lesion training mammograms; a tiny set may get fewer, and the
    summary's "defects" lists the folders actually affected. profile is "demo" (quick to learn)
    or "realistic" (calibrated to the real set, see the module docstring); contrast multiplies
    the realistic lesions' visibility (a contrast ladder: 1, 2, 4, 8); detail_rows sizes their
    fine detail as on a scan of that many rows (default: size's height); subtlety and density
    restrict the CSV ratings drawn (and so the realistic lesions' visibility) to a (lowest,
    highest) range, e.g. (1, 3) and (3, 4) for the hard end; test_share is the share of
    patients in the official test split (CBIS-DDSM's is about 0.2). Raises
    FileExistsError if the image folder exists, ValueError for unusable arguments.
    """
    out_dir = Path(out_dir)
    if patients < 1 or min(size) < 64 or layout not in LAYOUTS:
        raise ValueError(f"need patients >= 1, both sides >= 64 px and a layout in {LAYOUTS}, "
                         f"got {patients}, {size} and {layout!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not contrast > 0 or (detail_rows is not None and detail_rows < 1):
        raise ValueError(f"need contrast > 0 and detail_rows >= 1, got {contrast} and "
                         f"{detail_rows}")
    if not (1 <= subtlety[0] <= subtlety[1] <= 5 and 1 <= density[0] <= density[1] <= 4):
        raise ValueError(f"need 1 <= subtlety low <= high <= 5 and 1 <= density low <= high "
                         f"<= 4, got {subtlety} and {density}")
    if not 0 <= test_share < 1:
        raise ValueError(f"need 0 <= test_share < 1, got {test_share}")
    root = out_dir / image_folder(layout)
    if root.exists():
        raise FileExistsError(f"{root} already exists (use --overwrite to replace it)")
    plan = _plan(patients, defects, np.random.default_rng(seed), tuple(subtlety), tuple(density),
                 test_share)
    root.mkdir(parents=True)
    info = []
    for index, m in enumerate(tqdm(plan, desc="synthetic mammograms", disable=not progress)):
        info += _write_mammogram(root, m, size, seed, index, profile, layout, contrast,
                                 detail_rows)
    if layout == "kaggle":
        _write_kaggle_csvs(out_dir / "csv", plan, info)
    else:
        _write_csvs(out_dir, plan)
    return {**_summary(plan, out_dir, size, seed, layout), "profile": profile,
            "contrast": contrast, "detail_rows": detail_rows or size[0]}


def image_folder(layout: str) -> str:
    """The folder under --out that holds the images of a layout."""
    return "jpeg" if layout == "kaggle" else "CBIS-DDSM"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", type=Path, required=True,
        help="folder to write CBIS-DDSM/ and the 4 CSVs into (kaggle: jpeg/ and csv/)")
    add("--patients", type=int, default=60, help="patients, 1-3 mammograms each (default 60)")
    add(
        "--size",
        type=int,
        nargs=2,
        default=(640, 400),
        metavar=("H", "W"),
        help="mammogram height and width in px (default 640 400; real scans ~5000 3000)",
    )
    add("--seed", type=int, default=0, help="random seed; same seed, byte-identical output")
    add(
        "--profile",
        choices=PROFILES,
        default="demo",
        help="demo: lesions a model learns in minutes; realistic: sizes, contrasts and look-alikes "
        "calibrated to the real CBIS-DDSM (use --size 2048 1216 or more) (default demo)",
    )
    add(
        "--no-defects",
        dest="defects",
        action="store_false",
        help="leave out the deliberate defects: one ROI mask at the wrong size and one "
        "abnormality listed in the CSV whose folder is missing",
    )
    add(
        "--layout",
        choices=LAYOUTS,
        default="tcia",
        help="tcia: the NBIA DICOM download; kaggle: the Kaggle JPEG copy (csv/, jpeg/)",
    )
    add("--lesion-contrast", type=float, default=1.0, metavar="X",
        help="realistic profile: multiply every lesion's calibrated visibility by X (a contrast "
        "ladder 1, 2, 4, 8 finds where a recipe starts to learn; look-alikes keep theirs)")
    add("--detail-rows", type=int, default=None, metavar="R",
        help="realistic profile: size the fine detail (calcification specks, vessel walls, film "
        "grain) as on a scan of R rows; lesion boxes and anatomy stay fractions of the image "
        "(default: --size's H, i.e. a downsampled scan). E.g. --size 1024 608 --detail-rows 2048: "
        "a CPU-sized stand-in for a scan at native resolution, whose specks stay visible")
    add("--subtlety", type=int, nargs=2, default=(1, 5), metavar=("LOW", "HIGH"),
        help="draw the CSV's subtlety ratings (1 subtle .. 5 obvious; the realistic profile's "
        "lesion visibility follows them) only from LOW..HIGH, with the real shares")
    add("--density", type=int, nargs=2, default=(1, 4), metavar=("LOW", "HIGH"),
        help="draw BI-RADS breast density (1 fatty .. 4 dense) only from LOW..HIGH")
    add("--test-share", type=float, default=0.25, metavar="S",
        help="share of patients in the official test split (default 0.25; a larger test split "
        "narrows the confidence intervals of a study)")
    add("--overwrite", action="store_true", help="replace an existing OUT/CBIS-DDSM (OUT/jpeg)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    if args.overwrite:
        shutil.rmtree(args.out / image_folder(args.layout), ignore_errors=True)
    try:
        summary = make_synthetic_dataset(
            args.out,
            args.patients,
            tuple(args.size),
            args.seed,
            args.defects,
            args.progress,
            args.profile,
            args.layout,
            args.lesion_contrast,
            args.detail_rows,
            tuple(args.subtlety),
            tuple(args.density),
            args.test_share,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
