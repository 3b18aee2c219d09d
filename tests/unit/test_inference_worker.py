"""The worker's consume loop, circuit breaker and heartbeats, driven with a fake consumer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from medmesh_contracts.events import (
    InferenceCompleted,
    Producer,
    RunInference,
    WorkerHeartbeat,
    to_wire,
)
from medmesh_inference.batching import ModelUnavailable, Outcome
from medmesh_inference.circuit import Backoff, CircuitBreaker
from medmesh_inference.heartbeat import HealthMonitor, HeartbeatSource
from medmesh_inference.worker import LoopTiming, TaskWorker
from tests.factories import DETERIORATION_OUTPUTS, make_request, make_task

TOPIC = "medmesh.model.deterioration.v1.tasks"
PRODUCER = Producer(service="inference", instance="worker-1")


@dataclass
class FakeRecord:
    """The fields of an aiokafka ConsumerRecord the worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class FakeConsumer:
    """An in-memory aiokafka consumer: partitions, positions, pause state and commits."""

    def __init__(self, partitions: int = 2) -> None:
        self.logs: dict[TopicPartition, list[FakeRecord]] = {
            TopicPartition(TOPIC, p): [] for p in range(partitions)
        }
        self.positions = dict.fromkeys(self.logs, 0)
        self._paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.started = False
        self.polls = 0

    def add(self, value: bytes, partition: int = 0) -> FakeRecord:
        tp = TopicPartition(TOPIC, partition)
        record = FakeRecord(TOPIC, partition, len(self.logs[tp]), b"k", value)
        self.logs[tp].append(record)
        return record

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]:
        self.polls += 1
        limit = max_records or 10_000
        out: dict[Any, list[Any]] = {}
        for tp, log in self.logs.items():
            if tp in self._paused or limit <= 0:
                continue
            taken = log[self.positions[tp] : self.positions[tp] + limit]
            if taken:
                out[tp] = taken
                self.positions[tp] += len(taken)
                limit -= len(taken)
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out

    def assignment(self) -> set[Any]:
        return set(self.logs)

    def pause(self, *partitions: Any) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: Any) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> set[Any]:
        return set(self._paused)

    def seek(self, partition: Any, offset: int) -> None:
        self.positions[partition] = offset

    async def commit(self, offsets: dict[Any, int] | None = None) -> None:
        assert offsets is not None
        self.commits.append(dict(offsets))

    def committed(self, partition: int = 0) -> int:
        tp = TopicPartition(TOPIC, partition)
        return max((c[tp] for c in self.commits if tp in c), default=0)


class FakeTritonSide:
    """Stands in for score + publish: counts calls, can be unavailable or fail to publish."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.published: list[str] = []
        self.unavailable_calls = 0
        self.kafka_failures = 0
        self.ready_answers: list[bool] = []

    async def handle(self, tasks: Sequence[RunInference], sources: Sequence[Any]) -> list[Outcome]:
        self.calls.append([t.correlation_id for t in tasks])
        if self.unavailable_calls:
            self.unavailable_calls -= 1
            raise ModelUnavailable("StatusCode.UNAVAILABLE: connection refused")
        if self.kafka_failures:
            self.kafka_failures -= 1
            raise KafkaConnectionError("broker gone")
        outcomes: list[Outcome] = [
            InferenceCompleted(
                correlation_id=t.correlation_id,
                producer=PRODUCER,
                task=t,
                triton_model="deterioration",
                triton_version="1",
                outputs=DETERIORATION_OUTPUTS[1],
                device_kind="KIND_CPU",
                batch_size=len(tasks),
                inference_ms=1.0,
                completed_at=datetime(2026, 11, 23, tzinfo=UTC),
            )
            for t in tasks
        ]
        self.published.extend(o.correlation_id for o in outcomes)
        return outcomes

    async def probe(self) -> bool:
        return self.ready_answers.pop(0) if self.ready_answers else True


def _task_bytes(correlation_id: str) -> bytes:
    return to_wire(make_task(request=make_request(correlation_id=correlation_id)))


def _worker(
    consumer: FakeConsumer, side: FakeTritonSide, dead: list[str] | None = None
) -> TaskWorker:
    dead_letters = dead if dead is not None else []

    async def dead_letter(record: Any, reason: str) -> None:
        dead_letters.append(reason)

    async def on_ready() -> None:
        return None

    return TaskWorker(
        lambda: consumer,
        max_batch=64,
        handle=side.handle,
        dead_letter=dead_letter,
        probe=side.probe,
        on_ready=on_ready,
        breaker=CircuitBreaker(Backoff(0.01, 0.04), time.monotonic),
        timing=LoopTiming(linger_s=0.01, poll_s=0.01, kafka_retry_s=0.01),
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


async def test_buffered_tasks_become_one_batch_committed_after_publishing() -> None:
    """Five buffered tasks are one handler call; the commit stores offset 5 after publishing."""
    consumer, side = FakeConsumer(partitions=1), FakeTritonSide()
    for i in range(5):
        consumer.add(_task_bytes(f"r{i}"))
    worker = _worker(consumer, side)
    await _run_until(worker, lambda: consumer.committed() == 5)
    assert side.calls == [[f"r{i}" for i in range(5)]]
    assert side.published == [f"r{i}" for i in range(5)]


async def test_consumer_joins_only_once_the_model_version_is_ready() -> None:
    """While the readiness probe says no, the consumer is not started; it starts after a yes."""
    consumer, side = FakeConsumer(), FakeTritonSide()
    side.ready_answers = [False, False, True]
    worker = _worker(consumer, side)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.005)
    assert not consumer.started
    assert worker.breaker.state == "open"
    deadline = time.monotonic() + 5
    while not worker.consuming:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert consumer.started
    assert worker.breaker.closed
    worker.stop()
    await asyncio.wait_for(task, 2)


async def test_unavailable_triton_rewinds_pauses_and_serves_the_same_tasks_later() -> None:
    """ModelUnavailable fails nothing: the batch is rewound, partitions paused, then redone once."""
    consumer, side = FakeConsumer(partitions=2), FakeTritonSide()
    consumer.add(_task_bytes("a"), partition=0)
    consumer.add(_task_bytes("b"), partition=1)
    side.unavailable_calls = 1
    side.ready_answers = [True, False, False, True]  # startup, then two failed probes, then ready
    worker = _worker(consumer, side)
    paused_seen: list[set[Any]] = []
    original_pause = consumer.pause

    def pause(*tps: Any) -> None:
        original_pause(*tps)
        paused_seen.append(set(tps))

    consumer.pause = pause  # type: ignore[method-assign]
    await _run_until(worker, lambda: consumer.committed(0) == 1 and consumer.committed(1) == 1)
    assert paused_seen
    assert paused_seen[0] == consumer.assignment()
    assert sorted(side.published) == ["a", "b"]
    assert len(side.calls) == 2
    assert sorted(side.calls[0]) == sorted(side.calls[1]) == ["a", "b"]
    assert consumer.paused() == set()
    assert worker.breaker.closed
    assert worker.breaker.opened_total == 1


async def test_no_commit_while_publishing_fails_and_the_batch_is_redone() -> None:
    """A Kafka error while publishing commits nothing; the rewound batch is published later."""
    consumer, side = FakeConsumer(partitions=1), FakeTritonSide()
    consumer.add(_task_bytes("a"))
    side.kafka_failures = 2
    worker = _worker(consumer, side)
    await _run_until(worker, lambda: consumer.committed() == 1)
    assert len(side.calls) == 3
    assert side.published == ["a"]
    assert len(consumer.commits) == 1


async def test_undecodable_records_are_dead_lettered_and_committed() -> None:
    """A record that is not a RunInference is dead-lettered; its neighbours are still served."""
    consumer, side = FakeConsumer(partitions=1), FakeTritonSide()
    consumer.add(_task_bytes("a"))
    consumer.add(b"{not json")
    consumer.add(_task_bytes("c"))
    dead: list[str] = []
    worker = _worker(consumer, side, dead)
    await _run_until(worker, lambda: consumer.committed() == 3)
    assert side.published == ["a", "c"]
    assert len(dead) == 1
    assert "not a RunInference" in dead[0]


async def test_a_not_ready_health_probe_pauses_an_idle_worker_until_ready() -> None:
    """With no traffic, a not-ready heartbeat probe opens the circuit and pauses the partitions."""
    consumer, side = FakeConsumer(), FakeTritonSide()
    worker = _worker(consumer, side)
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
    consumer, side = FakeConsumer(), FakeTritonSide()
    worker = _worker(consumer, side)
    worker.breaker = CircuitBreaker(Backoff(0.05, 0.1), time.monotonic)
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


async def test_records_arriving_within_the_linger_join_the_batch() -> None:
    """A record that arrives while the first one lingers is scored in the same Triton call."""
    consumer, side = FakeConsumer(partitions=1), FakeTritonSide()
    consumer.add(_task_bytes("first"))
    original = consumer.getmany
    calls = 0

    async def getmany(*p: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            consumer.add(_task_bytes("second"))
        return await original(*p, timeout_ms=timeout_ms, max_records=max_records)

    consumer.getmany = getmany  # type: ignore[method-assign]
    worker = _worker(consumer, side)
    await _run_until(worker, lambda: consumer.committed() == 2)
    assert side.calls == [["first", "second"]]


def test_backoff_doubles_up_to_the_cap_with_equal_jitter() -> None:
    """Waits lie in [ceiling/2, ceiling]; the ceiling doubles per failure and stops at the cap."""
    backoff = Backoff(initial_s=0.2, max_s=5.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 6)] == [0.2, 0.4, 0.8, 1.6, 5.0]
    assert backoff.delay(3, lambda: 0.0) == pytest.approx(0.4)
    assert backoff.delay(3, lambda: 1.0) == pytest.approx(0.8)


def _state(breaker: CircuitBreaker) -> str:
    return breaker.state


def test_breaker_opens_probes_half_opens_and_closes() -> None:
    """open -> (wait) probe due -> half-open after a good probe -> closed after a served batch."""
    now = [100.0]
    breaker = CircuitBreaker(Backoff(1.0, 8.0), lambda: now[0], rand=lambda: 1.0)
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
    consumer, side = FakeConsumer(), FakeTritonSide()
    side.ready_answers = [True] + [False] * 100
    worker = _worker(consumer, side)
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
    consumer, side = FakeConsumer(), FakeTritonSide()
    worker = _worker(consumer, side)
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
