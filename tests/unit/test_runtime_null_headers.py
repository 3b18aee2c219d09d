"""Kafka headers without a value (legal in Kafka) are read as absent, everywhere headers are
read: the shared helpers, the consumer span, and every faststream subscriber of build_broker."""

from __future__ import annotations

import uuid
from typing import Any

from aiokafka import ConsumerRecord
from faststream.kafka import TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from medmesh_contracts import headers as h
from medmesh_runtime.deadletter import correlation_of
from medmesh_runtime.kafka import CONSUMER_ACK_POLICY, build_broker, record_headers
from medmesh_runtime.settings import ServiceSettings
from medmesh_runtime.telemetry import consumer_span

TOPIC = "medmesh.test.null-headers"
NULLS: list[tuple[str, bytes | None]] = [
    (h.CORRELATION_ID, None),
    ("traceparent", None),
    ("content-type", None),
    (h.SCHEMA, b"medmesh.Test/1"),
]


def _record(headers: list[tuple[str, bytes | None]], offset: int = 0) -> ConsumerRecord:
    return ConsumerRecord(
        topic=TOPIC,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=b"{}",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=2,
        headers=headers,  # Kafka allows null values (aiokafka's hint says bytes)
    )


def test_record_headers_leave_out_null_values_and_keep_the_rest() -> None:
    """record_headers reads a null-valued header as absent (no error, no empty string), keeps
    the others, and correlation_of makes a new correlation id for a null one."""
    assert record_headers(_record(NULLS)) == {h.SCHEMA: "medmesh.Test/1"}
    assert uuid.UUID(correlation_of(_record(NULLS)))


def test_a_consumer_span_of_a_record_with_null_headers_starts_a_new_trace() -> None:
    """consumer_span of a record whose traceparent and correlation id are null records a span
    (a new trace, an empty conversation id) instead of failing."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with consumer_span(provider.get_tracer("test"), _record(NULLS), "group"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.name == f"{TOPIC} process"
    assert span.parent is None
    assert (span.attributes or {})["messaging.message.conversation_id"] == ""


async def test_every_subscriber_of_build_broker_takes_a_record_with_null_headers() -> None:
    """A faststream subscriber of build_broker's broker gets a record with null header values
    (faststream's own parser fails on them), without them, and then the next record."""
    settings = ServiceSettings(instance_id="test")
    broker = build_broker(settings, "test", TracerProvider())
    seen: list[tuple[dict[str, Any], list[tuple[str, bytes | None]]]] = []

    subscriber = broker.subscriber(TOPIC, group_id="test", ack_policy=CONSUMER_ACK_POLICY)

    @subscriber
    async def handle(message: KafkaMessage) -> None:
        seen.append((dict(message.headers), list(message.raw_message.headers)))  # type: ignore[union-attr]

    async with TestKafkaBroker(broker):
        await subscriber.process_message(_record(NULLS, offset=0))
        await subscriber.process_message(_record([(h.CORRELATION_ID, b"c-2")], offset=1))
    assert seen == [
        ({h.SCHEMA: "medmesh.Test/1"}, [(h.SCHEMA, b"medmesh.Test/1")]),
        ({h.CORRELATION_ID: "c-2"}, [(h.CORRELATION_ID, b"c-2")]),
    ]
