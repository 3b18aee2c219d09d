"""The readings state on Kafka: rebuilt from medmesh.ingest.readings on start, partitioned by
patient pseudonym (the same partition a RequestInference keyed by that pseudonym goes to)."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.events import PatientReadingsUpdated
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.settings import IngestSettings
from medmesh_runtime.kafka import aiokafka_security
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.ingest.state")


def partition_of(pseudonym: str, partitions: int) -> int:
    """The partition of a pseudonym: Kafka's default (murmur2) partitioner on the pseudonym."""
    digest: int = murmur2(pseudonym.encode())
    return (digest & 0x7FFFFFFF) % partitions


async def rebuild(store: ReadingsStore, settings: IngestSettings, timeout_s: float = 60.0) -> int:
    """Read medmesh.ingest.readings from the beginning to its end into ``store``.

    Returns the topic's partition count (for partitioning what ingest writes there).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
        **aiokafka_security(settings),
    )
    await consumer.start()
    try:
        # aiokafka has no public call for the partitions of a topic not subscribed to.
        cluster = await consumer._client.fetch_all_metadata()
        found = cluster.partitions_for_topic(topics.INGEST_READINGS)
        if not found:
            raise RuntimeError(f"topic {topics.INGEST_READINGS} does not exist")
        parts = [TopicPartition(topics.INGEST_READINGS, p) for p in sorted(found)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout_s
        read = 0
        while await _behind(consumer, parts, end):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topics.INGEST_READINGS} took over {timeout_s}s")
            batches = await consumer.getmany(*parts, timeout_ms=500)
            for records in batches.values():
                for record in records:
                    read += 1
                    _apply(store, record.value)
        log.info("readings state rebuilt", records=read, states=len(store), partitions=len(parts))
        return len(parts)
    finally:
        await consumer.stop()


async def _behind(
    consumer: AIOKafkaConsumer, parts: list[TopicPartition], end: dict[TopicPartition, int]
) -> bool:
    for tp in parts:
        if await consumer.position(tp) < end[tp]:
            return True
    return False


def _apply(store: ReadingsStore, value: bytes | None) -> None:
    if value is None:
        return  # a tombstone: the key was deleted
    try:
        store.put(PatientReadingsUpdated.model_validate_json(value))
    except ValidationError:
        log.warning("unreadable readings state record skipped")
