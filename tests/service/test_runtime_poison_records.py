"""Poison records on ingest's inbound topic (in-memory broker): a null header value and a
rejected record too large to dead-letter whole do not stall the partition."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import FhirEventRejected, RequestInference
from medmesh_ingest.app import create_app
from medmesh_ingest.settings import IngestSettings
from tests.service.conftest import FIXTURES, SPECS_DIR

MAX_BYTES = 1_000_000  # MEDMESH_DEAD_LETTER_MAX_BYTES's default


@dataclass
class Inbound:
    """Ingest's broker, its inbound subscriber, and what ingest published."""

    broker: KafkaBroker
    subscriber: Any
    requests: list[bytes] = field(default_factory=list)
    invalid: list[tuple[bytes | None, bytes]] = field(default_factory=list)


@pytest.fixture
async def inbound() -> AsyncIterator[Inbound]:
    """The real ingest app on faststream's in-memory broker."""
    app = create_app(
        IngestSettings(
            model_specs_dir=SPECS_DIR,
            rebuild_readings_on_start=False,
            dead_letter_max_bytes=MAX_BYTES,
        )
    )
    broker: KafkaBroker = app.state.broker
    subscriber: Any = next(
        s for s in broker.subscribers if topics.FHIR_INBOUND in getattr(s, "topic_names", ())
    )
    harness = Inbound(broker, subscriber)

    @broker.subscriber(topics.INFERENCE_REQUESTS)
    async def requests(message: KafkaMessage) -> None:
        harness.requests.append(message.body)

    @broker.subscriber(topics.FHIR_INVALID)
    async def invalid(message: KafkaMessage) -> None:
        harness.invalid.append((message.raw_message.key, message.body))  # type: ignore[union-attr]

    async with TestKafkaBroker(broker):
        yield harness


def _record(offset: int, value: bytes, headers: list[tuple[str, bytes | None]]) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topics.FHIR_INBOUND,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=len(value),
        headers=headers,  # Kafka allows null values (aiokafka's hint says bytes)
    )


async def test_a_null_header_value_is_read_as_absent_and_the_next_record_is_processed_too(
    inbound: Inbound,
) -> None:
    """A poll whose first record has null header values (correlation id, traceparent, content
    type) is processed whole: both vitals Bundles become requests, none is rejected."""
    first = (FIXTURES / "vitals-bundle-medium.json").read_bytes()
    second = (FIXTURES / "vitals-bundle-high.json").read_bytes()
    nulls: list[tuple[str, bytes | None]] = [
        (h.CORRELATION_ID, None),
        ("traceparent", None),
        ("content-type", None),
        ("x-sender", b"ward-7"),
    ]
    poll = [_record(0, first, nulls), _record(1, second, [])]
    await inbound.subscriber.process_message(poll)
    subjects = [RequestInference.model_validate_json(r).subject_reference for r in inbound.requests]
    assert sorted(subjects) == ["Patient/example-high", "Patient/example-medium"]
    assert inbound.invalid == []


async def test_a_rejected_record_over_a_mebibyte_is_dead_lettered_within_the_bound(
    inbound: Inbound,
) -> None:
    """1.1 MiB of garbage on the inbound topic becomes a FhirEventRejected that fits the
    producer's request (value and key <= MEDMESH_DEAD_LETTER_MAX_BYTES) with the start of the
    payload, its whole size and SHA-256; the valid Bundle after it still becomes a request."""
    garbage = os.urandom(1_100 * 1024)
    key = b"mrn-garbage"
    await inbound.broker.publish(garbage, topic=topics.FHIR_INBOUND, key=key)
    await inbound.broker.publish(
        (FIXTURES / "vitals-bundle-medium.json").read_bytes(), topic=topics.FHIR_INBOUND
    )
    assert len(inbound.invalid) == 1
    dead_key, wire = inbound.invalid[0]
    assert len(wire) + len(dead_key or b"") <= MAX_BYTES
    event = FhirEventRejected.model_validate_json(wire)
    assert event.raw_truncated
    assert event.raw_size == len(garbage)
    assert event.raw_sha256 == hashlib.sha256(garbage).hexdigest()
    assert event.raw_encoding == "base64"
    assert len(event.raw_value) > MAX_BYTES // 2  # as much as fits, not nothing
    assert json.loads(wire)["operation_outcome"]["resourceType"] == "OperationOutcome"
    assert len(inbound.requests) == 1
