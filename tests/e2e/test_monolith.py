"""The monolith topology beside the services on the session's Kafka and Triton: same reports.

The monolith process (``python -m medmesh_monolith``) runs for this module only, on its own
HTTP port and its own inbound consumer group (starting at the inbound topic's current end, so it
never replays other tests' events). Its reports go to the same medmesh.reports.diagnostic, each
with its own correlation id, so the session's audit of every report still holds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.process import ManagedProcess
from medmesh_cli.devstack.stack import ServiceSpec, Stack, service_environment
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_reporting.report import report_ids
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.answers import expected_status, requests_sent
from tests.e2e.conftest import E2E_PORT_BASE, Record, TopicTap, fixture_with_new_patient

MONOLITH_PORT = E2E_PORT_BASE + 70
TIMESTAMPS = frozenset({"issued", "recorded", "lastUpdated", "timestamp", "occurredDateTime"})


async def _start_inbound_group_at_end(bootstrap: str, group_id: str) -> None:
    """Commit ``group_id``'s offsets at the inbound topic's end: the monolith sees new events only."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # aiokafka has no public metadata refresh
        parts = [
            TopicPartition(topics.FHIR_INBOUND, p)
            for p in sorted(consumer.partitions_for_topic(topics.FHIR_INBOUND) or ())
        ]
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        await consumer.commit(dict(ends.items()))
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
async def monolith(stack: Stack) -> AsyncIterator[str]:
    """The monolith process against the session's broker and Triton; yields its base URL."""
    group_id = f"medmesh-monolith-e2e-{uuid.uuid4().hex[:8]}"
    await _start_inbound_group_at_end(stack.config.bootstrap, group_id)
    spec = ServiceSpec(
        "monolith",
        "medmesh_monolith",
        MONOLITH_PORT,
        {
            "MEDMESH_INGEST_PORT": str(MONOLITH_PORT),
            "MEDMESH_INGEST_GROUP_ID": group_id,
            # Its own deployment on the same broker: ingest instances sharing a pseudonym key
            # share each patient's readings state (medmesh.ingest.readings), so with the
            # services' key the second topology to see an event found it already sent.
            "MEDMESH_PSEUDONYM_KEY": "monolith-e2e-deployment-pseudonym-key-0123456789",
        },
    )
    process = ManagedProcess(
        "monolith",
        [sys.executable, "-m", spec.module],
        stack.config.state_dir / "monolith-e2e.log",
        env=service_environment(stack.config, spec),
        cwd=repo_root(),
    )
    process.start()
    url = f"http://127.0.0.1:{MONOLITH_PORT}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2.0) as client:
            for _ in range(240):
                if not process.running():
                    pytest.fail(f"the monolith exited:\n{process.log_tail()}", pytrace=False)
                try:
                    if (await client.get("/readyz")).status_code == 204:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
            else:
                pytest.fail(f"the monolith never became ready:\n{process.log_tail()}")
        yield url
    finally:
        await asyncio.to_thread(process.stop, 10)


async def _post(url: str, payload: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.post(
            "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
        )


def _without_ids(response: httpx.Response) -> Any:
    """The answer's body with its correlation ids (one topology's own) replaced by a marker."""
    text = response.text
    for correlation_id in response.headers[h.CORRELATION_ID].split(","):
        text = text.replace(correlation_id, "<correlation-id>")
    return json.loads(text)


def _subject_is(patient: str) -> Any:
    def matches(record: Record) -> bool:
        entries = record.json()["entry"]
        report = next(
            e["resource"] for e in entries if e["resource"]["resourceType"] == "DiagnosticReport"
        )
        return bool(report["subject"]["reference"] == f"Patient/{patient}")

    return matches


async def _reports_for(tap: TopicTap, patient: str, count: int) -> list[Record]:
    for _ in range(1200):
        found = tap.matching(topics.REPORTS_DIAGNOSTIC, _subject_is(patient))
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"expected {count} reports for the patient within 60 s")


def normalized(record: Record) -> Any:
    """The report Bundle with its correlation id, the ids derived from it and its timestamps
    replaced by placeholders: what must be equal whichever topology built it."""
    correlation_id = record.headers[h.CORRELATION_ID]
    text = record.value.decode()
    for name, value in vars(report_ids(correlation_id)).items():
        text = text.replace(value, f"<{name}-id>")
    text = text.replace(correlation_id, "<correlation-id>")
    return _without_timestamps(json.loads(text))


def _without_timestamps(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: "<time>" if k in TIMESTAMPS else _without_timestamps(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_timestamps(v) for v in node]
    return node


@pytest.mark.parametrize(
    "fixture", ["vitals-bundle-high.json", "vitals-bundle-medium.json", "vitals-bundle-low.json"]
)
async def test_http_bundle_gives_the_same_report_in_both_topologies(
    stack: Stack, monolith: str, tap: TopicTap, fixture: str
) -> None:
    """The same Bundle posted to the services and to the monolith gets the same answer (202 +
    OperationOutcome for a collection, 200 + batch-/transaction-response for a batch or
    transaction, each naming its own request) and yields equal reports."""
    payload, patient = fixture_with_new_patient(fixture)
    services_answer, monolith_answer = await asyncio.gather(
        _post(stack.config.ingest_url, payload), _post(monolith, payload)
    )
    assert services_answer.status_code == monolith_answer.status_code == expected_status(payload)
    answers = [requests_sent(a, payload) for a in (services_answer, monolith_answer)]
    assert [list(sent.values()) for sent in answers] == [["deterioration"]] * 2
    assert _without_ids(services_answer) == _without_ids(monolith_answer)
    ids = {services_answer.headers[h.CORRELATION_ID], monolith_answer.headers[h.CORRELATION_ID]}
    reports = await _reports_for(tap, patient, 2)
    assert {r.headers[h.CORRELATION_ID] for r in reports} == ids
    assert all(check_report_bundle(r.json()) == [] for r in reports)
    assert normalized(reports[0]) == normalized(reports[1])


async def test_inbound_topic_event_gives_the_same_report_in_both_topologies(
    monolith: str, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """An event on medmesh.fhir.inbound is scored by both topologies (two consumer groups) alike."""
    payload, patient = fixture_with_new_patient("vitals-bundle-high.json")
    await producer.send_and_wait(topics.FHIR_INBOUND, payload, key=patient.encode())
    reports = await _reports_for(tap, patient, 2)
    assert len({r.headers[h.CORRELATION_ID] for r in reports}) == 2
    assert normalized(reports[0]) == normalized(reports[1])


async def test_invalid_bundle_gets_the_same_answer_in_both_topologies(
    stack: Stack, monolith: str
) -> None:
    """An invalid Bundle is refused with the same status and OperationOutcome by both."""
    payload, _patient = fixture_with_new_patient("bundle-invalid-status.json")
    services_answer = await _post(stack.config.ingest_url, payload)
    monolith_answer = await _post(monolith, payload)
    assert 400 <= services_answer.status_code < 500
    assert monolith_answer.status_code == services_answer.status_code
    assert monolith_answer.json() == services_answer.json()
