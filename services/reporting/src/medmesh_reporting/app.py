"""The reporting service: medmesh.inference.results -> FHIR R4B report Bundles.

Thin by design: decoding and publishing here, the FHIR in ``report.build_report``. Results of
shadow versions never become reports (the router marks them; see the contract's RouteDecision).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from faststream.asgi import AsgiFastStream
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import trace
from pydantic import ValidationError

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import InferenceCompleted, Producer, utc_now
from medmesh_contracts.modelspec import load_specs
from medmesh_reporting.report import ReportBuildError, build_report
from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.deadletter import DeadLetters
from medmesh_runtime.health import health_routes
from medmesh_runtime.kafka import CONSUMER_ACK_POLICY, build_broker, message_headers
from medmesh_runtime.logging import configure_logging, get_logger
from medmesh_runtime.telemetry import configure_service_tracing

SERVICE = "reporting"
log = get_logger("medmesh.reporting")


def create_app(settings: ReportingSettings) -> AsgiFastStream:
    """Build the reporting app; Kafka connects when the app starts."""
    configure_logging(SERVICE, settings.log_level)
    tracer_provider = configure_service_tracing(SERVICE, settings)
    tracer = tracer_provider.get_tracer("medmesh.reporting")
    specs = load_specs(settings.model_specs_dir)
    producer = Producer(service=SERVICE, instance=settings.instance_id)
    broker = build_broker(settings, SERVICE, tracer_provider)
    reports_out = broker.publisher(topics.REPORTS_DIAGNOSTIC, title="FHIR DiagnosticReport bundles")
    dead_letters = DeadLetters(broker.publisher(topics.REPORTING_DEADLETTER), producer)

    @broker.subscriber(
        topics.INFERENCE_RESULTS,
        group_id=settings.reporting_group_id,
        auto_offset_reset="earliest",
        ack_policy=CONSUMER_ACK_POLICY,
        title="inference results",
    )
    async def on_result(message: KafkaMessage) -> None:
        record: Any = message.raw_message
        try:
            completed = InferenceCompleted.model_validate_json(record.value)
            spec = specs[completed.task.request.model]
            with tracer.start_as_current_span("reporting.build-report"):
                bundle = build_report(
                    completed,
                    spec,
                    performer_display=settings.performer_display,
                    issued=completed.completed_at,
                )
        except (ValidationError, KeyError, ReportBuildError) as exc:
            await dead_letters.send(record, f"{type(exc).__name__}: {exc}")
            return
        await reports_out.publish(
            json.dumps(bundle, separators=(",", ":")).encode(),
            key=record.key,
            headers=message_headers(completed.correlation_id, h.FHIR_R4B_JSON),
            correlation_id=completed.correlation_id,
        )
        latency_ms = (utc_now() - completed.task.request.received_at).total_seconds() * 1000
        trace.get_current_span().set_attribute("medmesh.end_to_end_ms", latency_ms)
        log.info(
            "report published",
            correlation_id=completed.correlation_id,
            model=spec.name,
            model_version=completed.task.model_version,
            end_to_end_ms=round(latency_ms, 1),
        )

    async def close_tracing() -> None:
        tracer_provider.shutdown()

    return AsgiFastStream(
        broker,
        asgi_routes=health_routes(broker),
        on_shutdown=[close_tracing],
        logger=logging.getLogger(f"medmesh.{SERVICE}.app"),
    )
