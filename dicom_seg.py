"""Predicted masks as DICOM Segmentation objects (highdicom), the form DICOM viewers (OHIF,
3D Slicer, a PACS) show over the mammogram they were made from.

One binary segment per class found (benign lesion, malignant mass, malignant calcification
cluster), each with SNOMED CT coded concepts and the algorithm's identity (name, the
checkpoint's SHA-256 as version, its file name, input size and preprocessing version). The
Segmentation joins the source's study, references its series and SOP instance, and is aligned
pixel for pixel with it (one frame per segment). It copies the source's Frame of Reference UID
where it has one; CBIS-DDSM's scanned films have none, which highdicom allows for IODs that do not
require one (mammography, secondary capture). It copies PixelSpacing where the source has it,
with a slice thickness (the standard asks for one beside a Frame of Reference and highdicom
cannot read spacing back without it): the source's SliceThickness, else its BodyPartThickness
(a projection's frame spans the compressed breast), else the spacing is left out. No spacing is
made up from ImagerPixelSpacing, which is measured at the detector, not at the breast.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from cbis import BENIGN, CALC, CLASS_COLOURS, MASS
from inference import FLIP_NAMES, Member, tta_flips

SEGMENTS = {  # class id -> (label, segmented property type, its modifier)
    BENIGN: ("benign lesion", codes.SCT.Lesion, codes.SCT.Benign),
    MASS: ("malignant mass", codes.SCT.Mass, codes.SCT.Malignant),
    CALC: ("malignant calcification", codes.SCT.CalcificationCluster, codes.SCT.Malignant),
}
# Type 2 attributes highdicom copies from the source: anonymised files may lack them.
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                       "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
SERIES_NUMBER = 100  # a derived series, apart from the scanner's low numbers
MANUFACTURER = "CBIS-DDSM DeepLabV3+ pipeline"


@dataclass(frozen=True)
class SegAlgorithm:
    """The model that made a mask, as a Segmentation records it."""

    name: str
    version: str
    parameters: dict[str, str]


def segmentation_algorithm(members: list[Member], tta: bool = False) -> SegAlgorithm:
    """The identity of the checkpoint (or ensemble) that made a mask: its SHA-256 (first 16 hex
    digits as version; an ensemble's is the SHA-256 of its members' in order), file names,
    input size, preprocessing version and the test-time flips."""
    digests = [m.sha256 for m in members]
    version = digests[0] if len(members) == 1 else hashlib.sha256(
        "".join(digests).encode()).hexdigest()
    config = members[0].config
    backbones = ", ".join(dict.fromkeys(m.config["backbone"] for m in members))
    height, width = config["size"]
    return SegAlgorithm(
        name=f"DeepLabV3+ {backbones} CBIS-DDSM"
             + (f" ensemble of {len(members)}" if len(members) > 1 else ""),
        version=f"sha256:{version[:16]}",
        parameters={"checkpoint": ", ".join(m.path.name for m in members),
                    "checkpoint_sha256": ", ".join(digests),
                    "input_size": f"{height}x{width}",
                    "preprocess_version": str(config["preprocess_version"]),
                    "test_time_flips": ", ".join(FLIP_NAMES[f] for f in tta_flips(config, tta))})


def encode_dicom_seg(source: Path, mask: np.ndarray, algorithm: SegAlgorithm) -> bytes | None:
    """`mask` (uint8 class ids at the source's pixels) as the bytes of a DICOM Segmentation of
    the DICOM file `source`; None when the mask has no lesion (a Segmentation needs a segment)."""
    classes = [cls for cls in SEGMENTS if (mask == cls).any()]
    if not classes:
        return None
    header = pydicom.dcmread(source, stop_before_pixels=True)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    if "PixelSpacing" in header and "SliceThickness" not in header:
        if "BodyPartThickness" in header:
            header.SliceThickness = header.BodyPartThickness
        else:
            del header.PixelSpacing
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version, parameters=algorithm.parameters)
    descriptions = []
    for number, cls in enumerate(classes, start=1):
        label, property_type, modifier = SEGMENTS[cls]
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification, anatomic_regions=[codes.SCT.Breast],
            display_color=hd.color.CIELabColor.from_rgb(*CLASS_COLOURS[cls]))
        # highdicom has no argument for it: benign or malignant is the type's modifier.
        property_type_item = description.SegmentedPropertyTypeCodeSequence[0]
        property_type_item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(modifier)]
        descriptions.append(description)
    frames = np.stack([mask == cls for cls in classes], axis=-1)[None]  # (frame, H, W, segment)
    seg = hd.seg.Segmentation(
        source_images=[header], pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version, device_serial_number=algorithm.version,
        content_description="lesions predicted by DeepLabV3+", content_label="LESIONS")
    seg.SeriesDescription = f"{algorithm.name} lesions"
    encoded = io.BytesIO()
    seg.save_as(encoded)
    return encoded.getvalue()
