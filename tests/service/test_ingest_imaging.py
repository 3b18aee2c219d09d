"""The ingest app on the in-memory broker with ImagingStudies (issue 19 item 1): a study becomes
an image reading of chest-opacity (the claim check of one instance), or a 4xx saying why not."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from medmesh_contracts.events import (
    BodySiteCoding,
    ImageReference,
    PatientReadingsUpdated,
    RequestInference,
)
from medmesh_ingest.settings import IngestSettings
from tests.service.conftest import FIXTURES, SPECS_DIR
from tests.service.test_ingest_app import Harness, running

IMAGING = FIXTURES / "imaging"
PACS = "http://pacs.test:8042/dicom-web"
OTHER_PACS = "http://pacs-b.test/dicom-web"
SNOMED = "http://snomed.info/sct"
R4B = {"content-type": "application/fhir+json"}
R5 = {"content-type": "application/fhir+json; fhirVersion=5.0"}


def settings(specs_dir: Path = SPECS_DIR, **overrides: Any) -> IngestSettings:
    """Ingest settings for the in-memory broker with the specs of ``specs_dir``."""
    return IngestSettings(model_specs_dir=specs_dir, rebuild_readings_on_start=False, **overrides)


@pytest.fixture
def specs_dir() -> Path:
    """The deployed specs, chest-opacity among them."""
    return SPECS_DIR


@pytest.fixture
async def ingest(specs_dir: Path) -> AsyncIterator[Harness]:
    """Ingest with chest-opacity deployed and two allowed PACS, the first the default."""
    async with running(settings(specs_dir, pacs_urls=f"{PACS}/, {OTHER_PACS}")) as harness:
        yield harness


def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((IMAGING / name).read_text())
    return loaded


async def _post(
    harness: Harness, body: dict[str, Any], path: str = "/fhir", headers: dict[str, str] = R4B
) -> httpx.Response:
    return await harness.client.post(path, content=json.dumps(body), headers=headers)


def _image_request(harness: Harness) -> RequestInference:
    (raw,) = harness.captured.requests
    request = RequestInference.model_validate_json(raw)
    assert request.model == "chest-opacity"
    return request


async def test_r4b_study_posted_becomes_a_chest_opacity_request(ingest: Harness) -> None:
    """An R4B DX chest study POSTed to /fhir/ImagingStudy is 202 and sends one chest-opacity
    request whose input names the study, its UIDs and its (allowed) contained endpoint."""
    response = await _post(ingest, _fixture("imaging-study-dx.json"), "/fhir/ImagingStudy")
    assert response.status_code == 202, response.text
    request = _image_request(ingest)
    (image_input,) = request.inputs
    assert image_input.name == "chest_radiograph"
    assert (image_input.value, image_input.unit) == (1.0, "1")
    assert image_input.source_reference == "ImagingStudy/cxr-r4b"
    assert image_input.observed_at is not None
    assert image_input.observed_at.isoformat() == "2026-12-05T09:30:00+00:00"
    assert image_input.image == ImageReference(
        dicomweb_url=PACS,
        study_uid="2.25.1001",
        series_uid="2.25.1002",
        instance_uid="2.25.1003",
        body_site=BodySiteCoding(system=SNOMED, code="51185008", display="Thoracic structure"),
    )
    assert request.subject_reference == "Patient/imaging-1"
    (state,) = ingest.captured.states
    (kept,) = PatientReadingsUpdated.model_validate_json(state).readings
    assert kept.source_reference == "ImagingStudy/cxr-r4b"


async def test_r5_study_posted_becomes_a_chest_opacity_request(ingest: Harness) -> None:
    """An R5 CR study (modality and body site as CodeableConcept / CodeableReference, the
    endpoint's address with a trailing slash) is 202 with the same claim check."""
    response = await _post(
        ingest, _fixture("imaging-study-cr-r5.json"), "/fhir/ImagingStudy", headers=R5
    )
    assert response.status_code == 202, response.text
    request = _image_request(ingest)
    assert request.source.fhir_version == "R5"
    assert request.inputs[0].image == ImageReference(
        dicomweb_url=PACS,
        study_uid="2.25.2001",
        series_uid="2.25.2002",
        instance_uid="2.25.2003",
        body_site=BodySiteCoding(system=SNOMED, code="51185008"),
    )


async def test_transaction_with_study_and_order_uses_the_named_study(ingest: Harness) -> None:
    """A transaction of Patient, Endpoint, ImagingStudy and a ServiceRequest ordering
    chest-opacity with the study as supportingInfo: 200, the study and order entries 202, one
    request based on the order with the study's instance at the Endpoint entry's address."""
    response = await _post(ingest, _fixture("imaging-order-transaction.json"))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["200 OK", "200 OK", "202 Accepted", "202 Accepted"]
    request = _image_request(ingest)
    assert request.based_on_reference == "ServiceRequest/order-cxr-1"
    assert request.subject_reference == "Patient/imaging-3"
    image = request.inputs[0].image
    assert image is not None
    assert (image.dicomweb_url, image.study_uid, image.series_uid, image.instance_uid) == (
        PACS,
        "2.25.3001",
        "2.25.3002",
        "2.25.3003",
    )


async def test_ct_study_is_refused_saying_why_and_nothing_is_published(ingest: Harness) -> None:
    """A CT study is 422 with an OperationOutcome naming the model and the modality rule, no
    UID or address in it, and nothing is published."""
    study = _fixture("imaging-study-dx.json")
    study["series"][0]["modality"] = {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "CT",
    }
    response = await _post(ingest, study, "/fhir/ImagingStudy")
    assert response.status_code == 422, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    (issue,) = outcome["issue"]
    assert issue["expression"] == ["ImagingStudy.series"]
    assert "chest-opacity" in issue["diagnostics"]
    assert "modality" in issue["diagnostics"]
    assert "2.25." not in response.text
    assert "pacs.test" not in response.text
    assert ingest.captured.requests == []
    assert ingest.captured.states == []


async def test_endpoint_outside_the_allowlist_is_refused(ingest: Harness) -> None:
    """A study whose dicom-wado-rs endpoint is not in MEDMESH_PACS_URLS is 422 naming the
    setting, at the endpoint element, without the address; nothing is published."""
    study = _fixture("imaging-study-dx.json")
    study["contained"][0]["address"] = "http://attacker.example/dicom-web"
    response = await _post(ingest, study, "/fhir/ImagingStudy")
    assert response.status_code == 422, response.text
    (issue,) = response.json()["issue"]
    assert issue["expression"] == ["ImagingStudy.endpoint[0]"]
    assert "MEDMESH_PACS_URLS" in issue["diagnostics"]
    assert "attacker" not in response.text
    assert ingest.captured.requests == []


async def test_second_allowed_pacs_is_used_when_the_study_names_it(ingest: Harness) -> None:
    """An endpoint naming the second allowed base sends the worker there, not to the default."""
    study = _fixture("imaging-study-dx.json")
    study["contained"][0]["address"] = OTHER_PACS
    response = await _post(ingest, study, "/fhir/ImagingStudy")
    assert response.status_code == 202, response.text
    image = _image_request(ingest).inputs[0].image
    assert image is not None
    assert image.dicomweb_url == OTHER_PACS


async def test_study_without_endpoint_uses_the_default_pacs(ingest: Harness) -> None:
    """A study naming no endpoint is fetched from the first of MEDMESH_PACS_URLS."""
    study = _fixture("imaging-study-dx.json")
    del study["contained"], study["endpoint"]
    response = await _post(ingest, study, "/fhir/ImagingStudy")
    assert response.status_code == 202, response.text
    image = _image_request(ingest).inputs[0].image
    assert image is not None
    assert image.dicomweb_url == PACS


async def test_study_without_endpoint_is_fetched_from_its_sources_own_pacs(
    specs_dir: Path,
) -> None:
    """A named source with its own DICOMweb base: its studies naming no endpoint are fetched
    from that base, not the first allowed one; the default source's from the first."""
    study = _fixture("imaging-study-dx.json")
    del study["contained"], study["endpoint"]
    sources = {"radiology": {"token": "radiology-token", "dicomweb_url": f"{OTHER_PACS}/"}}
    configured = settings(
        specs_dir,
        pacs_urls=f"{PACS},{OTHER_PACS}",
        ingest_tokens="default-token",
        ingest_sources=sources,
    )
    async with running(configured) as harness:
        for token in ("radiology-token", "default-token"):
            headers = {**R4B, "authorization": f"Bearer {token}"}
            response = await _post(harness, study, "/fhir/ImagingStudy", headers=headers)
            assert response.status_code == 202, response.text
        bases = [
            RequestInference.model_validate_json(raw).inputs[0].image
            for raw in harness.captured.requests
        ]
    assert [b.dicomweb_url if b else None for b in bases] == [OTHER_PACS, PACS]


def test_a_sources_pacs_outside_the_allowlist_stops_ingest_at_start() -> None:
    """A source whose dicomweb_url is not one of MEDMESH_PACS_URLS is a settings error."""
    sources = {"radiology": {"token": "radiology-token", "dicomweb_url": OTHER_PACS}}
    with pytest.raises(ValueError, match="must be one of MEDMESH_PACS_URLS"):
        settings(pacs_urls=PACS, ingest_sources=sources)


async def test_study_without_endpoint_or_configured_pacs_is_refused(specs_dir: Path) -> None:
    """Without MEDMESH_PACS_URLS a study naming no endpoint has no usable one: 422."""
    study = _fixture("imaging-study-dx.json")
    del study["contained"], study["endpoint"]
    async with running(settings(specs_dir)) as harness:
        response = await _post(harness, study, "/fhir/ImagingStudy")
        assert harness.captured.requests == []
    assert response.status_code == 422, response.text
    (issue,) = response.json()["issue"]
    assert "no usable DICOMweb endpoint" in issue["diagnostics"]


async def test_batch_refuses_only_the_unreadable_study(ingest: Harness) -> None:
    """In a batch, a CT study's entry is 422 with its outcome and a DX study's entry is 202."""
    good = _fixture("imaging-study-dx.json")
    bad = copy.deepcopy(good)
    bad["id"] = "ct-1"
    bad["series"][0]["modality"]["code"] = "CT"
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": bad, "request": {"method": "POST", "url": "ImagingStudy"}},
            {"resource": good, "request": {"method": "POST", "url": "ImagingStudy"}},
        ],
    }
    response = await _post(ingest, batch)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "422 Unprocessable Entity",
        "202 Accepted",
    ]
    refused = entries[0]["response"]["outcome"]["issue"][0]
    assert refused["expression"] == ["Bundle.entry[0].resource.series"]
    assert _image_request(ingest).inputs[0].source_reference == "ImagingStudy/cxr-r4b"


async def test_study_when_no_imaging_model_is_deployed_causes_nothing(tmp_path: Path) -> None:
    """With only non-imaging specs deployed, a study is 200 and sends nothing, like an
    Observation no model reads."""
    for spec in ("deterioration.yaml", "ecg-rhythm.yaml"):
        shutil.copy(SPECS_DIR / spec, tmp_path / spec)
    async with running(settings(tmp_path, pacs_urls=PACS)) as harness:
        response = await _post(harness, _fixture("imaging-study-dx.json"), "/fhir/ImagingStudy")
        assert harness.captured.requests == []
        assert harness.captured.states == []
    assert response.status_code == 200, response.text
    assert response.json()["issue"][0]["code"] == "not-found"


async def test_study_in_a_subscription_notification_is_read(ingest: Harness) -> None:
    """An R4B backport event-notification carrying the study sends the chest-opacity request."""
    notification = json.loads((FIXTURES / "subscription-event-full.json").read_text())
    status_entry = notification["entry"][0]
    notification["entry"] = [
        status_entry,
        {
            "fullUrl": "http://fhir.test/ImagingStudy/cxr-r4b",
            "resource": _fixture("imaging-study-dx.json"),
            # A history Bundle's entries carry a request and a response (bdl-3, bdl-4).
            "request": {"method": "POST", "url": "ImagingStudy"},
            "response": {"status": "201 Created"},
        },
    ]
    response = await _post(ingest, notification)
    assert response.status_code == 202, response.text
    assert _image_request(ingest).inputs[0].image is not None


async def test_study_of_a_device_subject_is_refused(ingest: Harness) -> None:
    """An ImagingStudy whose subject is not a Patient is 422 at its subject, like others."""
    study = _fixture("imaging-study-dx.json")
    study["subject"] = {"reference": "Device/xray-1"}
    response = await _post(ingest, study, "/fhir/ImagingStudy")
    assert response.status_code == 422, response.text
    assert response.json()["issue"][0]["expression"] == ["ImagingStudy.subject"]


async def test_later_order_uses_the_last_study_of_the_state(ingest: Harness) -> None:
    """A ServiceRequest ordering chest-opacity after the study was POSTed alone is scored with
    that study, from the patient's state."""
    await _post(ingest, _fixture("imaging-study-dx.json"), "/fhir/ImagingStudy")
    order = {
        "resourceType": "ServiceRequest",
        "id": "order-later",
        "status": "active",
        "intent": "order",
        "code": {
            "coding": [
                {"system": "https://medmesh.dev/fhir/CodeSystem/model", "code": "chest-opacity"}
            ]
        },
        "subject": {"reference": "Patient/imaging-1"},
    }
    response = await _post(ingest, order, "/fhir/ServiceRequest")
    assert response.status_code == 202, response.text
    raw = ingest.captured.requests[-1]
    request = RequestInference.model_validate_json(raw)
    assert request.based_on_reference == "ServiceRequest/order-later"
    image = request.inputs[0].image
    assert image is not None
    assert image.instance_uid == "2.25.1003"
