"""Small Kafka reads and writes for the ops commands (aiokafka, no consumer group unless asked)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from medmesh_cli.ops.connection import Connection
from medmesh_runtime.kafka import read_to_end, record_headers, topic_partitions


@dataclass(frozen=True)
class Entry:
    """One record read back from a topic."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]


@asynccontextmanager
async def consumer(
    connection: Connection, group_id: str | None = None
) -> AsyncIterator[AIOKafkaConsumer]:
    """A read_committed consumer that commits only when told to."""
    kafka = AIOKafkaConsumer(
        **connection.kafka(
            group_id=group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
    )
    try:
        # Inside: a start that fails (a refused login) still closes what it opened.
        await kafka.start()
        yield kafka
    finally:
        await stop_consumer(kafka)


async def stop_consumer(kafka: AIOKafkaConsumer) -> None:
    """Stop a consumer, passing on only a cancellation of the task that stops it.

    aiokafka's group-less consumer starts a task of its own in start() and cancels and awaits it
    in stop(). Stopped before that task first ran (no request made in between: `medmesh status`
    on a stack whose groups have committed nothing yet), the task's CancelledError comes out of
    stop(); it is not a cancellation of the caller, and, a BaseException, it would escape the
    command's error handling as a traceback."""
    try:
        await kafka.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def sizes(kafka: AIOKafkaConsumer, topic: str) -> tuple[int, dict[TopicPartition, int]]:
    """Messages currently in a topic, and the end offset of each partition."""
    parts = await topic_partitions(kafka, topic)
    if not parts:
        return 0, {}
    start = await kafka.beginning_offsets(parts)
    end = await kafka.end_offsets(parts)
    return sum(end[p] - start[p] for p in parts), end


async def read_range(
    kafka: AIOKafkaConsumer, topic: str, from_committed: bool = False, limit: int | None = None
) -> list[Entry]:
    """Records of a topic up to its current end, from the beginning or the group's position."""
    parts = await topic_partitions(kafka, topic)
    if not parts:
        return []
    starts = {part: await kafka.committed(part) for part in parts} if from_committed else None
    entries: list[Entry] = []

    def keep(record: Any) -> bool:
        entries.append(
            Entry(
                partition=record.partition,
                offset=record.offset,
                timestamp_ms=record.timestamp,
                key=record.key,
                value=record.value or b"",
                headers=record_headers(record),
            )
        )
        return limit is not None and len(entries) >= limit

    await read_to_end(kafka, parts, keep, starts=starts)
    entries.sort(key=lambda e: (e.timestamp_ms, e.partition, e.offset))
    return entries if limit is None else entries[:limit]


@asynccontextmanager
async def producer(connection: Connection) -> AsyncIterator[AIOKafkaProducer]:
    """A durable producer (acks=all, idempotent)."""
    kafka = AIOKafkaProducer(**connection.kafka(acks="all", enable_idempotence=True))
    try:
        # Inside: a start that fails (a refused login) still closes what it opened.
        await kafka.start()
        yield kafka
    finally:
        await kafka.stop()


async def group_lags(connection: Connection, prefix: str = "medmesh-") -> dict[str, dict[str, int]]:
    """Consumer lag per medmesh consumer group and topic (end offset minus committed offset),
    groups in name order; a group that has committed no offset yet maps to an empty dict."""
    admin = AIOKafkaAdminClient(**connection.kafka())
    try:
        await admin.start()
        groups = [g[0] for g in await admin.list_consumer_groups() if g[0].startswith(prefix)]
        committed = {g: await admin.list_consumer_group_offsets(g) for g in sorted(groups)}
    finally:
        await admin.close()
    lags: dict[str, dict[str, int]] = {}
    async with consumer(connection) as kafka:
        for group, offsets in committed.items():
            per_topic = lags.setdefault(group, {})
            if not offsets:
                continue
            end = await kafka.end_offsets(list(offsets))
            for part, meta in offsets.items():
                behind = max(0, end[part] - meta.offset)
                per_topic[part.topic] = per_topic.get(part.topic, 0) + behind
    return lags
