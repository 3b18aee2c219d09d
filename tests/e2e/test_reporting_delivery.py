"""Report delivery on the real broker to the real FHIR server (HAPI's JPA server), exactly once.

The reporting service of the stack turns results into reports; the delivery loop runs here, with
its real Kafka clients, against the stack's HAPI FHIR server. The loop is stopped and started
again mid-way, as a crash would, and the server is down meanwhile. One report is refused by the
server for real: it already holds two DiagnosticReports with that report's identifier (a broken
earlier import), so the conditional create cannot tell which is meant (412 and an
OperationOutcome); once the two are removed, a replay stores the report once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from typer.testing import CliRunner

from medmesh_cli.devstack.stack import Stack
from medmesh_cli.main import app
from medmesh_contracts import topics
from medmesh_contracts.events import Producer, ReportUndeliverable, to_wire
from medmesh_reporting.delivery import DELIVERED_FROM, Deliverer, DeliveryBackoff, DeliveryLoop
from medmesh_reporting.kafka import delivery_clients
from medmesh_reporting.report import REPORT_IDENTIFIER_SYSTEM
from medmesh_reporting.settings import ReportingSettings
from tests.factories import make_completed, make_request, make_task

REPORTS = 20
# The first half is delivered before the crash, the second half while the server is down.
FIRST_HALF = range(REPORTS // 2)
SECOND_HALF = range(REPORTS // 2, REPORTS)
REFUSED = 7
runner = CliRunner()


async def _wait(what: str, done: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.5)


async def _undeliverable(bootstrap: str, run: str) -> list[tuple[str, ReportUndeliverable]]:
    """The undeliverable events of this run, each with its PARTITION:OFFSET."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topics.REPORTS_UNDELIVERABLE, p)
            for p in sorted(consumer.partitions_for_topic(topics.REPORTS_UNDELIVERABLE) or {0, 1})
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found = []
        for _ in range(6):
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    event = ReportUndeliverable.model_validate_json(record.value or b"")
                    if event.correlation_id.startswith(run):
                        found.append((f"{record.partition}:{record.offset}", event))
        return found
    finally:
        await consumer.stop()


def _patient(run: str, i: int) -> str:
    return f"{run}-p{i:02d}"


async def _start_group_at_end(bootstrap: str, group: str) -> None:
    """Commit the delivery group's offsets at the end of what it reads, as for a delivery that
    starts now: the reports of earlier tests are not this test's to deliver."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in DELIVERED_FROM
            for p in sorted(consumer.partitions_for_topic(topic) or {0, 1})
        ]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        await consumer.commit({tp: await consumer.position(tp) for tp in partitions})
    finally:
        await consumer.stop()


async def _produce_results(bootstrap: str, run: str, numbers: range) -> None:
    """One inference result per number, for the stack's reporting service to report on."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in numbers:
            request = make_request(
                correlation_id=f"{run}-{i:02d}",
                patient_pseudonym=f"p-{i}",
                subject_reference=f"Patient/{_patient(run, i)}",
            )
            completed = make_completed(make_task(request))
            await producer.send_and_wait(topics.INFERENCE_RESULTS, to_wire(completed), key=b"k")
    finally:
        await producer.stop()


async def _replay(position: str, bootstrap: str) -> None:
    """`medmesh dlq replay` of one undeliverable entry, as an operator runs it."""
    replayed = await asyncio.to_thread(
        runner.invoke,
        app,
        [
            "dlq",
            "replay",
            topics.REPORTS_UNDELIVERABLE,
            "--entry",
            position,
            "--bootstrap",
            bootstrap,
        ],
    )
    assert replayed.exit_code == 0, replayed.output
    assert f"-> {topics.REPORTS_DELIVERY_REQUESTS}" in replayed.output


async def _seed_conflicting_reports(base_url: str, identifier: str) -> list[str]:
    """Two DiagnosticReports claiming ``identifier`` (plain creates); their ids."""
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": REPORT_IDENTIFIER_SYSTEM, "value": identifier}],
        "status": "final",
        "code": {"text": "imported twice"},
    }
    ids = []
    async with httpx.AsyncClient(timeout=60.0) as client:
        for _ in range(2):
            response = await client.post(
                f"{base_url}/DiagnosticReport",
                json=report,
                headers={"content-type": "application/fhir+json"},
            )
            assert response.status_code == 201, response.text[:500]
            ids.append(response.json()["id"])
    return ids


async def _delete(base_url: str, ids: list[str]) -> None:
    async with httpx.AsyncClient(timeout=60.0) as client:
        for resource_id in ids:
            response = await client.delete(f"{base_url}/DiagnosticReport/{resource_id}")
            assert response.is_success, response.text[:500]


async def _refused_entry(bootstrap: str, run: str, refused: str, base_url: str) -> str:
    """The PARTITION:OFFSET of the refused report's undeliverable event, after checking that it
    is the run's only one and carries HAPI's answer."""
    # At least once: a crash between publishing the event and committing its offset repeats it.
    events = await _undeliverable(bootstrap, run)
    assert {e.correlation_id for _, e in events} == {refused}
    position, event = events[0]
    assert event.status_code == 412
    assert event.fhir_server == base_url
    assert event.operation_outcome is not None
    issue = event.operation_outcome["issue"][0]
    assert issue["severity"] == "error"
    assert "HAPI-0958" in issue["diagnostics"]  # the match URL matched 2 resources
    assert event.report["identifier"]["value"] == refused
    return position


class StoredReports:
    """Searches the FHIR server for the run's DiagnosticReports, by their patients."""

    def __init__(self, base_url: str, run: str) -> None:
        subjects = ",".join(f"Patient/{_patient(run, i)}" for i in range(REPORTS))
        self.url = f"{base_url}/DiagnosticReport"
        # HAPI's largest page is 50: more than the run's reports.
        self.params = {"subject": subjects, "_count": "50", "_elements": "identifier"}

    async def ids(self) -> list[str]:
        """Every stored report's identifier value, once per stored copy (empty while the server
        is down)."""
        async with httpx.AsyncClient(timeout=30.0) as client:
            try:
                response = await client.get(self.url, params=self.params)
            except httpx.TransportError:
                return []
        if response.status_code != 200:
            return []
        return [
            identifier["value"]
            for entry in response.json().get("entry", [])
            for identifier in entry["resource"].get("identifier", [])
        ]


async def test_reports_reach_the_fhir_server_once_across_outage_and_restart(stack: Stack) -> None:
    """Loop crashed mid-way, server down, then up: each report is stored once; one the server
    refuses is undeliverable with HAPI's OperationOutcome, and once the cause is removed
    `medmesh dlq replay` of it (twice) stores it exactly once."""
    run = f"dlv-{uuid.uuid4().hex[:8]}"
    refused = f"{run}-{REFUSED:02d}"
    base_url = stack.config.fhir_server_url
    stored = StoredReports(base_url, run)
    conflicting = await _seed_conflicting_reports(base_url, refused)

    settings = ReportingSettings(
        kafka_bootstrap_servers=stack.config.bootstrap,
        delivery_group_id=f"delivery-{run}",
        instance_id=f"delivery-test-{run}",
    )
    # A first transaction on a cold JVM can take seconds: a timed-out one is retried, and the
    # conditional creates keep the retry from storing a second copy.
    client = httpx.AsyncClient(timeout=60.0)
    deliverer = Deliverer(client, base_url, backoff=DeliveryBackoff(0.2, 2.0, 400.0))
    me = Producer(service="reporting", instance=settings.instance_id)

    def start() -> asyncio.Task[None]:
        loop = DeliveryLoop(lambda: delivery_clients(settings), deliverer, me)
        return asyncio.create_task(loop.run())

    async def first_half_stored() -> bool:
        return len(set(await stored.ids())) >= len(FIRST_HALF) - 1

    await _start_group_at_end(stack.config.bootstrap, settings.delivery_group_id)
    await _produce_results(stack.config.bootstrap, run, FIRST_HALF)
    first = start()
    await _wait("the first half on the FHIR server", first_half_stored, 240.0)
    first.cancel()  # a crash: offsets of delivered reports may not be committed yet
    await asyncio.gather(first, return_exceptions=True)

    # The server goes down; the second half comes while it is, to the restarted loop. It comes
    # back with what it had committed (its database is kept).
    await asyncio.to_thread(stack.fhir_server.stop)
    await _produce_results(stack.config.bootstrap, run, SECOND_HALF)
    second = start()
    try:
        await asyncio.sleep(5.0)  # the loop meets a server that refuses connections
        await asyncio.to_thread(stack.fhir_server.launch)

        async def all_but_one_stored() -> bool:
            return len(set(await stored.ids())) == REPORTS - 1

        await _wait("every report with a known patient", all_but_one_stored, 300.0)
        await asyncio.sleep(2.0)  # time for a duplicate to show up, were there one

        expected = sorted(f"{run}-{i:02d}" for i in range(REPORTS) if i != REFUSED)
        assert sorted(await stored.ids()) == expected
        position = await _refused_entry(stack.config.bootstrap, run, refused, base_url)

        # The cause fixed (the two conflicting reports removed), the entry is replayed twice
        # (an operator's second try): delivered through the delivery-request topic, stored once.
        await _delete(base_url, conflicting)
        for _ in range(2):
            await _replay(position, stack.config.bootstrap)

        async def replayed_stored() -> bool:
            return refused in await stored.ids()

        await _wait("the replayed report", replayed_stored, 120.0)
        await asyncio.sleep(3.0)  # time for a second copy to show up, were there one
    finally:
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await client.aclose()
    assert sorted(await stored.ids()) == sorted(f"{run}-{i:02d}" for i in range(REPORTS))
