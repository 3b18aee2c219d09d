"""The worker's consume loop: micro-batch -> score -> commit outcomes and offsets in one Kafka
transaction per task partition, behind a circuit breaker.

Plain asyncio over an aiokafka-like consumer and transactional producers; every collaborator is
injected, so unit tests drive the loop with fakes (tests/unit/test_inference_worker.py).

- **Readiness first**: the consumer joins its group only once the model version is ready.
- **Micro-batches**: one fetch returns what Kafka has buffered, up to the model's max batch size,
  and the whole batch is one Triton call. The worker waits for more only when tasks arrive fast
  enough to fill the batch within ``linger_s`` (``batching.Linger``): a lone task (an idle
  worker) is scored at once (``adaptive_linger=False``: every short batch waits ``linger_s``, as
  before issue 17).
- **Exactly once**: a batch's outcomes (results, failures, dead letters) of one task partition
  and that partition's next offset are committed in one transaction
  (``medmesh_runtime.transactional.PartitionTransactions``; partitions commit concurrently). A
  worker killed before its commit leaves nothing visible to read_committed readers; the batch is
  scored again by the partition's next owner, whose producer fences this one. A worker fenced
  that way (stalled past its session, then resumed) commits nothing: it rejoins its group and
  starts over from the committed offsets.
- **Poison is isolated**: an unexpected error from handling a batch (anything but
  ``ModelUnavailable`` or a ``KafkaError``) makes its tasks handled one at a time, each up to
  ``max_attempts`` times; a task that keeps failing is replaced by its dead letter, committed
  with its offset, and its neighbours are scored and committed as usual.
- **Triton away**: when scoring raises ``ModelUnavailable`` (or the health monitor reports the
  version not ready), nothing is failed: the worker rewinds every partition of the batch to its
  first record, pauses all its partitions, and keeps polling (so it stays in its consumer group)
  while the circuit breaker waits with exponential backoff and jitter. A readiness probe that
  succeeds resumes the partitions (half-open); the next batch served closes the circuit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from medmesh_contracts.events import InferenceFailed, RunInference
from medmesh_inference.batching import Linger, ModelUnavailable, Outcome
from medmesh_inference.circuit import CircuitBreaker, wait_until_ready
from medmesh_runtime.logging import get_logger, log_dead_letter, redact_text
from medmesh_runtime.transactional import (
    OutgoingRecord,
    PartitionLostError,
    PartitionTransactions,
    PoisonIsolation,
    ProducerFactory,
)

log = get_logger("medmesh.inference.worker")

WorkerState = Literal["starting", "ready", "degraded", "stopping"]


class Consumer(Protocol):
    """The part of aiokafka's AIOKafkaConsumer the worker uses (a group member that commits
    nothing itself: offsets go into the transactions)."""

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[Any, Sequence[Any]]: ...
    def assignment(self) -> set[Any]: ...
    def pause(self, *partitions: Any) -> None: ...
    def resume(self, *partitions: Any) -> None: ...
    def paused(self) -> set[Any]: ...
    def seek(self, partition: Any, offset: int) -> None: ...


class Scored(NamedTuple):
    """One task's outcome and the record that carries it (topic, key, traced headers)."""

    outcome: Outcome
    record: OutgoingRecord


# Scores the tasks (each with its source record): one Scored per task, in order. Produces
# nothing itself. Raises ModelUnavailable when Triton is away.
Handle = Callable[[Sequence[RunInference], Sequence[Any]], Awaitable[list[Scored]]]
# The dead letter of a consumed record and a reason (no patient data in the reason).
DeadLetter = Callable[[Any, str], OutgoingRecord]
Probe = Callable[[], Awaitable[bool]]
Clock = Callable[[], float]
RecordKind = Literal["completed", "failed", "undecodable", "poison"]


@dataclass(frozen=True)
class LoopTiming:
    """How long the loop waits for what."""

    # Longest wait for more tasks once a batch has started (``batching.Linger``).
    linger_s: float = 0.02
    # Wait only when tasks arrive fast enough to fill the batch within linger_s (a lone task on
    # an idle worker is scored at once); False: every short batch waits linger_s.
    adaptive_linger: bool = True
    # Longest single poll while idle or paused (the loop wakes this often to check its state).
    poll_s: float = 0.5
    # Pause after a Kafka error before the next fetch.
    kafka_retry_s: float = 1.0
    # Pause before a failing task's second attempt (doubling for each further one).
    retry_backoff_s: float = 0.2


@dataclass
class WorkerStats:
    """Counters for logs, heartbeats and tests (of committed batches only)."""

    batches: int = 0
    tasks: int = 0
    failed: int = 0
    dead_lettered: int = 0
    rewinds: int = 0
    probes: int = 0
    rejoins: int = 0
    transactions: int = 0


class _RejoinError(Exception):
    """The clients must start over from the committed offsets (fenced, or a producer of an
    assigned partition did not start)."""


def _fetched(batches: Mapping[Any, Sequence[Any]]) -> list[Any]:
    return [record for records in batches.values() for record in records]


def _position(record: Any) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)


def first_offsets(records: Sequence[Any]) -> dict[Any, int]:
    """The earliest offset of each partition in ``records`` (where a rewind seeks to)."""
    first: dict[Any, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def next_offsets(records: Sequence[Any]) -> dict[Any, int]:
    """Per partition, the offset after the last record in ``records`` (what a commit stores)."""
    after: dict[Any, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        after[tp] = max(after.get(tp, 0), r.offset + 1)
    return after


class TaskWorker:
    """One model version's consume loop. ``run`` until ``stop`` is called."""

    def __init__(
        self,
        make_consumer: Callable[[], Consumer],
        make_producer: ProducerFactory,
        *,
        topic: str,
        group_id: str,
        max_batch: int,
        handle: Handle,
        dead_letter: DeadLetter,
        probe: Probe,
        on_ready: Callable[[], Awaitable[None]],
        breaker: CircuitBreaker,
        timing: LoopTiming,
        clock: Clock,
        max_attempts: int = 3,
    ) -> None:
        # aiokafka clients must be built inside the running event loop: built in ``run``.
        self._make_consumer = make_consumer
        self._make_producer = make_producer
        self._consumer: Consumer | None = None
        self._transactions: PartitionTransactions | None = None
        self.topic = topic
        # Also the prefix of the per-partition transactional ids: one per model version, the
        # same for every instance, so an instance fences whoever held its partitions before.
        self.group_id = group_id
        self.max_batch = max_batch
        self._handle = handle
        self._dead_letter = dead_letter
        self._probe = probe
        self._on_ready = on_ready
        self.breaker = breaker
        self.timing = timing
        self.linger = Linger(timing.linger_s, max_batch, timing.adaptive_linger)
        self._clock = clock
        self.isolation = PoisonIsolation(
            self._outputs,
            self._poisoned,
            transient=(ModelUnavailable, KafkaError),
            max_attempts=max_attempts,
            backoff_s=timing.retry_backoff_s,
        )
        self.stats = WorkerStats()
        self.state: WorkerState = "starting"
        self.consuming = False
        self._stopping = asyncio.Event()
        # Set by the health monitor when its probe finds the version not ready.
        self._reported_unready = False
        # What the batch being served made of each record, by (topic, partition, offset).
        self._kinds: dict[tuple[str, int, int], RecordKind] = {}

    # --- state seen from outside -----------------------------------------------------------

    @property
    def consumer(self) -> Consumer:
        """The task consumer (RuntimeError before ``run`` built it)."""
        if self._consumer is None:
            raise RuntimeError("the worker has not started its consumer")
        return self._consumer

    @property
    def transactions(self) -> PartitionTransactions:
        """The assigned partitions' transactional producers (RuntimeError before ``run``)."""
        if self._transactions is None:
            raise RuntimeError("the worker has not started its consumer")
        return self._transactions

    async def close(self) -> None:
        """Stop the consumer (leaving the group) and the transactional producers."""
        await self._close_clients()

    @property
    def ready(self) -> bool:
        """Consuming with a closed circuit: the version is servable by this worker."""
        return self.consuming and self.breaker.closed and self.state == "ready"

    def report_triton_ready(self, ready: bool) -> None:
        """The health monitor's latest probe.

        Not ready trips the breaker proactively (on the loop's next turn). Ready while half-open
        closes the circuit: an idle worker has no trial batch, and a second good probe after
        the resume is the trial (else it would report "degraded" until traffic came back).
        """
        self._reported_unready = not ready
        if ready and self.breaker.state == "half-open":
            self.breaker.record_success()
            log.info("circuit closed: the version stayed ready after the resume")

    def stop(self) -> None:
        """Ask the loop to finish its current batch and return."""
        self.state = "stopping"
        self._stopping.set()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the model version, join the consumer group, then serve until stopped."""
        await self._wait_until_ready()
        if self._stopping.is_set():
            return
        await self._join()
        self.consuming = True
        self.state = "ready"
        log.info("consuming", max_batch=self.max_batch)
        try:
            while not self._stopping.is_set():
                await self.step()
        finally:
            self.consuming = False

    async def _join(self) -> None:
        """Subscribe a new consumer with the listener that starts each assigned partition's
        producer (fencing its previous owner) and then reads the partition's final committed
        offset (``PartitionTransactions.commit`` refuses records fetched from before it)."""
        transactions = PartitionTransactions(self._make_producer, self.group_id, self.group_id)
        consumer = self._make_consumer()
        self._consumer, self._transactions = consumer, transactions
        consumer.subscribe([self.topic], listener=transactions.listener(consumer))
        await consumer.start()

    async def _rejoin(self, reason: str) -> None:
        """Drop the clients and join again: the new consumer starts from the committed offsets,
        and this instance's producers are started only for partitions the group gives it."""
        self.stats.rejoins += 1
        log.warning("starting over from the committed offsets", reason=redact_text(reason)[:500])
        while not self._stopping.is_set():
            await self._close_clients()
            try:
                await self._join()
            except KafkaError as exc:
                log.warning("joining the consumer group failed; retrying", error=str(exc))
                await self._wait(self.timing.kafka_retry_s)
            else:
                return

    async def _close_clients(self) -> None:
        consumer, transactions = self._consumer, self._transactions
        self._consumer = self._transactions = None
        if consumer is not None:
            try:
                await consumer.stop()
            except KafkaError as exc:  # a broken client is dropped either way
                log.info("consumer did not stop cleanly", error=f"{type(exc).__name__}: {exc}")
        if transactions is not None:
            await transactions.close()

    async def _wait_until_ready(self) -> None:
        """Probe with the breaker's backoff until the version is ready (or the worker stops)."""

        async def probe() -> bool:
            self.stats.probes += 1
            return await self._probe()

        if await wait_until_ready(probe, self.breaker, self._wait, stopped=self._stopping.is_set):
            await self._on_ready()

    async def step(self) -> None:
        """One turn of the loop: a probe while the circuit is open, else one batch."""
        if self.breaker.closed and self._reported_unready:
            self._open("the health probe found the model version not ready")
        try:
            if not self.breaker.fetching:
                await self._while_open()
                return
            try:
                records = await self._fetch()
            except KafkaError as exc:
                log.warning("fetch failed; retrying", error=str(exc))
                await self._wait(self.timing.kafka_retry_s)
                return
            if records:
                await self._serve(records)
        except _RejoinError as exc:
            await self._rejoin(str(exc))

    async def _poll(self, timeout_ms: int, max_records: int | None = None) -> list[Any]:
        """One getmany; ``_RejoinError`` when an assignment it made could not start its producer
        (the fetched offsets may predate the previous owner's open transaction)."""
        records = _fetched(
            await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        )
        try:
            self.transactions.raise_failure()
        except Exception as exc:  # the loop starts over (and logs why)
            raise _RejoinError(
                f"a transactional producer did not start: {type(exc).__name__}: {exc}"
            ) from exc
        return records

    async def _while_open(self) -> None:
        """Keep every partition paused; poll (staying in the group) until a probe is due."""
        self._pause_all()
        if not self.breaker.probe_due():
            wait = min(self.breaker.seconds_to_probe(), self.timing.poll_s)
            try:
                stray = await self._poll(timeout_ms=max(1, math.ceil(wait * 1000)))
            except KafkaError as exc:
                log.warning("poll while paused failed", error=str(exc))
                await self._wait(wait)
                return
            if stray:  # assigned during a rebalance before it could be paused: fetch it later
                self._rewind(stray)
            return
        self.stats.probes += 1
        if await self._probe():
            self.breaker.probe_succeeded()
            self._reported_unready = False
            await self._on_ready()
            self._resume_all()
            self.state = "ready"
            log.info("model version ready again; resuming (half-open)")
        else:
            wait = self.breaker.record_failure()
            log.info("model version still unavailable", retry_in_s=round(wait, 2))

    async def _fetch(self) -> list[Any]:
        """Up to ``max_batch`` records: what is buffered, plus what arrives within the linger
        (``batching.Linger``: none for a lone record, or a trickle that cannot fill a batch)."""
        records = await self._poll(int(self.timing.poll_s * 1000), self.max_batch)
        if not records:
            return records
        deadline = self.linger.deadline(len(records), self._clock())
        while not self._stopping.is_set():
            remaining = self.linger.remaining(len(records), deadline, self._clock())
            if remaining <= 0:
                break
            more = await self._poll(max(1, int(remaining * 1000)), self.max_batch - len(records))
            if not more:
                break
            records.extend(more)
        self.linger.fetched(self._clock())
        return records

    async def _serve(self, records: list[Any]) -> None:
        """Score one batch (poison isolated), then commit each partition's outcomes with its
        next offset in one transaction."""
        self._kinds = {}
        try:
            outputs = await self.isolation.outputs(records)
        except ModelUnavailable as exc:
            self._rewind(records)
            self._open(f"model version unavailable: {exc}")  # Triton, or the PACS of its images
            return
        except KafkaError as exc:
            # Nothing is committed: the batch is fetched and scored again.
            log.warning("handling the batch failed; it will be redone", error=str(exc))
            self._rewind(records)
            await self._wait(self.timing.kafka_retry_s)
            return
        committed = await self._commit(records, outputs)
        kinds = [
            self._kinds.get(_position(r))
            for r in records
            if TopicPartition(r.topic, r.partition) in committed
        ]
        scored = sum(kind in ("completed", "failed", "poison") for kind in kinds)
        if committed and self.breaker.state == "half-open" and scored:
            self.breaker.record_success()
            log.info("circuit closed: the trial batch was served")
        self.stats.batches += bool(committed)
        self.stats.tasks += scored
        self.stats.failed += kinds.count("failed")
        self.stats.dead_lettered += sum(kind in ("undecodable", "poison") for kind in kinds)

    async def _commit(
        self, records: Sequence[Any], outputs: Sequence[Sequence[OutgoingRecord]]
    ) -> set[TopicPartition]:
        """Commit each partition of the batch, all at once; the partitions committed.

        A partition whose transaction failed is rewound (its transaction was aborted, nothing
        of it is visible): the batch is redone for it alone, the committed ones are not.
        """
        by_partition: dict[TopicPartition, list[OutgoingRecord]] = {}
        for record, outs in zip(records, outputs, strict=True):
            by_partition.setdefault(TopicPartition(record.topic, record.partition), []).extend(outs)
        after, first = next_offsets(records), first_offsets(records)
        partitions = list(by_partition)
        results = await asyncio.gather(
            *(
                self.transactions.commit(tp, by_partition[tp], after[tp], first_offset=first[tp])
                for tp in partitions
            ),
            return_exceptions=True,
        )
        failed = {
            tp: result
            for tp, result in zip(partitions, results, strict=True)
            if isinstance(result, BaseException)
        }
        self.stats.transactions += len(partitions) - len(failed)
        if not failed:
            return set(partitions)
        self._rewind([r for r in records if TopicPartition(r.topic, r.partition) in failed])
        lost = sorted(str(tp) for tp, exc in failed.items() if isinstance(exc, PartitionLostError))
        if lost:
            # Fenced: another worker owns these partitions now. Fetching them again would make
            # the next commit start a producer with their transactional id, which would fence
            # the rightful owner and commit this instance's stale offsets: start over instead.
            raise _RejoinError(f"fenced: another worker owns {', '.join(lost)}")
        for exc in failed.values():
            if isinstance(exc, asyncio.CancelledError):
                # Nobody cancelled this task (gather would have raised): aiokafka internals
                # raise it into callers; let through, it would end the loop silently.
                raise _RejoinError("CancelledError raised inside the Kafka client")
            if not isinstance(exc, KafkaError):
                raise exc
        log.warning(
            "committing the batch failed; its uncommitted partitions will be redone",
            partitions=sorted(str(tp) for tp in failed),
            error=str(next(iter(failed.values()))),
        )
        await self._wait(self.timing.kafka_retry_s)
        return set(partitions) - set(failed)

    # --- what a batch becomes (run by the poison isolation) ------------------------------

    async def _outputs(self, records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        """Each record's outputs: a task's outcome, or an undecodable record's dead letter."""
        outputs: list[list[OutgoingRecord]] = [[] for _ in records]
        kinds: dict[tuple[str, int, int], RecordKind] = {}
        tasks: list[RunInference] = []
        sources: list[Any] = []
        slots: list[int] = []
        for i, record in enumerate(records):
            try:
                tasks.append(RunInference.model_validate_json(record.value or b""))
            except ValidationError as exc:
                reason = f"not a RunInference: {exc.error_count()} errors"
                # The poison isolation logs the dead letters it makes; this one is the worker's.
                log_dead_letter(log, "task", record, reason)
                outputs[i] = [self._dead_letter(record, reason)]
                kinds[_position(record)] = "undecodable"
                continue
            sources.append(record)
            slots.append(i)
        if tasks:
            scored = await self._handle(tasks, sources)
            for i, source, (outcome, out) in zip(slots, sources, scored, strict=True):
                outputs[i] = [out]
                failed = isinstance(outcome, InferenceFailed)
                kinds[_position(source)] = "failed" if failed else "completed"
        # Only a call that returned counts: a failed one is redone record by record.
        self._kinds.update(kinds)
        return outputs

    def _poisoned(self, record: Any, reason: str) -> OutgoingRecord:
        """A record whose handling kept failing (or whose outcome is too large)."""
        if self._kinds.get(_position(record)) != "undecodable":
            self._kinds[_position(record)] = "poison"
        return self._dead_letter(record, reason)

    # --- helpers ---------------------------------------------------------------------------

    def _open(self, reason: str) -> None:
        wait = self.breaker.record_failure()
        self.state = "degraded"
        self._pause_all()
        log.warning(
            "circuit open: pausing consumption", reason=reason[:300], retry_in_s=round(wait, 2)
        )

    def _rewind(self, records: Sequence[Any]) -> None:
        """Seek each partition of ``records`` back to its first record (if still assigned)."""
        assigned = self.consumer.assignment()
        for tp, offset in first_offsets(records).items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self.stats.rewinds += 1

    def _pause_all(self) -> None:
        unpaused = self.consumer.assignment() - self.consumer.paused()
        if unpaused:
            self.consumer.pause(*unpaused)

    def _resume_all(self) -> None:
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    async def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when the worker is stopped."""
        if seconds <= 0 or self._stopping.is_set():
            return
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return
