"""The stack's PACS: the real Orthanc with its DICOMweb plugin that `medmesh up` starts.

A study sent by STOW-RS is found by QIDO-RS at every level and its pixels come back unchanged by
WADO-RS (the whole instance, and the raw frame); the demo studies are seeded at start; what is
not DICOM is refused; the studies survive a restart of the PACS.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from medmesh_cli.devstack import studies
from medmesh_cli.devstack.radiographs import synthetic_radiograph
from medmesh_cli.devstack.stack import Stack
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph
from medmesh_runtime import dicomweb


def _pixels(seed: int) -> npt.NDArray[np.uint16]:
    """A 256x256 image using the whole 12-bit range (any change to a pixel shows)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, studies.MAX_PIXEL + 1, size=(256, 256), dtype=np.uint16)


def _value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object."""
    return item[tag]["Value"][0]


@pytest.fixture(scope="module")
def posted(stack: Stack) -> tuple[StudyIdentity, npt.NDArray[np.uint16]]:
    """A fresh single-image study stored in the stack's PACS by STOW-RS."""
    pixels = _pixels(19)
    identity = StudyIdentity.new()
    result = studies.stow(stack.config.dicomweb_url, [build_radiograph(pixels, identity)])
    assert result.stored == (identity.sop_uid,)
    assert result.failed == ()
    return identity, pixels


def test_pacs_is_orthanc_with_dicomweb_on_the_stack_port(stack: Stack) -> None:
    """The stack's Orthanc answers on its configured loopback port with dicom-web loaded."""
    base = stack.orthanc.url
    assert base == f"http://127.0.0.1:{stack.config.ports.orthanc_http}"
    system = httpx.get(f"{base}/system", timeout=5.0).json()
    assert system["HttpPort"] == stack.config.ports.orthanc_http
    assert system["Name"] == "medmesh-pacs"
    assert "dicom-web" in httpx.get(f"{base}/plugins", timeout=5.0).json()


def test_stowed_study_is_found_by_qido_at_every_level(
    stack: Stack, posted: tuple[StudyIdentity, npt.NDArray[np.uint16]]
) -> None:
    """QIDO-RS finds the posted study by its UID and by its patient, its DX series by
    modality, and its one instance within that series."""
    identity, _ = posted
    url = stack.config.dicomweb_url
    [study] = studies.qido(url, "studies", {"StudyInstanceUID": identity.study_uid})
    assert _value(study, studies.TAG_STUDY_UID) == identity.study_uid
    assert _value(study, "00080061") == "DX"  # ModalitiesInStudy
    by_patient = studies.qido(url, "studies", {"PatientID": identity.patient_id})
    assert [_value(s, studies.TAG_STUDY_UID) for s in by_patient] == [identity.study_uid]
    [series] = studies.qido(url, f"studies/{identity.study_uid}/series", {"Modality": "DX"})
    assert _value(series, studies.TAG_SERIES_UID) == identity.series_uid
    [instance] = studies.qido(
        url, f"studies/{identity.study_uid}/series/{identity.series_uid}/instances", {}
    )
    assert _value(instance, studies.TAG_SOP_UID) == identity.sop_uid
    assert studies.qido(url, f"studies/{identity.study_uid}/series", {"Modality": "CT"}) == []


def test_wado_returns_the_pixels_that_were_sent(
    stack: Stack, posted: tuple[StudyIdentity, npt.NDArray[np.uint16]]
) -> None:
    """WADO-RS gives back the instance with exactly the sent pixels and attributes, and the
    raw first frame byte for byte."""
    identity, pixels = posted
    url = stack.config.dicomweb_url
    ds = studies.retrieve_instance(url, identity.study_uid, identity.series_uid, identity.sop_uid)
    assert ds.SOPInstanceUID == identity.sop_uid
    assert (ds.Modality, ds.BodyPartExamined, ds.PhotometricInterpretation) == (
        "DX",
        "CHEST",
        "MONOCHROME2",
    )
    assert (ds.BitsAllocated, ds.BitsStored) == (16, 12)
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    frame = studies.retrieve_frame(
        url, identity.study_uid, identity.series_uid, identity.sop_uid, frame=1
    )
    assert frame == pixels.astype("<u2").tobytes()


def test_project_radiograph_with_an_opacity_round_trips(stack: Stack) -> None:
    """A study of the project's synthetic radiograph (medmesh_cli.devstack.radiographs, with an opacity)
    is stored by STOW-RS and read back by WADO-RS pixel for pixel."""
    pixels = synthetic_radiograph(7, opacity=True)
    identity = StudyIdentity.new()
    url = stack.config.dicomweb_url
    studies.stow(url, [build_radiograph(pixels, identity)])
    ds = studies.retrieve_instance(url, identity.study_uid, identity.series_uid, identity.sop_uid)
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_demo_studies_are_seeded_at_start(stack: Stack) -> None:
    """The stack seeded the demo studies, with the UIDs derived from their seeds, and their
    pixels are the generator's held-out images."""
    url = stack.config.dicomweb_url
    expected = [studies.demo_identity(seed) for seed, _ in studies.DEMO_STUDIES]
    assert stack.seeded_studies == expected
    for (seed, opacity), identity in zip(studies.DEMO_STUDIES, expected, strict=True):
        [study] = studies.qido(url, "studies", {"StudyInstanceUID": identity.study_uid})
        assert _value(study, studies.TAG_STUDY_UID) == identity.study_uid
        ds = studies.retrieve_instance(
            url, identity.study_uid, identity.series_uid, identity.sop_uid
        )
        np.testing.assert_array_equal(ds.pixel_array, synthetic_radiograph(seed, opacity))


def test_stow_of_something_that_is_not_dicom_is_refused(stack: Stack) -> None:
    """A STOW-RS part that is not DICOM is refused with 400 and nothing is stored."""
    body, content_type = dicomweb.multipart_related([b"not a DICOM file"], "application/dicom")
    response = httpx.post(
        f"{stack.config.dicomweb_url}/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": dicomweb.DICOM_JSON},
        timeout=10.0,
    )
    assert response.status_code == 400, response.text
    assert "Value" not in response.json().get(studies.TAG_REFERENCED_SOPS, {})


def test_studies_survive_a_pacs_restart(
    stack: Stack, posted: tuple[StudyIdentity, npt.NDArray[np.uint16]]
) -> None:
    """After Orthanc is stopped and started again the posted study is still there."""
    identity, pixels = posted
    stack.restart_orthanc(down_s=0.5)
    assert "orthanc" not in stack.exited()
    url = stack.config.dicomweb_url
    ds = studies.retrieve_instance(url, identity.study_uid, identity.series_uid, identity.sop_uid)
    np.testing.assert_array_equal(ds.pixel_array, pixels)
