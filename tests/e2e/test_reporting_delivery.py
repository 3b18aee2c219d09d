"""Report delivery on the real broker: committed reports -> the FHIR test receiver, exactly once.

The reporting service of the stack turns results into reports; the delivery loop runs here, with
its real Kafka clients, against tests/fhir_receiver.py (no runnable FHIR server could be had; see
that module). It is stopped and started again mid-way, as a crash would.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from typer.testing import CliRunner

from medmesh_cli.devstack.stack import Stack
from medmesh_cli.main import app
from medmesh_contracts import topics
from medmesh_contracts.events import Producer, ReportUndeliverable, to_wire
from medmesh_reporting.delivery import Deliverer, DeliveryBackoff, DeliveryLoop
from medmesh_reporting.kafka import delivery_clients
from medmesh_reporting.settings import ReportingSettings
from tests.factories import make_completed, make_request, make_task
from tests.fhir_receiver import FhirTestServer

REPORTS = 20
runner = CliRunner()


async def _wait(what: str, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


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


def _run_ids(server: FhirTestServer, run: str) -> list[str]:
    return [
        identifier["value"]
        for report in server.of_type("DiagnosticReport")
        for identifier in report["identifier"]
        if identifier["value"].startswith(run)
    ]


async def test_reports_reach_the_fhir_server_once_across_outage_and_restart(stack: Stack) -> None:
    """Server down, then up, loop restarted: each report once; a refused one is undeliverable,
    and once the cause is fixed `medmesh dlq replay` of it (twice) stores it exactly once."""
    run = f"dlv-{uuid.uuid4().hex[:8]}"
    refused = f"{run}-07"
    fixed = asyncio.Event()
    server = FhirTestServer(
        down_for=8,
        reject_when=lambda b: (
            "unknown patient" if refused in json.dumps(b) and not fixed.is_set() else None
        ),
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.config.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(REPORTS):
            request = make_request(correlation_id=f"{run}-{i:02d}", patient_pseudonym=f"p-{i}")
            completed = make_completed(make_task(request))
            await producer.send_and_wait(topics.INFERENCE_RESULTS, to_wire(completed), key=b"k")
    finally:
        await producer.stop()

    settings = ReportingSettings(
        kafka_bootstrap_servers=stack.config.bootstrap,
        delivery_group_id=f"delivery-{run}",
        instance_id=f"delivery-test-{run}",
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    deliverer = Deliverer(client, "http://fhir.test/r4", backoff=DeliveryBackoff(0.05, 0.2, 60.0))
    me = Producer(service="reporting", instance=settings.instance_id)

    def start() -> asyncio.Task[None]:
        loop = DeliveryLoop(lambda: delivery_clients(settings), deliverer, me)
        return asyncio.create_task(loop.run())

    first = start()
    await _wait("half the reports", lambda: len(_run_ids(server, run)) >= REPORTS // 2)
    first.cancel()  # a crash mid-stream: offsets of delivered reports may not be committed
    await asyncio.gather(first, return_exceptions=True)
    second = start()
    try:
        await _wait("every report", lambda: len(_run_ids(server, run)) == REPORTS - 1)
        await asyncio.sleep(2.0)  # time for a duplicate to show up, were there one

        delivered = _run_ids(server, run)
        assert sorted(delivered) == sorted(f"{run}-{i:02d}" for i in range(REPORTS) if i != 7)
        # At least once: a crash between publishing the event and committing its offset repeats
        # it.
        events = await _undeliverable(stack.config.bootstrap, run)
        assert {e.correlation_id for _, e in events} == {refused}
        position, event = events[0]
        assert event.status_code == 422
        assert event.operation_outcome is not None
        assert event.report["identifier"]["value"] == refused

        # The cause fixed, the entry is replayed twice (an operator's second try): delivered
        # through the delivery-request topic, stored once.
        fixed.set()
        for _ in range(2):
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
                    stack.config.bootstrap,
                ],
            )
            assert replayed.exit_code == 0, replayed.output
            assert f"-> {topics.REPORTS_DELIVERY_REQUESTS}" in replayed.output
        await _wait("the replayed report", lambda: refused in _run_ids(server, run))
        await asyncio.sleep(2.0)  # time for a second copy to show up, were there one
    finally:
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await client.aclose()
    assert sorted(_run_ids(server, run)) == sorted(f"{run}-{i:02d}" for i in range(REPORTS))
