"""The reporting app and its transactional loop on an in-memory, transaction-aware fake Kafka.

``FakeKafka`` keeps what a read_committed consumer would see: records produced in a transaction
become visible, and its offsets committed, only when the transaction commits; an abort drops both.
A fresh consumer starts from the committed offsets, as a restarted process does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced
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
from medmesh_reporting.conformance import check_report_bundle
from medmesh_reporting.handling import ReportHandler
from medmesh_reporting.settings import ReportingSettings
from medmesh_reporting.transactional import LoopSettings, TransactionalLoop
from tests.factories import make_completed, make_request, make_task
from tests.service.conftest import SPECS_DIR

GROUP = "medmesh-reporting"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class FakeRecord:
    """A consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FakeKafka:
    """Topics of committed records, and the group's committed offsets."""

    committed: dict[str, list[FakeRecord]] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    aborted: int = 0
    fail_sends: int = 0
    fenced: bool = False

    def append(self, topic: str, value: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        """Write one committed record to partition 0 of ``topic``."""
        records = self.committed.setdefault(topic, [])
        records.append(FakeRecord(topic, 0, len(records), b"key", value, tuple(headers)))

    def values(self, topic: str) -> list[bytes]:
        """The committed values of ``topic``."""
        return [r.value or b"" for r in self.committed.get(topic, [])]

    def clients(self) -> tuple[FakeConsumer, FakeProducer]:
        """A fresh consumer (at the committed offsets) and producer."""
        return FakeConsumer(self), FakeProducer(self)


class FakeConsumer:
    """Reads partition 0 of the subscribed topics from the committed offsets."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self._topics: Sequence[str] = ()
        self._positions: dict[TopicPartition, int] = {}

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None:
        """Remember the topics."""
        self._topics = topics

    async def start(self) -> None:
        """Start at the committed offsets."""
        for topic in self._topics:
            tp = TopicPartition(topic, 0)
            self._positions[tp] = self._kafka.offsets.get(tp, 0)

    async def stop(self) -> None:
        """Nothing to release."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        """The next records after the position (the position moves on)."""
        out: dict[TopicPartition, Sequence[Any]] = {}
        for tp, position in self._positions.items():
            records = self._kafka.committed.get(tp.topic, [])[
                position : position + (max_records or 500)
            ]
            if records:
                out[tp] = records
                self._positions[tp] = records[-1].offset + 1
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out


class FakeProducer:
    """A transactional producer: records and offsets become visible on commit only."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self._pending: list[tuple[str, bytes, tuple[tuple[str, bytes], ...]]] = []
        self._offsets: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        """init_transactions; raises when another producer took the transactional id."""
        if self._kafka.fenced:
            raise ProducerFenced

    async def stop(self) -> None:
        """Nothing to release."""

    async def begin_transaction(self) -> None:
        """Start an empty transaction."""
        self._pending, self._offsets = [], {}

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]:
        """Add a record to the transaction; fails while ``fail_sends`` is positive."""
        if self._kafka.fail_sends > 0:
            self._kafka.fail_sends -= 1
            raise KafkaConnectionError("broker went away")
        self._pending.append((topic, value or b"", tuple(headers or ())))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_id: str
    ) -> None:
        """Add the consumer's next offsets to the transaction."""
        assert group_id == GROUP
        self._offsets = dict(offsets)

    async def commit_transaction(self) -> None:
        """Make the records and offsets visible."""
        for topic, value, headers in self._pending:
            self._kafka.append(topic, value, headers)
        self._kafka.offsets.update(self._offsets)

    async def abort_transaction(self) -> None:
        """Drop the records and offsets."""
        self._kafka.aborted += 1
        self._pending, self._offsets = [], {}


def _loop(kafka: FakeKafka, performer: str | None = None) -> TransactionalLoop:
    handler = ReportHandler(
        load_specs(SPECS_DIR),
        Producer(service="reporting", instance="reporting-test"),
        trace.get_tracer("test"),
        performer_display=performer,
    )
    settings = LoopSettings(
        group_id=GROUP, topics=(topics.INFERENCE_RESULTS,), poll_timeout_ms=10, restart_pause_s=0
    )
    return TransactionalLoop(kafka.clients, handler, settings)


async def _run_until(loop: TransactionalLoop, done: Any, timeout_s: float = 10.0) -> None:
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(timeout_s):
            while not done():
                if task.done():
                    return
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _header(record: FakeRecord, name: str) -> str:
    return dict(record.headers)[name].decode()


async def test_result_becomes_one_conformant_report_with_headers_and_trace() -> None:
    """A result becomes one conformant Bundle with correlation, schema and the caller's trace."""
    kafka = FakeKafka()
    completed = make_completed()
    kafka.append(
        topics.INFERENCE_RESULTS, to_wire(completed), [(h.TRACEPARENT, TRACEPARENT.encode())]
    )

    await _run_until(_loop(kafka), lambda: kafka.committed.get(topics.REPORTS_DIAGNOSTIC))

    (report,) = kafka.committed[topics.REPORTS_DIAGNOSTIC]
    assert check_report_bundle(json.loads(report.value or b"")) == []
    assert _header(report, h.CORRELATION_ID) == completed.correlation_id
    assert _header(report, h.SCHEMA) == h.FHIR_R4B_JSON
    assert _header(report, h.TRACEPARENT).split("-")[1] == TRACE_ID
    assert kafka.offsets[TopicPartition(topics.INFERENCE_RESULTS, 0)] == 1


async def test_redelivered_result_gives_the_identical_report() -> None:
    """The same result delivered twice produces byte-identical reports (idempotent ids, times)."""
    kafka = FakeKafka()
    wire = to_wire(make_completed())
    kafka.append(topics.INFERENCE_RESULTS, wire)
    kafka.append(topics.INFERENCE_RESULTS, wire)

    await _run_until(_loop(kafka), lambda: len(kafka.values(topics.REPORTS_DIAGNOSTIC)) == 2)

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

    await _run_until(_loop(kafka), lambda: kafka.committed.get(topics.REPORTING_DEADLETTER))

    (dead,) = kafka.values(topics.REPORTING_DEADLETTER)
    event = MessageDeadLettered.model_validate_json(dead)
    assert "ReportBuildError" in event.reason
    assert event.source_offset == 0
    assert event.correlation_id == completed.correlation_id
    assert topics.REPORTS_DIAGNOSTIC not in kafka.committed
    assert kafka.offsets[TopicPartition(topics.INFERENCE_RESULTS, 0)] == 1


async def test_garbage_is_dead_lettered_whole() -> None:
    """A value that is not an InferenceCompleted is dead-lettered with its raw bytes."""
    kafka = FakeKafka()
    kafka.append(topics.INFERENCE_RESULTS, b"\xff not json")

    await _run_until(_loop(kafka), lambda: kafka.committed.get(topics.REPORTING_DEADLETTER))

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

    await _run_until(loop, lambda: len(kafka.values(topics.REPORTS_DIAGNOSTIC)) == 3)

    reports = kafka.committed[topics.REPORTS_DIAGNOSTIC]
    assert sorted(_header(r, h.CORRELATION_ID) for r in reports) == ["req-0", "req-1", "req-2"]
    assert kafka.aborted == 1
    assert kafka.offsets[TopicPartition(topics.INFERENCE_RESULTS, 0)] == 3


async def test_shadow_result_never_becomes_a_report() -> None:
    """A result routed as shadow traffic produces nothing, and its offset is committed."""
    kafka = FakeKafka()
    kafka.append(topics.INFERENCE_RESULTS, to_wire(make_completed(make_task(reason="shadow"))))
    tp = TopicPartition(topics.INFERENCE_RESULTS, 0)

    await _run_until(_loop(kafka), lambda: kafka.offsets.get(tp) == 1)

    assert kafka.committed.keys() == {topics.INFERENCE_RESULTS}


async def test_fenced_producer_stops_the_loop_for_good() -> None:
    """When another instance owns the transactional id, the loop stops and says it is fenced."""
    kafka = FakeKafka(fenced=True)
    loop = _loop(kafka)

    await asyncio.wait_for(loop.run(), timeout=5)

    assert loop.fenced
    assert not loop.ready


async def _wait_for_status(client: httpx.AsyncClient, path: str, status: int) -> None:
    for _ in range(500):
        if (await client.get(path)).status_code == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never answered {status}")


async def test_app_is_ready_once_its_loop_runs_and_dead_once_fenced() -> None:
    """/readyz answers 204 once the loop consumes; /healthz 503 after the loop was fenced."""
    kafka = FakeKafka()
    app = create_app(ReportingSettings(model_specs_dir=SPECS_DIR), clients=kafka.clients)
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

    fenced = FakeKafka(fenced=True)
    app = create_app(ReportingSettings(model_specs_dir=SPECS_DIR), clients=fenced.clients)
    transport = httpx.ASGITransport(app=app)
    broker = app.broker
    assert isinstance(broker, KafkaBroker)
    async with (
        TestKafkaBroker(broker),
        httpx.AsyncClient(transport=transport, base_url="http://reporting") as client,
    ):
        await app.start()
        try:
            await _wait_for_status(client, "/healthz", 503)
            assert (await client.get("/readyz")).status_code == 503
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
    handler = ReportHandler(
        load_specs(SPECS_DIR),
        Producer(service="reporting", instance="reporting-test"),
        provider.get_tracer("test"),
    )
    settings = LoopSettings(group_id=GROUP, topics=(topics.INFERENCE_RESULTS,), poll_timeout_ms=10)
    loop = TransactionalLoop(kafka.clients, handler, settings)

    await _run_until(loop, lambda: kafka.committed.get(topics.REPORTS_DIAGNOSTIC))

    spans = {span.name: span for span in exporter.get_finished_spans()}
    process = spans[f"{topics.INFERENCE_RESULTS} process"]
    publish = spans[f"{topics.REPORTS_DIAGNOSTIC} publish"]
    assert publish.parent is not None
    assert publish.parent.span_id == process.context.span_id
    conversation = "messaging.message.conversation_id"
    assert (process.attributes or {})[conversation] == completed.correlation_id
    assert (publish.attributes or {})[conversation] == completed.correlation_id
    (report,) = kafka.committed[topics.REPORTS_DIAGNOSTIC]
    assert _header(report, h.TRACEPARENT).split("-")[2] == format(publish.context.span_id, "016x")
