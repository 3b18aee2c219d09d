"""Ingest's front door on the real stack: one reading at a time across a kill -9, Subscriptions
(their event counters across a restart too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.process import ManagedProcess
from medmesh_cli.devstack.stack import ServiceSpec, Stack, service_environment
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


FIXTURE_SUBSCRIPTION = b"https://ehr.st-elsewhere.example/fhir/Subscription/medmesh-vitals"


async def test_a_gap_spanning_a_restart_of_ingest_is_still_found(stack: Stack) -> None:
    """Events 1-7 of a subscription, ingest restarted, then event 10: the answer says events 8
    to 9 never arrived, so the highest number handled came back from medmesh.ingest.subscriptions
    (read in memory only, event 10 would be the first seen of it and nothing would be missed)."""
    subscription = f"https://ehr.st-elsewhere.example/fhir/Subscription/e2e-{uuid.uuid4().hex}"
    full, _ = fixture_with_new_patient("subscription-event-full.json")
    gap, _ = fixture_with_new_patient("subscription-event-gap.json")
    first = await _post(stack, full.replace(FIXTURE_SUBSCRIPTION, subscription.encode()))
    assert first.status_code == 202, first.text
    stack.restart_service("ingest")
    after = await _post(stack, gap.replace(FIXTURE_SUBSCRIPTION, subscription.encode()))
    assert after.status_code in (200, 202), after.text
    assert "events 8 to 9 of this subscription never arrived" in after.text


@contextlib.asynccontextmanager
async def _second_ingest(stack: Stack) -> AsyncIterator[str]:
    """Another ingest instance on the same stack (same group, own port) while open: its URL."""
    port = stack.config.ports.ingest + 50
    spec = ServiceSpec(
        "ingest-2",
        "medmesh_ingest",
        port,
        {"MEDMESH_INGEST_PORT": str(port), "MEDMESH_INSTANCE_ID": "ingest-2"},
    )
    process = ManagedProcess(
        spec.name,
        [sys.executable, "-m", spec.module],
        stack.config.state_dir / "ingest-2.log",
        env=service_environment(stack.config, spec),
        cwd=repo_root(),
    )
    process.start()
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(150):
                assert process.running(), process.log_tail()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 204:
                        break
                await asyncio.sleep(0.2)
            else:
                pytest.fail(f"the second ingest never got ready:\n{process.log_tail()}")
        yield f"http://127.0.0.1:{port}"
    finally:
        await asyncio.to_thread(process.stop)


async def test_two_ingest_instances_share_one_patients_readings(
    stack: Stack, tap: TopicTap
) -> None:
    """Readings of one patient sent to two ingest instances one after the other merge into
    exactly one complete request: each instance follows the other's state writes."""
    patient = f"e2e-two-{uuid.uuid4().hex[:12]}"
    async with _second_ingest(stack) as second_url, httpx.AsyncClient(timeout=30) as client:
        for name in ONE_BY_ONE[:4]:
            response = await client.post(
                f"{second_url}/fhir", content=_reading(name, patient), headers=FHIR
            )
            assert response.status_code == 200, response.text
        await asyncio.sleep(1.0)  # one after the other, not at the same moment
        answers = []
        for name in ONE_BY_ONE[4:]:
            response = await client.post(
                f"{stack.config.ingest_url}/fhir", content=_reading(name, patient), headers=FHIR
            )
            answers.append(response.status_code)
        assert answers == [200, 200, 202], answers  # complete with the last reading
    record = await tap.wait_for(
        topics.INFERENCE_REQUESTS, lambda r: f'"Patient/{patient}"' in r.value.decode()
    )
    request = RequestInference.model_validate_json(record.value)
    assert {i.name for i in request.inputs} >= {
        "respiratory_rate",
        "spo2",
        "supplemental_oxygen",
        "temperature",
        "systolic_bp",
        "heart_rate",
        "not_alert",
    }
    await asyncio.sleep(2.0)
    assert len(_requests_for(tap, patient)) == 1


def _bundle_of(names: list[str], patient: str) -> bytes:
    entries = [{"resource": json.loads(_reading(name, patient))} for name in names]
    return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()


async def test_two_ingest_instances_merging_one_patient_at_once_lose_no_reading(
    stack: Stack, tap: TopicTap
) -> None:
    """Readings of one patient reaching two instances at the same moment (each merging before
    it saw the other's write) are combined by both: the last reading completes the set."""
    patient = f"e2e-race-{uuid.uuid4().hex[:12]}"
    async with _second_ingest(stack) as second_url, httpx.AsyncClient(timeout=30) as client:
        at_once = await asyncio.gather(
            client.post(
                f"{second_url}/fhir", content=_bundle_of(ONE_BY_ONE[:3], patient), headers=FHIR
            ),
            client.post(
                f"{stack.config.ingest_url}/fhir",
                content=_bundle_of(ONE_BY_ONE[3:6], patient),
                headers=FHIR,
            ),
        )
        assert [r.status_code for r in at_once] == [200, 200], [r.text for r in at_once]
        await asyncio.sleep(1.0)  # each instance follows the other's write
        last = await client.post(
            f"{second_url}/fhir", content=_reading(ONE_BY_ONE[6], patient), headers=FHIR
        )
        assert last.status_code == 202, last.text
    record = await tap.wait_for(
        topics.INFERENCE_REQUESTS, lambda r: f'"Patient/{patient}"' in r.value.decode()
    )
    request = RequestInference.model_validate_json(record.value)
    assert {i.name for i in request.inputs if i.observed_at is not None} >= {
        "respiratory_rate",
        "spo2",
        "temperature",
        "systolic_bp",
        "heart_rate",
        "not_alert",
    }
