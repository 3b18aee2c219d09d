"""The worker's consume loop, circuit breaker and heartbeats, driven with an in-memory,
transaction-aware Kafka (tests/transactional_kafka.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from medmesh_contracts import topics
from medmesh_contracts.events import (
    InferenceCompleted,
    MessageDeadLettered,
    Producer,
    RunInference,
    WorkerHeartbeat,
    to_wire,
)
from medmesh_inference import worker as worker_module
from medmesh_inference.batching import ModelUnavailable, Outcome
from medmesh_inference.circuit import CircuitBackoff, CircuitBreaker
from medmesh_inference.heartbeat import HealthMonitor, HeartbeatSource
from medmesh_inference.worker import LoopTiming, Scored, TaskWorker
from medmesh_runtime import transactional as transactional_module
from medmesh_runtime.deadletter import dead_letter_record
from medmesh_runtime.transactional import OutgoingRecord, transactional_id
from tests.factories import DETERIORATION_OUTPUTS, make_request, make_task
from tests.transactional_kafka import FakeConsumer, FakeKafka

TOPIC = "medmesh.model.deterioration.v1.tasks"
GROUP = "medmesh-worker-deterioration-v1"
PRODUCER = Producer(service="inference", instance="worker-1")


class WorkerConsumer(FakeConsumer):
    """The fake group member (pause, resume and seek are the fake's own), counting its polls;
    a poll that finds nothing waits out its timeout, whatever arrives meanwhile.

    ``owned`` limits the partitions the group gives this member (default: all of them)."""

    def __init__(self, kafka: FakeKafka, owned: Sequence[int] | None = None) -> None:
        super().__init__(kafka, GROUP)
        self.kafka = kafka
        self._owned = owned
        self.listener: Any = None
        self.started = False
        self.polls = 0

    def subscribe(self, topics: Sequence[str], *, listener: Any) -> None:
        """Remember the listener (the topic is the task topic)."""
        assert list(topics) == [TOPIC]
        self.listener = listener

    async def start(self) -> None:
        """Join: the listener hears of the owned partitions, then their offsets are fetched."""
        owned = range(self.kafka.partitions) if self._owned is None else self._owned
        assigned = [TopicPartition(TOPIC, p) for p in owned]
        await self.listener.on_partitions_assigned(assigned)
        for tp in assigned:
            self.positions[tp] = self.kafka.offset(GROUP, TOPIC, tp.partition) or 0
        self.started = True

    async def stop(self) -> None:
        """Leave the group."""
        self.started = False

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        """The next committed records of the unpaused partitions (the positions move on)."""
        self.polls += 1
        out = self.take(max_records or 500)
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out


class FakeTritonSide:
    """Stands in for scoring: counts calls; can be unavailable, fail, or raise for some tasks."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.unavailable_calls = 0
        self.kafka_failures = 0
        self.ready_answers: list[bool] = []
        # correlation id -> how many more calls with this task raise ValueError (-1: always).
        self.poison: dict[str, int] = {}
        self.gate: asyncio.Event | None = None

    async def handle(self, tasks: Sequence[RunInference], sources: Sequence[Any]) -> list[Scored]:
        self.calls.append([t.correlation_id for t in tasks])
        if self.gate is not None:
            await self.gate.wait()
        if self.unavailable_calls:
            self.unavailable_calls -= 1
            raise ModelUnavailable("StatusCode.UNAVAILABLE: connection refused")
        if self.kafka_failures:
            self.kafka_failures -= 1
            raise KafkaConnectionError("broker gone")
        for t in tasks:
            left = self.poison.get(t.correlation_id, 0)
            if left:
                self.poison[t.correlation_id] = left - 1 if left > 0 else left
                raise ValueError(f"cannot score {t.correlation_id}")
        return [_scored(t, len(tasks), source) for t, source in zip(tasks, sources, strict=True)]

    async def probe(self) -> bool:
        return self.ready_answers.pop(0) if self.ready_answers else True


def _scored(task: RunInference, batch_size: int, source: Any) -> Scored:
    outcome: Outcome = InferenceCompleted(
        correlation_id=task.correlation_id,
        producer=PRODUCER,
        task=task,
        triton_model="deterioration",
        triton_version="1",
        outputs=DETERIORATION_OUTPUTS[1],
        device_kind="KIND_CPU",
        batch_size=batch_size,
        inference_ms=1.0,
        completed_at=datetime(2026, 11, 23, tzinfo=UTC),
    )
    record = OutgoingRecord(topics.INFERENCE_RESULTS, source.key, to_wire(outcome))
    return Scored(outcome, record)


def _task_bytes(correlation_id: str) -> bytes:
    return to_wire(make_task(request=make_request(correlation_id=correlation_id)))


def _add(kafka: FakeKafka, correlation_id: str, partition: int = 0) -> None:
    kafka.append(TOPIC, _task_bytes(correlation_id), partition=partition)


def _results(kafka: FakeKafka) -> list[str]:
    """Correlation ids of the committed results, in commit order."""
    return [
        InferenceCompleted.model_validate_json(v).correlation_id
        for v in kafka.values(topics.INFERENCE_RESULTS)
    ]


@pytest.fixture
def dead_letter_lines(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The dead-letter log lines written from now on (``log_dead_letter`` in the worker and
    the poison isolation, whichever way structlog is configured), as their reasons."""
    lines: list[str] = []
    for module in (worker_module, transactional_module):
        real = module.log_dead_letter

        def counted(
            logger: Any, what: str, record: Any, reason: str, real: Any = real, **fields: Any
        ) -> None:
            lines.append(reason)
            real(logger, what, record, reason, **fields)

        monkeypatch.setattr(module, "log_dead_letter", counted)
    return lines


def _dead_letters(kafka: FakeKafka) -> list[MessageDeadLettered]:
    return [
        MessageDeadLettered.model_validate_json(v)
        for v in kafka.values(topics.INFERENCE_DEADLETTER)
    ]


def _committed(kafka: FakeKafka, partition: int = 0) -> int:
    return kafka.offset(GROUP, TOPIC, partition) or 0


def _worker(
    kafka: FakeKafka,
    side: FakeTritonSide,
    consumers: list[WorkerConsumer] | None = None,
    timing: LoopTiming | None = None,
    max_batch: int = 64,
) -> TaskWorker:
    """A worker on ``kafka``; its consumers are taken from ``consumers`` in turn, then new."""
    queue = consumers if consumers is not None else []

    def make_consumer() -> WorkerConsumer:
        return queue.pop(0) if queue else WorkerConsumer(kafka)

    async def on_ready() -> None:
        return None

    def dead_letter(record: Any, reason: str) -> OutgoingRecord:
        return dead_letter_record(topics.INFERENCE_DEADLETTER, record, reason, PRODUCER)

    return TaskWorker(
        make_consumer,
        kafka.producer,
        topic=TOPIC,
        group_id=GROUP,
        max_batch=max_batch,
        handle=side.handle,
        dead_letter=dead_letter,
        probe=side.probe,
        on_ready=on_ready,
        breaker=CircuitBreaker(CircuitBackoff(0.01, 0.04), time.monotonic),
        timing=timing
        or LoopTiming(linger_s=0.01, poll_s=0.01, kafka_retry_s=0.01, retry_backoff_s=0.001),
        clock=time.monotonic,
    )


async def _eventually(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.002)


async def _run_until(worker: TaskWorker, done: Any, timeout_s: float = 5.0) -> None:
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + timeout_s
    try:
        while not done():
            assert time.monotonic() < deadline, "the worker did not get there in time"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.005)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 2)
        await worker.close()


async def test_buffered_tasks_become_one_batch_committed_in_one_transaction() -> None:
    """Five buffered tasks are one handler call; their results and offset 5 are one transaction
    of the partition's producer, whose transactional id names the worker's group and partition."""
    kafka, side = FakeKafka(), FakeTritonSide()
    for i in range(5):
        _add(kafka, f"r{i}")
    worker = _worker(kafka, side)
    await _run_until(worker, lambda: _committed(kafka) == 5)
    assert side.calls == [[f"r{i}" for i in range(5)]]
    assert _results(kafka) == [f"r{i}" for i in range(5)]
    assert kafka.transactional_ids == [transactional_id(GROUP, TopicPartition(TOPIC, 0))]
    assert worker.stats.batches == 1
    assert worker.stats.tasks == 5


async def test_consumer_joins_only_once_the_model_version_is_ready() -> None:
    """While the readiness probe says no, no consumer is built; it joins after a yes."""
    kafka, side = FakeKafka(), FakeTritonSide()
    consumer = WorkerConsumer(kafka)
    side.ready_answers = [False, False, True]
    worker = _worker(kafka, side, [consumer])
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.005)
    assert not consumer.started
    assert kafka.transactional_ids == []
    assert worker.breaker.state == "open"
    await _eventually(lambda: worker.consuming)
    assert consumer.started
    assert worker.breaker.closed
    worker.stop()
    await asyncio.wait_for(task, 2)


async def test_unavailable_triton_rewinds_pauses_and_serves_the_same_tasks_later() -> None:
    """ModelUnavailable fails nothing: the batch is rewound, partitions paused, then redone once."""
    kafka, side = FakeKafka(partitions=2), FakeTritonSide()
    _add(kafka, "a", partition=0)
    _add(kafka, "b", partition=1)
    side.unavailable_calls = 1
    side.ready_answers = [True, False, False, True]  # startup, then two failed probes, then ready
    consumer = WorkerConsumer(kafka)
    worker = _worker(kafka, side, [consumer])
    paused_seen: list[set[Any]] = []
    original_pause = consumer.pause

    def pause(*tps: Any) -> None:
        original_pause(*tps)
        paused_seen.append(set(tps))

    consumer.pause = pause  # type: ignore[method-assign]
    await _run_until(worker, lambda: _committed(kafka, 0) == 1 and _committed(kafka, 1) == 1)
    assert paused_seen
    assert paused_seen[0] == consumer.assignment()
    assert sorted(_results(kafka)) == ["a", "b"]
    assert len(side.calls) == 2
    assert sorted(side.calls[0]) == sorted(side.calls[1]) == ["a", "b"]
    assert consumer.paused() == set()
    assert worker.breaker.closed
    assert worker.breaker.opened_total == 1


async def test_a_kafka_error_while_handling_commits_nothing_and_the_batch_is_redone() -> None:
    """A Kafka error from the handler commits nothing; the rewound batch is committed later."""
    kafka, side = FakeKafka(), FakeTritonSide()
    _add(kafka, "a")
    side.kafka_failures = 2
    worker = _worker(kafka, side)
    await _run_until(worker, lambda: _committed(kafka) == 1)
    assert len(side.calls) == 3
    assert _results(kafka) == ["a"]
    assert worker.stats.transactions == 1


async def test_an_aborted_send_commits_neither_outcomes_nor_offset_and_redo_is_once() -> None:
    """Each partition commits alone: a send that fails aborts that partition's transaction
    (neither its outcome nor its offset is visible) while the other partition commits; only the
    aborted partition is redone, so every task's outcome is produced exactly once."""
    kafka, side = FakeKafka(partitions=2), FakeTritonSide()
    _add(kafka, "a", partition=0)
    _add(kafka, "b", partition=1)
    kafka.fail_sends = 1
    worker = _worker(
        kafka,
        side,
        timing=LoopTiming(linger_s=0.01, poll_s=0.01, kafka_retry_s=0.3, retry_backoff_s=0.001),
    )
    task = asyncio.create_task(worker.run())
    try:
        await _eventually(lambda: kafka.aborted == 1)
        await _eventually(lambda: _committed(kafka, 0) + _committed(kafka, 1) == 1)
        aborted = 0 if _committed(kafka, 0) == 0 else 1
        assert kafka.offset(GROUP, TOPIC, aborted) is None
        assert _results(kafka) == ["b" if aborted == 0 else "a"]
        await _eventually(lambda: _committed(kafka, 0) == 1 and _committed(kafka, 1) == 1)
        await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 2)
    assert sorted(_results(kafka)) == ["a", "b"]
    assert kafka.aborted == 1
    assert worker.stats.transactions == 2
    assert len(side.calls) == 2


async def test_undecodable_records_are_dead_lettered_and_committed(
    dead_letter_lines: list[str],
) -> None:
    """A record that is not a RunInference is dead-lettered in its offset's transaction; its
    neighbours are still served."""
    kafka, side = FakeKafka(), FakeTritonSide()
    _add(kafka, "a")
    kafka.append(TOPIC, b"{not json")
    _add(kafka, "c")
    worker = _worker(kafka, side)
    await _run_until(worker, lambda: _committed(kafka) == 3)
    assert _results(kafka) == ["a", "c"]
    assert len(dead_letter_lines) == 1
    dead = _dead_letters(kafka)
    assert len(dead) == 1
    assert "not a RunInference" in dead[0].reason
    assert (dead[0].source_topic, dead[0].source_offset) == (TOPIC, 1)
    assert worker.stats.dead_lettered == 1


async def test_a_task_whose_handling_raises_once_is_retried_and_scored() -> None:
    """A ValueError from handling one task is retried: the task and its neighbours are scored,
    nothing is dead-lettered, and the loop keeps running."""
    kafka, side = FakeKafka(), FakeTritonSide()
    for cid in ("a", "b", "c"):
        _add(kafka, cid)
    side.poison = {"b": 1}
    worker = _worker(kafka, side)
    await _run_until(worker, lambda: _committed(kafka) == 3)
    assert sorted(_results(kafka)) == ["a", "b", "c"]
    assert _dead_letters(kafka) == []
    assert side.calls[0] == ["a", "b", "c"]
    assert worker.isolation.stats.isolated_polls == 1


async def test_a_task_that_always_raises_is_dead_lettered_beside_committed_neighbours(
    dead_letter_lines: list[str],
) -> None:
    """A task whose handling raises every time is dead-lettered with the reason after the
    bounded attempts; the tasks beside it are committed with their outcomes in the same
    transaction, and the loop does not crash."""
    kafka, side = FakeKafka(), FakeTritonSide()
    for cid in ("a", "b", "c"):
        _add(kafka, cid)
    side.poison = {"b": -1}
    worker = _worker(kafka, side)
    await _run_until(worker, lambda: _committed(kafka) == 3)
    assert _results(kafka) == ["a", "c"]
    assert len(dead_letter_lines) == 1
    dead = _dead_letters(kafka)
    assert len(dead) == 1
    assert dead[0].source_offset == 1
    assert "failed 3 times" in dead[0].reason
    assert "ValueError: cannot score b" in dead[0].reason
    assert side.calls.count(["b"]) == 3
    assert worker.stats.transactions == 1
    assert (worker.stats.tasks, worker.stats.dead_lettered) == (3, 1)


async def test_a_stalled_worker_whose_partition_was_taken_over_cannot_commit() -> None:
    """A worker stalled mid-batch while another took its partition over is fenced: its commit
    fails (PartitionLostError), nothing of it is visible, and it rejoins its group (which gives
    the partition to the new owner) instead of committing its stale offsets."""
    kafka = FakeKafka()
    for cid in ("a", "b"):
        _add(kafka, cid)
    stalled_side, owner_side = FakeTritonSide(), FakeTritonSide()
    stalled_side.gate = asyncio.Event()
    stalled = _worker(kafka, stalled_side, [WorkerConsumer(kafka), WorkerConsumer(kafka, [])])
    owner = _worker(kafka, owner_side)
    stalled_task = asyncio.create_task(stalled.run())
    owner_task = asyncio.create_task(owner.run())
    try:
        await _eventually(lambda: stalled_side.calls == [["a", "b"]])
        await _eventually(lambda: _committed(kafka) == 2)
        stalled_side.gate.set()
        await _eventually(lambda: stalled.stats.rejoins == 1)
        await asyncio.sleep(0.05)
        assert not stalled_task.done()
        assert _results(kafka) == ["a", "b"]
        assert _committed(kafka) == 2
        assert stalled.stats.batches == 0
        assert stalled.stats.transactions == 0
        assert owner.stats.transactions == 1
    finally:
        for worker, task in ((stalled, stalled_task), (owner, owner_task)):
            worker.stop()
            await asyncio.wait_for(task, 2)


async def test_a_producer_that_does_not_start_on_assignment_makes_the_worker_start_over() -> None:
    """An assigned partition whose producer cannot start is not served from offsets fetched
    meanwhile: the worker rejoins, and serves once the producer starts."""
    kafka, side = FakeKafka(), FakeTritonSide()
    _add(kafka, "a")
    kafka.fail_starts = 1
    worker = _worker(kafka, side)
    await _run_until(worker, lambda: _committed(kafka) == 1)
    assert worker.stats.rejoins == 1
    assert _results(kafka) == ["a"]


async def test_a_not_ready_health_probe_pauses_an_idle_worker_until_ready() -> None:
    """With no traffic, a not-ready heartbeat probe opens the circuit and pauses the partitions."""
    kafka, side = FakeKafka(), FakeTritonSide()
    consumer = WorkerConsumer(kafka)
    worker = _worker(kafka, side, [consumer])
    task = asyncio.create_task(worker.run())
    await _eventually(lambda: worker.consuming)
    side.ready_answers = [False, False, False]
    worker.report_triton_ready(False)
    deadline = time.monotonic() + 5
    while consumer.paused() != consumer.assignment():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    assert worker.state == "degraded"
    assert not worker.ready
    while consumer.paused():  # the probes run out of "no" answers: resumed
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    worker.stop()
    await asyncio.wait_for(task, 2)


async def test_an_open_circuit_polls_gently_instead_of_spinning() -> None:
    """While Triton stays away, the loop polls a bounded number of times (it waits, not spins)."""
    kafka, side = FakeKafka(), FakeTritonSide()
    consumer = WorkerConsumer(kafka)
    worker = _worker(kafka, side, [consumer])
    worker.breaker = CircuitBreaker(CircuitBackoff(0.05, 0.1), time.monotonic)
    task = asyncio.create_task(worker.run())
    await _eventually(lambda: worker.consuming)
    side.ready_answers = [False] * 1000
    worker.report_triton_ready(False)
    await asyncio.sleep(0.5)
    polls, probes = consumer.polls, worker.stats.probes
    worker.stop()
    await asyncio.wait_for(task, 2)
    # poll_s is 10 ms here, so 0.5 s allows ~50 polls; a spinning loop makes thousands.
    assert polls < 120
    assert probes < 15


def _arriving_on_second_poll(kafka: FakeKafka, *correlation_ids: str) -> WorkerConsumer:
    """A consumer whose second poll finds ``correlation_ids`` newly arrived."""
    consumer = WorkerConsumer(kafka)
    original = consumer.getmany
    calls = 0

    async def getmany(*p: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            for correlation_id in correlation_ids:
                _add(kafka, correlation_id)
        return await original(*p, timeout_ms=timeout_ms, max_records=max_records)

    consumer.getmany = getmany  # type: ignore[method-assign]
    return consumer


def _timing(linger_s: float, *, adaptive: bool = True) -> LoopTiming:
    return LoopTiming(
        linger_s=linger_s,
        poll_s=0.01,
        kafka_retry_s=0.01,
        retry_backoff_s=0.001,
        adaptive_linger=adaptive,
    )


async def test_records_arriving_within_the_linger_join_the_batch() -> None:
    """With the fixed linger, a record that arrives while the first one lingers is scored in
    the same Triton call."""
    kafka, side = FakeKafka(), FakeTritonSide()
    _add(kafka, "first")
    consumer = _arriving_on_second_poll(kafka, "second")
    worker = _worker(kafka, side, [consumer], timing=_timing(0.01, adaptive=False))
    await _run_until(worker, lambda: _committed(kafka) == 2)
    assert side.calls == [["first", "second"]]


async def test_a_lone_task_on_an_idle_worker_is_scored_without_lingering() -> None:
    """Adaptive linger: a task found alone is scored at once, even with a 60 s linger; the
    record arriving next is the next batch."""
    kafka, side = FakeKafka(), FakeTritonSide()
    _add(kafka, "first")
    consumer = _arriving_on_second_poll(kafka, "second")
    worker = _worker(kafka, side, [consumer], timing=_timing(60.0))
    await _run_until(worker, lambda: _committed(kafka) == 2)
    assert side.calls == [["first"], ["second"]]


async def test_under_load_records_arriving_within_the_linger_join_the_batch() -> None:
    """Adaptive linger: a backlog that arrived fast enough to fill the batch within the linger
    waits, and what arrives meanwhile joins the same Triton call until the batch is full."""
    kafka, side = FakeKafka(), FakeTritonSide()
    _add(kafka, "a")
    consumer = _arriving_on_second_poll(kafka, "b", "c")
    original = consumer.getmany

    async def getmany(*p: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if consumer.polls == 2:  # the poll after the backlog b, c: more arrive while it waits
            for correlation_id in ("d", "e", "f", "g"):
                _add(kafka, correlation_id)
        return await original(*p, timeout_ms=timeout_ms, max_records=max_records)

    consumer.getmany = getmany  # type: ignore[method-assign]
    worker = _worker(kafka, side, [consumer], timing=_timing(60.0), max_batch=6)
    await _run_until(worker, lambda: _committed(kafka) == 7)
    assert side.calls == [["a"], ["b", "c", "d", "e", "f", "g"]]


def test_backoff_doubles_up_to_the_cap_with_equal_jitter() -> None:
    """Waits lie in [ceiling/2, ceiling]; the ceiling doubles per failure and stops at the cap."""
    backoff = CircuitBackoff(initial_s=0.2, max_s=5.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 6)] == [0.2, 0.4, 0.8, 1.6, 5.0]
    assert backoff.delay(3, lambda: 0.0) == pytest.approx(0.4)
    assert backoff.delay(3, lambda: 1.0) == pytest.approx(0.8)


def _state(breaker: CircuitBreaker) -> str:
    return breaker.state


def test_breaker_opens_probes_half_opens_and_closes() -> None:
    """open -> (wait) probe due -> half-open after a good probe -> closed after a served batch."""
    now = [100.0]
    breaker = CircuitBreaker(CircuitBackoff(1.0, 8.0), lambda: now[0], rand=lambda: 1.0)
    assert breaker.record_failure() == pytest.approx(1.0)
    assert breaker.state == "open"
    assert not breaker.fetching
    assert not breaker.probe_due()
    now[0] += 1.0
    assert breaker.probe_due()
    assert breaker.record_failure() == pytest.approx(2.0)  # the probe failed: a longer wait
    now[0] += 2.0
    breaker.probe_succeeded()
    assert _state(breaker) == "half-open"
    assert breaker.fetching
    breaker.record_success()
    assert breaker.closed
    assert breaker.failures == 0
    assert breaker.opened_total == 1


async def test_heartbeats_say_ready_then_degraded_keyed_by_instance() -> None:
    """A heartbeat reports the worker's state, circuit, Triton readiness and device kind."""
    kafka, side = FakeKafka(), FakeTritonSide()
    side.ready_answers = [True] + [False] * 100
    worker = _worker(kafka, side)
    sent: list[WorkerHeartbeat] = []

    async def publish(beat: WorkerHeartbeat) -> None:
        sent.append(beat)

    answers = [True, False]

    async def probe() -> bool:
        return answers.pop(0) if answers else False

    monitor = HealthMonitor(
        HeartbeatSource(PRODUCER, "deterioration", 1, 3.0),
        worker,
        probe,
        publish,
        lambda: "KIND_GPU",
        lambda: datetime(2026, 11, 23, tzinfo=UTC),
    )
    first = await monitor.beat()
    assert first.state == "starting"
    running = asyncio.create_task(worker.run())
    await _eventually(lambda: worker.consuming)
    await monitor.beat()  # probe says not ready: the worker is told, and opens its circuit
    await _eventually(lambda: worker.breaker.state == "open")
    worker.stop()
    await asyncio.wait_for(running, 2)
    beats = [(b.state, b.triton_ready, b.circuit) for b in sent]
    assert beats == [("starting", True, "closed"), ("ready", False, "closed")]
    assert all(b.instance == "worker-1" and b.device_kind == "KIND_GPU" for b in sent)
    assert sent[0].model == "deterioration"
    assert sent[0].model_version == 1


async def test_an_idle_half_open_worker_closes_on_the_next_good_health_probe() -> None:
    """Without traffic there is no trial batch: a good heartbeat probe closes a half-open circuit."""
    kafka, side = FakeKafka(), FakeTritonSide()
    worker = _worker(kafka, side)
    running = asyncio.create_task(worker.run())
    await _eventually(lambda: worker.consuming)
    side.ready_answers = [False, True]
    worker.report_triton_ready(False)
    await _eventually(lambda: worker.breaker.state == "half-open")
    assert not worker.ready
    worker.report_triton_ready(True)
    assert worker.breaker.closed
    assert worker.ready
    worker.stop()
    await asyncio.wait_for(running, 2)
