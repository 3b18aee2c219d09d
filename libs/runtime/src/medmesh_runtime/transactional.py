"""Consume -> transform -> produce exactly once, and no record can stall its partition.

Every consume-transform-produce stage of medmesh (ingest's inbound poll, the router, the
workers, reporting) commits through this module:

- **One transaction per input partition and poll.** The outputs of a partition's records and
  that partition's next offset are committed in one Kafka transaction, so a read_committed
  consumer sees each input's outputs exactly once however often a service dies: a crash before
  the commit leaves the transaction open, it is aborted when the partition's next owner starts
  its producer, and the records are processed again from the committed offset.
- **Zombies are fenced.** Each input partition has its own transactional producer, whose
  ``transactional_id`` names the partition (``<prefix>-<topic>-<partition>``). The instance the
  group gives the partition to starts that producer in its rebalance callback;
  ``init_transactions`` bumps the id's epoch, which aborts whatever the previous owner left open
  and makes every later request of the previous owner's producer fail with ``ProducerFenced``. An instance stalled past its session timeout and then resumed
  therefore cannot commit anything; it drops its clients and rejoins (aiokafka speaks
  TxnOffsetCommit v0, without the group generation that would fence it otherwise: KIP-447).
- **Poison is isolated.** A handler error that is not one of the ``transient`` kinds (Kafka or a
  backend being away) is the records' fault: the poll's records are handled one by one, each up
  to ``max_attempts`` times with a growing pause, and a record that still fails is replaced by
  its dead letter, produced in the same transaction as its offset. An output too large for the
  producer's request limit is also replaced by a dead letter naming the limit, rather than
  failing its transaction on every redelivery.

Offsets: partitions are only given up between transactions (revocation waits for the
transaction in flight). aiokafka assigns a partition, and may fetch its committed offset and
hand out its records, before the rebalance callback has started the partition's producer: a
commit waits for that producer, and the committed offset is read again once the producer has
fenced the previous owner (only then is it final), so records fetched from before it are not
committed but the loop starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from medmesh_runtime.logging import error_reason, get_logger, log_dead_letter, redact_text
from medmesh_runtime.retry import retrying
from medmesh_runtime.settings import PRODUCER_MAX_REQUEST_SIZE

log = get_logger("medmesh.transactional")

# What a record's framing, and aiokafka's batch header around it, add to its key, value and
# headers: an output whose parts leave less than this under the request limit is refused by
# the producer (MessageSizeTooLargeError) and is dead-lettered here instead.
_RECORD_OVERHEAD = 512


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to produce in the transaction of the input it was made from."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    # None: the producer's partitioner decides (murmur2 of the key).
    partition: int | None = None

    @property
    def size(self) -> int:
        """Bytes of key, value and headers (what the producer's request limit counts)."""
        return (
            len(self.key or b"")
            + len(self.value)
            + sum(len(name) + len(value) for name, value in self.headers)
        )


def encoded_headers(headers: Mapping[str, str]) -> tuple[tuple[str, bytes], ...]:
    """Text headers (medmesh's and W3C trace context) as a produced record carries them."""
    return tuple((name, value.encode()) for name, value in headers.items())


class TransactionalProducer(Protocol):
    """The part of a transactional AIOKafkaProducer used here."""

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
        partition: int | None = None,
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
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]: ...


# transactional_id -> an unstarted producer with that id (acks=all, idempotent).
ProducerFactory = Callable[[str], TransactionalProducer]
# The outputs of each record, in the order of the records (one list per record, maybe empty).
BatchHandler = Callable[[Sequence[Any]], Awaitable[Sequence[Sequence[OutgoingRecord]]]]
# The dead letter of a record and a reason (no patient data: the record is in its payload).
DeadLetterBuilder = Callable[[Any, str], OutgoingRecord]


class CommittedOffsets(Protocol):
    """The part of an AIOKafkaConsumer that reads its group's committed offset."""

    async def committed(self, partition: TopicPartition) -> int | None: ...


class PartitionLostError(Exception):
    """Another instance owns the partition now: this instance's producer for it was fenced."""


def transactional_id(prefix: str, partition: TopicPartition) -> str:
    """The transactional id of the producer that commits one input partition's outputs."""
    return f"{prefix}-{partition.topic}-{partition.partition}"


class PartitionTransactions:
    """One transactional producer per assigned input partition; commits a partition's outputs
    with its next offset in one transaction."""

    def __init__(self, make_producer: ProducerFactory, group_id: str, id_prefix: str) -> None:
        self._make_producer = make_producer
        self._group_id = group_id
        self._id_prefix = id_prefix
        self._producers: dict[TopicPartition, TransactionalProducer] = {}
        self._locks: dict[TopicPartition, asyncio.Lock] = {}
        # Assignments whose producers are starting, and whether ``close`` was called: a closed
        # instance starts no producer (a late rebalance callback of a stopped consumer would
        # otherwise start one that fences the producer of the loop's next consumer).
        self._starting: set[asyncio.Future[list[None]]] = set()
        self._closed = False
        # Per partition being started, done once it started (or failed to).
        self._starts: dict[TopicPartition, asyncio.Future[None]] = {}
        # A newly assigned partition's committed offset as read after its producer started,
        # until its first commit checks the records it commits begin there.
        self._committed: dict[TopicPartition, int] = {}
        # An assignment whose producer could not start: the owner must start over (raise_failure)
        # rather than fetch offsets that a predecessor's open transaction may still change.
        self.failure: BaseException | None = None
        self.transactions = 0

    def listener(self, consumer: CommittedOffsets | None = None) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe ``consumer`` with: it starts and stops the
        producers, and reads each assigned partition's committed offset again once its producer
        started (see ``commit``)."""
        return _Listener(self, consumer)

    def raise_failure(self) -> None:
        """Raise the error of an assignment whose producer did not start (None: nothing)."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    async def assigned(
        self, partitions: Iterable[TopicPartition], consumer: CommittedOffsets | None = None
    ) -> None:
        """Start (and so fence the previous owner of) each newly assigned partition's producer,
        all at once: each may wait for its predecessor's open transaction to be aborted. Then
        read the partition's committed offset again: only now is it final."""
        if self._closed:
            return
        new = [p for p in partitions if p not in self._producers]
        loop = asyncio.get_running_loop()
        for partition in new:  # before any await: a commit arriving meanwhile waits for these
            self._starts[partition] = loop.create_future()
        starting = asyncio.gather(*(self._start_assigned(p, consumer) for p in new))
        self._starting.add(starting)
        try:
            # Shielded: a cancelled callback leaves the starts to finish, for close to stop.
            await asyncio.shield(starting)
        finally:
            self._starting.discard(starting)

    async def _start_assigned(
        self, partition: TopicPartition, consumer: CommittedOffsets | None
    ) -> None:
        try:
            await self._start(partition)
            if consumer is not None:
                committed = await consumer.committed(partition)
                if committed is not None:
                    self._committed[partition] = committed
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            self._failed(partition, RuntimeError("CancelledError raised inside aiokafka"))
        except Exception as exc:  # noqa: BLE001 -- kept: the loop raises it and starts over
            self._failed(partition, exc)
        finally:
            started = self._starts.pop(partition, None)
            if started is not None and not started.done():
                started.set_result(None)

    def _failed(self, partition: TopicPartition, exc: BaseException) -> None:
        log.warning(
            "transactional producer did not start",
            partition=str(partition),
            error=f"{type(exc).__name__}: {exc}",
        )
        self.failure = exc

    async def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        """Wait for each revoked partition's transaction in flight, then stop its producer."""
        for partition in partitions:
            async with self._lock(partition):
                producer = self._producers.pop(partition, None)
            if producer is not None:
                await _stop_quietly(producer)

    async def close(self) -> None:
        """Stop every producer (the consumer has stopped, or the loop starts over), once the
        producers still starting have started: none is left running, none starts later."""
        self._closed = True
        await asyncio.gather(*self._starting, return_exceptions=True)
        await self.revoked(list(self._producers))

    async def commit(
        self,
        partition: TopicPartition,
        outputs: Sequence[OutgoingRecord],
        next_offset: int,
        *,
        first_offset: int | None = None,
    ) -> list[Any]:
        """Produce ``outputs`` (made of the records from ``first_offset``) and move
        ``partition``'s committed offset to ``next_offset``, in one transaction; each output's
        RecordMetadata. ``PartitionLostError`` when another instance owns the partition, or
        when the first commit after an assignment would start before the committed offset
        read once this instance had fenced the previous owner: aiokafka may fetch (and
        hand out) records from an offset read before that, which a predecessor finishing its
        last transaction can still move on."""
        starting = self._starts.get(partition)
        if starting is not None:
            await asyncio.shield(starting)
        async with self._lock(partition):
            producer = self._producers.get(partition)
            if producer is None:
                # Not (or no longer) this instance's: revoked, fenced, or its start failed (the
                # loop then starts over). Starting a producer here would fence the owner.
                raise PartitionLostError(f"{partition} is not held by this instance")
            committed = self._committed.pop(partition, None)
            # Below it only: above it is normal (the offset after a transaction is its commit
            # marker, which no consumer receives).
            if committed is not None and first_offset is not None and first_offset < committed:
                raise PartitionLostError(
                    f"{partition}: records from offset {first_offset} were read before the "
                    f"committed offset became final ({committed})"
                )
            await producer.begin_transaction()
            try:
                deliveries = [await _send(producer, out) for out in outputs]
                written = list(await asyncio.gather(*deliveries))
                await producer.send_offsets_to_transaction({partition: next_offset}, self._group_id)
                await producer.commit_transaction()
            except ProducerFenced as fenced:
                # Nothing of this transaction becomes visible; the producer is dead for good.
                self._producers.pop(partition, None)
                await _stop_quietly(producer)
                raise PartitionLostError(
                    f"another instance owns {partition} now (this one was fenced)"
                ) from fenced
            except BaseException:
                try:
                    await producer.abort_transaction()
                except Exception:  # noqa: BLE001 -- unusable now: the loop starts over without it
                    self._producers.pop(partition, None)
                    await _stop_quietly(producer)
                raise
            self.transactions += 1
            return written

    async def _start(self, partition: TopicPartition) -> TransactionalProducer:
        producer = self._make_producer(transactional_id(self._id_prefix, partition))
        try:
            await producer.start()  # init_transactions: fences the partition's previous owner
        except BaseException:
            await _stop_quietly(producer)
            raise
        self._producers[partition] = producer
        return producer

    def _lock(self, partition: TopicPartition) -> asyncio.Lock:
        return self._locks.setdefault(partition, asyncio.Lock())


async def _send(producer: TransactionalProducer, out: OutgoingRecord) -> Awaitable[Any]:
    """Hand one output to the producer (aiokafka wants the headers as a list): its delivery."""
    return await producer.send(
        out.topic, out.value, key=out.key, partition=out.partition, headers=list(out.headers)
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(
        self, transactions: PartitionTransactions, consumer: CommittedOffsets | None
    ) -> None:
        self._transactions = transactions
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        await self._transactions.revoked(revoked)
        if revoked:
            log.info("partitions revoked", partitions=sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = list(assigned)
        await self._transactions.assigned(assigned, self._consumer)
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))


@dataclass
class IsolationStats:
    """What poison isolation did (for logs, metrics and tests)."""

    isolated_polls: int = 0
    retries: int = 0
    dead_lettered: int = 0


@dataclass
class PoisonIsolation:
    """Runs a batch handler so that no record can fail its poll forever.

    An error of a ``transient`` kind is raised (nothing is the records' fault: the caller
    retries the poll from its committed offsets). Any other error makes the records handled
    one at a time, each up to ``max_attempts`` times; a record that keeps failing is replaced
    by its dead letter. An output over ``max_output_bytes`` replaces its record's outputs by a
    dead letter too.
    """

    handle: BatchHandler
    dead_letter: DeadLetterBuilder
    transient: tuple[type[BaseException], ...] = (KafkaError,)
    max_attempts: int = 3
    backoff_s: float = 0.2
    max_output_bytes: int = PRODUCER_MAX_REQUEST_SIZE - _RECORD_OVERHEAD
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    stats: IsolationStats = field(default_factory=IsolationStats)

    async def outputs(self, records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        """Each record's outputs (or its dead letter), in the order of ``records``."""
        if not records:
            return []
        if len(records) == 1:
            return [await self._alone(records[0])]
        try:
            produced = await self._handled(records)
        except self.transient:
            raise
        except Exception as exc:  # noqa: BLE001 -- the poll's records are retried one by one
            self.stats.isolated_polls += 1
            log.warning(
                "a poll failed: handling its records one at a time",
                records=len(records),
                error=_reason(exc),
            )
            return [await self._alone(record) for record in records]
        return [self._fitting(record, outs) for record, outs in zip(records, produced, strict=True)]

    async def _handled(self, records: Sequence[Any]) -> Sequence[Sequence[OutgoingRecord]]:
        produced = await self.handle(records)
        if len(produced) != len(records):
            raise RuntimeError(
                f"the handler returned outputs for {len(produced)} of {len(records)} records"
            )
        return produced

    async def _alone(self, record: Any) -> list[OutgoingRecord]:
        """One record's outputs, tried up to ``max_attempts`` times; else its dead letter."""
        try:
            async for attempt in retrying(
                self.max_attempts,
                self.backoff_s,
                transient=self.transient,
                sleep=self.sleep,
                on_retry=self._count_retry,
            ):
                with attempt:
                    produced = await self._handled([record])
        except self.transient:
            raise
        except Exception as exc:  # noqa: BLE001 -- every attempt failed: the dead letter
            return [
                self._dead_lettered(
                    record, f"failed {self.max_attempts} times; last error: {_reason(exc)}"
                )
            ]
        return self._fitting(record, produced[0])

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def _fitting(self, record: Any, outputs: Sequence[OutgoingRecord]) -> list[OutgoingRecord]:
        for out in outputs:
            if out.size > self.max_output_bytes:
                return [
                    self._dead_lettered(
                        record,
                        f"its output to {out.topic} takes {out.size} bytes, over the "
                        f"{self.max_output_bytes} a Kafka record may take",
                    )
                ]
        return list(outputs)

    def _dead_lettered(self, record: Any, reason: str) -> OutgoingRecord:
        self.stats.dead_lettered += 1
        log_dead_letter(log, "record", record, reason)
        return self.dead_letter(record, reason)


def _reason(exc: BaseException) -> str:
    """An error as a dead letter's reason (``error_reason``: never the input)."""
    return error_reason(exc)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop consumes, how, and how long it pauses before starting over after an error."""

    group_id: str
    topics: tuple[str, ...]
    # Prefix of the per-partition transactional ids: the same for every instance of a stage.
    transactional_id_prefix: str
    max_records: int = 200
    poll_timeout_ms: int = 200
    restart_pause_s: float = 1.0


def per_record(
    handle: Callable[[Any], Iterable[OutgoingRecord]],
) -> BatchHandler:
    """A batch handler made of a pure per-record one (no I/O)."""

    async def handle_batch(records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        return [list(handle(record)) for record in records]

    return handle_batch


@dataclass(frozen=True)
class StageClients:
    """How a transactional stage builds its Kafka clients (tests pass in-memory fakes)."""

    consumer: Callable[[], BatchConsumer]
    producer: ProducerFactory


# Commits one poll, given by partition, through the partitions' transactions (raises to make
# the loop start over from the committed offsets).
PollProcessor = Callable[
    [Mapping[TopicPartition, Sequence[Any]], PartitionTransactions], Awaitable[None]
]


class CommitOutputs:
    """The usual poll processor: each record's outputs by ``PoisonIsolation``, then each
    partition's outputs and next offset in its transaction, the partitions concurrently."""

    def __init__(self, isolation: PoisonIsolation) -> None:
        self.isolation = isolation

    async def __call__(
        self, batch: Mapping[TopicPartition, Sequence[Any]], transactions: PartitionTransactions
    ) -> None:
        """Handle the poll's records and commit them, one transaction per partition."""
        records = [record for partition in batch.values() for record in partition]
        outputs = await self.isolation.outputs(records)
        by_record = dict(zip(map(_position, records), outputs, strict=True))
        await commit_all(
            transactions.commit(
                tp,
                [out for record in partition for out in by_record[_position(record)]],
                partition[-1].offset + 1,
                first_offset=partition[0].offset,
            )
            for tp, partition in batch.items()
        )


async def commit_all(commits: Iterable[Awaitable[Any]]) -> None:
    """Run partitions' commits concurrently; each runs to its end, the first error is raised."""
    for result in await asyncio.gather(*commits, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


class TransactionalLoop:
    """Consumes ``settings.topics`` and commits each poll's outputs and offsets, one transaction
    per partition, until cancelled; starts over from the committed offsets after an error.

    ``process`` is a ``PoisonIsolation`` (each record's outputs, ``CommitOutputs``) or a poll
    processor of the stage's own (ingest's inbound poll merges a partition's events together).
    """

    def __init__(
        self,
        clients: StageClients,
        process: PoisonIsolation | PollProcessor,
        settings: LoopSettings,
    ) -> None:
        self._make_consumer = clients.consumer
        self._make_producer = clients.producer
        self._process = CommitOutputs(process) if isinstance(process, PoisonIsolation) else process
        self._settings = settings
        self.ready = False
        self.transactions = 0
        self.records = 0
        self.restarts = 0

    async def run(self) -> None:
        """Process polls until cancelled; after any error, start over with new clients."""
        while True:
            consumer = self._make_consumer()
            transactions = PartitionTransactions(
                self._make_producer, self._settings.group_id, self._settings.transactional_id_prefix
            )
            try:
                await self._serve(consumer, transactions)
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                # aiokafka internals can raise CancelledError into the caller; it must not end
                # the loop silently while the process stays up (found by tests/chaos).
                self._starting_over("CancelledError raised inside the Kafka client")
            except PartitionLostError as lost:
                self._starting_over(str(lost))
            except Exception as exc:  # noqa: BLE001 -- logged, then the loop starts over
                self._starting_over(f"{type(exc).__name__}: {exc}")
            finally:
                self.ready = False
                await _stop_quietly(consumer)
                await transactions.close()
            await asyncio.sleep(self._settings.restart_pause_s)

    def _starting_over(self, error: str) -> None:
        self.restarts += 1
        log.warning(
            "consume loop failed: starting over from the committed offsets",
            topics=list(self._settings.topics),
            error=redact_text(error)[:500],
        )

    async def _serve(self, consumer: BatchConsumer, transactions: PartitionTransactions) -> None:
        consumer.subscribe(list(self._settings.topics), listener=transactions.listener(consumer))
        await consumer.start()
        self.ready = True
        log.info("consume loop started", topics=list(self._settings.topics))
        while True:
            await self.process_batch(consumer, transactions)

    async def process_batch(
        self, consumer: BatchConsumer, transactions: PartitionTransactions
    ) -> int:
        """Consume one poll and commit it, one transaction per partition; the records handled."""
        polled = await consumer.getmany(
            timeout_ms=self._settings.poll_timeout_ms, max_records=self._settings.max_records
        )
        transactions.raise_failure()
        batch = {tp: list(records) for tp, records in polled.items() if records}
        if not batch:
            return 0
        before = transactions.transactions
        try:
            await self._process(batch, transactions)
        finally:
            self.transactions += transactions.transactions - before
        count = sum(len(records) for records in batch.values())
        self.records += count
        return count


def _position(record: Any) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


async def _stop_quietly(client: _Stoppable) -> None:
    """Stop a client, whatever state a failure left it in.

    aiokafka's ``stop()`` can raise CancelledError although nobody cancelled this task (0.14's
    Fetcher.close awaits the fetch tasks it has just cancelled). Let through, a stray one ended
    the loop for good while the process stayed up and never reported again (found by
    tests/chaos, Kafka restart). It is swallowed unless this task itself is being cancelled.
    """
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


@dataclass
class _Waiting:
    records: Sequence[OutgoingRecord]
    written: asyncio.Future[list[Any]]


class GroupCommit:
    """Commits the records of concurrent callers (an HTTP server's requests) together, one
    transaction per group: what each caller publishes becomes visible all at once or not at
    all, and a caller's ``publish`` returns once its records are committed.

    One producer has one transaction open at a time, so callers arriving while one commits wait
    for the next; a group takes every caller waiting when it starts (at most ``max_records``
    records, unless one caller alone has more). A failed group fails each of its callers.
    The transactional id must be stable per instance (``MEDMESH_INSTANCE_ID``): a restarted
    instance's ``init_transactions`` then aborts what its crashed predecessor left open, which
    would otherwise hold back read_committed consumers until the transaction timeout.
    """

    def __init__(
        self, make_producer: ProducerFactory, transactional_id: str, max_records: int = 5000
    ) -> None:
        self._make_producer = make_producer
        self._transactional_id = transactional_id
        self._max_records = max_records
        self._producer: TransactionalProducer | None = None
        self._waiting: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0

    async def start(self) -> None:
        """Start the producer (init_transactions) and the committing task."""
        self._producer = await self._started()
        self._task = asyncio.create_task(self._commit_groups(), name="group-commit")

    async def stop(self) -> None:
        """Stop committing: waiting callers fail; the producer stops."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._waiting:
            if not waiting.written.done():
                waiting.written.set_exception(RuntimeError("the service is stopping"))
        self._waiting.clear()
        if self._producer is not None:
            await _stop_quietly(self._producer)

    async def publish(self, records: Sequence[OutgoingRecord]) -> list[Any]:
        """Commit ``records`` (with other callers'); each one's RecordMetadata."""
        if self._task is None or self._task.done():
            raise RuntimeError("group commit is not running")
        written: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(records, written))
        self._wake.set()
        return await asyncio.shield(written)

    async def _started(self) -> TransactionalProducer:
        producer = self._make_producer(self._transactional_id)
        try:
            await producer.start()
        except BaseException:
            await _stop_quietly(producer)
            raise
        return producer

    def _next_group(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        size = 0
        while self._waiting and (
            not group or size + len(self._waiting[0].records) <= self._max_records
        ):
            waiting = self._waiting.pop(0)
            group.append(waiting)
            size += len(waiting.records)
        return group

    async def _commit_groups(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            group = self._next_group()
            try:
                written = await self._commit([w.records for w in group])
            except asyncio.CancelledError:
                for waiting in group:
                    waiting.written.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 -- each caller of the group gets the error
                for waiting in group:
                    if not waiting.written.done():
                        waiting.written.set_exception(exc)
                await self._renew_if_broken(exc)
                continue
            for waiting, records in zip(group, written, strict=True):
                if not waiting.written.done():
                    waiting.written.set_result(records)

    async def _commit(self, groups: Sequence[Sequence[OutgoingRecord]]) -> list[list[Any]]:
        producer = self._producer
        if producer is None:
            producer = self._producer = await self._started()
        await producer.begin_transaction()
        try:
            deliveries = [[await _send(producer, out) for out in records] for records in groups]
            written = [list(await asyncio.gather(*sent)) for sent in deliveries]
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.abort_transaction()
            raise
        self.transactions += 1
        return written

    async def _renew_if_broken(self, exc: Exception) -> None:
        """A fenced producer (another process started with this id) or one whose transaction
        could not be aborted cannot commit again: the next group starts a new one."""
        if isinstance(exc, ProducerFenced | KafkaError) and self._producer is not None:
            log.warning(
                "transactional producer replaced after an error",
                transactional_id=self._transactional_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            producer, self._producer = self._producer, None
            await _stop_quietly(producer)
