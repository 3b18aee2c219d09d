"""The ingest service: FHIR over HTTP (FastAPI) and from medmesh.fhir.inbound (``inbound``).

Thin by design: it authenticates, checks the transport (media type, FHIR version, size), hands
the payload to ``service.IngestService`` and translates its ``Answer``. A 2xx is sent only after
every message the payload caused (its requests and patient states) was committed to Kafka in
one transaction (acks=all); otherwise 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Tracer

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    FhirEventRejected,
    FhirVersion,
    PatientReadingsUpdated,
    Producer,
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
from medmesh_ingest.inbound import DeliverRequests, InboundPoll
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
from medmesh_ingest.validation import Limits
from medmesh_runtime.deadletter import rejected_event
from medmesh_runtime.kafka import (
    message_headers,
    record_headers,
    stage_clients,
)
from medmesh_runtime.logging import get_logger
from medmesh_runtime.service import ServiceRuntime
from medmesh_runtime.telemetry import (
    publish_headers,
    trace_id_hex,
    within,
)
from medmesh_runtime.transactional import (
    GroupCommit,
    LoopSettings,
    OutgoingRecord,
    StageClients,
    TransactionalLoop,
    encoded_headers,
)

SERVICE = "ingest"
FHIR_JSON = "application/fhir+json"
log = get_logger("medmesh.ingest")


class Ingest:
    """The two entrypoints (HTTP and inbound topic) over one IngestService and its publishers."""

    def __init__(
        self,
        settings: IngestSettings,
        broker: KafkaBroker,
        tracer: Tracer,
        *,
        publish_requests: DeliverRequests | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer
        # None: requests are produced to medmesh.inference.requests with the patient states.
        self.publish_requests = publish_requests
        self.specs = load_specs(settings.model_specs_dir)
        self.auth = Authenticator(settings)
        self.producer = Producer(service=SERVICE, instance=settings.instance_id)
        # Set when the app starts: commits the HTTP path's requests and states together.
        self.group_commit: GroupCommit | None = None
        # The inbound topic's poll processor (set by create_app).
        self.inbound: InboundPoll | None = None
        self.store = ReadingsStore(max_bytes=settings.readings_max_bytes)
        # Partitions of the state topic, known once it was read on start (None: key hashing).
        self.state_partitions: int | None = None
        self.ready = False
        self.http_client: httpx.AsyncClient | None = None
        self.service = IngestService(
            specs=self.specs,
            pseudonymize=Pseudonymizer(settings.pseudonym_key.get_secret_value().encode()),
            producer=self.producer,
            store=self.store,
            publish=self.publish,
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

    async def publish(
        self,
        requests: Sequence[Outgoing],
        states: Sequence[PatientReadingsUpdated],
        payloads: int,
    ) -> list[int | None]:
        """Commit an HTTP payload's requests and patient states in one transaction (shared with
        concurrent payloads: group commit); each state's offset on its topic. With
        ``publish_requests``, the requests are handed to it first and only the states commit."""
        if self.publish_requests is not None:
            await self.publish_requests(requests)
            requests = ()
        if self.group_commit is None:
            raise KafkaUnavailableError("ingest has not started its Kafka producer")
        written = await self.group_commit.publish(
            [*self.request_records(requests), *self.state_records(states)]
        )
        return [getattr(w, "offset", None) for w in written[len(requests) :]]

    def request_records(self, requests: Sequence[Outgoing]) -> list[OutgoingRecord]:
        """Each request as a record keyed by its pseudonym, in the trace of its payload."""
        records = []
        for item in requests:
            request = item.request
            with within(item.trace):
                headers = publish_headers(
                    self.tracer,
                    topics.INFERENCE_REQUESTS,
                    request.correlation_id,
                    schema_of(type(request)),
                )
            records.append(
                OutgoingRecord(
                    topics.INFERENCE_REQUESTS,
                    request.patient_pseudonym.encode(),
                    to_wire(request),
                    encoded_headers(headers | routing_headers(request)),
                )
            )
        return records

    def state_records(self, states: Sequence[PatientReadingsUpdated]) -> list[OutgoingRecord]:
        """Each patient state as a record of the compacted topic, on its pseudonym's partition.

        Untraced: a state is ingest's own bookkeeping, not a hop of the request's trace.
        """
        return [
            OutgoingRecord(
                topics.INGEST_READINGS,
                state_key(state.patient_pseudonym, state.model).encode(),
                to_wire(state),
                encoded_headers(
                    message_headers(state.correlation_id, schema_of(PatientReadingsUpdated))
                ),
                partition=(
                    partition_of(state.patient_pseudonym, self.state_partitions)
                    if self.state_partitions
                    else None
                ),
            )
            for state in states
        ]

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

    def rejection_record(self, record: Any, answer: Answer) -> OutgoingRecord:
        """The rejected event kept whole (up to the dead-letter bound), with its offset and
        OperationOutcome, for medmesh.fhir.invalid; in the event's trace."""
        rejected = rejected_event(
            record,
            answer.operation_outcome,
            self.producer,
            max_bytes=self.settings.dead_letter_max_bytes,
        )
        headers = publish_headers(
            self.tracer, topics.FHIR_INVALID, rejected.correlation_id, schema_of(FhirEventRejected)
        )
        log.warning(
            "inbound event rejected",
            status=answer.status,
            partition=record.partition,
            offset=record.offset,
            dead_letter_topic=topics.FHIR_INVALID,
        )
        return OutgoingRecord(
            topics.FHIR_INVALID, record.key, to_wire(rejected), encoded_headers(headers)
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


def _too_large_outcome() -> dict[str, Any]:
    return outcome((Issue("error", "too-costly", "payload exceeds the size limit"),))


def unauthorized(trace_id: str) -> Response:
    """401 with an OperationOutcome and the bearer challenge."""
    issue = Issue("error", "login", "a valid bearer token is required (Authorization: Bearer ...)")
    response = fhir_response(401, outcome((issue,)), trace_id)
    response.headers["www-authenticate"] = 'Bearer realm="medmesh"'
    return response


async def _nothing() -> None:
    """No hook: ingest as a service."""


def create_app(
    settings: IngestSettings,
    *,
    service: str = SERVICE,
    clients: StageClients | None = None,
    publish_requests: DeliverRequests | None = None,
    on_start: Callable[[], Awaitable[None]] = _nothing,
    on_stop: Callable[[], Awaitable[None]] = _nothing,
) -> FastAPI:
    """Build the ingest ASGI app; Kafka connects in its lifespan, not here.

    ``service`` names the process in logs, spans and metrics (the monolith topology serves this
    same app as "monolith"). ``clients`` replaces the transactional Kafka clients (tests:
    in-memory fakes). Raises ValueError when asked to listen beyond loopback without bearer
    tokens.

    The monolith's points of composition (by default: ingest as a service): ``publish_requests``
    takes every payload's requests, from HTTP and from the inbound topic, instead of their being
    produced (the patient states still commit to Kafka in their transaction); ``on_start`` is
    awaited before ingest starts anything, ``on_stop`` once it takes no more payloads (the
    inbound poll stopped) and before its Kafka clients stop.
    """
    check_listen_address(settings)
    runtime = ServiceRuntime.build(service, settings, settings.ingest_group_id)
    broker = runtime.broker
    ingest = Ingest(
        settings,
        broker,
        runtime.tracer_provider.get_tracer("medmesh.ingest"),
        publish_requests=publish_requests,
    )
    kafka = clients or stage_clients(
        settings, f"medmesh-{service}-{settings.instance_id}", settings.ingest_group_id
    )
    ingest.inbound = InboundPoll(
        ingest, settings.ingest_group_id, deliver_requests=publish_requests
    )
    inbound = TransactionalLoop(
        kafka,
        ingest.inbound,
        LoopSettings(
            group_id=settings.ingest_group_id,
            topics=(topics.FHIR_INBOUND,),
            transactional_id_prefix=settings.ingest_group_id,
            max_records=settings.inbound_max_batch,
        ),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await on_start()
        if settings.pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY:
            log.warning("development pseudonym key in use; set MEDMESH_PSEUDONYM_KEY in production")
        if not ingest.auth.required:
            log.warning("no bearer tokens configured: listening on loopback only")
        follower = ReadingsFollower(ingest.store, settings)
        if settings.rebuild_readings_on_start:
            ingest.state_partitions = await follower.start()
        ingest.http_client = httpx.AsyncClient(follow_redirects=False)
        await broker.start()
        # Per instance: a restart with the same MEDMESH_INSTANCE_ID aborts what it left open.
        ingest.group_commit = GroupCommit(
            kafka.producer, f"{settings.ingest_group_id}-http-{settings.instance_id}"
        )
        await ingest.group_commit.start()
        inbound_task = asyncio.create_task(inbound.run(), name="ingest-inbound")
        await runtime.start()
        ingest.ready = True
        log.info("ingest started", models=sorted(ingest.specs), port=settings.ingest_port)
        try:
            yield
        finally:
            ingest.ready = False
            inbound_task.cancel()
            await asyncio.gather(inbound_task, return_exceptions=True)
            await on_stop()
            await ingest.group_commit.stop()
            await broker.stop()
            await follower.stop()
            await ingest.http_client.aclose()
            await runtime.stop()

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
