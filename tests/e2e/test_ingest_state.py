"""Ingest's front door on the real stack: one reading at a time across a kill -9, Subscriptions."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import topics
from medmesh_contracts.events import RequestInference
from tests.e2e.conftest import FIXTURES, Record, TopicTap, fixture_with_new_patient

ONE_BY_ONE = ["rr", "spo2", "o2-flow", "temp", "bp", "hr", "acvpu"]
FHIR = {"content-type": "application/fhir+json"}


def _reading(name: str, patient: str) -> bytes:
    observation: dict[str, Any] = json.loads((FIXTURES / "one-by-one" / f"{name}.json").read_text())
    observation["subject"] = {"reference": f"Patient/{patient}"}
    observation["id"] = f"{patient}-{name}"
    return json.dumps(observation).encode()


def _requests_for(tap: TopicTap, patient: str) -> list[Record]:
    return tap.matching(
        topics.INFERENCE_REQUESTS, lambda r: f'"Patient/{patient}"' in r.value.decode()
    )


async def _post(stack: Stack, payload: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        return await client.post("/fhir", content=payload, headers=FHIR)


async def test_pending_readings_survive_kill_9_of_ingest(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Readings sent one by one (HTTP and Kafka) survive kill -9; exactly one request follows."""
    patient = f"e2e-state-{uuid.uuid4().hex[:12]}"
    for name in ONE_BY_ONE[:3]:
        response = await _post(stack, _reading(name, patient))
        assert response.status_code == 200, response.text
    await producer.send_and_wait(
        topics.FHIR_INBOUND, _reading(ONE_BY_ONE[3], patient), key=patient.encode()
    )
    await producer.send_and_wait(
        topics.FHIR_INBOUND, _reading(ONE_BY_ONE[4], patient), key=patient.encode()
    )
    stack.kill_service("ingest")  # SIGKILL, possibly in the middle of the Kafka arrivals
    stack.restart_service("ingest")
    for name in ONE_BY_ONE[5:]:
        response = await _post(stack, _reading(name, patient))
        assert response.status_code in (200, 202), response.text
    record = await tap.wait_for(
        topics.INFERENCE_REQUESTS, lambda r: f'"Patient/{patient}"' in r.value.decode()
    )
    request = RequestInference.model_validate_json(record.value)
    values = {i.name: i.value for i in request.inputs}
    assert values["respiratory_rate"] == 24  # sent before the kill
    assert values["systolic_bp"] == 98  # sent over Kafka around the kill
    assert values["not_alert"] == 1  # sent after the restart
    await asyncio.sleep(3.0)  # time for a duplicate to show up, were there one
    assert len(_requests_for(tap, patient)) == 1
    assert stack.services["ingest"].running()


async def test_subscription_rest_hook_gets_reports(stack: Stack, tap: TopicTap) -> None:
    """A handshake is acknowledged; an event-notification becomes a report; a resend does not."""
    handshake = await _post(stack, (FIXTURES / "subscription-handshake.json").read_bytes())
    assert handshake.status_code == 200
    payload, patient = fixture_with_new_patient("subscription-event-full.json")
    response = await _post(stack, payload)
    assert response.status_code == 202, response.text
    report = await tap.wait_for(
        topics.REPORTS_DIAGNOSTIC, lambda r: f'"Patient/{patient}"' in r.value.decode()
    )
    assert report.json()["resourceType"] == "Bundle"
    resent = await _post(stack, payload)
    assert resent.status_code == 200
    await asyncio.sleep(2.0)
    assert len(_requests_for(tap, patient)) == 1
