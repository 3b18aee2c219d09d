"""Parsing and checking inbound FHIR payloads (medmesh_ingest.validation, .outcomes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.outcomes import FhirRejected, Issue, outcome
from medmesh_ingest.validation import Limits, ParsedResource, fhirpath, parse
from tests.ingest_support import ingest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fhir"
SPECS = load_specs(Path(__file__).parents[2] / "deploy" / "models")
VALID_FIXTURES = [
    "vitals-bundle-high.json",
    "vitals-bundle-medium.json",
    "vitals-bundle-low.json",
    "observation-heart-rate.json",
    "bundle-missing-spo2.json",
]
# Patient data in the fixtures that must never appear in an OperationOutcome.
PHI = ["Thornbury", "Margaret", "MRN-4471902", "1948-03-14", "Larkspur", "HX7 8QT", "900461"]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def resources(
    raw: bytes, hint: str | None = None, limits: Limits | None = None
) -> list[ParsedResource]:
    """What ingest reads from a payload: the resource itself, or the entries of a Bundle."""
    return parse(raw, hint, limits=limits or Limits()).resources


def observation(**overrides: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "hr",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-11-23T08:00:00+00:00",
        "valueQuantity": {"value": 80, "system": "http://unitsofmeasure.org", "code": "/min"},
    }
    resource.update(overrides)
    return resource


def bundle(bundle_type: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": bundle_type, "entry": list(entries)}


def rejection(payload: bytes | dict[str, Any], hint: str | None = None) -> FhirRejected:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(FhirRejected) as caught:
        resources(raw, hint)
    return caught.value


def expressions(rejected: FhirRejected) -> list[str]:
    return [e for issue in rejected.outcome["issue"] for e in issue.get("expression", [])]


def codes(rejected: FhirRejected) -> list[str]:
    return [issue["code"] for issue in rejected.outcome["issue"]]


# --- OperationOutcome --------------------------------------------------------------------------


def test_outcome_is_a_valid_r4b_operation_outcome() -> None:
    """outcome() builds R4B OperationOutcome JSON with severity, code, diagnostics, expression."""
    built = outcome(
        [Issue("error", "value", "Observation.status is bad.", ("Observation.status",))]
    )
    parsed = OperationOutcome.model_validate(built)
    assert parsed.issue[0].expression == ["Observation.status"]
    assert parsed.issue[0].severity == "error"


def test_empty_outcome_says_no_issues() -> None:
    """OperationOutcome.issue is 1..*, so an outcome without issues carries an information one."""
    built = outcome([])
    OperationOutcome.model_validate(built)
    assert built["issue"][0]["severity"] == "information"


def test_accepted_names_the_correlation_ids() -> None:
    """A 202's OperationOutcome names the requests it started first, then any issues."""
    payload = json.loads(fixture("vitals-bundle-high.json"))
    odd = json.loads(json.dumps(payload["entry"][-2]))  # the latest heart rate, in kg
    odd["resource"] |= {"id": "example-high-hr-kg"}
    odd["resource"]["valueQuantity"] |= {"code": "kg", "unit": "kg"}
    odd["fullUrl"] += "-kg"
    payload["entry"].append(odd)
    answer = ingest(json.dumps(payload).encode(), SPECS).answer
    built = answer.operation_outcome
    OperationOutcome.model_validate(built)
    assert answer.status == 202
    (request,) = answer.requests
    assert built["issue"][0]["code"] == "informational"
    assert request.correlation_id in built["issue"][0]["diagnostics"]
    assert built["issue"][1]["severity"] == "error"


def test_fhir_rejected_carries_status_and_outcome() -> None:
    """FhirRejected holds the HTTP status and the OperationOutcome."""
    rejected = FhirRejected(415, outcome([Issue("error", "not-supported", "R5 is not spoken")]))
    assert rejected.status == 415
    assert rejected.outcome["resourceType"] == "OperationOutcome"
    assert "R5 is not spoken" in str(rejected)


# --- 400: not FHIR -----------------------------------------------------------------------------


def test_garbage_is_rejected_as_not_json() -> None:
    """A payload that is not JSON is a 400 with a structure issue."""
    rejected = rejection(fixture("not-fhir.txt"))
    assert rejected.status == 400
    assert codes(rejected) == ["structure"]


def test_bytes_that_are_not_utf8_are_rejected_as_not_json() -> None:
    """Undecodable bytes are a 400, not a crash."""
    assert rejection(b"\xff\xfe\x00garbage").status == 400


def test_json_that_is_not_an_object_is_rejected() -> None:
    """A JSON array or string is not a FHIR resource: 400."""
    assert rejection(b"[1, 2]").status == 400


def test_json_without_resource_type_is_rejected() -> None:
    """A JSON object without resourceType is not a FHIR resource: 400."""
    assert rejection({"status": "final"}).status == 400


def test_unknown_resource_type_is_rejected() -> None:
    """A resourceType R4B does not define is a 400 naming resourceType."""
    rejected = rejection({"resourceType": "VitalSignsThing"})
    assert rejected.status == 400
    assert expressions(rejected) == ["resourceType"]


def test_endpoint_type_mismatch_is_rejected() -> None:
    """POST /fhir/Observation with a Bundle body is a 400."""
    rejected = rejection(fixture("vitals-bundle-high.json"), hint="Observation")
    assert rejected.status == 400
    assert expressions(rejected) == ["resourceType"]


def test_endpoint_type_that_matches_is_accepted() -> None:
    """POST /fhir/Observation with an Observation body parses."""
    [parsed] = resources(fixture("observation-heart-rate.json"), "Observation")
    assert parsed.resource_type == "Observation"


# --- 422: invalid FHIR -------------------------------------------------------------------------


def test_structure_errors_name_fhirpath_inside_bundle_entries() -> None:
    """fhir.resources errors become issues located by FHIRPath, with the entry index."""
    bad = observation(valueQuantity={"value": "eighty"})
    rejected = rejection(bundle("collection", {"resource": observation()}, {"resource": bad}))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.entry[1].resource.valueQuantity.value"]
    assert codes(rejected) == ["value"]


def test_missing_required_element_is_a_required_issue() -> None:
    """A missing Observation.status is a 'required' issue at Observation.status."""
    resource = observation()
    del resource["status"]
    rejected = rejection(resource)
    assert rejected.status == 422
    assert expressions(rejected) == ["Observation.status"]
    assert codes(rejected) == ["required"]


def test_unknown_element_is_a_structure_issue() -> None:
    """An element R4B does not define is a 'structure' issue at its path."""
    rejected = rejection(observation(heartRate=80))
    assert expressions(rejected) == ["Observation.heartRate"]
    assert codes(rejected) == ["structure"]


def test_unknown_resource_type_inside_a_bundle_is_an_issue() -> None:
    """An entry of unknown resourceType is a 422 issue (fhir.resources would raise KeyError)."""
    rejected = rejection(bundle("collection", {"resource": {"resourceType": "Nonsense"}}))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.entry[0].resource.resourceType"]


def test_bogus_bundle_type_is_rejected() -> None:
    """A Bundle.type outside the R4B value set is a 422 'value' issue at Bundle.type."""
    rejected = rejection(bundle("bogus", {"resource": observation()}))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.type"]
    assert codes(rejected) == ["value"]


@pytest.mark.parametrize("bundle_type", ["searchset", "document", "batch-response"])
def test_bundle_types_we_do_not_take_are_rejected(bundle_type: str) -> None:
    """Valid Bundle types other than collection, batch, transaction are 422 not-supported."""
    rejected = rejection(bundle(bundle_type, {"resource": observation()}))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.type"]
    assert codes(rejected) == ["not-supported"]


def test_bogus_observation_status_in_a_bundle_is_rejected() -> None:
    """status 'bogus' (accepted by fhir.resources) is a 422 at Bundle.entry[1].resource.status."""
    rejected = rejection(fixture("bundle-invalid-status.json"))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.entry[1].resource.status"]
    assert codes(rejected) == ["value"]


def test_bogus_status_of_a_single_observation_is_rejected() -> None:
    """A single Observation's bad status is located at Observation.status."""
    rejected = rejection(observation(status="done"))
    assert expressions(rejected) == ["Observation.status"]


def test_service_request_status_and_intent_are_checked() -> None:
    """ServiceRequest status and intent must be in their R4B value sets; both are reported."""
    request = {
        "resourceType": "ServiceRequest",
        "status": "pending",
        "intent": "wish",
        "subject": {"reference": "Patient/p1"},
    }
    rejected = rejection(request)
    assert rejected.status == 422
    assert expressions(rejected) == ["ServiceRequest.status", "ServiceRequest.intent"]


def test_valid_service_request_parses() -> None:
    """A ServiceRequest with valid codes is accepted."""
    request = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
    }
    [parsed] = resources(json.dumps(request).encode())
    assert parsed.resource_type == "ServiceRequest"


def test_subject_of_another_type_is_rejected() -> None:
    """An Observation whose subject is a Group is a 422 at Observation.subject."""
    rejected = rejection(observation(subject={"reference": "Group/ward-7"}))
    assert rejected.status == 422
    assert expressions(rejected) == ["Observation.subject"]


def test_subject_with_another_declared_type_is_rejected() -> None:
    """Reference.type other than Patient is rejected even without a literal reference."""
    subject = {"type": "Device", "identifier": {"value": "pump-3"}}
    assert expressions(rejection(observation(subject=subject))) == ["Observation.subject"]


def test_subject_urn_resolving_to_another_type_is_rejected() -> None:
    """A urn:uuid subject that resolves to a Device entry is rejected at the entry's subject."""
    device_urn = "urn:uuid:9a8b7c6d-1111-4222-8333-444455556666"
    device = {"fullUrl": device_urn, "resource": {"resourceType": "Device"}}
    obs = {"resource": observation(subject={"reference": device_urn})}
    rejected = rejection(bundle("collection", device, obs))
    assert expressions(rejected) == ["Bundle.entry[1].resource.subject"]


def test_subject_urn_that_resolves_to_nothing_is_rejected() -> None:
    """A urn:uuid subject with no matching fullUrl in the Bundle is rejected."""
    obs = {"resource": observation(subject={"reference": "urn:uuid:0000-missing"})}
    rejected = rejection(bundle("collection", obs))
    assert rejected.status == 422
    assert codes(rejected) == ["invalid"]


def test_unparseable_subject_reference_is_rejected() -> None:
    """A subject reference that names no resource type is rejected."""
    rejected = rejection(observation(subject={"reference": "somebody"}))
    assert expressions(rejected) == ["Observation.subject"]


def test_encounter_must_reference_an_encounter() -> None:
    """Observation.encounter pointing at a Patient is rejected."""
    rejected = rejection(observation(encounter={"reference": "Patient/p1"}))
    assert expressions(rejected) == ["Observation.encounter"]


@pytest.mark.parametrize("bundle_type", ["transaction", "batch"])
def test_transaction_and_batch_entries_need_request(bundle_type: str) -> None:
    """Entries of a transaction or batch without request are a 422 at Bundle.entry[i].request."""
    with_request = {
        "resource": observation(),
        "request": {"method": "POST", "url": "Observation"},
    }
    rejected = rejection(bundle(bundle_type, with_request, {"resource": observation(id="x")}))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.entry[1].request"]
    assert codes(rejected) == ["required"]


def test_request_method_must_be_an_http_verb() -> None:
    """Bundle.entry.request.method outside the http-verb value set is rejected."""
    entry = {"resource": observation(), "request": {"method": "SEND", "url": "Observation"}}
    assert expressions(rejection(bundle("batch", entry))) == ["Bundle.entry[0].request.method"]


def test_entry_without_resource_is_rejected() -> None:
    """A Bundle entry without a resource (e.g. a GET in a batch) is rejected."""
    entry = {"request": {"method": "GET", "url": "Patient/p1"}}
    assert expressions(rejection(bundle("batch", entry))) == ["Bundle.entry[0].resource"]


def test_all_problems_of_a_bundle_are_reported_together() -> None:
    """Every entry's coded-value problem is in one OperationOutcome."""
    entries = [{"resource": observation(id=f"o{i}", status="bogus")} for i in range(3)]
    rejected = rejection(bundle("collection", *entries))
    assert len(rejected.outcome["issue"]) == 3


def test_diagnostics_never_carry_patient_data() -> None:
    """Rejections name paths and rules, not the offending values (which may be patient data)."""
    patient = json.loads(fixture("vitals-bundle-high.json"))["entry"][0]["resource"]
    patient["birthDate"] = "Thornbury-1948-03-14"
    patient["telecom"][0]["value"] = {"number": "+44 7700 900461"}
    patient["identifier"][0]["value"] = ["MRN-4471902"]
    rejected = rejection(patient)
    text = json.dumps(rejected.outcome)
    assert rejected.status == 422
    for value in PHI:
        assert value not in text
    assert "Patient.birthDate" in expressions(rejected)


# --- how many objects and arrays --------------------------------------------------------------


def test_too_many_containers_are_413_before_the_json_is_decoded() -> None:
    """The node count comes first: a body of brackets that is not even JSON is 413, not 400."""
    with pytest.raises(FhirRejected) as caught:
        resources(b"[{" * 60, limits=Limits(max_nodes=100))
    assert caught.value.status == 413
    (issue,) = caught.value.outcome["issue"]
    assert issue["code"] == "too-costly"
    assert "at most 100" in issue["diagnostics"]
    assert rejection(b"[{" * 40).status == 400  # under the limit: the JSON error as before


def test_a_bundle_at_the_entry_limit_is_far_below_the_node_limit() -> None:
    """1000 entries of the high-risk vitals Bundle hold about 13,000 objects and arrays: the
    default node limit (100,000) refuses none of them, and 1001 entries are still 413 for
    their number."""
    base = json.loads(fixture("vitals-bundle-high.json"))
    entries = (base["entry"] * 101)[:1001]
    raw = json.dumps(base | {"entry": entries[:1000]})
    assert raw.count("{") + raw.count("[") < Limits().max_nodes / 5
    with pytest.raises(FhirRejected) as caught:
        resources(json.dumps(base | {"entry": entries}).encode())
    assert caught.value.outcome["issue"][0]["expression"] == ["Bundle.entry"]


# --- what parsing gives ------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALID_FIXTURES)
def test_valid_fixtures_parse(name: str) -> None:
    """Every valid fixture parses into resources."""
    assert resources(fixture(name))


def test_bundle_entries_are_returned_with_their_location() -> None:
    """A Bundle gives its entries, each with its FHIRPath and fullUrl."""
    parsed = resources(fixture("vitals-bundle-high.json"))
    assert [p.resource_type for p in parsed[:3]] == ["Patient", "Encounter", "Observation"]
    assert parsed[2].expression == "Bundle.entry[2].resource"
    assert parsed[2].full_url.endswith("/Observation/example-high-rr")  # type: ignore[union-attr]
    assert parsed[2].reference == "Observation/example-high-rr"
    assert parsed[2].subject_reference == "Patient/example-high"
    assert parsed[2].encounter_reference == "Encounter/example-high-admission"


def test_single_resource_is_returned_alone() -> None:
    """A single resource is returned as one item located at its type."""
    [parsed] = resources(fixture("observation-heart-rate.json"))
    assert parsed.expression == "Observation"
    assert parsed.full_url is None
    assert parsed.subject_reference == "Patient/example-high"


def test_urn_subject_resolves_to_the_patient_id() -> None:
    """A urn:uuid subject becomes Patient/<id> of the entry with that fullUrl."""
    parsed = resources(fixture("vitals-bundle-low.json"))
    observations = [p for p in parsed if p.resource_type == "Observation"]
    assert {p.subject_reference for p in observations} == {"Patient/example-low"}
    assert all(p.reference and p.reference.startswith("urn:uuid:") for p in observations)


def test_urn_subject_of_a_patient_without_id_is_rejected() -> None:
    """A urn subject whose Patient entry has no id is a 422 at the subject: a report could only
    repeat the urn, which names nobody outside the Bundle (the e2e fuzzing found such a report)."""
    urn = "urn:uuid:6f1c2b9e-3d4a-4c1e-9f0b-2a7d5e8c1b34"
    patient = {"fullUrl": urn, "resource": {"resourceType": "Patient"}}
    obs = {"resource": observation(subject={"reference": urn})}
    rejected = rejection(bundle("collection", patient, obs))
    assert rejected.status == 422
    assert expressions(rejected) == ["Bundle.entry[1].resource.subject"]


def test_absolute_patient_reference_is_kept_as_written() -> None:
    """An absolute Patient URL is a Patient reference, kept as written."""
    url = "https://ehr.example/fhir/Patient/p1"
    [parsed] = resources(json.dumps(observation(subject={"reference": url})).encode())
    assert parsed.subject_reference == url


def test_contained_patient_subject_is_accepted_but_not_usable() -> None:
    """A subject pointing at a contained Patient is valid, but gives no reference downstream."""
    contained = [{"resourceType": "Patient", "id": "pat"}]
    resource = observation(contained=contained, subject={"reference": "#pat"})
    [parsed] = resources(json.dumps(resource).encode())
    assert parsed.subject_reference is None


def test_fhirpath_maps_pydantic_locations() -> None:
    """Pydantic locations become FHIRPath: indexes in brackets, Python names as JSON names."""
    assert fhirpath("Bundle", ("entry", 3, "resource", "valueQuantity", "code")) == (
        "Bundle.entry[3].resource.valueQuantity.code"
    )
    assert fhirpath("Observation", ("resource_type",)) == "Observation.resourceType"
    assert fhirpath("Observation", ("function-after[validate(), str]", "status")) == (
        "Observation.status"
    )
