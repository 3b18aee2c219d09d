"""The router app on the in-memory broker: requests in, tasks or dead letters out."""

from __future__ import annotations

import json

from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from medmesh_contracts import topics
from medmesh_contracts.events import RunInference, to_wire
from medmesh_router.app import create_app
from medmesh_router.settings import RouterSettings
from tests.factories import make_request
from tests.service.conftest import SPECS_DIR


def _broker() -> KafkaBroker:
    app = create_app(RouterSettings(model_specs_dir=SPECS_DIR))
    broker = app.broker
    assert isinstance(broker, KafkaBroker)
    return broker


async def test_request_becomes_a_task_on_the_version_topic() -> None:
    """A RequestInference is published as a RunInference on medmesh.model.deterioration.v1.tasks."""
    broker = _broker()
    seen: list[bytes] = []

    @broker.subscriber(topics.model_task_topic("deterioration", 1))
    async def capture(message: KafkaMessage) -> None:
        seen.append(message.body)

    request = make_request()
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(
            to_wire(request),
            topic=topics.INFERENCE_REQUESTS,
            key=request.patient_pseudonym.encode(),
        )
    assert len(seen) == 1
    task = RunInference.model_validate_json(seen[0])
    assert task.request == request
    assert task.model_version == 1


async def test_undecodable_request_is_dead_lettered_with_the_reason() -> None:
    """A value that is not a RequestInference goes to the router's dead-letter topic."""
    broker = _broker()
    dead: list[bytes] = []

    @broker.subscriber(topics.ROUTER_DEADLETTER)
    async def capture(message: KafkaMessage) -> None:
        dead.append(message.body)

    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(b"{not json", topic=topics.INFERENCE_REQUESTS)
    assert len(dead) == 1
    event = json.loads(dead[0])
    assert event["schema"] == "medmesh.MessageDeadLettered/1"
    assert event["raw_value"] == "{not json"
    assert "ValidationError" in event["reason"]
