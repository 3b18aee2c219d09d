"""The worker's consume loop: micro-batch -> score -> publish outcomes -> commit, behind a breaker.

Plain asyncio over an aiokafka-like consumer; every collaborator is injected, so unit tests drive
the loop with fakes (tests/unit/test_inference_worker.py).

- **Readiness first**: the consumer joins its group only once the model version is ready.
- **Micro-batches**: one fetch returns what Kafka has buffered, up to the model's max batch size;
  when it returns fewer, the worker waits at most ``linger_s`` for more (a lone request is held no
  longer than that), then makes one Triton call for the whole batch.
- **No premature commit**: a batch's offsets are committed only after every outcome (result,
  failure, dead letter) of the batch is acknowledged by Kafka.
- **Triton away**: when scoring raises ``ModelUnavailable`` (or the health monitor reports the
  version not ready), nothing is failed: the worker rewinds every partition of the batch to its
  first record, pauses all its partitions, and keeps polling (so it stays in its consumer group)
  while the circuit breaker waits with exponential backoff and jitter. A readiness probe that
  succeeds resumes the partitions (half-open); the next batch served closes the circuit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from medmesh_contracts.events import InferenceFailed, RunInference
from medmesh_inference.batching import ModelUnavailable, Outcome
from medmesh_inference.circuit import CircuitBreaker
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.inference.worker")

WorkerState = Literal["starting", "ready", "degraded", "stopping"]


class Consumer(Protocol):
    """The part of aiokafka's AIOKafkaConsumer the worker uses."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]: ...
    def assignment(self) -> set[Any]: ...
    def pause(self, *partitions: Any) -> None: ...
    def resume(self, *partitions: Any) -> None: ...
    def paused(self) -> set[Any]: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    async def commit(self, offsets: dict[Any, int] | None = None) -> None: ...


# Scores the tasks (each with its source record) and publishes one outcome per task, returning
# once Kafka acknowledged them all. Raises ModelUnavailable before publishing anything when
# Triton is away, KafkaError when publishing failed.
Handle = Callable[[Sequence[RunInference], Sequence[Any]], Awaitable[list[Outcome]]]
DeadLetter = Callable[[Any, str], Awaitable[None]]
Probe = Callable[[], Awaitable[bool]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class LoopTiming:
    """How long the loop waits for what."""

    # Longest wait for more tasks once a batch has started (a lone request is held this long).
    linger_s: float = 0.02
    # Longest single poll while idle or paused (the loop wakes this often to check its state).
    poll_s: float = 0.5
    # Pause after a Kafka error before the next fetch.
    kafka_retry_s: float = 1.0


@dataclass
class WorkerStats:
    """Counters for logs, heartbeats and tests."""

    batches: int = 0
    tasks: int = 0
    failed: int = 0
    dead_lettered: int = 0
    rewinds: int = 0
    probes: int = 0


def _fetched(batches: dict[Any, list[Any]]) -> list[Any]:
    return [record for records in batches.values() for record in records]


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
        *,
        max_batch: int,
        handle: Handle,
        dead_letter: DeadLetter,
        probe: Probe,
        on_ready: Callable[[], Awaitable[None]],
        breaker: CircuitBreaker,
        timing: LoopTiming,
        clock: Clock,
    ) -> None:
        # aiokafka consumers must be built inside the running event loop: built in ``run``.
        self._make_consumer = make_consumer
        self._consumer: Consumer | None = None
        self.max_batch = max_batch
        self._handle = handle
        self._dead_letter = dead_letter
        self._probe = probe
        self._on_ready = on_ready
        self.breaker = breaker
        self.timing = timing
        self._clock = clock
        self.stats = WorkerStats()
        self.state: WorkerState = "starting"
        self.consuming = False
        self._stopping = asyncio.Event()
        # Set by the health monitor when its probe finds the version not ready.
        self._reported_unready = False

    # --- state seen from outside -----------------------------------------------------------

    @property
    def consumer(self) -> Consumer:
        """The task consumer (RuntimeError before ``run`` built it)."""
        if self._consumer is None:
            raise RuntimeError("the worker has not started its consumer")
        return self._consumer

    async def close(self) -> None:
        """Stop the consumer (leaving the group) if it was started."""
        if self._consumer is not None:
            await self._consumer.stop()

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
        self._consumer = self._make_consumer()
        await self.consumer.start()
        self.consuming = True
        self.state = "ready"
        log.info("consuming", max_batch=self.max_batch)
        try:
            while not self._stopping.is_set():
                await self.step()
        finally:
            self.consuming = False

    async def _wait_until_ready(self) -> None:
        """Probe with the breaker's backoff until the version is ready (or the worker stops)."""
        while not self._stopping.is_set():
            self.stats.probes += 1
            if await self._probe():
                self.breaker.record_success()
                await self._on_ready()
                return
            wait = self.breaker.record_failure()
            log.info("waiting for the model version to be ready", retry_in_s=round(wait, 2))
            await self._wait(wait)

    async def step(self) -> None:
        """One turn of the loop: a probe while the circuit is open, else one batch."""
        if self.breaker.closed and self._reported_unready:
            self._open("the health probe found the model version not ready")
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

    async def _while_open(self) -> None:
        """Keep every partition paused; poll (staying in the group) until a probe is due."""
        self._pause_all()
        if not self.breaker.probe_due():
            wait = min(self.breaker.seconds_to_probe(), self.timing.poll_s)
            try:
                stray = _fetched(
                    await self.consumer.getmany(timeout_ms=max(1, math.ceil(wait * 1000)))
                )
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
        """Up to ``max_batch`` records: what is buffered, plus what arrives within the linger."""
        records = _fetched(
            await self.consumer.getmany(
                timeout_ms=int(self.timing.poll_s * 1000), max_records=self.max_batch
            )
        )
        if not records:
            return records
        deadline = self._clock() + self.timing.linger_s
        while len(records) < self.max_batch and not self._stopping.is_set():
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            more = _fetched(
                await self.consumer.getmany(
                    timeout_ms=max(1, int(remaining * 1000)),
                    max_records=self.max_batch - len(records),
                )
            )
            if not more:
                break
            records.extend(more)
        return records

    async def _serve(self, records: list[Any]) -> None:
        """Score one batch, publish its outcomes and dead letters, then commit it."""
        tasks: list[RunInference] = []
        sources: list[Any] = []
        undecodable: list[tuple[Any, str]] = []
        for record in records:
            try:
                tasks.append(RunInference.model_validate_json(record.value))
                sources.append(record)
            except ValidationError as exc:
                undecodable.append((record, f"not a RunInference: {exc.error_count()} errors"))
        try:
            outcomes = await self._handle(tasks, sources) if tasks else []
            for record, reason in undecodable:
                await self._dead_letter(record, reason)
        except ModelUnavailable as exc:
            self._rewind(records)
            self._open(f"Triton unavailable: {exc}")
            return
        except KafkaError as exc:
            # Nothing is committed: the batch is fetched and scored again (at-least-once).
            log.warning("publishing outcomes failed; the batch will be redone", error=str(exc))
            self._rewind(records)
            await self._wait(self.timing.kafka_retry_s)
            return
        await self._commit(records)
        if self.breaker.state == "half-open" and tasks:
            self.breaker.record_success()
            log.info("circuit closed: the trial batch was served")
        self.stats.batches += 1
        self.stats.tasks += len(tasks)
        self.stats.failed += sum(isinstance(o, InferenceFailed) for o in outcomes)
        self.stats.dead_lettered += len(undecodable)

    async def _commit(self, records: Sequence[Any]) -> None:
        try:
            await self.consumer.commit(next_offsets(records))
        except (CommitFailedError, KafkaError) as exc:
            # The partitions moved to another worker during the batch: it will redo the batch
            # from the last committed offset; the outcomes published here may appear twice.
            log.warning(
                "commit failed after a rebalance; records will be redelivered", error=str(exc)
            )

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
