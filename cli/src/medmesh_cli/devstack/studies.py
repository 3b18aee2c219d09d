"""Synthetic imaging studies for the local PACS: DICOM built from pixel arrays, sent by STOW-RS,
found by QIDO-RS and read back by WADO-RS.

Every instance is a Digital X-Ray (For Presentation) chest radiograph: MONOCHROME2, 16 bits
allocated, 12 stored, little-endian explicit VR, fresh 2.25 UIDs (derived from a seed when one is
given, so the demo studies have the same UIDs on every start). The patient is visibly synthetic
(``SYNTHETIC^PATIENT``, ids starting ``MEDMESH-SYNTH-``) with no birth date and no accession
number. The pixels come from the caller; the demo studies `medmesh up` seeds are the held-out
images of the project's radiograph generator (``radiographs``), which the demonstration CNN
classifies correctly. ``imaging_study`` is the FHIR ImagingStudy that announces a study.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from medmesh_cli.devstack import radiographs
from medmesh_runtime.dicomweb import DICOM_JSON, multipart_parts, multipart_related

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BITS_STORED = 12
MAX_PIXEL = (1 << BITS_STORED) - 1
SYNTHETIC_PREFIX = "MEDMESH-SYNTH-"
MAX_LO = 64
# DICOM JSON tags read from QIDO-RS and STOW-RS answers.
TAG_STUDY_UID = "0020000D"
TAG_SERIES_UID = "0020000E"
TAG_SOP_UID = "00080018"
TAG_REFERENCED_SOPS = "00081199"
TAG_FAILED_SOPS = "00081198"
TAG_REFERENCED_SOP_UID = "00081155"


@dataclass(frozen=True)
class StudyIdentity:
    """The UIDs and the synthetic patient of one single-image study."""

    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str

    @classmethod
    def new(cls, seed: str | None = None) -> StudyIdentity:
        """Fresh UIDs, or UIDs derived from ``seed`` (the same seed, the same study)."""
        key = seed if seed is not None else uuid.uuid4().hex
        return cls(
            study_uid=uuid_uid(f"medmesh-study-{key}"),
            series_uid=uuid_uid(f"medmesh-series-{key}"),
            sop_uid=uuid_uid(f"medmesh-sop-{key}"),
            patient_id=f"{SYNTHETIC_PREFIX}{uuid.uuid5(uuid.NAMESPACE_OID, key).hex[:8]}",
        )


def uuid_uid(name: str) -> str:
    """A UUID-derived UID (``2.25.<decimal UUID>``, PS3.5 B.2) named by ``name``: the same name
    gives the same UID, different names practically never collide."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def check_pixels(pixels: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """``pixels`` as a little-endian uint16 image, after checking it fits the instance: two
    dimensions, unsigned 16-bit, every value within the 12 stored bits."""
    if pixels.ndim != 2:
        raise ValueError(f"a radiograph has 2 dimensions, not {pixels.ndim}")
    if pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be uint16, not {pixels.dtype}")
    if pixels.size and int(pixels.max()) > MAX_PIXEL:
        raise ValueError(f"pixels above {MAX_PIXEL} do not fit in {BITS_STORED} stored bits")
    return np.ascontiguousarray(pixels, dtype="<u2")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_radiograph(
    pixels: npt.NDArray[Any],
    identity: StudyIdentity,
    description: str = "Synthetic chest radiograph (medmesh demo)",
    modality: str = "DX",
) -> Dataset:
    """One DX For Presentation instance (a study of one series of one image) holding
    ``pixels``; ready to write with ``to_bytes``."""
    image = check_pixels(pixels)
    if len(description) > MAX_LO:
        raise ValueError(f"a study description has at most {MAX_LO} characters (VR LO)")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(DX_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = UID(identity.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = identity.sop_uid
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    # Patient: visibly synthetic; the optional identifying attributes stay empty.
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTH"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyDescription = description
    ds.Modality = modality
    _set_series_and_anatomy(ds)
    _set_image(ds, image)
    return ds


def _set_series_and_anatomy(ds: Dataset) -> None:
    """Series, equipment and the DX anatomy: one PA chest view."""
    ds.SeriesNumber = 1
    ds.SeriesDescription = "PA"
    ds.Manufacturer = "medmesh (synthetic data)"
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.BodyPartExamined = "CHEST"
    ds.AnatomicRegionSequence = DicomSequence([_code("43799004", "SCT", "Chest")])
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]


def _set_image(ds: Dataset, image: npt.NDArray[np.uint16]) -> None:
    """The DX image and pixel modules: MONOCHROME2, 16 bits allocated, 12 stored, identity
    rescale, a window over the whole stored range."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = (MAX_PIXEL + 1) // 2
    ds.WindowWidth = MAX_PIXEL + 1
    ds.PixelData = image.tobytes()


def to_bytes(ds: Dataset) -> bytes:
    """The Part 10 file (preamble, DICM, file meta) of ``ds``."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class StowError(RuntimeError):
    """STOW-RS did not store every instance sent (no patient data in the message)."""


@dataclass(frozen=True)
class StowResult:
    """What the PACS answered to one STOW-RS request."""

    stored: tuple[str, ...]
    failed: tuple[str, ...]


def _sop_uids(answer: Mapping[str, Any], tag: str) -> tuple[str, ...]:
    items = answer.get(tag, {}).get("Value", [])
    return tuple(
        str(item[TAG_REFERENCED_SOP_UID]["Value"][0])
        for item in items
        if TAG_REFERENCED_SOP_UID in item
    )


def stow(dicomweb_url: str, datasets: Sequence[Dataset], timeout_s: float = 30.0) -> StowResult:
    """POST ``datasets`` to ``{dicomweb_url}/studies`` (STOW-RS); StowError unless every
    instance was stored."""
    body, content_type = multipart_related([to_bytes(ds) for ds in datasets], "application/dicom")
    response = httpx.post(
        f"{dicomweb_url}/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": DICOM_JSON},
        timeout=timeout_s,
    )
    if response.status_code not in (200, 202):
        raise StowError(
            f"STOW-RS to {dicomweb_url} answered {response.status_code}: {response.text[:300]}"
        )
    answer = response.json()
    result = StowResult(
        stored=_sop_uids(answer, TAG_REFERENCED_SOPS), failed=_sop_uids(answer, TAG_FAILED_SOPS)
    )
    sent = {str(ds.SOPInstanceUID) for ds in datasets}
    if result.failed or not sent <= set(result.stored):
        raise StowError(
            f"STOW-RS to {dicomweb_url}: {len(result.stored)} of {len(sent)} instances stored, "
            f"{len(result.failed)} failed"
        )
    return result


def qido(
    dicomweb_url: str, level: str, params: Mapping[str, str], timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """QIDO-RS search at ``level`` (``studies``, ``studies/{s}/series`` ...): DICOM JSON."""
    response = httpx.get(
        f"{dicomweb_url}/{level}",
        params=dict(params),
        headers={"Accept": DICOM_JSON},
        timeout=timeout_s,
    )
    response.raise_for_status()
    if response.status_code == 204 or not response.content:
        return []
    found: list[dict[str, Any]] = response.json()
    return found


def retrieve_instance(
    dicomweb_url: str, study_uid: str, series_uid: str, sop_uid: str, timeout_s: float = 30.0
) -> Dataset:
    """WADO-RS retrieve of one instance, as a dataset."""
    response = httpx.get(
        f"{dicomweb_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=timeout_s,
    )
    response.raise_for_status()
    parts = multipart_parts(response.content, response.headers.get("content-type", ""))
    if len(parts) != 1:
        raise ValueError(f"WADO-RS answered {len(parts)} parts for one instance")
    return pydicom.dcmread(io.BytesIO(parts[0]))


def retrieve_frame(
    dicomweb_url: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    frame: int = 1,
    timeout_s: float = 30.0,
) -> bytes:
    """WADO-RS retrieve of one frame's pixel data, uncompressed (explicit VR little endian)."""
    response = httpx.get(
        f"{dicomweb_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
        f"/frames/{frame}",
        headers={
            "Accept": 'multipart/related; type="application/octet-stream"; '
            f"transfer-syntax={ExplicitVRLittleEndian}"
        },
        timeout=timeout_s,
    )
    response.raise_for_status()
    parts = multipart_parts(response.content, response.headers.get("content-type", ""))
    if len(parts) != 1:
        raise ValueError(f"WADO-RS answered {len(parts)} parts for one frame")
    return parts[0]


# The studies `medmesh up` seeds: (generator seed, opacity), held-out images the model was never
# trained on. Their UIDs are derived from the seed.
DEMO_STUDIES: tuple[tuple[int, bool], ...] = (
    (radiographs.CLEAR_FIXTURE_SEEDS[0], False),
    (radiographs.OPACITY_FIXTURE_SEEDS[0], True),
)


def demo_identity(seed: int) -> StudyIdentity:
    """The UIDs of the demo study seeded with ``seed`` (the same on every start)."""
    return StudyIdentity.new(f"demo-{seed}")


def seed_demo_studies(dicomweb_url: str) -> list[StudyIdentity]:
    """Store the demo studies (one without, one with a synthetic opacity) by STOW-RS."""
    identities: list[StudyIdentity] = []
    datasets: list[Dataset] = []
    for seed, opacity in DEMO_STUDIES:
        identity = demo_identity(seed)
        label = "opacity" if opacity else "clear"
        datasets.append(
            build_radiograph(
                radiographs.synthetic_radiograph(seed, opacity),
                identity,
                description=f"Synthetic chest radiograph, {label} (medmesh demo)",
            )
        )
        identities.append(identity)
    stow(dicomweb_url, datasets)
    return identities


DCM = "http://dicom.nema.org/resources/ontology/DCM"
MODALITY_DISPLAY = {"DX": "Digital Radiography", "CR": "Computed Radiography", "CT": "CT"}
THORAX = {"system": "http://snomed.info/sct", "code": "51185008", "display": "Thoracic structure"}


def imaging_study(
    identity: StudyIdentity,
    resource_id: str,
    patient: str,
    dicomweb_url: str,
    modality: str = "DX",
    started: str = "2026-12-05T09:30:00Z",
) -> dict[str, Any]:
    """The FHIR ImagingStudy (R4B and R5 alike) announcing ``identity``'s one-instance chest
    study: its PACS as a contained ``dicom-wado-rs`` Endpoint at ``dicomweb_url``, the study UID
    as identifier, one series of ``modality`` over the thorax with the instance's SOP class."""
    return {
        "resourceType": "ImagingStudy",
        "id": resource_id,
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "pacs",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM"}],
                "address": dicomweb_url,
            }
        ],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{identity.study_uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "started": started,
        "endpoint": [{"reference": "#pacs"}],
        "series": [
            {
                "uid": identity.series_uid,
                "number": 1,
                "modality": {
                    "system": DCM,
                    "code": modality,
                    "display": MODALITY_DISPLAY.get(modality, modality),
                },
                "bodySite": THORAX,
                "instance": [
                    {
                        "uid": identity.sop_uid,
                        "number": 1,
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": f"urn:oid:{DX_FOR_PRESENTATION}",
                        },
                    }
                ],
            }
        ],
    }
