"""An in-memory, transaction-aware Kafka: the worker bench runs the real ``TaskWorker`` loop on
it (``bench.worker``, linger), and the transactional stages' unit and service tests run on it
(``tests/transactional_kafka.py``). It lives here, not under tests/, because the bench is shipped
in the cli and cannot import tests; one fake keeps the two from drifting apart.

``FakeKafka`` keeps what a read_committed consumer would see: records produced in a transaction
become visible, and its offsets committed, only when the transaction commits; an abort drops
both. A fresh consumer starts from the committed offsets, as a restarted process does. A
producer started with a transactional id bumps that id's epoch, and every later request of an
older producer with the same id fails with ``ProducerFenced``, as Kafka's coordinator does. A
consumer waiting for records wakes when one is appended, as a long poll does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced

from medmesh_runtime.transactional import StageClients


@dataclass(frozen=True)
class FakeRecord:
    """A consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass
class FakeKafka:
    """Topics of committed records (by partition), groups' committed offsets, producer epochs."""

    partitions: int = 1
    committed: dict[str, dict[int, list[FakeRecord]]] = field(default_factory=dict)
    offsets: dict[tuple[str, TopicPartition], int] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)
    aborted: int = 0
    fail_sends: int = 0
    fail_starts: int = 0
    # How long init_transactions takes (a predecessor's open transaction being aborted).
    start_delay_s: float = 0.0
    # How long commit_transaction takes (the bench's broker round trips).
    commit_delay_s: float = 0.0
    transactional_ids: list[str] = field(default_factory=list)
    # Told each transaction's committed offsets, once they are visible (the bench times commits).
    on_commit: Callable[[Mapping[tuple[str, TopicPartition], int]], None] | None = None
    _waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = field(
        default_factory=list, repr=False
    )

    def append(
        self,
        topic: str,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
        *,
        key: bytes | None = b"key",
        partition: int = 0,
    ) -> None:
        """Write one committed record to ``partition`` of ``topic``."""
        records = self.committed.setdefault(topic, {}).setdefault(partition, [])
        records.append(FakeRecord(topic, partition, len(records), key, value, tuple(headers)))
        for watched, waiter in self._waiters:
            if topic in watched and not waiter.done():
                waiter.set_result(None)

    async def arrival(self, topics: Iterable[str], timeout_s: float) -> None:
        """Wait until a record is appended to one of ``topics``, ``timeout_s`` at most."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (frozenset(topics), waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait([waiter], timeout=timeout_s)
        finally:
            self._waiters.remove(entry)

    def records(self, topic: str) -> list[FakeRecord]:
        """The committed records of ``topic``, partition by partition."""
        return [r for p in sorted(self.committed.get(topic, {})) for r in self.committed[topic][p]]

    def values(self, topic: str) -> list[bytes]:
        """The committed values of ``topic``."""
        return [r.value or b"" for r in self.records(topic)]

    def offset(self, group: str, topic: str, partition: int = 0) -> int | None:
        """The group's committed offset of one partition (None: nothing committed)."""
        return self.offsets.get((group, TopicPartition(topic, partition)))

    def consumer(self, group: str) -> FakeConsumer:
        """A fresh, unstarted member of ``group`` (the only one: it gets every partition)."""
        return FakeConsumer(self, group)

    def producer(self, transactional_id: str) -> FakeProducer:
        """A fresh, unstarted transactional producer."""
        return FakeProducer(self, transactional_id)

    def clients(self, group: str) -> StageClients:
        """A transactional stage's clients, in ``group``, on this Kafka."""
        return StageClients(lambda: self.consumer(group), self.producer)


class FakeConsumer:
    """Reads every partition of the subscribed topics from the group's committed offsets; the
    worker's pause, resume and seek included."""

    def __init__(self, kafka: FakeKafka, group: str) -> None:
        self._kafka = kafka
        self._group = group
        self._topics: Sequence[str] = ()
        self._listener: ConsumerRebalanceListener | None = None
        self.positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None:
        """Remember the topics and the listener."""
        self._topics = topics
        self._listener = listener

    async def start(self) -> None:
        """Join: the listener hears of the assignment, then the committed offsets are fetched."""
        assigned = [
            TopicPartition(topic, p)
            for topic in self._topics
            for p in range(self._kafka.partitions)
        ]
        if self._listener is not None:
            await self._listener.on_partitions_assigned(assigned)
        for tp in assigned:
            self.positions[tp] = self._kafka.offsets.get((self._group, tp), 0)

    async def revoke(self) -> None:
        """A rebalance takes every partition away (the listener hears first)."""
        if self._listener is not None:
            await self._listener.on_partitions_revoked(list(self.positions))
        self.positions.clear()

    async def stop(self) -> None:
        """Nothing to release."""

    async def committed(self, partition: TopicPartition) -> int | None:
        """The group's committed offset of ``partition`` (None: none yet)."""
        return self._kafka.offsets.get((self._group, partition))

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        """The next records after each unpaused position (the positions move on); with none yet,
        what arrives within ``timeout_ms``."""
        out = self.take(max_records or 500)
        if not out:
            await self._kafka.arrival(self._topics, timeout_ms / 1000)
            out = self.take(max_records or 500)
        return out

    def take(self, budget: int) -> dict[TopicPartition, Sequence[Any]]:
        """Up to ``budget`` next records of the unpaused partitions, now (the positions move on)."""
        out: dict[TopicPartition, Sequence[Any]] = {}
        for tp, position in self.positions.items():
            if tp in self._paused:
                continue
            records = self._kafka.committed.get(tp.topic, {}).get(tp.partition, [])
            taken = records[position : position + budget]
            if taken:
                out[tp] = taken
                budget -= len(taken)
                self.positions[tp] = taken[-1].offset + 1
            if budget <= 0:
                break
        return out

    def assignment(self) -> set[TopicPartition]:
        """The assigned partitions."""
        return set(self.positions)

    def pause(self, *partitions: TopicPartition) -> None:
        """Fetch nothing of these partitions until resumed."""
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        """Fetch these partitions again."""
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        """The paused partitions."""
        return set(self._paused)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Fetch ``partition`` from ``offset`` next (an unassigned one is a bug, as in aiokafka)."""
        if partition not in self.positions:
            raise ValueError(f"seek on an unassigned partition {partition}")
        self.positions[partition] = offset


class FakeProducer:
    """A transactional producer: records and offsets become visible on commit only."""

    def __init__(self, kafka: FakeKafka, transactional_id: str) -> None:
        self._kafka = kafka
        self.transactional_id = transactional_id
        self._epoch = -1
        self._pending: list[
            tuple[str, bytes | None, bytes, tuple[tuple[str, bytes], ...], int]
        ] = []
        self._offsets: dict[tuple[str, TopicPartition], int] = {}

    def _check(self) -> None:
        if self._kafka.epochs.get(self.transactional_id) != self._epoch:
            raise ProducerFenced

    async def start(self) -> None:
        """init_transactions: bump the id's epoch (fencing older producers with this id)."""
        await asyncio.sleep(self._kafka.start_delay_s)
        if self._kafka.fail_starts > 0:
            self._kafka.fail_starts -= 1
            raise KafkaConnectionError("broker went away")
        self._epoch = self._kafka.epochs.get(self.transactional_id, -1) + 1
        self._kafka.epochs[self.transactional_id] = self._epoch
        self._kafka.transactional_ids.append(self.transactional_id)

    async def stop(self) -> None:
        """Nothing to release."""

    async def begin_transaction(self) -> None:
        """Start an empty transaction."""
        self._pending, self._offsets = [], {}

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]:
        """Add a record to the transaction; fails while ``fail_sends`` is positive."""
        if headers is not None and not isinstance(headers, list):
            raise TypeError(f"Expected list, got {type(headers).__name__}")  # as aiokafka does
        self._check()
        if self._kafka.fail_sends > 0:
            self._kafka.fail_sends -= 1
            raise KafkaConnectionError("broker went away")
        self._pending.append((topic, key, value or b"", tuple(headers or ()), partition or 0))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_id: str
    ) -> None:
        """Add the consumer's next offsets to the transaction."""
        self._check()
        self._offsets = {(group_id, tp): offset for tp, offset in offsets.items()}

    async def commit_transaction(self) -> None:
        """Make the records and offsets visible (after ``commit_delay_s``)."""
        if self._kafka.commit_delay_s:
            await asyncio.sleep(self._kafka.commit_delay_s)
        self._check()
        for topic, key, value, headers, partition in self._pending:
            self._kafka.append(topic, value, headers, key=key, partition=partition)
        self._kafka.offsets.update(self._offsets)
        if self._kafka.on_commit is not None:
            self._kafka.on_commit(self._offsets)
        self._pending, self._offsets = [], {}

    async def abort_transaction(self) -> None:
        """Drop the records and offsets."""
        self._kafka.aborted += 1
        self._pending, self._offsets = [], {}
