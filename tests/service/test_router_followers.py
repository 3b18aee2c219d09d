"""The router's followers on the in-memory broker: what they read of each record, and that they
read it without a thread-pool round trip per message (issue 17)."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import pytest
from faststream.kafka import TestKafkaBroker

from medmesh_contracts import topics
from medmesh_contracts.events import InferenceFailed, Producer, to_wire, utc_now
from medmesh_contracts.lifecycle import (
    ModelDeployment,
    seed_deployment,
)
from medmesh_router.app import Router
from tests.factories import make_completed, make_request, make_task
from tests.service.test_router_app import canary_at_half, router_on

PRODUCER = Producer(service="test", instance="t-1")
MODEL = "deterioration"
RECORDS = 10


async def _loaded_router(*records: ModelDeployment) -> Router:
    router = router_on(*records)
    await router.load()
    return router


def _completed(i: int, version: int = 2) -> bytes:
    task = make_task(make_request(correlation_id=f"r{i}"), model_version=version)
    return to_wire(make_completed(task).model_copy(update={"completed_at": utc_now()}))


def _failed(i: int) -> bytes:
    task = make_task(make_request(correlation_id=f"f{i}"), model_version=2)
    failed = InferenceFailed(
        correlation_id=task.correlation_id,
        producer=PRODUCER,
        task=task,
        error_kind="model-unavailable",
        reason="test",
        attempts=1,
    )
    return to_wire(failed)


async def test_outcomes_are_followed_without_a_thread_hop_per_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Results, shadow results and failures reach the rollout's figures with no
    anyio.to_thread.run_sync call per record (a ``KafkaMessage`` parameter would cost one)."""
    router = await _loaded_router(canary_at_half())
    hops = 0
    run_sync = anyio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await run_sync(*args, **kwargs)

    async with TestKafkaBroker(router.broker) as broker:
        monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
        for i in range(RECORDS):
            await broker.publish(_completed(i), topic=topics.INFERENCE_RESULTS)
            await broker.publish(_completed(100 + i), topic=topics.INFERENCE_SHADOW_RESULTS)
            await broker.publish(_failed(i), topic=topics.INFERENCE_FAILED)
        monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    figures = router.rollout.figures(router.state.deployments[MODEL], 2, utc_now())
    assert (figures.requests, figures.failures) == (3 * RECORDS, RECORDS)
    assert hops == 0, f"{hops} thread-pool round trips for {3 * RECORDS} followed records"


async def test_registry_records_read_at_start_are_skipped_by_topic_partition_and_offset() -> None:
    """A registry record at or below the offset the start-up read reached (same topic and
    partition) is not applied again; one past it is."""
    router = await _loaded_router(canary_at_half())
    promoted = seed_deployment(MODEL, {2: 100}, PRODUCER, utc_now(), "test")
    promoted = promoted.model_copy(
        update={"revision": router.state.deployments[MODEL].revision + 5}
    )
    async with TestKafkaBroker(router.broker) as broker:
        # The in-memory broker gives every record offset 0 on partition 0.
        router.followers.loaded = {(topics.MODELS_REGISTRY, 0): 0}
        await broker.publish(to_wire(promoted), topic=topics.MODELS_REGISTRY)
        assert router.state.deployments[MODEL].weights == {1: 50, 2: 50}
        router.followers.loaded = {(topics.MODELS_STATUS, 0): 0}
        await broker.publish(to_wire(promoted), topic=topics.MODELS_REGISTRY)
    assert router.state.deployments[MODEL].weights == {2: 100}


async def test_an_unreadable_outcome_is_counted_not_applied() -> None:
    """An outcome that does not parse raises the unreadable count and changes no figures."""
    router = await _loaded_router(canary_at_half())
    async with TestKafkaBroker(router.broker) as broker:
        await broker.publish(b"{", topic=topics.INFERENCE_RESULTS)
        await broker.publish(b"", topic=topics.INFERENCE_FAILED)
    figures = router.rollout.figures(router.state.deployments[MODEL], 2, utc_now())
    assert router.followers.unreadable_outcomes == 2
    assert (figures.requests, figures.failures) == (0, 0)
