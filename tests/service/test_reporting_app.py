"""The reporting app and its transactional loop on an in-memory, transaction-aware fake Kafka
(``tests.transactional_kafka``)."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import MessageDeadLettered, Producer, to_wire
from medmesh_contracts.modelspec import load_specs
from medmesh_reporting.app import create_app
from medmesh_reporting.handling import ReportHandler
from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.deadletter import dead_letter_record
from medmesh_runtime.transactional import (
    LoopSettings,
    PartitionLostError,
    PartitionTransactions,
    PoisonIsolation,
    TransactionalLoop,
    per_record,
)
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task
from tests.service.conftest import SPECS_DIR
from tests.transactional_kafka import FakeKafka, FakeRecord, run_until

GROUP = "medmesh-reporting"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _loop(
    kafka: FakeKafka, performer: str | None = None, tracer: trace.Tracer | None = None
) -> TransactionalLoop:
    producer = Producer(service="reporting", instance="reporting-test")
    handler = ReportHandler(
        load_specs(SPECS_DIR),
        producer,
        tracer or trace.get_tracer("test"),
        performer_display=performer,
    )
    settings = LoopSettings(
        group_id=GROUP,
        topics=(topics.INFERENCE_RESULTS,),
        transactional_id_prefix=GROUP,
        poll_timeout_ms=10,
        restart_pause_s=0,
    )
    dead = functools.partial(dead_letter_record, topics.REPORTING_DEADLETTER, producer=producer)
    return TransactionalLoop(
        kafka.clients(GROUP), PoisonIsolation(per_record(handler), dead), settings
    )


def _reports(kafka: FakeKafka) -> list[FakeRecord]:
    return kafka.records(topics.REPORTS_DIAGNOSTIC)


def _header(record: FakeRecord, name: str) -> str:
    return (dict(record.headers)[name] or b"").decode()


async def test_result_becomes_one_conformant_report_with_headers_and_trace() -> None:
    """A result becomes one conformant Bundle with correlation, schema and the caller's trace."""
    kafka = FakeKafka()
    completed = make_completed()
    kafka.append(
        topics.INFERENCE_RESULTS, to_wire(completed), [(h.TRACEPARENT, TRACEPARENT.encode())]
    )

    await run_until(_loop(kafka), lambda: _reports(kafka))

    (report,) = _reports(kafka)
    assert check_report_bundle(json.loads(report.value or b"")) == []
    assert _header(report, h.CORRELATION_ID) == completed.correlation_id
    assert _header(report, h.SCHEMA) == h.FHIR_R4B_JSON
    assert _header(report, h.TRACEPARENT).split("-")[1] == TRACE_ID
    assert kafka.offset(GROUP, topics.INFERENCE_RESULTS) == 1


async def test_redelivered_result_gives_the_identical_report() -> None:
    """The same result delivered twice produces byte-identical reports (idempotent ids, times)."""
    kafka = FakeKafka()
    wire = to_wire(make_completed())
    kafka.append(topics.INFERENCE_RESULTS, wire)
    kafka.append(topics.INFERENCE_RESULTS, wire)

    await run_until(_loop(kafka), lambda: len(kafka.values(topics.REPORTS_DIAGNOSTIC)) == 2)

    first, second = kafka.values(topics.REPORTS_DIAGNOSTIC)
    assert first == second


async def test_result_with_an_impossible_band_is_dead_lettered_in_the_transaction() -> None:
    """A result whose band the spec does not know is dead-lettered and its offset committed."""
    kafka = FakeKafka()
    completed = make_completed(
        outputs={"SCORE": [7.0], "RISK_BAND": [9.0], "CONTRIBUTIONS": [0.0] * 7}
    )
    correlation = [(h.CORRELATION_ID, completed.correlation_id.encode())]
    kafka.append(topics.INFERENCE_RESULTS, to_wire(completed), correlation)

    await run_until(_loop(kafka), lambda: kafka.records(topics.REPORTING_DEADLETTER))

    (dead,) = kafka.values(topics.REPORTING_DEADLETTER)
    event = MessageDeadLettered.model_validate_json(dead)
    assert "ReportBuildError" in event.reason
    assert event.source_offset == 0
    assert event.correlation_id == completed.correlation_id
    assert topics.REPORTS_DIAGNOSTIC not in kafka.committed
    assert kafka.offset(GROUP, topics.INFERENCE_RESULTS) == 1


async def test_garbage_is_dead_lettered_whole() -> None:
    """A value that is not an InferenceCompleted is dead-lettered with its raw bytes."""
    kafka = FakeKafka()
    kafka.append(topics.INFERENCE_RESULTS, b"\xff not json")

    await run_until(_loop(kafka), lambda: kafka.records(topics.REPORTING_DEADLETTER))

    event = MessageDeadLettered.model_validate_json(kafka.values(topics.REPORTING_DEADLETTER)[0])
    assert event.raw_encoding == "base64"
    assert event.reason.startswith("ValidationError")


async def test_failure_mid_batch_aborts_and_the_batch_is_processed_again_once() -> None:
    """A send failing mid-transaction aborts it; the retry from committed offsets reports once."""
    kafka = FakeKafka(fail_sends=1)
    for n in range(3):
        request = make_request(correlation_id=f"req-{n}")
        kafka.append(topics.INFERENCE_RESULTS, to_wire(make_completed(make_task(request))))
    loop = _loop(kafka)

    await run_until(loop, lambda: len(kafka.values(topics.REPORTS_DIAGNOSTIC)) == 3)

    reports = _reports(kafka)
    assert sorted(_header(r, h.CORRELATION_ID) for r in reports) == ["req-0", "req-1", "req-2"]
    assert kafka.aborted == 1
    assert kafka.offset(GROUP, topics.INFERENCE_RESULTS) == 3


async def test_shadow_result_never_becomes_a_report() -> None:
    """A result routed as shadow traffic produces nothing, and its offset is committed."""
    kafka = FakeKafka()
    kafka.append(topics.INFERENCE_RESULTS, to_wire(make_completed(make_task(reason="shadow"))))

    await run_until(_loop(kafka), lambda: kafka.offset(GROUP, topics.INFERENCE_RESULTS) == 1)

    assert kafka.committed.keys() == {topics.INFERENCE_RESULTS}


async def test_a_resumed_zombie_instance_reports_nothing_the_new_owner_reports_once() -> None:
    """A reporting instance stalled past its session and then resumed is fenced: the results
    its successor took over become one report each, and the zombie's batch is aborted."""
    kafka = FakeKafka()
    for n in range(2):
        request = make_request(correlation_id=f"req-{n}")
        kafka.append(topics.INFERENCE_RESULTS, to_wire(make_completed(make_task(request))))
    zombie_loop, successor_loop = _loop(kafka), _loop(kafka)
    zombie = kafka.consumer(GROUP)
    transactions = PartitionTransactions(kafka.producer, GROUP, GROUP)
    zombie.subscribe([topics.INFERENCE_RESULTS], listener=transactions.listener())
    await zombie.start()

    await run_until(successor_loop, lambda: len(_reports(kafka)) == 2)
    with pytest.raises(PartitionLostError):
        await zombie_loop.process_batch(zombie, transactions)

    assert sorted(_header(r, h.CORRELATION_ID) for r in _reports(kafka)) == ["req-0", "req-1"]
    assert kafka.offset(GROUP, topics.INFERENCE_RESULTS) == 2


async def _wait_for_status(client: httpx.AsyncClient, path: str, status: int) -> None:
    for _ in range(500):
        if (await client.get(path)).status_code == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never answered {status}")


async def test_app_is_ready_once_its_loop_runs() -> None:
    """/readyz answers 503 until the loop consumes, then 204; /healthz answers 204."""
    kafka = FakeKafka()
    app = create_app(ReportingSettings(model_specs_dir=SPECS_DIR), clients=kafka.clients(GROUP))
    transport = httpx.ASGITransport(app=app)
    broker = app.broker
    assert isinstance(broker, KafkaBroker)
    async with (
        TestKafkaBroker(broker),
        httpx.AsyncClient(transport=transport, base_url="http://reporting") as client,
    ):
        assert (await client.get("/readyz")).status_code == 503
        await app.start()
        try:
            await _wait_for_status(client, "/readyz", 204)
            assert (await client.get("/healthz")).status_code == 204
        finally:
            await app.stop()


def test_trace_context_is_w3c() -> None:
    """The propagator in use reads W3C traceparent headers (what the pipeline writes)."""
    context = propagate.extract({h.TRACEPARENT: TRACEPARENT})
    span_context = trace.get_current_span(context).get_span_context()
    assert format(span_context.trace_id, "032x") == TRACE_ID


async def test_spans_are_named_like_every_other_hop() -> None:
    """The hop shows as '<results> process' and '<reports> publish' spans with the correlation id."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    kafka = FakeKafka()
    completed = make_completed()
    kafka.append(topics.INFERENCE_RESULTS, to_wire(completed))
    loop = _loop(kafka, tracer=provider.get_tracer("test"))

    await run_until(loop, lambda: _reports(kafka))

    spans = {span.name: span for span in exporter.get_finished_spans()}
    process = spans[f"{topics.INFERENCE_RESULTS} process"]
    publish = spans[f"{topics.REPORTS_DIAGNOSTIC} publish"]
    assert publish.parent is not None
    assert publish.parent.span_id == process.context.span_id
    conversation = "messaging.message.conversation_id"
    assert (process.attributes or {})[conversation] == completed.correlation_id
    assert (publish.attributes or {})[conversation] == completed.correlation_id
    (report,) = _reports(kafka)
    assert _header(report, h.TRACEPARENT).split("-")[2] == format(publish.context.span_id, "016x")
