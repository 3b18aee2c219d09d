"""The router app on the in-memory broker: routing by the registry, seeding, readiness, rollback."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

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
    LifecycleDecision,
    ModelDeployment,
    RolloutPolicy,
    advance,
    deploy_version,
    seed_deployment,
)
from medmesh_router.app import Router
from medmesh_router.rollout import Rollout
from medmesh_router.routing import bucket_of
from medmesh_router.settings import RouterSettings
from medmesh_router.topic_reader import Consumed
from tests.factories import make_completed, make_request, make_task
from tests.service.conftest import SPECS_DIR
from tests.transactional_kafka import FakeKafka, run_until

PRODUCER = Producer(service="test", instance="t-1")
GROUP = "medmesh-router"
MODEL = "deterioration"


def router_on(*records: ModelDeployment, kafka: FakeKafka | None = None) -> Router:
    """A router (not loaded yet) on an in-memory Kafka, its registry holding ``records``."""

    async def read(
        _settings: RouterSettings,
        topic: str,
        since: datetime | None = None,
        apply: Callable[[Consumed], None] | None = None,
    ) -> list[Consumed]:
        if topic != topics.MODELS_REGISTRY:
            return []
        return [Consumed(0, offset, to_wire(d)) for offset, d in enumerate(records)]

    clients = (kafka or FakeKafka()).clients(GROUP)
    return Router(RouterSettings(model_specs_dir=SPECS_DIR, router_tick_s=3600), read, clients)


async def _route(
    router: Router, kafka: FakeKafka, *values: bytes, key: bytes | None = None
) -> None:
    """Append ``values`` to the requests topic and run the requests stage until it committed."""
    for value in values:
        kafka.append(topics.INFERENCE_REQUESTS, value, key=key)
    end = len(kafka.records(topics.INFERENCE_REQUESTS))
    await run_until(router.requests, lambda: kafka.offset(GROUP, topics.INFERENCE_REQUESTS) == end)


def canary_at_half(min_requests: int = 50, max_error_rate: float = 0.05) -> ModelDeployment:
    """v1 stable and v2 canary at the 50 % step of (50, 100), progressing."""
    seeded = seed_deployment(MODEL, {1: 100}, PRODUCER, utc_now(), "test")
    deployed = deploy_version(
        seeded,
        2,
        PRODUCER,
        utc_now(),
        "test",
        policy=RolloutPolicy(
            steps=(50, 100), min_requests=min_requests, max_error_rate=max_error_rate
        ),
    )
    return advance(deployed, PRODUCER, utc_now(), "test")


def _capture(broker: KafkaBroker, topic: str) -> list[bytes]:
    seen: list[bytes] = []

    @broker.subscriber(topic)
    async def capture(message: KafkaMessage) -> None:
        seen.append(message.body)

    return seen


def _patient_on(version: int) -> str:
    """A pseudonym whose bucket is in v1's half (below 5000) or v2's half of a 50/50 split."""
    for i in range(1000):
        pseudonym = f"pseudo-{i}"
        if (bucket_of(MODEL, pseudonym) >= 5000) == (version == 2):
            return pseudonym
    raise AssertionError("no such patient")


async def test_request_becomes_a_task_on_the_version_topic() -> None:
    """A RequestInference is published as a RunInference on medmesh.model.deterioration.v1.tasks."""
    kafka = FakeKafka()
    router = router_on(kafka=kafka)
    await router.load()
    request = make_request()
    await _route(router, kafka, to_wire(request), key=request.patient_pseudonym.encode())
    seen = kafka.values(topics.model_task_topic(MODEL, 1))
    assert len(seen) == 1
    task = RunInference.model_validate_json(seen[0])
    assert task.request == request
    assert task.model_version == 1


async def test_undecodable_request_is_dead_lettered_with_the_reason() -> None:
    """A value that is not a RequestInference goes to the router's dead-letter topic, with a
    reason that names what is wrong but quotes none of the value (it may hold patient data)."""
    kafka = FakeKafka()
    router = router_on(kafka=kafka)
    await router.load()
    await _route(router, kafka, b"{not json")
    dead = kafka.values(topics.ROUTER_DEADLETTER)
    assert len(dead) == 1
    assert kafka.offset(GROUP, topics.INFERENCE_REQUESTS) == 1
    event = json.loads(dead[0])
    assert event["schema"] == "medmesh.MessageDeadLettered/1"
    assert event["raw_value"] == "{not json"
    assert "ValidationError" in event["reason"]
    assert "not json" not in event["reason"]


async def test_empty_registry_is_seeded_from_the_spec_and_audited() -> None:
    """With no registry record, each spec's 100 % v1 is published to the registry with a 'seed'."""
    router = router_on()
    registry = _capture(router.broker, topics.MODELS_REGISTRY)
    audit = _capture(router.broker, topics.MODELS_AUDIT)
    await router.load()
    async with TestKafkaBroker(router.broker):
        await router.started()
        await router.stopping()
    seeded = {d.model: d.weights for d in map(ModelDeployment.model_validate_json, registry)}
    assert seeded == {"deterioration": {1: 100}, "ecg-rhythm": {1: 100}, "chest-opacity": {1: 100}}
    assert [LifecycleDecision.model_validate_json(a).action for a in audit] == ["seed"] * 3


async def test_state_is_rebuilt_from_the_registry_records() -> None:
    """A registry holding a 50 % v2 canary routes a patient of the upper half to v2, not seeded."""
    kafka = FakeKafka()
    router = router_on(canary_at_half(), kafka=kafka)
    await router.load()
    request = make_request(patient_pseudonym=_patient_on(2))
    await _route(router, kafka, to_wire(request))
    v2 = kafka.values(topics.model_task_topic(MODEL, 2))
    assert [RunInference.model_validate_json(t).model_version for t in v2] == [2]
    assert router.state.deployments[MODEL].revision == 3


async def test_dead_canary_gives_its_share_to_stable_and_is_audited() -> None:
    """v2 seen ready, then silent past 3 intervals: readiness-lost audited, patients go to v1."""
    kafka = FakeKafka()
    router = router_on(canary_at_half(), kafka=kafka)
    await router.load()
    audit = _capture(router.broker, topics.MODELS_AUDIT)
    beat = WorkerHeartbeat(
        correlation_id="hb",
        producer=PRODUCER,
        model=MODEL,
        model_version=2,
        instance="w-v2",
        state="ready",
        triton_ready=True,
        interval_s=1.0,
        sent_at=utc_now() - timedelta(seconds=1),
    )
    async with TestKafkaBroker(router.broker) as test_broker:
        await test_broker.publish(to_wire(beat), topic=topics.MODELS_STATUS)
        assert router.state.tables[MODEL].weights == {1: 50, 2: 50}
        await router.rollout.audit_readiness(utc_now() + timedelta(seconds=5))
    request = make_request(patient_pseudonym=_patient_on(2))
    await _route(router, kafka, to_wire(request))
    v1 = kafka.values(topics.model_task_topic(MODEL, 1))
    assert router.state.tables[MODEL].weights == {1: 100}
    decisions = [LifecycleDecision.model_validate_json(a) for a in audit]
    assert [(d.action, d.version) for d in decisions] == [("readiness-lost", 2)]
    assert len(v1) == 1


async def test_failures_of_the_canary_roll_it_back_with_figures() -> None:
    """5 failures of v2 with min_requests 5: the controller retires v2 and audits the rollback."""
    router = router_on(canary_at_half(min_requests=5, max_error_rate=0.1))
    await router.load()
    registry = _capture(router.broker, topics.MODELS_REGISTRY)
    audit = _capture(router.broker, topics.MODELS_AUDIT)
    async with TestKafkaBroker(router.broker) as test_broker:
        for i in range(5):
            task = make_task(make_request(correlation_id=f"c{i}"), model_version=2)
            failed = InferenceFailed(
                correlation_id=task.correlation_id,
                producer=PRODUCER,
                task=task,
                error_kind="model-unavailable",
                reason="test",
                attempts=1,
            )
            await test_broker.publish(to_wire(failed), topic=topics.INFERENCE_FAILED)
        await router.rollout.tick(utc_now())
    assert router.state.deployments[MODEL].weights == {1: 100}
    assert [ModelDeployment.model_validate_json(r).version(2).state for r in registry] == [
        "retired"
    ]
    (rollback,) = [LifecycleDecision.model_validate_json(a) for a in audit]
    assert rollback.action == "rollback"
    assert rollback.figures[0].failures == 5
    assert rollback.weights_before == {1: 50, 2: 50}


async def test_a_restart_reads_back_the_current_steps_results_and_failures() -> None:
    """At start the router reads results and failures since the step began: a restarted
    router judges the step on the evidence gathered before it went down."""
    canary = canary_at_half()
    asked_since: list[datetime | None] = []

    def completed(i: int) -> bytes:
        task = make_task(make_request(correlation_id=f"r{i}"), model_version=2)
        return to_wire(make_completed(task).model_copy(update={"completed_at": utc_now()}))

    def failed(i: int) -> bytes:
        task = make_task(make_request(correlation_id=f"f{i}"), model_version=2)
        return to_wire(
            InferenceFailed(
                correlation_id=task.correlation_id,
                producer=PRODUCER,
                task=task,
                error_kind="invalid-input",
                reason="test",
                attempts=1,
            )
        )

    async def read(
        _settings: RouterSettings,
        topic: str,
        since: datetime | None = None,
        apply: Callable[[Consumed], None] | None = None,
    ) -> list[Consumed]:
        records: list[Consumed] = []
        if topic == topics.MODELS_REGISTRY:
            records = [Consumed(0, 0, to_wire(canary))]
        elif topic == topics.INFERENCE_RESULTS:
            asked_since.append(since)
            records = [Consumed(0, i, completed(i)) for i in range(3)] + [Consumed(0, 3, b"{")]
        elif topic == topics.INFERENCE_FAILED:
            records = [Consumed(0, 0, failed(0))]
        if apply is None:
            return records
        for record in records:
            apply(record)
        return []

    router = Router(RouterSettings(model_specs_dir=SPECS_DIR, router_tick_s=3600), read)
    await router.load()
    figures = router.rollout.figures(router.state.deployments[MODEL], 2, utc_now())
    assert (figures.requests, figures.failures) == (4, 1)
    assert asked_since == [canary.rollout.step_started_at]


async def test_a_hold_is_audited_once_per_interval_not_every_tick() -> None:
    """A step past its interval with too few requests holds: the first tick audits the hold,
    ticks within the next interval audit nothing, a tick an interval later audits it again."""
    router = router_on(canary_at_half(min_requests=50))
    await router.load()
    audits: list[LifecycleDecision] = []

    async def publish_audit(audit: LifecycleDecision) -> None:
        audits.append(audit)

    rollout = Rollout(
        router.state,
        router.analysis,
        PRODUCER,
        "controller:test",
        router.publish_change,
        publish_audit,
    )
    deployment = router.state.deployments[MODEL]
    assert deployment.rollout.step_started_at is not None
    interval = deployment.policy.interval_s
    after_step = deployment.rollout.step_started_at + timedelta(seconds=interval + 1)
    for seconds in (0, 1, interval / 2):
        await rollout.tick(after_step + timedelta(seconds=seconds))
    assert [a.action for a in audits] == ["hold"]
    await rollout.tick(after_step + timedelta(seconds=interval + 1))
    assert [a.action for a in audits] == ["hold", "hold"]
    assert "only 0 of 50" in audits[0].reason
