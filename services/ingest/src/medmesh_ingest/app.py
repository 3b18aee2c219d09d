"""The ingest service: FHIR over HTTP (FastAPI) and from medmesh.fhir.inbound (faststream).

Thin by design: it translates transport to ``service.decide`` and publishes what it decides.
A 202 is sent only after every request is acknowledged by Kafka (acks=all).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Tracer

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    FhirEventRejected,
    Producer,
    SourceContext,
    new_id,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.capability import capability_statement
from medmesh_ingest.outcomes import Issue, outcome
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.service import IngestDecision, decide
from medmesh_ingest.settings import DEVELOPMENT_PSEUDONYM_KEY, IngestSettings
from medmesh_ingest.transport import content_type_problem
from medmesh_runtime.kafka import CONSUMER_ACK_POLICY, build_broker, encode_raw, message_headers
from medmesh_runtime.logging import configure_logging, get_logger
from medmesh_runtime.telemetry import configure_service_tracing, trace_id_hex

SERVICE = "ingest"
FHIR_JSON = "application/fhir+json"
log = get_logger("medmesh.ingest")


class Ingest:
    """The two entrypoints (HTTP and inbound topic) over one set of publishers and specs."""

    def __init__(self, settings: IngestSettings, broker: KafkaBroker, tracer: Tracer) -> None:
        self.settings = settings
        self.tracer = tracer
        self.specs = load_specs(settings.model_specs_dir)
        self.pseudonymize = Pseudonymizer(settings.pseudonym_key.get_secret_value().encode())
        self.producer = Producer(service=SERVICE, instance=settings.instance_id)
        self.requests_out = broker.publisher(topics.INFERENCE_REQUESTS, title="inference requests")
        self.invalid_out = broker.publisher(topics.FHIR_INVALID, title="rejected inbound FHIR")

    def decide(
        self, raw: bytes, channel: SourceContext, resource_type: str | None = None
    ) -> IngestDecision:
        """Validate and extract one payload (no I/O)."""
        with self.tracer.start_as_current_span("ingest.validate-and-extract"):
            return decide(
                raw,
                specs=self.specs,
                pseudonymize=self.pseudonymize,
                producer=self.producer,
                source=channel,
                received_at=utc_now(),
                resource_type_hint=resource_type,
            )

    async def publish_requests(self, decision: IngestDecision) -> None:
        """Publish every request and wait for Kafka's acknowledgement of each."""
        for request in decision.requests:
            await self.requests_out.publish(
                to_wire(request),
                key=request.patient_pseudonym.encode(),
                headers=message_headers(request.correlation_id, schema_of(type(request))),
                correlation_id=request.correlation_id,
            )

    async def on_inbound_event(self, message: KafkaMessage) -> None:
        """One event from medmesh.fhir.inbound: requests downstream, or a rejection event."""
        record: Any = message.raw_message
        raw: bytes = record.value or b""
        decision = self.decide(raw, SourceContext(channel="kafka"))
        if not decision.rejected:
            await self.publish_requests(decision)
            log.info(
                "inbound event processed",
                requests=len(decision.requests),
                issues=len(decision.issues),
                partition=record.partition,
                offset=record.offset,
            )
            return
        value, encoding = encode_raw(raw)
        rejected = FhirEventRejected(
            correlation_id=new_id(),
            producer=self.producer,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            raw_value=value,
            raw_encoding=encoding,
            operation_outcome=decision.operation_outcome,
        )
        await self.invalid_out.publish(
            to_wire(rejected),
            key=record.key,
            headers=message_headers(rejected.correlation_id, schema_of(FhirEventRejected)),
        )
        log.warning(
            "inbound event rejected",
            status=decision.status,
            partition=record.partition,
            offset=record.offset,
            dead_letter_topic=topics.FHIR_INVALID,
        )

    async def on_http(self, request: Request, resource_type: str | None) -> Response:
        """One HTTP POST: the answer is sent after Kafka acknowledged every request."""
        incoming = propagate.extract(dict(request.headers))
        with self.tracer.start_as_current_span(
            f"POST {request.url.path}", kind=SpanKind.SERVER, context=incoming
        ) as span:
            trace_id = trace_id_hex(span)
            problem = content_type_problem(request.headers.get("content-type"))
            if problem is not None:
                return fhir_response(problem.status, problem.outcome, trace_id)
            raw = await request.body()
            if len(raw) > self.settings.max_payload_bytes:
                too_big = Issue("error", "too-costly", "payload exceeds the size limit")
                return fhir_response(413, outcome((too_big,)), trace_id)
            decision = self.decide(raw, SourceContext(channel="http"), resource_type)
            try:
                await self.publish_requests(decision)
            except Exception as exc:  # any Kafka failure means "not accepted": the sender retries
                log.exception("publishing to Kafka failed; answering 503")
                unavailable = Issue(
                    "error",
                    "transient",
                    f"could not store the request durably: {type(exc).__name__}",
                )
                return fhir_response(503, outcome((unavailable,)), trace_id)
            log.info(
                "http payload handled",
                status=decision.status,
                requests=len(decision.requests),
                issues=len(decision.issues),
            )
            return fhir_response(
                decision.status,
                decision.operation_outcome,
                trace_id,
                correlation_ids=[r.correlation_id for r in decision.requests],
            )


def create_app(settings: IngestSettings) -> FastAPI:
    """Build the ingest ASGI app; Kafka connects in its lifespan, not here."""
    configure_logging(SERVICE, settings.log_level)
    tracer_provider = configure_service_tracing(SERVICE, settings)
    broker = build_broker(settings, SERVICE, tracer_provider)
    ingest = Ingest(settings, broker, tracer_provider.get_tracer("medmesh.ingest"))
    broker.subscriber(
        topics.FHIR_INBOUND,
        group_id=settings.ingest_group_id,
        auto_offset_reset="earliest",
        ack_policy=CONSUMER_ACK_POLICY,
        title="inbound FHIR events",
    )(ingest.on_inbound_event)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY:
            log.warning("development pseudonym key in use; set MEDMESH_PSEUDONYM_KEY in production")
        await broker.start()
        log.info("ingest started", models=sorted(ingest.specs), port=settings.ingest_port)
        try:
            yield
        finally:
            await broker.stop()
            tracer_provider.shutdown()

    app = FastAPI(title="medmesh ingest", lifespan=lifespan)

    @app.post("/fhir")
    async def post_bundle(request: Request) -> Response:
        return await ingest.on_http(request, None)

    @app.get("/fhir/metadata")
    async def metadata() -> Response:
        statement = capability_statement(ingest.specs.values(), utc_now())
        return JSONResponse(statement, media_type=FHIR_JSON)

    @app.post("/fhir/{resource_type}")
    async def post_resource(resource_type: str, request: Request) -> Response:
        return await ingest.on_http(request, resource_type)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(status_code=204)

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(status_code=204 if await broker.ping(timeout=2.0) else 503)

    app.state.broker = broker
    return app


def fhir_response(
    status: int,
    body: dict[str, Any],
    trace_id: str,
    correlation_ids: list[str] | None = None,
) -> JSONResponse:
    """A FHIR JSON answer with the trace id and correlation ids as headers."""
    headers = {"medmesh-trace-id": trace_id}
    if correlation_ids:
        headers[h.CORRELATION_ID] = ",".join(correlation_ids)
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)
