"""The whole pipeline on the real Kafka broker and the real Triton server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from fhir.resources.R4B.bundle import Bundle

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.conftest import Record, TopicTap, fixture_with_new_patient

HIGH_RISK_BUNDLE = "vitals-bundle-high.json"


def _resources(report: Record) -> dict[str, dict[str, Any]]:
    bundle = report.json()
    return {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}


def _for_patient(patient_id: str) -> Any:
    def matches(record: Record) -> bool:
        report = _resources(record)["DiagnosticReport"]
        return bool(report["subject"]["reference"] == f"Patient/{patient_id}")

    return matches


async def _post(stack: Stack, payload: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        return await client.post(
            "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
        )


async def test_http_bundle_becomes_exactly_one_valid_report(stack: Stack, tap: TopicTap) -> None:
    """A vital-signs Bundle posted over HTTP comes back as one valid report with the right NEWS2."""
    payload, patient = fixture_with_new_patient(HIGH_RISK_BUNDLE)
    response = await _post(stack, payload)
    assert response.status_code == 202, response.text
    correlation_id = response.headers[h.CORRELATION_ID]
    report = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _for_patient(patient))
    assert report.headers[h.CORRELATION_ID] == correlation_id
    Bundle.model_validate(report.json())
    assert check_report_bundle(report.json()) == []
    observation = _resources(report)["Observation"]
    assert observation["valueInteger"] == 15
    bands = [c["code"] for i in observation["interpretation"] for c in i["coding"]]
    assert "high" in bands
    await asyncio.sleep(2.0)  # time for a duplicate to show up, were there one
    assert len(tap.matching(topics.REPORTS_DIAGNOSTIC, _for_patient(patient))) == 1


async def test_inbound_topic_event_becomes_a_report(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """The same Bundle published to medmesh.fhir.inbound also comes back as a report."""
    payload, patient = fixture_with_new_patient(HIGH_RISK_BUNDLE)
    await producer.send_and_wait(topics.FHIR_INBOUND, payload, key=patient.encode())
    report = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _for_patient(patient))
    assert _resources(report)["Observation"]["valueInteger"] == 15
    assert check_report_bundle(report.json()) == []


async def test_invalid_bundle_gets_operation_outcome_and_nothing_downstream(
    stack: Stack, tap: TopicTap
) -> None:
    """An invalid Bundle is answered 4xx with an OperationOutcome and produces no request."""
    payload, patient = fixture_with_new_patient("bundle-invalid-status.json")
    response = await _post(stack, payload)
    assert 400 <= response.status_code < 500
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any("status" in " ".join(i.get("expression", [])) for i in outcome["issue"])
    await asyncio.sleep(3.0)
    sent = tap.matching(topics.INFERENCE_REQUESTS, lambda r: patient in r.value.decode())
    assert sent == []


async def test_garbage_on_inbound_topic_is_dead_lettered_and_pipeline_keeps_working(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Garbage on medmesh.fhir.inbound lands on medmesh.fhir.invalid; valid events still flow."""
    marker = f"not fhir at all {id(tap)}".encode()
    await producer.send_and_wait(topics.FHIR_INBOUND, marker)
    rejected = await tap.wait_for(
        topics.FHIR_INVALID, lambda r: json.loads(r.value)["raw_value"] == marker.decode()
    )
    event = rejected.json()
    assert event["schema"] == "medmesh.FhirEventRejected/1"
    assert event["operation_outcome"]["resourceType"] == "OperationOutcome"
    payload, patient = fixture_with_new_patient(HIGH_RISK_BUNDLE)
    await producer.send_and_wait(topics.FHIR_INBOUND, payload)
    await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _for_patient(patient))
    assert all(p.running() for p in stack.services.values())


async def test_report_carries_the_trace_ingest_started(stack: Stack, tap: TopicTap) -> None:
    """The trace id in the report's traceparent header equals the one ingest answered with."""
    payload, patient = fixture_with_new_patient(HIGH_RISK_BUNDLE)
    response = await _post(stack, payload)
    assert response.status_code == 202
    report = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _for_patient(patient))
    trace_id = report.headers[h.TRACEPARENT].split("-")[1]
    assert trace_id == response.headers["medmesh-trace-id"]
