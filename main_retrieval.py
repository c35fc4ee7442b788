"""Turn a CBIS-DDSM download into csv/{train,val,test}.csv.

Two layouts are recognised by themselves: the TCIA / NBIA DICOM tree, and the Kaggle JPEG copy
(a folder holding csv/dicom_info.csv and jpeg/<SeriesInstanceUID>/). One pass reads headers only
(DICOM headers, or dicom_info.csv's rows), pairs every abnormality of the four TCIA description
CSVs with its full mammogram and ROI mask (a file whose header does not say what it is: by its
size, else its pixels), splits the official training set by patient into train/val, and writes
the CSVs, a sidecar JSON (data root, schema version) and a report of everything skipped.

    python main_retrieval.py --data-root /data/CBIS-DDSM --out-dir csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from tqdm import tqdm

from cbis import (
    BENIGN_PATHOLOGIES,
    CLASS_NAMES,
    CSV_COLUMNS,
    FOLDER_RE,
    FOLDS_COLUMNS,
    FOLDS_NAME,
    MALIGNANT_PATHOLOGY,
    SCHEMA_VERSION,
    SIDECAR_NAME,
    class_id,
    sposso_label,
)
from imaging import DatasetError, kind_from_description, looks_like_mask, read_pixels
from utils import DiskFullError, atomic_write_all, clean_stale_tmp

REPORT_NAME = "retrieval_report.json"
BUNDLED_METADATA = Path(__file__).resolve().parent / "metadata"
DESCRIPTION_FILES = {
    "Mass-Training": "mass_case_description_train_set.csv",
    "Mass-Test": "mass_case_description_test_set.csv",
    "Calc-Training": "calc_case_description_train_set.csv",
    "Calc-Test": "calc_case_description_test_set.csv",
}
DESCRIPTION_COLUMNS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
]  # fmt: skip
HEADER_TAGS = ["SeriesDescription", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
               "NumberOfFrames", "PixelData"]
PIXEL_DATA = 0x7FE00010
DUPLICATE = "duplicate row in the description CSVs"
KAGGLE_INFO = Path("csv") / "dicom_info.csv"  # with jpeg/: the Kaggle copy's root
KAGGLE_INFO_COLUMNS = ["image_path", "SeriesDescription", "Rows", "Columns"]
KAGGLE_SUFFIX = ".jpg"  # every image of the copy


class RetrievalError(Exception):
    """A problem the user has to fix; main() prints it on one line."""


# ----------------------------------------------------------------------------- description CSVs


def find_metadata_dir(data_root: Path, metadata_dir: Path | None) -> Path:
    """--metadata-dir if given, else the data root (or its csv/, as in the Kaggle copy) when it
    holds the four CSVs, else our copy."""
    if metadata_dir is not None:
        return metadata_dir
    for candidate in (data_root, data_root / "csv", data_root.parent):
        if all((candidate / name).is_file() for name in DESCRIPTION_FILES.values()):
            return candidate
    return BUNDLED_METADATA


def load_descriptions(metadata_dir: Path) -> pd.DataFrame:
    """The four TCIA description CSVs as one frame with normalised column names."""
    frames = []
    for collection, name in DESCRIPTION_FILES.items():
        path = metadata_dir / name
        if not path.is_file():
            raise RetrievalError(
                f"missing description CSV {path}: download it from TCIA's CBIS-DDSM page "
                "or pass --metadata-dir to a folder holding all four"
            )
        try:
            # Real files end rows in CRLF and hold a bare LF inside one quoted path field.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise RetrievalError(f"cannot parse {path}: {error}") from error
        frame.columns = [c.strip() for c in frame.columns]
        frame = frame.rename(columns={"breast density": "breast_density"})
        missing = [c for c in DESCRIPTION_COLUMNS if c not in frame.columns]
        if missing:
            raise RetrievalError(
                f"{path} is not a CBIS-DDSM description CSV (no column {missing[0]!r}): "
                "use the files from TCIA or the ones in metadata/"
            )
        frame = frame.apply(lambda column: column.str.strip())
        frame["collection"] = collection
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- the image tree


@dataclass
class ImageInfo:
    path: Path
    kind: str | None  # "full", "crop", "mask" or None when the header does not say
    rows: int
    columns: int
    problem: str | None = None  # why its pixel data cannot be whole (truncated, none)


@dataclass
class Tree:
    """A download's image files, grouped by the folder a description-CSV path names."""

    layout: str  # "tcia" or "kaggle"
    folders: dict[str, list[Path]]
    component: int  # the part of a description-CSV path that names the folder
    read: Callable[[Path], ImageInfo | None]  # header facts, or None when unreadable

    def infos(self, csv_paths: list[str]) -> list[ImageInfo] | None:
        """The readable files of the folders these paths name; None when none of them exists."""
        names = dict.fromkeys(path.split("/")[self.component] for path in csv_paths)
        found = [self.folders[name] for name in names if name in self.folders]
        if not found:
            return None
        return [info for files in found for info in map(self.read, files) if info is not None]


def open_tree(data_root: Path) -> Tree:
    """The Kaggle JPEG copy if data_root holds csv/dicom_info.csv and jpeg/, else the TCIA tree."""
    if not data_root.is_dir():
        raise RetrievalError(f"--data-root {data_root} is not a folder")
    if (data_root / KAGGLE_INFO).is_file() and (data_root / "jpeg").is_dir():
        return kaggle_tree(data_root)
    # TCIA: a case folder per series group; the description CSV's first path part names it.
    return Tree("tcia", scan_tree(find_series_root(data_root)), 0, read_info)


def find_series_root(data_root: Path) -> Path:
    """The folder whose children are the CBIS-DDSM series folders (root or root/CBIS-DDSM)."""
    for candidate in (data_root, data_root / "CBIS-DDSM"):
        if candidate.is_dir() and any(FOLDER_RE.match(e.name) for e in os.scandir(candidate)):
            return candidate
    raise RetrievalError(
        f"no CBIS-DDSM folders (like Mass-Training_P_00001_LEFT_CC) in {data_root} or "
        f"{data_root / 'CBIS-DDSM'}, and no {KAGGLE_INFO} with a jpeg/ folder beside it: point "
        "--data-root at the TCIA download or at the Kaggle copy's folder"
    )


def scan_tree(series_root: Path) -> dict[str, list[Path]]:
    """Every CBIS-DDSM top folder name -> the DICOM files below it, sorted."""
    folders = {}
    for entry in os.scandir(series_root):
        if entry.is_dir() and FOLDER_RE.match(entry.name):
            folders[entry.name] = sorted(Path(entry.path).rglob("*.dcm"))
    return folders


def read_info(path: Path) -> ImageInfo | None:
    """Header facts needed for pairing, or None when the file is not readable DICOM."""
    try:
        # Pixel data over 1 KB is deferred: its length and offset are read, not its bytes.
        header = pydicom.dcmread(path, defer_size=1024, specific_tags=HEADER_TAGS)
        return ImageInfo(
            path,
            kind_from_description(str(header.get("SeriesDescription", ""))),
            int(header.Rows),
            int(header.Columns),
            pixel_data_problem(path, header),
        )
    except Exception:  # noqa: BLE001 - pydicom raises many types for a damaged file
        return None


def pixel_data_problem(path: Path, header: pydicom.Dataset) -> str | None:
    """Why the pixel data cannot be whole, from the header and the file size alone (a truncated
    download, a file without pixels); None when it can."""
    element = header.get_item(PIXEL_DATA, keep_deferred=True)
    if element is None:
        return "no pixel data"
    syntax = getattr(header, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:  # its size is not Rows x Columns x bits
        return None
    frames = int(header.get("NumberOfFrames") or 1)
    bits = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel") or 1) \
        * frames * int(header.get("BitsAllocated") or 16)
    expected = (bits + 7) // 8
    if getattr(element, "value", None) is None and hasattr(element, "value_tell"):  # deferred
        available = min(element.length, path.stat().st_size - element.value_tell)
    else:
        available = len(element.value or b"")
    if available < expected:
        return f"pixel data truncated: {available} of {expected} bytes"
    return None


def read_dicom_info(path: Path) -> dict[str, tuple[str | None, int, int]]:
    """dicom_info.csv as 'jpeg/<uid>/<file>' -> (kind, rows, columns); rows without a size are
    left out (their JPEG is measured instead). Rows with an empty SeriesDescription are kept."""
    try:
        info = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise RetrievalError(f"cannot parse {path}: {error}") from error
    missing = [c for c in KAGGLE_INFO_COLUMNS if c not in info.columns]
    if missing:
        raise RetrievalError(f"{path} is not the Kaggle copy's dicom_info.csv (no column "
                             f"{missing[0]!r}): use the file that came with the JPEGs")
    facts = {}
    for image_path, description, rows, columns in info[KAGGLE_INFO_COLUMNS].itertuples(
            index=False):
        if rows.isdigit() and columns.isdigit():
            # image_path is CBIS-DDSM/jpeg/<uid>/<file>: its last three parts lie below the root.
            key = "/".join(image_path.strip().split("/")[-3:])
            facts[key] = (kind_from_description(description), int(rows), int(columns))
    return facts


def kaggle_tree(data_root: Path) -> Tree:
    """The Kaggle copy: jpeg/<SeriesInstanceUID>/<n>-<m>.jpg, which dicom_info.csv describes.

    The description CSVs' paths keep the TCIA form <case>/<study uid>/<series uid>/0000x.dcm;
    their third part names the JPEG folder.
    """
    facts = read_dicom_info(data_root / KAGGLE_INFO)
    folders = {}
    for entry in os.scandir(data_root / "jpeg"):
        if entry.is_dir():
            folders[entry.name] = sorted(p for p in Path(entry.path).iterdir()
                                         if p.suffix.lower() == KAGGLE_SUFFIX)

    def read(path: Path) -> ImageInfo | None:
        known = facts.get("/".join(path.parts[-3:]))
        return ImageInfo(path, *known) if known else info_from_pixels(path)

    return Tree("kaggle", folders, 2, read)


def _read_pixels(path: Path) -> np.ndarray | None:
    try:
        return read_pixels(path, label_map=True)
    except DatasetError:
        return None


def info_from_pixels(path: Path) -> ImageInfo | None:
    """The size of an image no header describes (decoded), or None when unreadable."""
    pixels = _read_pixels(path)
    return None if pixels is None else ImageInfo(path, None, *pixels.shape)


def kind_from_size_or_content(info: ImageInfo, full: ImageInfo) -> str | None:
    """A file whose header does not say: its mammogram's size means a mask (a crop is the
    lesion's box), else its grey levels decide."""
    if (info.rows, info.columns) == (full.rows, full.columns):
        return "mask"
    pixels = _read_pixels(info.path)
    if pixels is None:
        return None
    return "mask" if looks_like_mask(pixels) else "crop"


def find_roi_files(infos: list[ImageInfo],
                   full: ImageInfo) -> tuple[ImageInfo | None, ImageInfo | None, int]:
    """(crop, mask, files typed without a description) of one abnormality, never by file name."""
    untyped = 0
    for info in infos:
        if info.kind not in ("crop", "mask"):
            info.kind = kind_from_size_or_content(info, full)
            untyped += 1
    masks = [i for i in infos if i.kind == "mask"]
    crops = [i for i in infos if i.kind == "crop"]
    # Two files both typed "mask" (e.g. a binary-looking crop): the mask is the larger one.
    masks.sort(key=lambda i: i.rows * i.columns, reverse=True)
    return (crops[0] if crops else None), (masks[0] if masks else None), untyped


# ----------------------------------------------------------------------------- pairing


def pair_abnormalities(
    descriptions: pd.DataFrame, tree: Tree, data_root: Path
) -> tuple[pd.DataFrame, list[dict], list[dict], int]:
    """One row per usable abnormality, the skipped ones, the size mismatches and the number of
    ROI files typed without a description."""
    rows, skipped, mismatched = [], [], []
    untyped = 0
    seen = set()
    full_cache: dict[str, ImageInfo | None] = {}

    def relative(path: Path) -> str:
        return path.relative_to(data_root).as_posix()

    for fields in tqdm(descriptions.to_dict("records"), desc="pairing", unit="roi", leave=False):
        image_folder = fields["image file path"].split("/")[0]
        roi_folder = fields["ROI mask file path"].split("/")[0]
        where = {"image": image_folder, "roi": roi_folder, "collection": fields["collection"]}
        if roi_folder in seen:
            skipped.append({**where, "reason": DUPLICATE})
            continue
        seen.add(roi_folder)
        if fields["pathology"] not in (MALIGNANT_PATHOLOGY, *BENIGN_PATHOLOGIES):
            skipped.append({**where, "reason": f"unknown pathology {fields['pathology']!r}"})
            continue
        if image_folder not in full_cache:
            full_cache[image_folder] = find_full_image(
                tree.infos([fields["image file path"]]) or [])
        full = full_cache[image_folder]
        if full is None:
            skipped.append({**where, "reason": "missing or unreadable full mammogram"})
            continue
        if full.problem:
            skipped.append({**where, "reason": "damaged full mammogram (truncated or no pixels)",
                            "file": relative(full.path), "problem": full.problem})
            continue
        infos = tree.infos([fields["cropped image file path"], fields["ROI mask file path"]])
        if infos is None:
            skipped.append({**where, "reason": "missing ROI folder"})
            continue
        crop, mask, typed = find_roi_files(infos, full)
        untyped += typed
        if mask is None:
            skipped.append({**where, "reason": "missing or unreadable ROI mask"})
            continue
        if mask.problem:
            skipped.append({**where, "reason": "damaged ROI mask (truncated or no pixels)",
                            "file": relative(mask.path), "problem": mask.problem})
            continue
        if (mask.rows, mask.columns) != (full.rows, full.columns):
            mismatched.append({**where, "mask_size": [mask.rows, mask.columns],
                               "image_size": [full.rows, full.columns]})
        abnormality_type = fields["abnormality type"]
        rows.append({
            "image_folder": image_folder,
            "roi_folder": roi_folder,
            "img_path": relative(full.path),
            "roi_path": relative(mask.path),
            "label": sposso_label(abnormality_type, fields["pathology"]),
            "class_id": class_id(abnormality_type, fields["pathology"]),
            "patient_id": fields["patient_id"],
            "side": fields["left or right breast"],
            "view": fields["image view"],
            "abnormality_id": int(fields["abnormality id"]),
            "abnormality_type": abnormality_type,
            "pathology": fields["pathology"],
            "assessment": fields["assessment"],
            "subtlety": fields["subtlety"],
            "breast_density": fields["breast_density"],
            "split": "test" if fields["collection"].endswith("Test") else "train",
            "collection": fields["collection"],
            "crop_path": relative(crop.path) if crop else "",
        })  # fmt: skip
    columns = ["image_folder", "roi_folder", *CSV_COLUMNS]
    return pd.DataFrame(rows, columns=columns), skipped, mismatched, untyped


def find_full_image(infos: list[ImageInfo]) -> ImageInfo | None:
    full = [i for i in infos if i.kind == "full"]
    if full:
        return full[0]
    return infos[0] if len(infos) == 1 else None


def drop_incomplete_mammograms(rows: pd.DataFrame, skipped: list[dict]) -> pd.DataFrame:
    """Drop every mammogram with an unusable ROI: keeping it would label that lesion background."""
    unusable = {s["image"] for s in skipped if s["reason"] != DUPLICATE}
    incomplete = rows["image_folder"].isin(unusable)
    for record in rows[incomplete].itertuples():
        skipped.append({"image": record.image_folder, "roi": record.roi_folder,
                        "collection": record.collection,
                        "reason": "another ROI of this mammogram is unusable"})
    return rows.loc[~incomplete, CSV_COLUMNS].reset_index(drop=True)


def split_by_patient(rows: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded random val_fraction of the official training patients to 'val'."""
    train_patients = np.array(sorted(rows.loc[rows["split"] == "train", "patient_id"].unique()))
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(train_patients)))
    val_patients = set(rng.choice(train_patients, size=n_val, replace=False)) if n_val else set()
    rows = rows.copy()
    rows.loc[(rows["split"] == "train") & rows["patient_id"].isin(val_patients), "split"] = "val"
    return rows


def assign_folds(rows: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """A patient-level k-fold assignment of the official training patients (train and val rows;
    the test split never enters): FOLDS_COLUMNS, one row per patient, sorted by patient.

    Stratified by the set of classes a patient has: patients are ordered by that set (seeded
    random order within it) and dealt to the folds in turn, so every fold gets each set's
    patients within one of its share and fold sizes differ by at most one patient.
    """
    training = rows[rows["split"] != "test"]
    strata = training.groupby("patient_id")["class_id"].agg(lambda c: tuple(sorted(set(c))))
    if len(strata) < n_folds:
        raise RetrievalError(f"{len(strata)} training patients cannot fill --folds {n_folds}: "
                             f"pass --folds {len(strata)} or less (0 writes no folds)")
    order = np.random.default_rng(seed).permutation(len(strata))
    dealt = pd.DataFrame({"patient_id": strata.index, "stratum": strata.to_numpy(),
                          "order": order}).sort_values(["stratum", "order"])
    dealt["fold"] = np.arange(len(dealt)) % n_folds
    return dealt.sort_values("patient_id")[FOLDS_COLUMNS].reset_index(drop=True)


# ----------------------------------------------------------------------------- outputs


def views_in_both_collections(rows: pd.DataFrame) -> int:
    """Breast views published in both the Mass and the Calc collection (two copies of one
    mammogram, each annotated for its own type; dataset.py gives each copy both's ROIs)."""
    view = rows.groupby(["patient_id", "side", "view", "split"])["collection"].nunique()
    return int((view > 1).sum())


def summarise(rows: pd.DataFrame) -> dict:
    """Counts per split: mammograms, abnormalities, per collection, pathology and class."""
    summary = {}
    for split in ("train", "val", "test"):
        part = rows[rows["split"] == split]
        summary[split] = {
            "mammograms": int(part["img_path"].nunique()),
            "abnormalities": len(part),
            "patients": int(part["patient_id"].nunique()),
            "per_collection": {k: int(v) for k, v in part["collection"].value_counts().items()},
            "per_pathology": {k: int(v) for k, v in part["pathology"].value_counts().items()},
            "per_class": {CLASS_NAMES[k]: int(v)
                          for k, v in sorted(part["class_id"].value_counts().items())},
        }  # fmt: skip
    return summary


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise RetrievalError(
            f"cannot write to --out-dir {out_dir} ({error.strerror}): choose a writable folder"
        ) from error


def retrieve(data_root: Path, metadata_dir: Path | None = None, val_fraction: float = 0.1,
             seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """All usable abnormalities with their split, and the report. No files are written."""
    start = time.perf_counter()
    data_root = data_root.resolve()
    tree = open_tree(data_root)
    metadata_dir = find_metadata_dir(data_root, metadata_dir)
    descriptions = load_descriptions(metadata_dir)
    rows, skipped, mismatched, untyped = pair_abnormalities(descriptions, tree, data_root)
    rows = drop_incomplete_mammograms(rows, skipped)
    rows = split_by_patient(rows, val_fraction, seed)
    report = {
        "schema_version": SCHEMA_VERSION,
        "data_root": str(data_root),
        "layout": tree.layout,
        "metadata_dir": str(metadata_dir.resolve()),
        "series_folders_found": len(tree.folders),
        "abnormalities_described": len(descriptions),
        "abnormalities_kept": len(rows),
        "mammograms_kept": int(rows["img_path"].nunique()),
        "splits": summarise(rows),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped": skipped,
        "mask_size_mismatch": mismatched,
        "views_in_both_collections": views_in_both_collections(rows),
        "roi_files_typed_without_description": untyped,
        "val_fraction": val_fraction,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return rows, report


def check_kept(report: dict) -> str | None:
    """Refuse an empty result (RetrievalError); a warning when under half of the described
    abnormalities were kept (a wrong --data-root or --metadata-dir, a partial download)."""
    kept, described = report["abnormalities_kept"], report["abnormalities_described"]
    top = "; ".join(f"{reason} ({count})" for reason, count
                    in Counter(report["skipped_by_reason"]).most_common(3))
    if kept == 0:
        raise RetrievalError(f"kept 0 of {described} described abnormalities (top reasons: "
                             f"{top}); nothing written, the CSVs in --out-dir are unchanged: "
                             "check --data-root and --metadata-dir")
    if kept < described / 2:
        return (f"WARNING: kept only {kept} of {described} described abnormalities "
                f"({kept / described:.0%}); top reasons: {top}. Is --data-root the whole "
                "download, and --metadata-dir its description CSVs?")
    return None


def write_outputs(rows: pd.DataFrame, folds: pd.DataFrame | None, report: dict,
                  out_dir: Path) -> None:
    """The three CSVs, the folds (if any: else an older folds file goes, it would not fit these
    CSVs), the sidecar and the report, written atomically as one set."""
    sidecar = {key: report[key] for key in ("schema_version", "data_root", "metadata_dir")}
    sidecar["columns"] = CSV_COLUMNS
    texts = {f"{split}.csv": rows[rows["split"] == split].to_csv(index=False)
             for split in ("train", "val", "test")}
    if folds is not None:
        texts[FOLDS_NAME] = folds.to_csv(index=False)
    texts[SIDECAR_NAME] = json.dumps(sidecar, indent=2)
    texts[REPORT_NAME] = json.dumps(report, indent=2)
    atomic_write_all({out_dir / name: lambda tmp, text=text: Path(tmp).write_text(text)
                      for name, text in texts.items()})
    if folds is None:
        (out_dir / FOLDS_NAME).unlink(missing_ok=True)


def format_report(report: dict) -> str:
    lines = [f"{'split':<6} {'images':>7} {'ROIs':>6} {'patients':>8}  "
             f"{'benign':>6} {'mass':>5} {'calc':>5}"]
    for split, counts in report["splits"].items():
        per_class = counts["per_class"]
        lines.append(
            f"{split:<6} {counts['mammograms']:>7} {counts['abnormalities']:>6} "
            f"{counts['patients']:>8}  {per_class.get('benign', 0):>6} "
            f"{per_class.get('mass', 0):>5} {per_class.get('calc', 0):>5}"
        )
    lines.append(f"kept {report['abnormalities_kept']} of {report['abnormalities_described']} "
                 f"described abnormalities on {report['mammograms_kept']} mammograms "
                 f"in {report['seconds']} s")
    for reason, count in report["skipped_by_reason"].items():
        lines.append(f"skipped {count}: {reason}")
    for item in report["skipped"]:
        if "problem" in item:
            lines.append(f"damaged DICOM: {item['file']}: {item['problem']}")
    if report["views_in_both_collections"]:
        lines.append(f"{report['views_in_both_collections']} views are in both the Mass and the "
                     "Calc collection: each copy's target gets the ROIs of both")
    for item in report["mask_size_mismatch"]:
        lines.append(f"mask size differs (resized at training time): {item['roi']} "
                     f"{item['mask_size']} vs image {item['image_size']}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True,
                        help="the download folder: holds CBIS-DDSM/ or the series folders (TCIA), "
                             "or csv/dicom_info.csv and jpeg/ (the Kaggle JPEG copy)")
    parser.add_argument("--metadata-dir", type=Path, default=None,
                        help="folder with the four TCIA description CSVs (default: the data root "
                             "or its csv/ folder if it has them, else the copies in metadata/)")
    parser.add_argument("--out-dir", type=Path, default=Path("csv"),
                        help="where train/val/test.csv, dataset.json and the report go "
                             "(default: csv)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of training patients held out for validation (default: 0.1)")
    parser.add_argument("--folds", type=int, default=5,
                        help="also write folds.csv: the official training patients (train and "
                             "val) dealt into this many patient-level folds, stratified by "
                             "their classes, for Train_deep_labv3+.py --fold K; 0 writes none "
                             "(default: 5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/val split and of the folds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 0 < args.val_fraction < 1:  # training selects its best checkpoint on val
        print("error: --val-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    if args.folds < 0 or args.folds == 1:  # one fold would validate on its own training set
        print(f"error: --folds must be 0 (none) or at least 2, got {args.folds}", file=sys.stderr)
        return 2
    try:
        check_writable(args.out_dir)
        clean_stale_tmp(args.out_dir, min_age_s=0)  # left by a killed run; we are its writer
        rows, report = retrieve(args.data_root, args.metadata_dir, args.val_fraction, args.seed)
        warning = check_kept(report)
        folds = assign_folds(rows, args.folds, args.seed) if args.folds else None
        report["patients_per_fold"] = ([] if folds is None else
                                       folds["fold"].value_counts().sort_index().tolist())
        write_outputs(rows, folds, report, args.out_dir)
    except RetrievalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    folds_note = f", {FOLDS_NAME} ({args.folds} folds)" if folds is not None else ""
    print(f"wrote {args.out_dir}/{{train,val,test}}.csv{folds_note} and "
          f"{args.out_dir / REPORT_NAME}")
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
