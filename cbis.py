"""The data contract every part of the pipeline agrees on: the classes, the retrieval CSVs'
columns, schema version and sidecar, how a CBIS-DDSM abnormality maps to a class, and the
CBIS-DDSM folder names. Imports nothing from the project, so any module may import it.

| id | name       | which abnormalities                                                |
|----|------------|--------------------------------------------------------------------|
| 0  | background | everything else                                                    |
| 1  | benign     | pathology BENIGN or BENIGN_WITHOUT_CALLBACK, mass or calcification |
| 2  | mass       | mass, pathology MALIGNANT                                          |
| 3  | calc       | calcification, pathology MALIGNANT                                 |

Where ROIs overlap, the higher id wins. Every other module names a class by these constants,
never by its number.
"""

from __future__ import annotations

import re
from pathlib import Path

BACKGROUND, BENIGN, MASS, CALC = 0, 1, 2, 3
CLASS_NAMES = ("background", "benign", "mass", "calc")  # indexed by class id
NUM_CLASSES = len(CLASS_NAMES)
LESION_IDS = (BENIGN, MASS, CALC)
MALIGNANT_IDS = (MASS, CALC)
# The same classes as slices of a class axis (the ids are consecutive): a view, not a copy.
LESIONS = slice(BENIGN, CALC + 1)
MALIGNANT = slice(MASS, CALC + 1)
# One display colour per class (RGB): background black, benign green, mass red, calc yellow.
CLASS_COLOURS = ((0, 0, 0), (40, 200, 60), (230, 40, 40), (250, 210, 30))

# The description CSVs' pathologies; BENIGN_WITHOUT_CALLBACK counts as benign.
MALIGNANT_PATHOLOGY = "MALIGNANT"
BENIGN_PATHOLOGIES = ("BENIGN", "BENIGN_WITHOUT_CALLBACK")


def class_id(abnormality_type: str, pathology: str) -> int:
    """Contract class: benign, malignant mass or malignant calcification (table above)."""
    if pathology in BENIGN_PATHOLOGIES:
        return BENIGN
    return MASS if abnormality_type == "mass" else CALC


def sposso_label(abnormality_type: str, pathology: str) -> int:
    """The sposso CSVs' label: 1 calc malignant, 2 calc benign, 3 mass malignant, 4 mass benign."""
    return (1 if abnormality_type == "calcification" else 3) + (pathology in BENIGN_PATHOLOGIES)


# ----------------------------------------------------------------------------- retrieval CSVs

SCHEMA_VERSION = 1
CSV_COLUMNS = [
    # The first three keep the names and meaning of the sposso CBIS-DDSM-DATASET CSVs.
    "img_path", "roi_path", "label",
    "class_id", "patient_id", "side", "view", "abnormality_id", "abnormality_type",
    "pathology", "assessment", "subtlety", "breast_density", "split",
    "collection", "crop_path",
]  # fmt: skip
SIDECAR_NAME = "dataset.json"  # beside the CSVs: data root, schema version, columns
# Beside the CSVs too: the k-fold assignment of the official training patients (train and val
# rows alike; the test split never has a fold). One row per patient.
FOLDS_NAME = "folds.csv"
FOLDS_COLUMNS = ["patient_id", "fold"]

# ----------------------------------------------------------------------------- folder names

FOLDER_RE = re.compile(
    r"^(?P<collection>(?:Mass|Calc)-(?:Training|Test))_(?P<patient>P_\d+)"
    r"_(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)(?:_(?P<abnormality>\d+))?$"
)


def image_folder_name(img_path: str) -> str:
    """The CBIS-DDSM folder of a mammogram (e.g. Mass-Test_P_00016_LEFT_CC), else its path."""
    parts = Path(img_path).parts
    return next((p for p in parts if FOLDER_RE.match(p)), "__".join(parts))
