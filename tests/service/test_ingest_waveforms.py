"""The ingest app on the in-memory broker with ECG waveforms (FHIR SampledData, R4B and R5)."""

from __future__ import annotations

import json

import httpx

from medmesh_contracts import headers as h
from medmesh_contracts.events import PatientReadingsUpdated, RequestInference
from tests.service.conftest import FIXTURES
from tests.service.test_ingest_app import Harness, running, settings

R4B = {"content-type": "application/fhir+json"}
R5 = {"content-type": "application/fhir+json; fhirVersion=5.0"}


async def _post(harness: Harness, name: str, headers: dict[str, str] = R4B) -> httpx.Response:
    return await harness.client.post(
        "/fhir", content=(FIXTURES / name).read_bytes(), headers=headers
    )


async def test_ecg_observation_becomes_a_request_with_its_samples() -> None:
    """An R4B ECG transaction gets 200 and a transaction-response whose Observation entry is
    202 Accepted naming its request (202 + OperationOutcome before issue 18); the request for
    ecg-rhythm carries 2500 mV samples 4 ms apart, and the patient's state keeps them (for a
    later request built from the state)."""
    async with running(settings()) as ingest:
        response = await _post(ingest, "ecg-sinus.json")
        assert response.status_code == 200, response.text
        (raw,) = ingest.captured.requests
        (state,) = ingest.captured.states
    request = RequestInference.model_validate_json(raw)
    assert request.correlation_id == response.headers[h.CORRELATION_ID]
    answer = response.json()
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "202 Accepted"]
    named = json.dumps(answer["entry"][1]["response"]["outcome"])
    assert f"ecg-rhythm request {request.correlation_id}" in named
    assert request.model == "ecg-rhythm"
    (lead,) = request.inputs
    assert (lead.name, lead.unit, lead.period_ms) == ("ecg_lead_ii", "mV", 4.0)
    assert lead.samples is not None
    assert len(lead.samples) == 2500
    (kept,) = PatientReadingsUpdated.model_validate_json(state).readings
    assert kept.samples == lead.samples


async def test_r5_ecg_by_content_type_is_scored() -> None:
    """An R5 ECG transaction (interval + intervalUnit) sent with fhirVersion=5.0 gets 200, a
    transaction-response with its Observation 202 Accepted, and an R5 request."""
    async with running(settings()) as ingest:
        response = await _post(ingest, "ecg-af-r5.json", R5)
        assert response.status_code == 200, response.text
        (raw,) = ingest.captured.requests
    answer = response.json()
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "202 Accepted"]
    request = RequestInference.model_validate_json(raw)
    assert request.source.fhir_version == "R5"
    assert request.inputs[0].period_ms == 4.0


async def test_waveform_over_the_sample_limit_gets_413_naming_it() -> None:
    """An ECG with more points than MEDMESH_MAX_WAVEFORM_SAMPLES is 413 + OperationOutcome."""
    async with running(settings(max_waveform_samples=1000)) as ingest:
        response = await _post(ingest, "ecg-sinus.json")
        assert ingest.captured.requests == []
    assert response.status_code == 413
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    (issue,) = outcome["issue"]
    assert issue["code"] == "too-costly"
    assert issue["expression"] == ["Bundle.entry[1].resource.component[0].valueSampledData.data"]


async def test_inbound_waveform_over_the_limit_is_dead_lettered() -> None:
    """The same oversized ECG on medmesh.fhir.inbound goes to medmesh.fhir.invalid whole."""
    async with running(settings(max_waveform_samples=1000)) as ingest:
        raw = (FIXTURES / "ecg-af.json").read_bytes()
        await ingest.inbound(raw)
        assert ingest.captured.requests == []
        (rejected,) = ingest.captured.invalid
    event = json.loads(rejected)
    assert event["schema"] == "medmesh.FhirEventRejected/1"
    assert event["raw_value"] == raw.decode()
    assert event["operation_outcome"]["issue"][0]["code"] == "too-costly"
