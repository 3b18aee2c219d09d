"""A batch answered entry by entry (parse's ``isolate_entries``): invalid entries are set aside
with their own status and issues, the others go on; anything else is still rejected whole."""

from __future__ import annotations

import json
from typing import Any

import pytest

from medmesh_contracts.events import FhirVersion
from medmesh_ingest.outcomes import FhirRejected, Issue
from medmesh_ingest.validation import (
    EntryFailure,
    Limits,
    Payload,
    entry_failures,
    entry_of,
    issue_entry,
    parse,
)

LIMITS = Limits()
PATIENT_URN = "urn:uuid:5b8e3c1e-0000-4000-8000-000000000001"


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


def entry(resource: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "POST", "url": "Observation"}, **extra}


def bundle(bundle_type: str, *entries: dict[str, Any], **extra: Any) -> bytes:
    body = {"resourceType": "Bundle", "type": bundle_type, "entry": list(entries), **extra}
    return json.dumps(body).encode()


def isolated(raw: bytes, version: FhirVersion = "R4B", limits: Limits = LIMITS) -> Payload:
    return parse(raw, None, version, limits, isolate_entries=True)


def kept(payload: Payload) -> list[str]:
    return [r.expression for r in payload.resources]


def failures(payload: Payload) -> dict[int, tuple[int, list[str]]]:
    return {
        f.index: (f.status, [e for i in f.issues for e in i.expression]) for f in payload.failed
    }


def test_an_invalid_code_sets_only_its_entry_aside() -> None:
    """A bogus status in entry 1 of a batch: entry 1 is set aside (422 at its status), 0 and 2
    are kept with their own indexes, and the Bundle's entry count is known."""
    payload = isolated(
        bundle(
            "batch",
            entry(observation(id="a")),
            entry(observation(id="b", status="bogus")),
            entry(observation(id="c")),
        )
    )
    assert kept(payload) == ["Bundle.entry[0].resource", "Bundle.entry[2].resource"]
    assert failures(payload) == {1: (422, ["Bundle.entry[1].resource.status"])}
    assert payload.entries == 3


def test_structure_errors_and_unknown_types_set_their_entries_aside() -> None:
    """An element fhir.resources refuses and a resource type that does not exist fail their own
    entries; the valid entry between them is kept."""
    unknown = {"resource": {"resourceType": "Nonsense"}, "request": {"method": "POST", "url": "x"}}
    payload = isolated(
        bundle(
            "batch",
            entry(observation(id="a", bogusElement=1)),
            entry(observation(id="b")),
            unknown,
        )
    )
    assert kept(payload) == ["Bundle.entry[1].resource"]
    assert failures(payload) == {
        0: (422, ["Bundle.entry[0].resource.bogusElement"]),
        2: (422, ["Bundle.entry[2].resource.resourceType"]),
    }


def test_an_entry_without_request_or_resource_is_set_aside() -> None:
    """A batch entry without request, or without a resource (a GET), fails alone."""
    get = {"request": {"method": "GET", "url": "Patient/p1"}}
    payload = isolated(
        bundle("batch", {"resource": observation(id="a")}, get, entry(observation(id="c")))
    )
    assert kept(payload) == ["Bundle.entry[2].resource"]
    assert failures(payload) == {
        0: (422, ["Bundle.entry[0].request"]),
        1: (422, ["Bundle.entry[1].resource"]),
    }


def test_a_waveform_over_the_limit_sets_its_entry_aside_with_413() -> None:
    """An Observation whose waveform has too many points fails with 413; the next is kept."""
    ecg = observation(
        id="ecg",
        valueQuantity=None,
        valueSampledData={
            "origin": {"value": 0, "unit": "mV"},
            "period": 4,
            "dimensions": 1,
            "data": " ".join(["1"] * 50),
        },
    )
    del ecg["valueQuantity"]
    payload = isolated(
        bundle("batch", entry(ecg), entry(observation(id="b"))),
        limits=Limits(max_waveform_samples=10),
    )
    assert kept(payload) == ["Bundle.entry[1].resource"]
    assert failures(payload) == {0: (413, ["Bundle.entry[0].resource.valueSampledData.data"])}


def test_a_reference_to_an_entry_set_aside_fails_too_and_says_so() -> None:
    """An Observation whose urn:uuid subject is a Patient entry set aside fails as well, told
    that the entry was not accepted."""
    patient = {
        "fullUrl": PATIENT_URN,
        "resource": {"resourceType": "Patient", "id": "p1", "birthDate": "1956-13-45"},
        "request": {"method": "PUT", "url": "Patient/p1"},
    }
    payload = isolated(
        bundle("batch", patient, entry(observation(subject={"reference": PATIENT_URN})))
    )
    assert payload.resources == []
    [(_, issues)] = [(f.index, f.issues) for f in payload.failed if f.index == 1]
    assert "not accepted" in issues[0].diagnostics
    assert "1956-13-45" not in json.dumps([i.diagnostics for f in payload.failed for i in f.issues])


def test_an_r5_batch_is_isolated_too() -> None:
    """R5 batches are read entry by entry the same way."""
    payload = isolated(
        bundle("batch", entry(observation(status="bogus")), entry(observation(id="b"))), "R5"
    )
    assert kept(payload) == ["Bundle.entry[1].resource"]
    assert list(failures(payload)) == [0]


def test_a_bundle_level_error_still_rejects_the_whole_batch() -> None:
    """An error located in no entry (an unknown element of the Bundle) rejects the batch."""
    with pytest.raises(FhirRejected) as caught:
        isolated(bundle("batch", entry(observation()), bogus=1))
    assert caught.value.status == 422


@pytest.mark.parametrize("bundle_type", ["transaction", "collection"])
def test_other_bundles_are_still_rejected_whole(bundle_type: str) -> None:
    """Entry isolation is for batches only: a transaction or collection with one invalid entry
    is rejected as a whole, naming the entry."""
    with pytest.raises(FhirRejected) as caught:
        isolated(bundle(bundle_type, entry(observation(status="bogus")), entry(observation())))
    assert caught.value.status == 422
    assert caught.value.outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource.status"]


def test_without_isolation_a_batch_is_rejected_whole() -> None:
    """The inbound topic's parse (no isolation) rejects a batch with one invalid entry."""
    with pytest.raises(FhirRejected):
        parse(bundle("batch", entry(observation(status="bogus")), entry(observation())))


def test_entry_paths_and_failures_by_entry() -> None:
    """entry_of reads the index of Bundle.entry[i] paths only; entry_failures groups errors by
    entry and gives None when an error lies in no entry."""
    assert entry_of("Bundle.entry[12].resource.status") == 12
    assert entry_of("Bundle.entry[3]") == 3
    assert entry_of("Bundle.entry[3]x") is None
    assert entry_of("Observation.status") is None
    error = Issue("error", "value", "d", ("Bundle.entry[2].resource.status",))
    note = Issue("warning", "incomplete", "d", ("Bundle.entry[4].resource",))
    assert issue_entry(error) == 2
    assert entry_failures(422, [error, note]) == {2: EntryFailure(2, 422, (error,))}
    assert entry_failures(422, [error, Issue("error", "value", "nowhere")]) is None
