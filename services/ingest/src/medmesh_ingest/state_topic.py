"""Ingest's state on Kafka, rebuilt on start and followed afterwards: the patients' readings
(medmesh.ingest.readings, partitioned by patient pseudonym: the same partition a
RequestInference keyed by that pseudonym goes to) and the subscriptions' highest handled event
numbers (medmesh.ingest.subscriptions)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.events import PatientReadingsUpdated, SubscriptionEventsHandled
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.settings import IngestSettings
from medmesh_ingest.subscriptions import SubscriptionProgress
from medmesh_runtime.kafka import aiokafka_security, read_to_end, topic_partitions
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.ingest.state")
# How often the follower forgets states older than the retention.
_SWEEP_INTERVAL_S = 60.0


def partition_of(pseudonym: str, partitions: int) -> int:
    """The partition of a pseudonym: Kafka's default (murmur2) partitioner on the pseudonym."""
    digest: int = murmur2(pseudonym.encode())
    return (digest & 0x7FFFFFFF) % partitions


class ReadingsFollower:
    """The readings state of every patient, rebuilt from medmesh.ingest.readings on start and
    then kept following it, so that an instance sees what the other instances merged.

    Without following, an instance knew only the states of the start and its own writes, and a
    patient whose readings reached two instances one after the other was never complete on
    either. Following leaves only readings that two instances merge at the same moment (within
    the topic's replication delay) to race; ``ReadingsStore.put`` then combines the two states
    (``readings.combine``: each input's latest reading, both sets of answered orders), so
    neither instance's readings are lost.
    """

    def __init__(
        self,
        store: ReadingsStore,
        settings: IngestSettings,
        subscriptions: SubscriptionProgress | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        # None: the subscriptions' event numbers are not read (tools that need only readings).
        self.subscriptions = subscriptions
        self.applied = 0
        # Records that could not be applied (logged one by one, with their offsets).
        self.skipped = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 60.0) -> int:
        """Read the topic from the beginning to its end into the store, then follow it.

        Returns the topic's partition count (for partitioning what ingest writes there).
        """
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"medmesh-ingest-state-{self.settings.instance_id}",
            **aiokafka_security(self.settings),
        )
        await consumer.start()
        self._consumer = consumer
        try:
            partitions = await self._rebuild(consumer, timeout_s)
        except BaseException:
            await self.stop()  # no consumer left behind when the start fails
            raise
        self._task = asyncio.create_task(self._follow(consumer), name="readings-follower")
        return partitions

    async def _rebuild(self, consumer: AIOKafkaConsumer, timeout_s: float) -> int:
        parts = await topic_partitions(consumer, topics.INGEST_READINGS)
        if not parts:
            raise RuntimeError(f"topic {topics.INGEST_READINGS} does not exist")
        followed = list(parts)
        if self.subscriptions is not None:
            counters = await topic_partitions(consumer, topics.INGEST_SUBSCRIPTIONS)
            if not counters:
                raise RuntimeError(f"topic {topics.INGEST_SUBSCRIPTIONS} does not exist")
            followed += counters
        try:
            await read_to_end(consumer, followed, self.apply_record, timeout_s=timeout_s)
        except TimeoutError:
            raise TimeoutError(f"reading ingest's state took over {timeout_s}s") from None
        self.forget_stale()  # the topic deletes whole segments, so older states may remain
        # Evicted: states the rebuild read but could not keep under MEDMESH_READINGS_MAX_BYTES.
        log.info(
            "readings state rebuilt",
            records=self.applied,
            states=len(self.store),
            bytes=self.store.bytes,
            evicted=self.store.evicted,
            partitions=len(parts),
            subscriptions=None if self.subscriptions is None else len(self.subscriptions),
            subscriptions_evicted=None
            if self.subscriptions is None
            else self.subscriptions.evicted,
        )
        return len(parts)

    async def _apply_next(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> None:
        batches = await consumer.getmany(timeout_ms=timeout_ms)
        for records in batches.values():
            for record in records:
                self.apply_record(record)

    def apply_record(self, record: Any) -> None:
        """Apply one record of either topic (read at start or followed)."""
        if record.topic == topics.INGEST_SUBSCRIPTIONS:
            self._apply_counter(record)
            return
        self.applied += 1
        if record.key is not None and self.store.wrote(
            bytes(record.key).decode(errors="replace"), record.offset
        ):
            return  # this instance's own write, stored when its transaction committed
        try:
            _apply(self.store, record.value)
        except Exception as exc:  # noqa: BLE001 -- one record's failure: counted, the rest go on
            # A state is ingest's own record, not an input to dead-letter: skipping it costs
            # that patient's merged readings (the next reading starts a new set), while
            # raising would stop the rebuild (ingest cannot start) or drop the poll's rest.
            self.skipped += 1
            log.warning(
                "readings state record skipped",
                partition=record.partition,
                offset=record.offset,
                error=type(exc).__name__,
            )

    def _apply_counter(self, record: Any) -> None:
        if self.subscriptions is None or record.value is None:
            return  # not followed, or a tombstone
        try:
            handled = SubscriptionEventsHandled.model_validate_json(record.value)
        except ValidationError as exc:
            # Ingest's own record, not an input to dead-letter: skipping it only means that
            # subscription's counting restarts at its next notification (as on a first one).
            self.skipped += 1
            log.warning(
                "subscription counter record skipped",
                partition=record.partition,
                offset=record.offset,
                errors=exc.error_count(),
            )
            return
        self.subscriptions.learn(handled)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        swept = time.monotonic()
        while True:
            try:
                await self._apply_next(consumer, timeout_ms=1000)
            except Exception:  # the follower must outlive a broker outage; the error is logged
                log.exception("following the readings state failed; retrying in 1 s")
                await asyncio.sleep(1.0)
            if time.monotonic() - swept >= _SWEEP_INTERVAL_S:
                swept = time.monotonic()
                self.forget_stale()

    def forget_stale(self, now: datetime | None = None) -> int:
        """Forget the states not updated within the retention (the topic deletes them too)."""
        retention = timedelta(hours=self.settings.readings_retention_hours)
        forgotten = self.store.forget_older_than((now or datetime.now(UTC)) - retention)
        if forgotten:
            log.info("stale readings states forgotten", states=forgotten, kept=len(self.store))
        return forgotten

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def _apply(store: ReadingsStore, value: bytes | None) -> None:
    if value is None:
        return  # a tombstone: the key was deleted
    store.put(PatientReadingsUpdated.model_validate_json(value))
