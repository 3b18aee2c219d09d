"""The router service: medmesh.inference.requests -> medmesh.model.<name>.v<version>.tasks.

Thin by design: decoding and publishing here, the decision in ``routing.route``.
"""

from __future__ import annotations

import logging
from typing import Any

from faststream.asgi import AsgiFastStream
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.events import (
    Producer,
    RequestInference,
    RunInference,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_router.routing import UnknownModelError, route
from medmesh_router.settings import RouterSettings
from medmesh_runtime.deadletter import DeadLetters
from medmesh_runtime.health import health_routes
from medmesh_runtime.kafka import CONSUMER_ACK_POLICY, build_broker, message_headers
from medmesh_runtime.logging import configure_logging, get_logger
from medmesh_runtime.telemetry import configure_service_tracing

SERVICE = "router"
log = get_logger("medmesh.router")


def create_app(settings: RouterSettings) -> AsgiFastStream:
    """Build the router app; Kafka connects when the app starts."""
    configure_logging(SERVICE, settings.log_level)
    tracer_provider = configure_service_tracing(SERVICE, settings)
    specs = load_specs(settings.model_specs_dir)
    producer = Producer(service=SERVICE, instance=settings.instance_id)
    broker = build_broker(settings, SERVICE, tracer_provider)
    task_out = {
        topics.model_task_topic(spec.name, v.version): broker.publisher(
            topics.model_task_topic(spec.name, v.version), title=f"{spec.name} v{v.version} tasks"
        )
        for spec in specs.values()
        for v in spec.versions
    }
    dead_letters = DeadLetters(broker.publisher(topics.ROUTER_DEADLETTER), producer)

    @broker.subscriber(
        topics.INFERENCE_REQUESTS,
        group_id=settings.router_group_id,
        auto_offset_reset="earliest",
        ack_policy=CONSUMER_ACK_POLICY,
        title="inference requests",
    )
    async def on_request(message: KafkaMessage) -> None:
        record: Any = message.raw_message
        try:
            request = RequestInference.model_validate_json(record.value)
            routed = route(request, specs, producer, utc_now())
        except (ValidationError, UnknownModelError) as exc:
            await dead_letters.send(record, f"{type(exc).__name__}: {exc}")
            return
        await task_out[routed.topic].publish(
            to_wire(routed.task),
            key=record.key,
            headers=message_headers(routed.task.correlation_id, schema_of(RunInference)),
            correlation_id=routed.task.correlation_id,
        )
        log.info(
            "request routed",
            correlation_id=request.correlation_id,
            model=request.model,
            model_version=routed.task.model_version,
            route=routed.task.route.detail,
        )

    async def close_tracing() -> None:
        tracer_provider.shutdown()

    return AsgiFastStream(
        broker,
        asgi_routes=health_routes(broker),
        on_shutdown=[close_tracing],
        logger=logging.getLogger(f"medmesh.{SERVICE}.app"),
    )
