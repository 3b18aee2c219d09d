"""`medmesh dlq replay` without Kafka: what it refuses, skips and sends (the Kafka I/O faked)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import TopicPartition
from typer.testing import CliRunner

from medmesh_cli.main import app
from medmesh_cli.ops import kafka_io
from medmesh_cli.ops.connection import Connection
from medmesh_cli.ops.dlq import REPLAY_HEADER, replay_of
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import DeliverReport, Producer, ReportUndeliverable, to_wire

runner = CliRunner()


def _undeliverable() -> dict[str, Any]:
    event = ReportUndeliverable(
        correlation_id="c-1",
        producer=Producer(service="reporting", instance="r-0"),
        fhir_server="https://fhir.example/r4",
        report={"resourceType": "Bundle", "type": "collection", "entry": []},
        status_code=422,
        reason="the FHIR server answered 422",
        attempts=1,
    )
    loaded: dict[str, Any] = json.loads(to_wire(event))
    return loaded


def test_an_undeliverable_report_is_replayed_as_a_delivery_request_not_a_report() -> None:
    """replay_of turns a ReportUndeliverable into a DeliverReport command on the delivery-request
    topic (never back to medmesh.reports.diagnostic), same report, key and correlation id."""
    event = _undeliverable()
    replay = replay_of(event, b"pseudonym", "medmesh.reports.undeliverable/0/4")
    assert replay.topic == topics.REPORTS_DELIVERY_REQUESTS
    assert replay.key == b"pseudonym"
    command = DeliverReport.model_validate_json(replay.value)
    assert command.report == event["report"]
    assert command.correlation_id == "c-1"
    assert command.replay_of == "medmesh.reports.undeliverable/0/4"
    headers = dict(replay.headers)
    assert headers[h.SCHEMA] == b"medmesh.DeliverReport/1"
    assert headers[h.CORRELATION_ID] == b"c-1"
    assert headers[REPLAY_HEADER] == b"medmesh.reports.undeliverable/0/4"


class FakeConsumer:
    """Records commits."""

    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)


class FakeProducer:
    """Records what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send_and_wait(self, topic: str, value: bytes, **_kwargs: Any) -> None:
        self.sent.append((topic, value))


def _kafka_holding(
    monkeypatch: pytest.MonkeyPatch, entries: list[kafka_io.Entry]
) -> tuple[FakeConsumer, FakeProducer]:
    """The CLI's Kafka I/O replaced: the topic holds ``entries``; what is sent and committed is
    kept."""
    consumer, producer = FakeConsumer(), FakeProducer()

    @asynccontextmanager
    async def fake_consumer(_c: Connection, group_id: str | None = None) -> AsyncIterator[Any]:
        yield consumer

    @asynccontextmanager
    async def fake_producer(_c: Connection) -> AsyncIterator[Any]:
        yield producer

    async def fake_read_range(*_args: Any, **_kwargs: Any) -> list[kafka_io.Entry]:
        return entries

    monkeypatch.setattr(kafka_io, "consumer", fake_consumer)
    monkeypatch.setattr(kafka_io, "producer", fake_producer)
    monkeypatch.setattr(kafka_io, "read_range", fake_read_range)
    return consumer, producer


def test_an_entry_that_cannot_be_replayed_is_skipped_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A truncated dead letter is skipped with its reason, the next entry is still replayed,
    both are committed past, and the command exits 1 naming the skipped entry."""
    truncated = {
        "source_topic": topics.FHIR_INBOUND,
        "source_offset": 7,
        "raw_value": "{",
        "raw_encoding": "utf-8",
        "raw_truncated": True,
        "raw_size": 2_000_000,
        "raw_sha256": "ab" * 32,
    }
    whole = {"source_topic": topics.FHIR_INBOUND, "raw_value": "{}", "raw_encoding": "utf-8"}
    entries = [
        kafka_io.Entry(0, offset, 0, b"k", json.dumps(event).encode(), {})
        for offset, event in enumerate([truncated, whole])
    ]
    consumer, producer = _kafka_holding(monkeypatch, entries)
    result = runner.invoke(app, ["dlq", "replay", topics.FHIR_INVALID])
    assert result.exit_code == 1, result.output
    assert "skipped 0:0:" in result.output
    assert f"replayed 0:1 -> {topics.FHIR_INBOUND}" in result.output
    assert producer.sent == [(topics.FHIR_INBOUND, b"{}")]
    assert consumer.commits == [
        {TopicPartition(topics.FHIR_INVALID, 0): 1},
        {TopicPartition(topics.FHIR_INVALID, 0): 2},
    ]


def test_replaying_the_undeliverable_topic_sends_delivery_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`dlq replay medmesh.reports.undeliverable` sends each report as a DeliverReport command to
    medmesh.reports.delivery-requests and commits past it; nothing goes to the report topic."""
    entries = [kafka_io.Entry(0, 3, 0, b"k", json.dumps(_undeliverable()).encode(), {})]
    consumer, producer = _kafka_holding(monkeypatch, entries)
    result = runner.invoke(app, ["dlq", "replay", topics.REPORTS_UNDELIVERABLE])
    assert result.exit_code == 0, result.output
    assert [topic for topic, _value in producer.sent] == [topics.REPORTS_DELIVERY_REQUESTS]
    assert consumer.commits == [{TopicPartition(topics.REPORTS_UNDELIVERABLE, 0): 4}]
