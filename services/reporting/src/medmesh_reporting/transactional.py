"""Consume -> handle -> produce in one Kafka transaction per batch: exactly-once reports.

Each batch that ``getmany`` returns is processed inside one producer transaction: every record the
handler returns (reports and dead letters alike) is produced, the batch's next offsets are added
with ``send_offsets_to_transaction``, and the transaction commits. A read_committed consumer of the
output topics therefore sees each result's output exactly once, however often the service dies:

- a crash before the commit leaves an open transaction that the restarted instance aborts when it
  calls ``init_transactions`` with the same ``transactional_id`` (which also fences a zombie), and
  the consumer resumes from the committed offsets, so the batch is processed again;
- any other error aborts the transaction, closes both clients and starts over from the committed
  offsets after a pause;
- partitions are only given up (rebalance) between transactions: the revocation waits for the
  transaction in flight, so no two instances commit offsets of the same partition for one batch.

``ProducerFenced`` means another process now owns this ``transactional_id``: the loop stops for
good and the service reports itself not alive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ProducerFenced

from medmesh_reporting.handling import ConsumedRecord, Outgoing
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.reporting.transactional")


class TransactionalProducer(Protocol):
    """The part of a transactional AIOKafkaProducer the loop uses."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def begin_transaction(self) -> None: ...
    async def commit_transaction(self) -> None: ...
    async def abort_transaction(self) -> None: ...
    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]: ...
    async def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_id: str
    ) -> None: ...


class BatchConsumer(Protocol):
    """The part of an AIOKafkaConsumer (group member, read_committed, no auto commit) used here."""

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]: ...


Handler = Callable[[ConsumedRecord], Iterable[Outgoing]]
ClientFactory = Callable[[], tuple[BatchConsumer, TransactionalProducer]]


@dataclass(frozen=True)
class LoopSettings:
    """How the loop consumes, and how long it pauses before starting over after an error."""

    group_id: str
    topics: tuple[str, ...]
    max_records: int = 200
    poll_timeout_ms: int = 200
    restart_pause_s: float = 1.0


class _WaitForTransaction(ConsumerRebalanceListener):  # type: ignore[misc]
    """Revocation waits until the transaction in flight has committed or aborted."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._lock:
            log.info("partitions revoked", partitions=sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))


class TransactionalLoop:
    """Runs the handler over the consumed records, one transaction per batch, until cancelled."""

    def __init__(self, clients: ClientFactory, handle: Handler, settings: LoopSettings) -> None:
        self._clients = clients
        self._handle = handle
        self._settings = settings
        self._in_transaction = asyncio.Lock()
        self.ready = False
        self.fenced = False
        self.transactions = 0
        self.records = 0

    async def run(self) -> None:
        """Process batches; on an error start over from the committed offsets; stop when fenced."""
        while True:
            consumer, producer = self._clients()
            try:
                await self._serve(consumer, producer)
            except ProducerFenced:
                self.fenced = True
                log.exception("another instance took over this transactional id: stopping")
                return
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                # aiokafka internals can raise CancelledError into the caller; it must not end
                # the loop silently while the process stays up (found by tests/chaos).
                log.warning(
                    "reporting loop failed: starting over from the committed offsets",
                    error="CancelledError raised inside the Kafka client",
                )
            except Exception as exc:  # noqa: BLE001 -- logged, then the loop starts over
                log.warning(
                    "reporting loop failed: starting over from the committed offsets",
                    error=f"{type(exc).__name__}: {exc}",
                )
            finally:
                self.ready = False
                await _stop_quietly(consumer, producer)
            await asyncio.sleep(self._settings.restart_pause_s)

    async def _serve(self, consumer: BatchConsumer, producer: TransactionalProducer) -> None:
        await producer.start()  # init_transactions: aborts what a crashed predecessor left open
        consumer.subscribe(
            self._settings.topics, listener=_WaitForTransaction(self._in_transaction)
        )
        await consumer.start()
        self.ready = True
        log.info("reporting loop started", topics=list(self._settings.topics))
        while True:
            await self.process_batch(consumer, producer)

    async def process_batch(self, consumer: BatchConsumer, producer: TransactionalProducer) -> int:
        """Consume one batch and commit its output and offsets in one transaction; its size."""
        batch = await consumer.getmany(
            timeout_ms=self._settings.poll_timeout_ms, max_records=self._settings.max_records
        )
        batch = {tp: records for tp, records in batch.items() if records}
        if not batch:
            return 0
        async with self._in_transaction:
            await producer.begin_transaction()
            try:
                count = await self._produce(batch, producer)
                await producer.commit_transaction()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.abort_transaction()
                raise
        self.transactions += 1
        self.records += count
        return count

    async def _produce(
        self, batch: Mapping[TopicPartition, Sequence[Any]], producer: TransactionalProducer
    ) -> int:
        deliveries = []
        count = 0
        for records in batch.values():
            for record in records:
                count += 1
                for out in self._handle(record):
                    deliveries.append(
                        await producer.send(
                            out.topic, out.value, key=out.key, headers=list(out.headers)
                        )
                    )
        await asyncio.gather(*deliveries)
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        await producer.send_offsets_to_transaction(offsets, self._settings.group_id)
        return count


async def _stop_quietly(consumer: BatchConsumer, producer: TransactionalProducer) -> None:
    """Stop both clients, whatever state a failure left them in.

    aiokafka's ``stop()`` can raise CancelledError although nobody cancelled this task (0.14's
    Fetcher.close awaits the fetch tasks it has just cancelled). Let through, a stray one ended
    the loop for good while the process stayed up and never reported again (found by
    tests/chaos, Kafka restart). It is swallowed unless this task itself is being cancelled.
    """
    for client in (consumer, producer):
        try:
            await client.stop()
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            log.info("client did not stop cleanly", error="CancelledError from inside aiokafka")
        except Exception as exc:  # noqa: BLE001 -- closing a broken client: nothing left to do
            log.info("client did not stop cleanly", error=f"{type(exc).__name__}: {exc}")


def _cancelled_from_outside() -> bool:
    """True when this task itself is being cancelled (not a CancelledError from a client)."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0
