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
from medmesh_cli.ops.dlq import replay_of
from medmesh_contracts import topics
from medmesh_contracts.events import Producer, ReportUndeliverable, to_wire

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


def test_an_undeliverable_report_is_not_replayed_as_a_second_report() -> None:
    """replay_of refuses a ReportUndeliverable: sending it back would duplicate the report."""
    with pytest.raises(ValueError, match="publish the report a second time"):
        replay_of(_undeliverable(), b"pseudonym", "test")


def test_replaying_the_undeliverable_topic_is_refused_before_kafka(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`dlq replay medmesh.reports.undeliverable` exits 2 explaining why and what to do instead,
    without opening a Kafka client."""

    def no_kafka(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("no Kafka client may be built")

    monkeypatch.setattr(kafka_io, "consumer", no_kafka)
    monkeypatch.setattr(kafka_io, "producer", no_kafka)
    result = runner.invoke(app, ["dlq", "replay", topics.REPORTS_UNDELIVERABLE])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "publish the report a second time" in output
    assert "medmesh-reporting-delivery" in output
    assert "Undeliverable reports" in output


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
    result = runner.invoke(app, ["dlq", "replay", topics.FHIR_INVALID])
    assert result.exit_code == 1, result.output
    assert "skipped 0:0:" in result.output
    assert f"replayed 0:1 -> {topics.FHIR_INBOUND}" in result.output
    assert producer.sent == [(topics.FHIR_INBOUND, b"{}")]
    assert consumer.commits == [
        {TopicPartition(topics.FHIR_INVALID, 0): 1},
        {TopicPartition(topics.FHIR_INVALID, 0): 2},
    ]
