"""The ingest service: FHIR over HTTP (FastAPI) and from medmesh.fhir.inbound (faststream).

Thin by design: it authenticates, checks the transport (media type, FHIR version, size), hands
the payload to ``service.IngestService`` and translates its ``Answer``. A 2xx is sent only after
Kafka acknowledged every message the payload caused (acks=all); otherwise 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
from aiokafka.structs import RecordMetadata
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Tracer

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    FhirEventRejected,
    PatientReadingsUpdated,
    Producer,
    RequestInference,
    SourceContext,
    routing_headers,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.auth import Authenticator, Source, check_listen_address
from medmesh_ingest.capability import capability_statement
from medmesh_ingest.fetch import http_fetcher
from medmesh_ingest.outcomes import TOO_LARGE, FhirRejected, Issue, outcome
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore, state_key
from medmesh_ingest.service import (
    Answer,
    Context,
    Fetch,
    IngestService,
    KafkaUnavailableError,
    Outgoing,
    Prepared,
    SourceUnavailableError,
)
from medmesh_ingest.settings import DEVELOPMENT_PSEUDONYM_KEY, IngestSettings
from medmesh_ingest.state_topic import ReadingsFollower, partition_of
from medmesh_ingest.transport import requested_version
from medmesh_ingest.validation import FhirVersion, Limits
from medmesh_runtime.deadletter import rejected_event
from medmesh_runtime.kafka import (
    CONSUMER_ACK_POLICY,
    build_broker,
    message_headers,
    record_headers,
)
from medmesh_runtime.lag import LagMonitor
from medmesh_runtime.logging import configure_logging, get_logger
from medmesh_runtime.telemetry import (
    configure_service_tracing,
    consumer_span,
    trace_id_hex,
    untraced,
    within,
)

SERVICE = "ingest"
FHIR_JSON = "application/fhir+json"
log = get_logger("medmesh.ingest")


class Ingest:
    """The two entrypoints (HTTP and inbound topic) over one IngestService and its publishers."""

    def __init__(self, settings: IngestSettings, broker: KafkaBroker, tracer: Tracer) -> None:
        self.settings = settings
        self.tracer = tracer
        self.specs = load_specs(settings.model_specs_dir)
        self.auth = Authenticator(settings)
        self.producer = Producer(service=SERVICE, instance=settings.instance_id)
        self.requests_out = broker.publisher(topics.INFERENCE_REQUESTS, title="inference requests")
        self.invalid_out = broker.publisher(topics.FHIR_INVALID, title="rejected inbound FHIR")
        self.state_out = broker.publisher(topics.INGEST_READINGS, title="per-patient readings")
        self.store = ReadingsStore()
        # Partitions of the state topic, known once it was read on start (None: key hashing).
        self.state_partitions: int | None = None
        self.ready = False
        self.http_client: httpx.AsyncClient | None = None
        self.service = IngestService(
            specs=self.specs,
            pseudonymize=Pseudonymizer(settings.pseudonym_key.get_secret_value().encode()),
            producer=self.producer,
            store=self.store,
            publish_requests=self.publish_requests,
            publish_states=self.publish_states,
            limits=Limits(
                settings.max_json_depth,
                settings.max_bundle_entries,
                settings.max_waveform_samples,
                max_waveform_seconds=settings.max_waveform_seconds,
                max_nodes=settings.max_json_nodes,
            ),
            lookback=timedelta(minutes=settings.readings_lookback_minutes),
            max_fetched=settings.max_fetched_resources,
            publish_timeout_s=settings.publish_timeout_s,
        )

    async def publish_requests(self, outgoing: Sequence[Outgoing]) -> list[BaseException | None]:
        """Publish requests, each in the trace of the payload that caused it; once every one
        is settled, None for each acknowledged and the error of each other."""
        sent: list[object] = []
        for item in outgoing:
            with within(item.trace):
                sent.append(await _handed_over(self._send_request(item.request)))
        return [_error_of(settled) for settled in await _settled(sent)]

    async def _send_request(self, request: RequestInference) -> object:
        """Hand one request to the producer: its acknowledgement."""
        return await self.requests_out.publish(
            to_wire(request),
            key=request.patient_pseudonym.encode(),
            headers=message_headers(request.correlation_id, schema_of(type(request)))
            | routing_headers(request),
            correlation_id=request.correlation_id,
            no_confirm=True,
        )

    async def publish_states(
        self, states: Sequence[PatientReadingsUpdated]
    ) -> list[BaseException | None]:
        """Publish patients' states to the compacted topic, each on its pseudonym's partition;
        once every one is settled, None for each acknowledged and the error of each other.

        Untraced: a state is ingest's own bookkeeping, not a hop of the request's trace, and
        its two publish spans per event cost more CPU than the rest of the publish.
        """
        with untraced():
            sent = [await _handed_over(self._send_state(state)) for state in states]
        outcomes = await _settled(sent)
        for state, settled in zip(states, outcomes, strict=True):
            if isinstance(settled, RecordMetadata):  # the in-memory test broker gives none
                key = state_key(state.patient_pseudonym, state.model)
                self.store.written(key, settled.offset)
        return [_error_of(settled) for settled in outcomes]

    async def _send_state(self, state: PatientReadingsUpdated) -> object:
        """Hand one state to the producer (on its pseudonym's partition): its acknowledgement."""
        partition = (
            partition_of(state.patient_pseudonym, self.state_partitions)
            if self.state_partitions
            else None
        )
        return await self.state_out.publish(
            to_wire(state),
            key=state_key(state.patient_pseudonym, state.model).encode(),
            partition=partition,
            headers=message_headers(state.correlation_id, schema_of(PatientReadingsUpdated)),
            no_confirm=True,
        )

    def fetcher(self, source: Source) -> Fetch | None:
        """How to fetch id-only notification content for this source (None: not configured)."""
        if source.base_url is None or self.http_client is None:
            return None
        return http_fetcher(
            source.base_url,
            source.fetch_token,
            timeout_s=self.settings.fetch_timeout_s,
            max_bytes=self.settings.max_payload_bytes,
            client=self.http_client,
        )

    async def handle(self, raw: bytes, context: Context) -> Answer:
        """The service's answer, inside a span."""
        with self.tracer.start_as_current_span("ingest.handle"):
            return await self.service.handle(raw, context, utc_now())

    # --- Kafka ---------------------------------------------------------------------------------

    async def on_inbound_events(self, message: KafkaMessage) -> None:
        """A poll of medmesh.fhir.inbound: each event prepared in turn, then all applied at once
        (their requests and states published together), then the rejected events
        dead-lettered, and one offset commit for the poll.

        In turn, not concurrently: one patient's events must merge in arrival order, and
        ``apply`` keeps that order. Kafka or source-server failures propagate once the events
        before the failure are applied, so the poll is redelivered (NACK); the events already
        applied then come again and are recognised as duplicates. Rejected events are
        dead-lettered only once the poll went through, so a redelivered poll does not
        dead-letter them again.
        """
        records = tuple(message.raw_message)  # a batch message holds a tuple of records
        ready: list[Prepared] = []
        rejections: list[tuple[Any, Answer, otel_context.Context]] = []
        failure: SourceUnavailableError | None = None
        for record in records:
            with consumer_span(self.tracer, record, self.settings.ingest_group_id):
                try:
                    prepared = await self.prepare_inbound(record)
                except SourceUnavailableError as exc:
                    failure = exc
                    break
                if isinstance(prepared, Prepared):
                    ready.append(prepared)
                elif prepared.rejected:
                    rejections.append((record, prepared, otel_context.get_current()))
        answers = await self.service.apply(ready) if ready else []
        log.info(
            "inbound poll processed",
            events=len(records),
            applied=len(answers),
            requests=sum(len(a.requests) for a in answers),
            rejected=len(rejections),
            first_offset=records[0].offset if records else None,
        )
        if failure is not None:
            raise failure
        for record, answer, trace in rejections:
            with within(trace):  # in the rejected event's own trace
                await self.dead_letter(record, record.value or b"", answer)

    async def prepare_inbound(self, record: Any) -> Prepared | Answer:
        """One event from medmesh.fhir.inbound, parsed and checked (an Answer: not to merge)."""
        raw: bytes = record.value or b""
        source = self.auth.default_source
        try:
            version = self.inbound_version(record, raw, source)
        except FhirRejected as problem:
            return Answer(problem.status, problem.outcome)
        with self.tracer.start_as_current_span("ingest.handle"):
            context = Context(
                SourceContext(channel="kafka", fhir_version=version),
                version,
                fetch=self.fetcher(source),
                trace=otel_context.get_current(),  # its requests are published in this span
            )
            return await self.service.prepare(raw, context, utc_now())

    def inbound_version(self, record: Any, raw: bytes, source: Source) -> FhirVersion:
        """The FHIR version of an inbound event (its content-type header, else the default).

        Raises FhirRejected for an event over the size limit or of a version not spoken.
        """
        if len(raw) > self.settings.max_payload_bytes:
            raise FhirRejected(TOO_LARGE, _too_large_outcome())
        content_type = record_headers(record).get("content-type", "")
        if "fhirversion" not in content_type.lower():
            # Kafka clients set content types of their own (or none): only a FHIR one counts.
            return source.fhir_version
        return requested_version(content_type, source.fhir_version)

    async def dead_letter(self, record: Any, raw: bytes, answer: Answer) -> None:
        """Publish the rejected event whole, with its offset and OperationOutcome."""
        rejected = rejected_event(
            record,
            answer.operation_outcome,
            self.producer,
            max_bytes=self.settings.dead_letter_max_bytes,
        )
        await self.invalid_out.publish(
            to_wire(rejected),
            key=record.key,
            headers=message_headers(rejected.correlation_id, schema_of(FhirEventRejected)),
        )
        log.warning(
            "inbound event rejected",
            status=answer.status,
            partition=record.partition,
            offset=record.offset,
            dead_letter_topic=topics.FHIR_INVALID,
        )

    # --- HTTP ----------------------------------------------------------------------------------

    async def on_http(self, request: Request, resource_type: str | None) -> Response:
        """One HTTP POST: a 2xx is sent after Kafka acknowledged everything it caused."""
        incoming = propagate.extract(dict(request.headers))
        with self.tracer.start_as_current_span(
            f"POST {request.url.path}", kind=SpanKind.SERVER, context=incoming
        ) as span:
            trace_id = trace_id_hex(span)
            source = self.auth.source(request.headers.get("authorization"))
            if source is None:
                return unauthorized(trace_id)
            try:
                version = requested_version(
                    request.headers.get("content-type"), source.fhir_version
                )
                raw = await self.read_body(request)
            except FhirRejected as problem:
                return fhir_response(problem.status, problem.outcome, trace_id)
            context = Context(
                SourceContext(
                    channel="http",
                    fhir_version=version,
                    site=source.site,
                    source_system=None if source.name == "default" else source.name,
                ),
                version,
                resource_type,
                self.fetcher(source),
            )
            try:
                answer = await self.handle(raw, context)
            except (KafkaUnavailableError, SourceUnavailableError) as exc:
                return self.unavailable(exc, trace_id)
            log.info(
                "http payload handled",
                status=answer.status,
                requests=len(answer.requests),
                issues=len(answer.issues),
            )
            return fhir_response(
                answer.status,
                answer.operation_outcome,
                trace_id,
                correlation_ids=[r.correlation_id for r in answer.requests],
            )

    async def read_body(self, request: Request) -> bytes:
        """The body, read no further than the size limit (413 beyond it)."""
        limit = self.settings.max_payload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FhirRejected(TOO_LARGE, _too_large_outcome())
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise FhirRejected(TOO_LARGE, _too_large_outcome())
            chunks.append(chunk)
        return b"".join(chunks)

    def unavailable(self, exc: Exception, trace_id: str) -> Response:
        """503 with Retry-After: nothing (or not all) of the payload is durably taken."""
        if isinstance(exc, KafkaUnavailableError):
            log.error("publishing to Kafka failed; answering 503", error=str(exc))
            text = f"could not store the request durably ({exc}); retry later"
        else:
            log.warning("the source FHIR server failed; answering 503", error=str(exc))
            text = f"could not fetch the notification's resources from the source: {exc}"
        response = fhir_response(503, outcome((Issue("error", "transient", text),)), trace_id)
        response.headers["retry-after"] = str(self.settings.retry_after_s)
        return response


async def _settled(sent: Sequence[object]) -> list[object]:
    """Each send's outcome once all are settled: its RecordMetadata or its error (an error
    already raised when handing it over stays as it is).

    No timeout here: the service times the publish out and keeps it in doubt (a producer does
    not withdraw a message whose wait was given up).
    """
    # faststream's in-memory test broker returns None instead of a future (nothing to await).
    futures = [f for f in sent if isinstance(f, asyncio.Future)]
    settled = iter(await asyncio.gather(*futures, return_exceptions=True))
    return [next(settled) if isinstance(f, asyncio.Future) else f for f in sent]


async def _handed_over(send: Awaitable[object]) -> object:
    """What handing one message to the producer gave: its acknowledgement future, or the
    error raised on the way (that message is not taken; the service raises it)."""
    try:
        return await send
    except Exception as exc:  # noqa: BLE001 -- kept as that message's outcome, raised by the service
        return exc


def _error_of(settled: object) -> BaseException | None:
    return settled if isinstance(settled, BaseException) else None


async def _records_undecoded(_message: Any) -> None:
    """The inbound handler reads the records' bytes itself (``message.raw_message``): this
    spares faststream's decoding of every record as JSON, which nothing uses."""
    return None


def _too_large_outcome() -> dict[str, Any]:
    return outcome((Issue("error", "too-costly", "payload exceeds the size limit"),))


def unauthorized(trace_id: str) -> Response:
    """401 with an OperationOutcome and the bearer challenge."""
    issue = Issue("error", "login", "a valid bearer token is required (Authorization: Bearer ...)")
    response = fhir_response(401, outcome((issue,)), trace_id)
    response.headers["www-authenticate"] = 'Bearer realm="medmesh"'
    return response


def create_app(settings: IngestSettings, *, service: str = SERVICE) -> FastAPI:
    """Build the ingest ASGI app; Kafka connects in its lifespan, not here.

    ``service`` names the process in logs, spans and metrics (the monolith topology serves this
    same app as "monolith"). Raises ValueError when asked to listen beyond loopback without
    bearer tokens.
    """
    check_listen_address(settings)
    configure_logging(service, settings.log_level)
    tracer_provider = configure_service_tracing(service, settings)
    broker = build_broker(settings, service, tracer_provider)
    ingest = Ingest(settings, broker, tracer_provider.get_tracer("medmesh.ingest"))
    # Batches: one synchronous offset commit per poll instead of one per event.
    broker.subscriber(
        topics.FHIR_INBOUND,
        batch=True,
        max_records=settings.inbound_max_batch,
        batch_timeout_ms=settings.inbound_batch_wait_ms,
        group_id=settings.ingest_group_id,
        auto_offset_reset="earliest",
        ack_policy=CONSUMER_ACK_POLICY,
        decoder=_records_undecoded,
        title="inbound FHIR events",
    )(ingest.on_inbound_events)

    lag = LagMonitor(settings, settings.ingest_group_id)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY:
            log.warning("development pseudonym key in use; set MEDMESH_PSEUDONYM_KEY in production")
        if not ingest.auth.required:
            log.warning("no bearer tokens configured: listening on loopback only")
        follower = ReadingsFollower(ingest.store, settings)
        if settings.rebuild_readings_on_start:
            ingest.state_partitions = await follower.start()
        ingest.http_client = httpx.AsyncClient(follow_redirects=False)
        await broker.start()
        await lag.start()
        ingest.ready = True
        log.info("ingest started", models=sorted(ingest.specs), port=settings.ingest_port)
        try:
            yield
        finally:
            ingest.ready = False
            await lag.stop()
            await broker.stop()
            await follower.stop()
            await ingest.http_client.aclose()
            tracer_provider.shutdown()

    # The API description is for development (MEDMESH_HTTP_DOCS): in production it only tells a
    # caller which routes to probe.
    docs = settings.http_docs
    app = FastAPI(
        title="medmesh ingest",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )

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
        ready = ingest.ready and await broker.ping(timeout=2.0)
        return Response(status_code=204 if ready else 503)

    # /metrics is answered in front of this app by medmesh_runtime.serve (metricsgate).

    app.state.broker = broker
    app.state.ingest = ingest
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
