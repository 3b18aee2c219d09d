"""ImagingStudy to image reading (medmesh_ingest.imaging and extraction): which series and
instance qualify, where the worker fetches it, the refusals, orders naming a study, and how
readings.merge sends the claim check."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from medmesh_contracts.events import BodySiteCoding, FhirVersion, ImageReference, Producer
from medmesh_contracts.modelspec import ModelSpec
from medmesh_ingest.extraction import Extraction, extract
from medmesh_ingest.imaging import PacsPolicy
from medmesh_ingest.readings import merge
from medmesh_ingest.validation import parse

REPO = Path(__file__).resolve().parents[2]
IMAGING = REPO / "tests" / "fixtures" / "fhir" / "imaging"
SPEC = ModelSpec.model_validate(
    yaml.safe_load((REPO / "deploy" / "models" / "chest-opacity.yaml").read_text())
)
SPECS = {SPEC.name: SPEC}
PACS = "http://pacs.test:8042/dicom-web"
POLICY = PacsPolicy.from_setting(f"{PACS}/,http://other.test/dicom-web")
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ECT = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PRODUCER = Producer(service="ingest", instance="test")
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _study(name: str = "imaging-study-dx.json") -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((IMAGING / name).read_text())
    return loaded


def _extract(
    *resources: dict[str, Any], version: FhirVersion = "R4B", pacs: PacsPolicy = POLICY
) -> Extraction:
    body: dict[str, Any] = (
        resources[0]
        if len(resources) == 1
        else {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": f"urn:uuid:{_uuid(i)}", "resource": r} for i, r in enumerate(resources)
            ],
        }
    )
    payload = parse(json.dumps(body).encode(), fhir_version=version)
    return extract(payload.resources, SPECS, pacs)


def _uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def _image(extraction: Extraction) -> ImageReference:
    (found,) = extraction.readings
    image = found.readings["chest_radiograph"].input.image
    assert image is not None
    return image


def _series(uid: str, modality: str, *instances: tuple[str, str]) -> dict[str, Any]:
    return {
        "uid": uid,
        "modality": {"system": DCM, "code": modality},
        "instance": [
            {"uid": i, "sopClass": {"system": "urn:ietf:rfc:3986", "code": c}} for i, c in instances
        ],
    }


DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def test_first_qualifying_instance_of_the_first_qualifying_series_is_read() -> None:
    """A CT series is skipped, and in the DX series the CT-class instance; the DX instance of
    the DX series (SOP class without its urn:oid prefix) is read, from the study's endpoint."""
    study = _study()
    study["series"] = [
        _series("2.25.10", "CT", ("2.25.11", CT_IMAGE)),
        _series("2.25.20", "DX", ("2.25.21", CT_IMAGE), ("2.25.22", DX_PRESENTATION)),
        _series("2.25.30", "DX", ("2.25.31", DX_PRESENTATION)),
    ]
    assert _image(_extract(study)) == ImageReference(
        dicomweb_url=PACS, study_uid="2.25.1001", series_uid="2.25.20", instance_uid="2.25.22"
    )


@pytest.mark.parametrize(
    "body_site",
    [
        None,
        {"system": "http://snomed.info/sct", "code": "51185008"},
        {"system": "http://example.org/local", "code": "chest"},
        {"system": "http://example.org/local", "code": "x", "display": "Chest"},
    ],
)
def test_body_site_absent_named_or_mapped_qualifies(body_site: dict[str, str] | None) -> None:
    """bodySite absent, CHEST as code or display (any case), or SNOMED 51185008 qualifies."""
    study = _study()
    if body_site is None:
        del study["series"][0]["bodySite"]
    else:
        study["series"][0]["bodySite"] = body_site
    assert _image(_extract(study)).series_uid == "2.25.1002"


def test_r5_body_site_as_a_body_structure_reference_qualifies() -> None:
    """An R5 bodySite that is only a BodyStructure reference is not checked (the worker reads
    the DICOM header)."""
    study = _study("imaging-study-cr-r5.json")
    study["series"][0]["bodySite"] = {"reference": {"reference": "BodyStructure/x"}}
    assert _image(_extract(study, version="R5")).instance_uid == "2.25.2003"


THORAX = BodySiteCoding(
    system="http://snomed.info/sct", code="51185008", display="Thoracic structure"
)


def test_the_series_body_site_rides_with_the_claim_check() -> None:
    """An R4B series' bodySite Coding and an R5 one's CodeableReference concept become the
    reference's body_site; an R5 BodyStructure reference alone gives none."""
    assert _image(_extract(_study())).body_site == THORAX
    r5 = _study("imaging-study-cr-r5.json")
    assert _image(_extract(r5, version="R5")).body_site == BodySiteCoding(
        system="http://snomed.info/sct", code="51185008"
    )
    r5["series"][0]["bodySite"] = {"reference": {"reference": "BodyStructure/x"}}
    assert _image(_extract(r5, version="R5")).body_site is None


def test_other_body_site_is_refused_naming_the_rule_not_the_values() -> None:
    """A knee (SNOMED 72696002) series is refused: the issue names the model, the input, the
    series index and the spec's body part, and no UID."""
    study = _study()
    study["series"][0]["bodySite"] = {"system": "http://snomed.info/sct", "code": "72696002"}
    extraction = _extract(study)
    assert extraction.readings == ()
    (issue,) = extraction.rejections
    assert issue.expression == ("ImagingStudy.series",)
    assert "model chest-opacity (input chest_radiograph)" in issue.diagnostics
    assert "series[0] has a body site that is none of the model's (CHEST)" in issue.diagnostics
    assert "2.25." not in issue.diagnostics
    assert "72696002" not in issue.diagnostics


def test_no_instance_of_a_listed_sop_class_is_refused() -> None:
    """A DX series whose only instance is a CT Image Storage is refused, naming SOP classes."""
    study = _study()
    study["series"] = [_series("2.25.20", "DX", ("2.25.21", f"urn:oid:{CT_IMAGE}"))]
    (issue,) = _extract(study).rejections
    assert "no instance with a uid and one of the model's SOP classes" in issue.diagnostics


def test_modality_of_another_system_does_not_qualify() -> None:
    """A DX code in a system other than DICOM's DCM is not the source's modality."""
    study = _study()
    study["series"][0]["modality"] = {"system": "http://example.org/modality", "code": "DX"}
    (issue,) = _extract(study).rejections
    assert "has a modality that is none of the model's (DX, CR" in issue.diagnostics


def test_refusal_names_at_most_three_series() -> None:
    """Five CT series: the refusal names three and counts the rest."""
    study = _study()
    study["series"] = [_series(f"2.25.{i}", "CT") for i in range(5)]
    (issue,) = _extract(study).rejections
    assert "series[2]" in issue.diagnostics
    assert "series[3]" not in issue.diagnostics
    assert "and 2 more series" in issue.diagnostics


def test_study_without_a_dicom_uid_identifier_is_refused() -> None:
    """No identifier with system urn:dicom:uid: refused at ImagingStudy.identifier."""
    study = _study()
    study["identifier"] = [{"system": "http://example.org/accession", "value": "A1"}]
    (issue,) = _extract(study).rejections
    assert issue.expression == ("ImagingStudy.identifier",)


def test_series_endpoint_comes_before_the_study_endpoint() -> None:
    """The series' own dicom-wado-rs Endpoint (a Bundle entry named Endpoint/id) is used."""
    study = _study()
    study["series"][0]["endpoint"] = [{"reference": "Endpoint/other"}]
    endpoint = {
        "resourceType": "Endpoint",
        "id": "other",
        "status": "active",
        "connectionType": {"system": ECT, "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "address": "http://other.test/dicom-web/",
    }
    assert _image(_extract(endpoint, study)).dicomweb_url == "http://other.test/dicom-web"


def test_endpoint_outside_the_allowlist_is_refused() -> None:
    """A WADO-RS endpoint whose address is not allowed refuses the study (not the default)."""
    study = _study()
    study["contained"][0]["address"] = "http://pacs.test:8042/dicom-web/../../admin"
    (issue,) = _extract(study).rejections
    assert issue.expression == ("ImagingStudy.endpoint[0]",)
    assert "MEDMESH_PACS_URLS" in issue.diagnostics
    assert "admin" not in issue.diagnostics


def test_other_connection_types_and_unresolved_endpoints_fall_back_to_the_default() -> None:
    """An IHE-IID endpoint and a reference to an Endpoint not in the payload name no WADO-RS
    base: the default (first allowed) base is used."""
    study = _study()
    study["contained"][0]["connectionType"] = {"system": ECT, "code": "ihe-iid"}
    study["contained"][0]["address"] = "http://viewer.test/"
    study["endpoint"].append({"reference": "Endpoint/elsewhere"})
    assert _image(_extract(study)).dicomweb_url == PACS


def test_no_endpoint_and_no_configured_pacs_is_refused() -> None:
    """Without MEDMESH_PACS_URLS a study naming no endpoint has none usable."""
    study = _study()
    del study["contained"], study["endpoint"]
    (issue,) = _extract(study, pacs=PacsPolicy()).rejections
    assert "no usable DICOMweb endpoint" in issue.diagnostics


def test_cancelled_study_gives_nothing_and_refuses_nothing() -> None:
    """A cancelled study is no reading and no rejection."""
    study = _study()
    study["status"] = "cancelled"
    extraction = _extract(study)
    assert (extraction.readings, extraction.rejections) == ((), ())


def test_no_imaging_model_deployed_means_no_refusal() -> None:
    """With no spec reading images, a CT study is neither a reading nor a rejection."""
    study = _study()
    study["series"][0]["modality"]["code"] = "CT"
    payload = parse(json.dumps(study).encode())
    extraction = extract(payload.resources, {}, POLICY)
    assert (extraction.readings, extraction.rejections) == ((), ())


def test_pacs_policy_normalises_trailing_slashes() -> None:
    """The setting's bases and endpoint addresses compare without trailing slashes."""
    policy = PacsPolicy.from_setting(" http://a.test/dicom-web/ , ,http://b.test/dw")
    assert policy.allowed == ("http://a.test/dicom-web", "http://b.test/dw")
    assert policy.default == "http://a.test/dicom-web"
    assert policy.allows("http://b.test/dw/") == "http://b.test/dw"
    assert policy.allows("http://b.test/dw/x") is None


def _order(subject: str, study_ref: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": "order-1",
        "status": "active",
        "intent": "order",
        "code": {
            "coding": [
                {"system": "https://medmesh.dev/fhir/CodeSystem/model", "code": "chest-opacity"}
            ]
        },
        "subject": {"reference": subject},
        "supportingInfo": [{"reference": study_ref}],
    }


def test_order_pins_the_study_it_names() -> None:
    """An order whose supportingInfo names the payload's study (by fullUrl) pins its reading."""
    extraction = _extract(_study(), _order("Patient/imaging-1", f"urn:uuid:{_uuid(0)}"))
    (order,) = extraction.orders
    (pinned,) = order.pinned
    assert pinned.input.image is not None
    assert pinned.input.image.study_uid == "2.25.1001"


def test_order_never_pins_another_patients_study() -> None:
    """A study of another patient named by an order is not pinned, with a warning."""
    extraction = _extract(_study(), _order("Patient/someone-else", "ImagingStudy/cxr-r4b"))
    (order,) = extraction.orders
    assert order.pinned == ()
    assert any("another patient" in i.diagnostics for i in extraction.issues)


def test_merge_sends_the_claim_check_and_counts_the_instance_in_the_fingerprint() -> None:
    """merge sends the image reading with its claim check; a second study with the same start
    but another instance is a new request, not a duplicate."""
    (first,) = _extract(_study()).readings
    merged = merge(
        None,
        spec=SPEC,
        pseudonym="p",
        found=first,
        order=None,
        received_at=NOW,
        lookback=timedelta(hours=4),
        producer=PRODUCER,
    )
    assert merged.inputs is not None
    assert merged.inputs[0].image == first.readings["chest_radiograph"].input.image
    other = copy.deepcopy(_study())
    other["id"] = "cxr-2"
    other["series"][0]["instance"][0]["uid"] = "2.25.9999"
    (second,) = _extract(other).readings
    again = merge(
        merged.state,
        spec=SPEC,
        pseudonym="p",
        found=second,
        order=None,
        received_at=NOW,
        lookback=timedelta(hours=4),
        producer=PRODUCER,
    )
    assert again.inputs is not None
    assert again.inputs[0].image is not None
    assert again.inputs[0].image.instance_uid == "2.25.9999"


def test_an_order_uses_the_stored_study_and_a_reading_without_claim_check_is_missing() -> None:
    """An order merged later on the patient's state is scored with the study the state kept;
    a stored image reading without its claim check (written before the contract had one) sends
    nothing and names the input missing."""
    (found,) = _extract(_study()).readings
    merged = merge(
        None,
        spec=SPEC,
        pseudonym="p",
        found=found,
        order=None,
        received_at=NOW,
        lookback=timedelta(hours=4),
        producer=PRODUCER,
    )
    (order,) = _extract(_order("Patient/imaging-1", "ImagingStudy/absent")).orders
    kept = merge(
        merged.state,
        spec=SPEC,
        pseudonym="p",
        found=None,
        order=order,
        received_at=NOW,
        lookback=timedelta(hours=4),
        producer=PRODUCER,
    )
    assert kept.inputs is not None
    assert kept.inputs[0].image is not None
    assert kept.inputs[0].image == merged.state.readings[0].image
    stale = merged.state.model_copy(
        update={"readings": (merged.state.readings[0].model_copy(update={"image": None}),)}
    )
    later = merge(
        stale,
        spec=SPEC,
        pseudonym="p",
        found=None,
        order=order,
        received_at=NOW,
        lookback=timedelta(hours=4),
        producer=PRODUCER,
    )
    assert later.inputs is None
    assert later.missing == ("chest_radiograph",)
