"""In-memory stand-ins for the delivery loop's Kafka clients (medmesh_reporting.delivery's
DeliveryConsumer and EventProducer protocols), shared by the delivery tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from medmesh_contracts import headers as h
from medmesh_contracts import topics


class DeliveryRecord:
    """One consumed record: a report (or a command on ``topic``), with its correlation id and,
    when given, its schema header."""

    def __init__(
        self,
        offset: int,
        value: bytes,
        correlation_id: str,
        topic: str = topics.REPORTS_DIAGNOSTIC,
        schema: str | None = None,
    ) -> None:
        self.topic = topic
        self.partition = 0
        self.offset = offset
        self.key = b"pseudo"
        self.value = value
        headers = [(h.CORRELATION_ID, correlation_id.encode())]
        if schema is not None:
            headers.append((h.SCHEMA, schema.encode()))
        self.headers = tuple(headers)


class DeliveryConsumer:
    """Hands out its records once and keeps the offsets committed."""

    def __init__(self, records: list[DeliveryRecord]) -> None:
        self.records = records
        self.commits: list[int] = []

    def subscribe(self, topics: Sequence[str]) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        records, self.records = self.records, []
        return {TopicPartition(topics.REPORTS_DIAGNOSTIC, 0): records} if records else {}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.commits.extend(offsets.values())


class SentEvents:
    """Keeps what the loop produces (undeliverable events), by topic."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        self.sent.append((topic, value or b""))
