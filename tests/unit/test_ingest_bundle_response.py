"""Batch and transaction Bundles answered entry by entry (IngestService with answer_bundles, as
the HTTP path runs it): batch-response / transaction-response Bundles, valid FHIR per version."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.R4B.bundle import Bundle as R4BBundle

from medmesh_contracts.events import (
    FhirVersion,
    PatientReadingsUpdated,
    Producer,
    RequestInference,
    SourceContext,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.bundle_response import status_line
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Answer, Context, IngestService, Outgoing
from medmesh_ingest.validation import Limits

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"
SPECS = load_specs(ROOT / "deploy" / "models")
RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
_STATUS = re.compile(r"^[1-5]\d\d( .*)?$")


def response_problems(
    answer: dict[str, Any], request: dict[str, Any], version: FhirVersion
) -> list[str]:
    """What makes ``answer`` not a valid response to the batch or transaction ``request``:
    fhir.resources validation in ``version``, the Bundle invariants a response can break
    (bdl-1 total, bdl-2 search, bdl-3 request, bdl-4 / R5 bdl-3d response, bdl-5 content),
    entry.response.status starting with a 3-digit HTTP code, outcomes that are
    OperationOutcomes, and one entry per request entry."""
    problems: list[str] = []
    model = R5Bundle if version == "R5" else R4BBundle
    try:
        model.model_validate(answer)
    except ValueError as exc:
        problems.append(f"not a valid {version} Bundle: {exc}")
    if answer.get("type") != f"{request['type']}-response":
        problems.append(f"type {answer.get('type')} answers a {request['type']}")
    if "total" in answer:
        problems.append("bdl-1: total outside searchset/history")
    entries = answer.get("entry", [])
    if len(entries) != len(request.get("entry", [])):
        problems.append(f"{len(entries)} response entries for {len(request['entry'])}")
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if "search" in entry:
            problems.append(f"bdl-2: {where}.search")
        if "request" in entry:
            problems.append(f"bdl-3: {where}.request in a response")
        response = entry.get("response")
        if not isinstance(response, dict) or "status" not in response:
            problems.append(f"bdl-4: {where}.response.status missing")
            continue
        if not _STATUS.match(response["status"]):
            problems.append(f"{where}.response.status does not start with an HTTP code")
        outcome = response.get("outcome")
        if outcome is not None and outcome.get("resourceType") != "OperationOutcome":
            problems.append(f"{where}.response.outcome is not an OperationOutcome")
    return problems


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


class Kafka:
    """Takes every publish (or fails them all)."""

    def __init__(self) -> None:
        self.requests: list[RequestInference] = []
        self.states: list[PatientReadingsUpdated] = []

    async def publish(
        self,
        outgoing: Sequence[Outgoing],
        states: Sequence[PatientReadingsUpdated],
        payloads: int,
    ) -> list[int | None]:
        self.requests.extend(item.request for item in outgoing)
        self.states.extend(states)
        return [None] * len(states)


def _service(kafka: Kafka) -> IngestService:
    return IngestService(
        specs=SPECS,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="test"),
        store=ReadingsStore(),
        publish=kafka.publish,
        limits=Limits(),
        lookback=timedelta(hours=4),
    )


def handle(
    payload: dict[str, Any],
    version: FhirVersion = "R4B",
    *,
    kafka: Kafka | None = None,
    answer_bundles: bool = True,
) -> Answer:
    context = Context(
        SourceContext(channel="http", fhir_version=version),
        version,
        answer_bundles=answer_bundles,
    )
    service = _service(kafka or Kafka())
    return asyncio.run(service.handle(json.dumps(payload).encode(), context, RECEIVED))


def statuses(answer: Answer) -> list[str]:
    assert answer.bundle is not None
    return [e["response"]["status"] for e in answer.bundle["entry"]]


def outcome_text(answer: Answer, index: int) -> str:
    assert answer.bundle is not None
    return json.dumps(answer.bundle["entry"][index]["response"].get("outcome", {}))


def with_entries(name: str, *extra: dict[str, Any]) -> dict[str, Any]:
    bundle = fixture(name)
    bundle["entry"].extend(extra)
    return bundle


def spo2_entry(value: float, *, status: str = "final", id_: str = "extra-spo2") -> dict[str, Any]:
    """An SpO2 Observation of the medium fixture's patient, as a batch entry."""
    entry: dict[str, Any] = copy.deepcopy(fixture("vitals-bundle-medium.json")["entry"][2])
    entry["resource"].update(id=id_, status=status, code=_spo2_code())
    entry["resource"]["valueQuantity"]["value"] = value
    entry["fullUrl"] = f"https://ehr.st-elsewhere.example/fhir/Observation/{id_}"
    entry["request"]["url"] = f"Observation/{id_}"
    return entry


def _spo2_code() -> dict[str, Any]:
    return {"coding": [{"system": "http://loinc.org", "code": "59408-5"}]}


def test_a_batch_gets_a_batch_response_with_an_entry_per_entry() -> None:
    """A complete vitals batch: 200, a valid R4B batch-response, the Patient entry 200 OK
    without outcome, each Observation 202 Accepted naming the one request; no location."""
    kafka = Kafka()
    request = fixture("vitals-bundle-medium.json")
    answer = handle(request, kafka=kafka)
    assert answer.status == 200
    assert answer.bundle is not None
    assert response_problems(answer.bundle, request, "R4B") == []
    assert statuses(answer) == ["200 OK"] + ["202 Accepted"] * 7
    assert "outcome" not in answer.bundle["entry"][0]["response"]
    [sent] = kafka.requests
    assert all(sent.correlation_id in outcome_text(answer, i) for i in range(1, 8))
    assert all("location" not in e["response"] for e in answer.bundle["entry"])


def test_invalid_batch_entries_fail_alone_and_the_rest_is_scored() -> None:
    """A batch with a bogus-status entry and an impossible SpO2 entry: those two are 422 with
    their FHIRPaths, the others are processed and the request is sent without them."""
    kafka = Kafka()
    request = with_entries(
        "vitals-bundle-medium.json",
        spo2_entry(94, status="bogus", id_="bad-status"),
        spo2_entry(140, id_="impossible"),
    )
    answer = handle(request, kafka=kafka)
    assert answer.status == 200
    assert answer.bundle is not None
    assert response_problems(answer.bundle, request, "R4B") == []
    assert statuses(answer)[8:] == [status_line(422)] * 2
    assert "Bundle.entry[8].resource.status" in outcome_text(answer, 8)
    assert "Bundle.entry[9].resource.valueQuantity.value" in outcome_text(answer, 9)
    [sent] = kafka.requests
    assert {i.name: i.value for i in sent.inputs}["spo2"] == 95  # not 140
    assert statuses(answer)[1:8] == ["202 Accepted"] * 7


def test_a_batch_whose_entries_all_fail_is_answered_200_and_sends_nothing() -> None:
    """Every entry invalid: still a batch-response (200), every entry 4xx, nothing published."""
    kafka = Kafka()
    request = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [spo2_entry(140, id_="a"), spo2_entry(96, status="bogus", id_="b")],
    }
    answer = handle(request, kafka=kafka)
    assert answer.status == 200
    assert statuses(answer) == [status_line(422)] * 2
    assert kafka.requests == []
    assert kafka.states == []


def test_an_incomplete_batch_tells_each_observation_what_is_missing() -> None:
    """Readings kept for later: each Observation entry is 200 OK with the missing inputs."""
    request = fixture("vitals-bundle-medium.json")
    del request["entry"][2]  # SpO2
    answer = handle(request)
    assert statuses(answer) == ["200 OK"] * 7
    assert all("spo2" in outcome_text(answer, i) for i in range(1, 7))


def test_a_transaction_with_an_invalid_entry_is_rejected_whole() -> None:
    """All or nothing: one impossible value (or one bogus code) rejects the transaction with a
    single OperationOutcome (422) naming the entry, and nothing is published."""
    for bad in (spo2_entry(140), spo2_entry(94, status="bogus")):
        kafka = Kafka()
        request = with_entries("vitals-bundle-low.json", bad)
        request["entry"][-1]["resource"]["subject"] = {"reference": "Patient/example-low"}
        answer = handle(request, kafka=kafka)
        assert answer.status == 422
        assert answer.bundle is None
        assert answer.body["resourceType"] == "OperationOutcome"
        assert "Bundle.entry[8]" in json.dumps(answer.body)
        assert kafka.requests == []
        assert kafka.states == []


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("vitals-bundle-low.json", "R4B"),
        ("transaction-bundle.json", "R4B"),
        ("ecg-sinus.json", "R4B"),
        ("ecg-af-r5.json", "R5"),
        ("ecg-sinus-r5.json", "R5"),
    ],
)
def test_a_valid_transaction_gets_a_transaction_response(name: str, version: FhirVersion) -> None:
    """A valid transaction (R4B or R5): 200, a transaction-response valid in its version, the
    Patient entry 200 OK and the scored Observations 202 Accepted."""
    request = fixture(name)
    answer = handle(request, version)
    assert answer.status == 200
    assert answer.bundle is not None
    assert response_problems(answer.bundle, request, version) == []
    assert statuses(answer)[0] == "200 OK"
    assert "202 Accepted" in statuses(answer)
    assert len(answer.requests) == 1


def test_entries_without_id_or_full_url_are_matched_by_their_patient() -> None:
    """A transaction whose Observations have neither id nor fullUrl (no request can name them):
    they count as used when their patient's request has inputs without a source."""
    request = fixture("vitals-bundle-medium.json")
    request["type"] = "transaction"
    for entry in request["entry"][1:]:
        del entry["fullUrl"]
        del entry["resource"]["id"]
    answer = handle(request)
    assert statuses(answer) == ["200 OK"] + ["202 Accepted"] * 7


def test_an_order_entry_is_accepted_with_its_request() -> None:
    """A ServiceRequest order in a batch after the readings: its request answers it (202)."""
    request = fixture("vitals-bundle-medium.json")
    order = fixture("service-request-order.json")
    order["subject"] = {"reference": "Patient/example-medium"}
    request["entry"].append(
        {"resource": order, "request": {"method": "POST", "url": "ServiceRequest"}}
    )
    answer = handle(request)
    assert statuses(answer)[8] == "202 Accepted"
    assert "deterioration request" in outcome_text(answer, 8)
    assert any(r.based_on_reference == "ServiceRequest/example-order-1" for r in answer.requests)


def test_no_patient_data_in_the_response() -> None:
    """Names, birth date and an invalid value of the Patient never appear in the answer."""
    request = fixture("transaction-bundle.json")
    request["type"] = "batch"
    request["entry"][0]["resource"]["birthDate"] = "1956-13-45"  # invalid: that entry fails
    answer = handle(request)
    text = json.dumps(answer.body)
    assert statuses(answer)[0] == status_line(422)
    for value in ("Okonkwo", "Adaeze", "1956-13-45", "1956-07-02"):
        assert value not in text


def test_without_answer_bundles_a_batch_gets_an_operation_outcome() -> None:
    """The inbound topic's way (no answer_bundles): a batch is answered as before, 202 with an
    OperationOutcome, and one invalid entry rejects it whole."""
    answer = handle(fixture("vitals-bundle-medium.json"), answer_bundles=False)
    assert (answer.status, answer.bundle) == (202, None)
    assert answer.body["resourceType"] == "OperationOutcome"
    bad = with_entries("vitals-bundle-medium.json", spo2_entry(140))
    assert handle(bad, answer_bundles=False).status == 422


def test_the_response_check_catches_broken_responses() -> None:
    """response_problems flags a wrong type, a missing status, a request element, a status
    without an HTTP code and a missing entry."""
    request = {"resourceType": "Bundle", "type": "batch", "entry": [{}, {}, {}]}
    broken = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"location": "x"}},
            {"response": {"status": "OK"}, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    problems = " ".join(response_problems(broken, request, "R4B"))
    for expected in ("answers a batch", "bdl-4", "bdl-3", "HTTP code", "2 response entries"):
        assert expected in problems
