"""Model lifecycle on the real stack: registry rebuild, automatic rollback, dead canary workers.

Each test changes the registry through the same functions the ``medmesh models`` CLI uses and
leaves it at 100 % v1 (the spec's default) when it ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medmesh_cli.devstack.stack import Stack
from medmesh_cli.models import write_change
from medmesh_contracts import topics
from medmesh_contracts.events import (
    InferenceFailed,
    Producer,
    RunInference,
    WorkerHeartbeat,
    to_wire,
    utc_now,
)
from medmesh_contracts.lifecycle import (
    LifecycleAction,
    LifecycleError,
    ModelDeployment,
    RolloutPolicy,
    advance,
    decision,
    deploy_version,
    roll_back,
)
from medmesh_router.routing import bucket_of
from tests.e2e.conftest import Record, TopicTap
from tests.e2e.router_view import current_deployment, router_view, wait_for_view
from tests.factories import make_request

MODEL = "deterioration"
PRODUCER = Producer(service="e2e", instance="lifecycle-test")
V1_TASKS = topics.model_task_topic(MODEL, 1)
V2_TASKS = topics.model_task_topic(MODEL, 2)


@pytest.fixture(scope="session")
async def lifecycle_tap(stack: Stack) -> AsyncIterator[TopicTap]:
    """Reads the audit topic and both versions' task topics for the session."""
    reader = TopicTap(stack.config.bootstrap, (topics.MODELS_AUDIT, V1_TASKS, V2_TASKS))
    await reader.start()
    yield reader
    await reader.stop()


async def _wait_view(
    stack: Stack, check: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 30
) -> float:
    """Wait for the router's view to satisfy ``check``; returns the seconds it took."""
    started = time.monotonic()
    await wait_for_view(stack, MODEL, check, what, timeout_s)
    return time.monotonic() - started


def _weights(expected: dict[int, int]) -> Callable[[dict[str, Any]], bool]:
    as_json = {str(v): w for v, w in expected.items()}
    return lambda view: bool(view["effective_weights"] == as_json)


async def _write(
    stack: Stack, before: ModelDeployment, after: ModelDeployment, action: LifecycleAction
) -> ModelDeployment:
    audit = decision(before, after, action, "e2e", f"e2e {action}", PRODUCER, utc_now())
    await write_change(stack.config.bootstrap, after, audit)
    return after


async def _canary_at_50(stack: Stack, policy: RolloutPolicy, *, start: bool) -> ModelDeployment:
    current = await current_deployment(stack, MODEL)
    deployed = deploy_version(current, 2, PRODUCER, utc_now(), "e2e", start=start, policy=policy)
    if not start:
        deployed = advance(deployed, PRODUCER, utc_now(), "e2e")
    return await _write(stack, current, deployed, "deploy")


async def _restore_default(stack: Stack) -> None:
    """Roll back whatever is being rolled out; the router must show 100 % v1 again."""
    current = await current_deployment(stack, MODEL)
    with contextlib.suppress(LifecycleError):
        await _write(stack, current, roll_back(current, PRODUCER, utc_now(), "e2e"), "rollback")
    await _wait_view(stack, _weights({1: 100}), "100 % v1")


@contextlib.asynccontextmanager
async def _heartbeats(stack: Stack, version: int, instance: str) -> AsyncIterator[None]:
    """Stand in for a live, ready worker of ``version`` (heartbeats every 0.5 s) while open."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.config.bootstrap, acks="all")
    await producer.start()

    async def beat() -> None:
        while True:
            event = WorkerHeartbeat(
                correlation_id=instance,
                producer=PRODUCER,
                model=MODEL,
                model_version=version,
                instance=instance,
                state="ready",
                triton_ready=True,
                interval_s=0.5,
                sent_at=utc_now(),
            )
            await producer.send_and_wait(
                topics.MODELS_STATUS, to_wire(event), key=instance.encode()
            )
            await asyncio.sleep(0.5)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()


def _patients_on_upper_half(count: int) -> list[str]:
    """Fresh pseudonyms whose bucket is in the canary's half of a 50/50 split."""
    found: list[str] = []
    while len(found) < count:
        pseudonym = f"e2e-{uuid.uuid4().hex[:12]}"
        if bucket_of(MODEL, pseudonym) >= 5000:
            found.append(pseudonym)
    return found


async def _send_requests(producer: AIOKafkaProducer, pseudonyms: list[str]) -> list[str]:
    ids = []
    for pseudonym in pseudonyms:
        request = make_request(patient_pseudonym=pseudonym, correlation_id=str(uuid.uuid4()))
        await producer.send_and_wait(
            topics.INFERENCE_REQUESTS, to_wire(request), key=pseudonym.encode()
        )
        ids.append(request.correlation_id)
    return ids


def _task_for(correlation_id: str) -> Callable[[Record], bool]:
    return lambda record: bool(record.json()["correlation_id"] == correlation_id)


async def test_router_restart_rebuilds_its_state_from_the_registry(
    stack: Stack, lifecycle_tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """A paused 50 % v2 canary survives a router restart: same revision, patients still on v2."""
    try:
        async with _heartbeats(stack, 2, "e2e-restart-v2"):
            written = await _canary_at_50(stack, RolloutPolicy(steps=(50, 100)), start=False)
            await _wait_view(stack, _weights({1: 50, 2: 50}), "the 50 % canary")
            # In a thread: the stand-in worker's heartbeats must go on during the restart.
            await asyncio.to_thread(stack.restart_service, "router")
            view = await router_view(stack, MODEL)
            assert view["deployment"]["revision"] == written.revision
            assert view["deployment"]["rollout"]["phase"] == "paused"
            assert view["effective_weights"] == {"1": 50, "2": 50}
            (sent,) = await _send_requests(producer, _patients_on_upper_half(1))
            task = await lifecycle_tap.wait_for(V2_TASKS, _task_for(sent), timeout_s=30)
            assert RunInference.model_validate_json(task.value).model_version == 2
    finally:
        await _restore_default(stack)


def _v2_requests_at_least(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda view: bool(view["versions"]["2"]["figures"]["requests"] >= count)


async def test_a_restarted_router_keeps_the_current_steps_figures(
    stack: Stack, producer: AIOKafkaProducer
) -> None:
    """Mid-step, v2 has served 6 requests; after a router restart its figures still count
    them (read back from the results topic), so the step does not start counting again."""
    try:
        policy = RolloutPolicy(steps=(50, 100), interval_s=600, min_requests=1000)
        await _canary_at_50(stack, policy, start=True)
        await _wait_view(stack, _weights({1: 50, 2: 50}), "the controller's first step")
        await _send_requests(producer, _patients_on_upper_half(6))
        await _wait_view(stack, _v2_requests_at_least(6), "6 v2 results before the restart")
        await asyncio.to_thread(stack.restart_service, "router")
        view = await router_view(stack, MODEL)
        assert view["deployment"]["rollout"]["phase"] == "progressing"
        assert view["versions"]["2"]["figures"]["requests"] >= 6
    finally:
        await _restore_default(stack)


async def test_a_failing_canary_is_rolled_back_automatically(
    stack: Stack, lifecycle_tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """v2's worker fails every task: the controller rolls v2 back with no manual action, audits
    the figures, and v2's patients go to v1 again."""
    since = utc_now()
    stack.kill_service("deterioration-v2")
    failing = asyncio.create_task(_fail_every_v2_task(stack))
    try:
        async with _heartbeats(stack, 2, "e2e-failing-v2"):
            policy = RolloutPolicy(
                steps=(50, 100), interval_s=60, min_requests=8, max_error_rate=0.2
            )
            await _canary_at_50(stack, policy, start=True)
            await _wait_view(stack, _weights({1: 50, 2: 50}), "the controller's first step")
            await _send_requests(producer, _patients_on_upper_half(10))
            rollback = await lifecycle_tap.wait_for(
                topics.MODELS_AUDIT,
                lambda r: (
                    r.json()["action"] == "rollback"
                    and r.json()["actor"] != "e2e"
                    and datetime.fromisoformat(r.json()["decided_at"]) > since
                ),
                timeout_s=45,
            )
            figures = rollback.json()["figures"][0]
            assert figures["version"] == 2
            assert figures["failures"] >= 8
            assert figures["error_rate"] == 1.0
            assert rollback.json()["weights_after"] == {"1": 100}
            await _wait_view(stack, _weights({1: 100}), "100 % v1 after the rollback")
            (sent,) = await _send_requests(producer, _patients_on_upper_half(1))
            await lifecycle_tap.wait_for(V1_TASKS, _task_for(sent), timeout_s=30)
    finally:
        failing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await failing
        await _restore_default(stack)
        stack.restart_service("deterioration-v2")


async def _fail_every_v2_task(stack: Stack) -> None:
    """A broken v2 worker: answers every task on v2's topic with InferenceFailed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.config.bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=stack.config.bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        partitions = [TopicPartition(V2_TASKS, p) for p in range(stack.config.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        async for record in consumer:
            task = RunInference.model_validate_json(record.value)
            failed = InferenceFailed(
                correlation_id=task.correlation_id,
                producer=Producer(service="inference", instance="e2e-failing-v2"),
                task=task,
                error_kind="model-unavailable",
                reason="deliberately failing version (e2e)",
                attempts=1,
            )
            await producer.send_and_wait(topics.INFERENCE_FAILED, to_wire(failed), key=record.key)
    finally:
        await consumer.stop()
        await producer.stop()


async def test_dead_canary_workers_return_their_share_to_stable(
    stack: Stack, lifecycle_tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """kill -9 of v2's only worker: its 50 % goes to v1 within 3 heartbeats, audited."""
    since = utc_now()
    try:
        await _canary_at_50(stack, RolloutPolicy(steps=(50, 100)), start=False)
        await _wait_view(
            stack,
            lambda view: (
                view["versions"]["2"]["live_workers"] >= 1
                and view["effective_weights"] == {"1": 50, "2": 50}
            ),
            "a live v2 worker and the 50 % canary",
        )
        stack.kill_service("deterioration-v2")
        took = await _wait_view(stack, _weights({1: 100}), "v2's share back on v1", timeout_s=20)
        assert took < 12.0  # 3 missed beats of 3 s, plus one controller tick
        lost = await lifecycle_tap.wait_for(
            topics.MODELS_AUDIT,
            lambda r: (
                r.json()["action"] == "readiness-lost"
                and r.json()["version"] == 2
                and datetime.fromisoformat(r.json()["decided_at"]) > since
            ),
            timeout_s=5,
        )
        assert lost.json()["reason"].startswith("v2 has no live ready worker")
        (sent,) = await _send_requests(producer, _patients_on_upper_half(1))
        await lifecycle_tap.wait_for(V1_TASKS, _task_for(sent), timeout_s=30)
    finally:
        await _restore_default(stack)
        stack.restart_service("deterioration-v2")
