"""The console's Kafka reads (LiveSources) over an in-memory broker: what one page load reads."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pytest
from aiokafka import TopicPartition

from medmesh_cli.ops import kafka_io
from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS
from medmesh_console.settings import ConsoleSettings
from medmesh_console.sources import LiveSources
from medmesh_console.views import AUDIT_DECISIONS_PER_PARTITION, DEAD_LETTERS_PER_PARTITION
from medmesh_contracts import topics
from tests.unit.test_console_views import audit

# Many more records than a page load may read: 14 days of dead letters, years of decisions.
HELD = 5 * max(AUDIT_DECISIONS_PER_PARTITION, DEAD_LETTERS_PER_PARTITION)
BATCH = 250  # records per fetch, as a broker hands them out


@dataclass
class Record:
    """A consumed record as aiokafka gives it (the fields the console reads)."""

    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    timestamp: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class Broker:
    """Topics in memory, and how many records consumers fetched from them."""

    logs: ClassVar[dict[TopicPartition, list[Record]]] = {}
    fetched: ClassVar[int] = 0

    @classmethod
    def fill(cls, topic: str, values: list[bytes]) -> None:
        """One partition of ``topic`` holding ``values`` at offsets 0.."""
        part = TopicPartition(topic, 0)
        cls.logs[part] = [Record(0, offset, value) for offset, value in enumerate(values)]

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {p.partition for p in self.logs if p.topic == topic}


class MemoryConsumer:
    """The part of AIOKafkaConsumer the console's reads use, over ``Broker``."""

    def __init__(self, **_kwargs: Any) -> None:
        self._positions: dict[TopicPartition, int] = {}
        self._client = self

    async def fetch_all_metadata(self) -> Broker:
        return Broker()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def beginning_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(parts, 0)

    async def end_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {p: len(Broker.logs[p]) for p in parts}

    def assign(self, parts: list[TopicPartition]) -> None:
        self._positions = dict.fromkeys(parts, 0)

    def seek(self, part: TopicPartition, offset: int) -> None:
        self._positions[part] = offset

    async def seek_to_beginning(self, *parts: TopicPartition) -> None:
        for part in parts:
            self._positions[part] = 0

    async def position(self, part: TopicPartition) -> int:
        return self._positions[part]

    async def getmany(
        self, *parts: TopicPartition, timeout_ms: int = 0
    ) -> dict[TopicPartition, list[Record]]:
        found = {}
        for part in parts:
            at = self._positions[part]
            batch = Broker.logs[part][at : at + BATCH]
            self._positions[part] = at + len(batch)
            Broker.fetched += len(batch)
            found[part] = batch
        return found


@pytest.fixture
def sources(monkeypatch: pytest.MonkeyPatch) -> LiveSources:
    """The console's live reads, with every Kafka consumer a MemoryConsumer."""
    monkeypatch.setattr(kafka_io, "AIOKafkaConsumer", MemoryConsumer)
    monkeypatch.setattr(Broker, "logs", {})
    monkeypatch.setattr(Broker, "fetched", 0)
    return LiveSources(ConsoleSettings(), httpx.AsyncClient())


def test_rollouts_page_reads_only_the_newest_audit_decisions(sources: LiveSources) -> None:
    """An audit topic kept for good holds many times the bound: one load fetches at most the
    newest AUDIT_DECISIONS_PER_PARTITION records, and those are the newest decisions."""
    held = [audit(minute, "hold", 2, {1: 95, 2: 5}) for minute in range(HELD)]
    Broker.fill(topics.MODELS_AUDIT, [d.model_dump_json().encode() for d in held])
    decisions, unreadable = asyncio.run(sources.decisions())
    assert Broker.fetched <= AUDIT_DECISIONS_PER_PARTITION
    assert unreadable == 0
    assert decisions == held[-AUDIT_DECISIONS_PER_PARTITION:]


def test_dead_letters_page_reads_only_the_newest_entries(sources: LiveSources) -> None:
    """Each dead-letter topic holds many times the bound: one load fetches at most
    DEAD_LETTERS_PER_PARTITION records of each of its partitions, and keeps each entry's reason
    (a short line), never its value (up to MEDMESH_DEAD_LETTER_MAX_BYTES)."""
    large = json.dumps({"reason": "unknown model", "raw": "x" * 500_000}).encode()
    for topic in DEAD_LETTER_TOPICS:
        Broker.fill(topic, [large] * HELD)
    entries = asyncio.run(sources.dead_letters())
    assert Broker.fetched <= DEAD_LETTERS_PER_PARTITION * len(DEAD_LETTER_TOPICS)
    assert len(entries) == DEAD_LETTERS_PER_PARTITION * len(DEAD_LETTER_TOPICS)
    assert {reason for _, reason in entries} == {"unknown model"}
