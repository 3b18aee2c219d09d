"""The ingest app on the in-memory broker: HTTP answers and what reaches Kafka."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import RequestInference
from medmesh_ingest.app import create_app
from medmesh_ingest.settings import IngestSettings
from tests.service.conftest import FIXTURES, SPECS_DIR


@dataclass
class Captured:
    """Values published to the topics ingest writes."""

    requests: list[bytes] = field(default_factory=list)
    invalid: list[bytes] = field(default_factory=list)


@dataclass
class Harness:
    """An HTTP client on the ingest app and the in-memory broker behind it."""

    client: httpx.AsyncClient
    broker: KafkaBroker
    captured: Captured


@pytest.fixture
async def ingest() -> AsyncIterator[Harness]:
    """The real ingest app with its broker replaced by faststream's in-memory broker."""
    app = create_app(IngestSettings(model_specs_dir=SPECS_DIR))
    broker: KafkaBroker = app.state.broker
    captured = Captured()

    @broker.subscriber(topics.INFERENCE_REQUESTS)
    async def requests(message: KafkaMessage) -> None:
        captured.requests.append(message.body)

    @broker.subscriber(topics.FHIR_INVALID)
    async def invalid(message: KafkaMessage) -> None:
        captured.invalid.append(message.body)

    async with TestKafkaBroker(broker):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
            yield Harness(client, broker, captured)


async def _post(harness: Harness, name: str, path: str = "/fhir") -> httpx.Response:
    return await harness.client.post(
        path,
        content=(FIXTURES / name).read_bytes(),
        headers={"content-type": "application/fhir+json"},
    )


async def test_complete_vitals_are_accepted_and_published(ingest: Harness) -> None:
    """A complete vitals Bundle gets 202 and one RequestInference keyed by pseudonym."""
    response = await _post(ingest, "vitals-bundle-high.json")
    assert response.status_code == 202
    assert response.json()["resourceType"] == "OperationOutcome"
    assert len(ingest.captured.requests) == 1
    request = RequestInference.model_validate_json(ingest.captured.requests[0])
    assert request.correlation_id == response.headers[h.CORRELATION_ID]
    assert request.subject_reference == "Patient/example-high"
    assert "example-high" not in request.patient_pseudonym
    assert [i.name for i in request.inputs][:2] == ["respiratory_rate", "spo2"]


async def test_missing_input_gets_a_warning_and_nothing_is_published(ingest: Harness) -> None:
    """Valid FHIR without SpO2 gets 200 with a warning naming spo2, and no request."""
    response = await _post(ingest, "bundle-missing-spo2.json")
    assert response.status_code == 200
    issues = response.json()["issue"]
    assert any(i["severity"] == "warning" and "spo2" in i["diagnostics"] for i in issues)
    assert ingest.captured.requests == []


async def test_invalid_fhir_gets_422_with_a_fhirpath_and_nothing_is_published(
    ingest: Harness,
) -> None:
    """An Observation with status 'bogus' is answered 422 naming its FHIRPath."""
    response = await _post(ingest, "bundle-invalid-status.json")
    assert response.status_code == 422
    expressions = [e for i in response.json()["issue"] for e in i.get("expression", [])]
    assert "Bundle.entry[1].resource.status" in expressions
    assert ingest.captured.requests == []


async def test_garbage_gets_400(ingest: Harness) -> None:
    """A body that is not JSON is answered 400 with an OperationOutcome."""
    response = await _post(ingest, "not-fhir.txt")
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_other_fhir_versions_get_415(ingest: Harness) -> None:
    """A content type naming fhirVersion 5.0 is answered 415."""
    response = await ingest.client.post(
        "/fhir", content=b"{}", headers={"content-type": "application/fhir+json; fhirVersion=5.0"}
    )
    assert response.status_code == 415


async def test_capability_statement_names_r4b(ingest: Harness) -> None:
    """GET /fhir/metadata is a CapabilityStatement for FHIR 4.3.0."""
    response = await ingest.client.get("/fhir/metadata")
    assert response.json()["resourceType"] == "CapabilityStatement"
    assert response.json()["fhirVersion"] == "4.3.0"


async def test_inbound_garbage_is_dead_lettered_with_its_outcome(ingest: Harness) -> None:
    """Garbage on medmesh.fhir.inbound becomes a FhirEventRejected on medmesh.fhir.invalid."""
    await ingest.broker.publish(b"\xff\xfe not fhir", topic=topics.FHIR_INBOUND)
    assert len(ingest.captured.invalid) == 1
    event = json.loads(ingest.captured.invalid[0])
    assert event["schema"] == "medmesh.FhirEventRejected/1"
    assert event["raw_encoding"] == "base64"
    assert event["operation_outcome"]["issue"][0]["severity"] in ("error", "fatal")
    assert ingest.captured.requests == []


async def test_inbound_vitals_become_a_request(ingest: Harness) -> None:
    """A valid Bundle on medmesh.fhir.inbound becomes a RequestInference."""
    await ingest.broker.publish(
        (FIXTURES / "vitals-bundle-medium.json").read_bytes(), topic=topics.FHIR_INBOUND
    )
    assert len(ingest.captured.requests) == 1
    assert (
        RequestInference.model_validate_json(ingest.captured.requests[0]).source.channel == "kafka"
    )
